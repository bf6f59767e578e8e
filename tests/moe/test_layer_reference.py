"""The MoE layer must equal a naive per-token loop, in output and in every gradient, for every router."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megamoe.config import MoEConfig
from megamoe.moe.layer import MoEFeedForward
from megamoe.moe.routers import ROUTERS, RoutingContext

DIM, FFN, B, L, L_TEXT = 16, 32, 2, 6, 5
TOL = dict(atol=1e-5, rtol=1e-5)
TOKEN_CHOICE = ("linear", "mlp", "cross_attention")

# Variants run for the token-choice routers (the shared defaults already cover shared experts).
VARIANTS = {
    "plain": {},
    "null_experts": dict(num_null_experts=2),
    "bias_balancing": dict(bias_balancing=True),
    "sigmoid_no_renorm": dict(score_func="sigmoid", renormalize=False),
    "top1_fine_grained": dict(top_k=1, expert_ffn_dim=16, num_shared_experts=0),
}


# Routers whose defaults do not fit 4 experts at top-2: two timestep bands of 3 experts (top-2 of 3, so the
# balance loss acts), an MLP picking in each.
ROUTER_DEFAULTS = {
    "timestep_band": dict(num_experts=6, timestep_band_router="mlp", timestep_band_boundaries=[500.0]),
    "expert_race": dict(race_gate="mlp"),  # reads router_hidden_dim (below) only with the MLP gate
}


def make_cfg(router: str, **overrides) -> MoEConfig:
    base = dict(num_experts=4, top_k=2, router=router, num_shared_experts=2, shared_ffn_dim=8)
    base.update(ROUTER_DEFAULTS.get(router, {}))
    optional = dict(router_hidden_dim=16, balance_loss=0.01, z_loss=0.001)  # where the router reads them
    base.update({k: v for k, v in optional.items() if k in ROUTERS[router].config_keys})
    base.update(overrides)
    return MoEConfig(**base)


def make_context(gen: torch.Generator) -> RoutingContext:
    text = torch.randn(B, L_TEXT, DIM, generator=gen)
    text[1] = torch.randn(DIM, generator=gen)  # sample 1 is unconditional: the projected null text
    return RoutingContext(
        batch_size=B,
        seq_len=L,
        temb=torch.randn(B, DIM, generator=gen),
        text=text,
        is_null=torch.tensor([False, True]),
        timestep=torch.tensor([300.0, 800.0]),
    )


def reference(layer: MoEFeedForward, x: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor):
    """sum over the selected real experts e of probs[t, e] * ffn_e(x_t), plus the shared FFN,
    one token and one expert at a time with plain matmuls."""
    ex = layer.experts
    tokens = x.reshape(-1, DIM)
    rows = []
    for t in range(tokens.shape[0]):
        acc = torch.zeros(DIM)
        for e in routing_map[t].nonzero().flatten().tolist():
            if e >= layer.num_experts:
                continue  # null expert: zero output
            h = F.gelu(tokens[t] @ ex.w1[e] + ex.b1[e], approximate="tanh")
            acc = acc + probs[t, e] * (h @ ex.w2[e] + ex.b2[e])
        if layer.shared is not None:
            up, down = layer.shared.net[0].proj, layer.shared.net[2]
            h = F.gelu(tokens[t] @ up.weight.T + up.bias, approximate="tanh")
            acc = acc + h @ down.weight.T + down.bias
        rows.append(acc)
    return torch.stack(rows).view_as(x)


def check_layer(cfg: MoEConfig, use_grouped_mm=None, seed: int = 0):
    torch.manual_seed(seed)
    layer = MoEFeedForward(DIM, FFN, cfg)
    layer.experts.use_grouped_mm = use_grouped_mm
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-zero biases, so a bias applied to the wrong expert shows
        layer.experts.b1.normal_(generator=gen)
        layer.experts.b2.normal_(generator=gen)
        if getattr(layer.router, "expert_bias", None) is not None:
            layer.router.expert_bias.normal_(0, 0.3, generator=gen)  # selection must differ from plain top-k
    x = torch.randn(B, L, DIM, generator=gen, requires_grad=True)
    ctx = make_context(gen)
    cotangent = torch.randn(B, L, DIM, generator=gen)

    y_plain = layer(x, ctx)  # the layer end to end, its own router call
    routed = layer.router(x.reshape(-1, DIM), ctx)  # one router call shared by both paths below
    layer.router.forward = lambda tokens, ctx: routed
    y = layer(x, ctx)
    y_ref = reference(layer, x, routed.probs, routed.routing_map)
    torch.testing.assert_close(y_plain, y_ref, **TOL)
    torch.testing.assert_close(y, y_ref, **TOL)

    params = dict(layer.named_parameters())
    names = list(params)
    inputs = [x] + [params[n] for n in names]
    grads = torch.autograd.grad(y, inputs, cotangent, retain_graph=True, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, inputs, cotangent, allow_unused=True)
    for name, g, g_ref, p in zip(["input"] + names, grads, grads_ref, inputs):
        g = torch.zeros_like(p) if g is None else g
        g_ref = torch.zeros_like(p) if g_ref is None else g_ref
        torch.testing.assert_close(g, g_ref, **TOL, msg=lambda m: f"gradient of {name}: {m}")
    router_grads = [g for n, g in zip(names, grads[1:]) if n.startswith("router.") and g is not None]
    return layer, routed, router_grads


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_router_matches_reference(router):
    _, _, router_grads = check_layer(make_cfg(router))
    if router in TOKEN_CHOICE:
        assert router_grads and any(g.abs().sum() > 0 for g in router_grads), "router got no gradient"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("router", TOKEN_CHOICE)
def test_token_choice_variants_match_reference(router, variant):
    layer, routed, _ = check_layer(make_cfg(router, **VARIANTS[variant]))
    if variant == "null_experts":
        assert routed.routing_map[:, layer.num_experts :].any(), "test should route some tokens to null experts"


@pytest.mark.parametrize("use_grouped_mm", [False, True])
def test_both_expert_paths_match_reference(use_grouped_mm):
    check_layer(make_cfg("linear", num_null_experts=1), use_grouped_mm=use_grouped_mm)


def test_record_keeps_routing_for_diagnostics():
    cfg = make_cfg("linear")
    layer = MoEFeedForward(DIM, FFN, cfg)
    ctx = make_context(torch.Generator().manual_seed(0))
    layer(torch.randn(B, L, DIM), ctx)
    assert layer.last_routing is None
    layer.record = True
    layer(torch.randn(B, L, DIM), ctx)
    probs, routing_map, got_ctx = layer.last_routing
    assert probs.shape == routing_map.shape == (B * L, 4) and not probs.requires_grad and got_ctx is ctx
    assert set(layer.aux) == {"balance", "z"}


def test_dataclass_config_not_mutated():
    cfg = make_cfg("mlp")
    before = dataclasses.asdict(cfg)
    check_layer(cfg)
    assert dataclasses.asdict(cfg) == before


@pytest.mark.parametrize("use_grouped_mm", [None, False])
def test_bf16_layer_close_to_fp32(use_grouped_mm):
    """bf16 weights and input: same routing as fp32 on the same (bf16-representable) values, output
    within bf16 rounding, returned in bf16; autocast runs the experts in bf16 as nn.Linear would."""
    torch.manual_seed(0)
    cfg = make_cfg("cross_attention", num_null_experts=1)
    layer = MoEFeedForward(DIM, FFN, cfg).bfloat16()
    layer.experts.use_grouped_mm = use_grouped_mm
    ref = MoEFeedForward(DIM, FFN, cfg)
    ref.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, L, DIM, generator=gen).bfloat16()
    ctx = make_context(gen)
    ctx.text, ctx.temb = ctx.text.bfloat16(), ctx.temb.bfloat16()
    y = layer(x, ctx)
    y_ref = ref(x.float(), ctx)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref, atol=0.05, rtol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_auto = ref(x.float(), ctx)
    torch.testing.assert_close(y_auto.float(), y_ref, atol=0.05, rtol=0.05)
