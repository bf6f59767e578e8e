"""A merged MoE layer (MC-SMoE, model.moe.merged_from): the router scores the experts before
merging and the layer folds its columns onto the merged experts. Reference: a per-token loop
that adds, for each router column a token chose, its weight times its merged expert's FFN."""

import pytest
import torch
import torch.nn.functional as F

from megamoe.config import Config, ConfigError, ModelConfig, MoEConfig
from megamoe.config_checks import validate
from megamoe.moe.layer import MoEFeedForward
from megamoe.moe.routers import RoutingContext

DIM, FFN = 16, 24


def merged_layer(router="linear", **kw):
    torch.manual_seed(0)
    layer = MoEFeedForward(DIM, FFN, MoEConfig(num_experts=3, merged_from=7, top_k=3, router=router, **kw))
    with torch.no_grad():
        layer.experts.b1.normal_(0, 0.1)
        layer.experts.b2.normal_(0, 0.1)
        layer.expert_map.copy_(torch.tensor([2, 0, 2, 1, 0, 2, 2]))  # groups of 2, 1 and 4 columns
    return layer


def loop_reference(layer, x):
    """Per token: sum over the chosen router columns c of probs[c] * expert_map[c]'s FFN (both biases)."""
    tokens = x.reshape(-1, DIM)
    routed = layer.router(tokens, RoutingContext(batch_size=x.shape[0], seq_len=x.shape[1]))
    e = layer.experts
    out = []
    for t in range(tokens.shape[0]):
        y = torch.zeros(DIM)
        for c in routed.routing_map[t].nonzero().flatten().tolist():
            k = int(layer.expert_map[c])
            h = F.gelu(tokens[t] @ e.w1[k] + e.b1[k], approximate="tanh")
            y = y + routed.probs[t, c] * (h @ e.w2[k] + e.b2[k])
        out.append(y)
    y = torch.stack(out)
    if layer.shared is not None:
        y = y + layer.shared(x).reshape(-1, DIM)
    return y.reshape(x.shape)


@pytest.mark.parametrize("router, kw", [("linear", {}), ("linear", {"num_shared_experts": 1}), ("expert_choice", {})])
def test_folded_layer_matches_per_token_loop(router, kw):
    layer = merged_layer(router, **kw)
    x = torch.randn(2, 9, DIM, generator=torch.Generator().manual_seed(1), requires_grad=True)
    w = torch.randn(2, 9, DIM, generator=torch.Generator().manual_seed(2))
    ctx_free = layer(x)
    (ctx_free * w).sum().backward()
    got = {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in layer.named_parameters()}}
    layer.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    ref = loop_reference(layer, x2)
    (ref * w).sum().backward()
    want = {"x": x2.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    torch.testing.assert_close(ctx_free, ref, rtol=0, atol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_tokens_choosing_two_members_are_computed_once():
    layer = merged_layer()
    layer.record = True
    layer(torch.randn(1, 50, DIM))
    probs, routing_map, _ = layer.last_routing
    assert probs.shape == routing_map.shape == (50, 3)
    assert int(routing_map.sum()) < 50 * 3  # top-3 of 7 columns often lands twice in a group of 4
    torch.testing.assert_close(probs.sum(1), torch.ones(50))  # renormalised weights survive folding


@pytest.mark.parametrize(
    "moe, key",
    [
        (dict(num_experts=4, merged_from=4), "merged_from=4 must exceed"),
        (dict(num_experts=4, merged_from=8, num_null_experts=1), "num_null_experts=1 cannot be combined"),
        (dict(num_experts=4, merged_from=-1), "merged_from must be >= 0"),
        (dict(num_experts=2, merged_from=8, top_k=3), "top_k=3"),  # fine: 8 router columns; the check is the router's
    ],
)
def test_config_rules(moe, key):
    cfg = Config(model=ModelConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=64, moe=MoEConfig(**moe)))
    if key == "top_k=3":
        validate(cfg)  # top_k counts router columns, not merged experts
        return
    with pytest.raises(ConfigError, match=key):
        validate(cfg)


def test_a_dense_model_is_not_upcycled_into_a_merged_one():
    from megamoe.moe.upcycle import slices_per_ffn

    cfg = ModelConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=64, moe=MoEConfig(num_experts=4, merged_from=8))
    with pytest.raises(ValueError, match="cannot be upcycled into a merged one"):
        slices_per_ffn(cfg)
