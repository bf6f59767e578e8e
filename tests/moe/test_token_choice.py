"""Token-choice selection, null experts, aux-free bias balancing, experts, dispatch, losses, layer parsing."""

import math

import pytest
import torch
import torch.nn.functional as F

from megamoe.config import ModelConfig, MoEConfig
from megamoe.moe.dispatch import LocalDispatcher, expert_assignments
from megamoe.moe.experts import GroupedExperts
from megamoe.moe.layer import MoEFeedForward, moe_layer_indices
from megamoe.moe.losses import switch_balance_loss, z_loss
from megamoe.moe.routers import RoutingContext, build_router
from megamoe.moe.routers.token_choice import select_top_k

DIM, B, L = 16, 2, 8
TOKEN_CHOICE = ("linear", "mlp", "cross_attention")


def ctx_for(b=B, l=L, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return RoutingContext(
        batch_size=b,
        seq_len=l,
        temb=torch.randn(b, DIM, generator=gen),
        text=torch.randn(b, 3, DIM, generator=gen),
        is_null=torch.zeros(b, dtype=torch.bool),
    )


def tokens(n=B * L, seed=1):
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("router", TOKEN_CHOICE)
@pytest.mark.parametrize("top_k", [1, 3])
def test_exactly_k_experts_and_weights_sum_to_one(router, top_k):
    torch.manual_seed(0)
    hidden = {} if router == "linear" else dict(router_hidden_dim=16)
    r = build_router(DIM, MoEConfig(num_experts=6, top_k=top_k, router=router, **hidden))
    out = r(tokens(), ctx_for())
    assert (out.routing_map.sum(1) == top_k).all()
    assert (out.probs[~out.routing_map] == 0).all() and (out.probs[out.routing_map] > 0).all()
    torch.testing.assert_close(out.probs.sum(1), torch.ones(B * L))


def test_sigmoid_scores_without_renormalisation():
    torch.manual_seed(0)
    r = build_router(DIM, MoEConfig(num_experts=6, top_k=2, score_func="sigmoid", renormalize=False))
    x = tokens()
    out = r(x, ctx_for())
    scores = torch.sigmoid(x @ r.gate.weight.T)
    expected = torch.zeros_like(scores).scatter(1, scores.topk(2).indices, scores.topk(2).values)
    torch.testing.assert_close(out.probs, expected)


def test_router_stays_fp32_when_module_is_bf16():
    torch.manual_seed(0)
    r = build_router(DIM, MoEConfig(num_experts=4, bias_balancing=True)).bfloat16()
    assert r.gate.weight.dtype == torch.bfloat16 and r.expert_bias.dtype == torch.float32
    out = r(tokens().bfloat16(), ctx_for())
    assert out.probs.dtype == torch.float32


def test_null_experts_cost_nothing_and_give_zero():
    cfg = MoEConfig(num_experts=2, num_null_experts=2, top_k=2, renormalize=False)
    layer = MoEFeedForward(DIM, 32, cfg)
    x = tokens()
    direction = torch.randn(DIM)
    with torch.no_grad():  # null logits +-20 along `direction`: tokens on its positive side pick both nulls
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[2:] = 20 * direction / direction.norm()
    to_null = x @ direction > 0
    assert 0 < to_null.sum() < len(x)
    seen = []
    forward = layer.experts.forward
    layer.experts.forward = lambda t, index, counts, w: (
        seen.append((index, counts.clone())) or forward(t, index, counts, w)
    )
    y = layer(x.view(B, L, DIM)).view(-1, DIM)
    assert (y[to_null] == 0).all() and (y[~to_null] != 0).any()
    index, counts = seen[0]
    assert len(index) == 2 * int((~to_null).sum()) and counts.tolist() == [int((~to_null).sum())] * 2
    assert not to_null[index].any()  # the experts never see a token routed to null experts only


def overloaded_router(rate=0.1, top_k=1):
    cfg = MoEConfig(num_experts=4, top_k=top_k, bias_balancing=True, bias_update_rate=rate)
    r = build_router(DIM, cfg)
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[0, 0] = 10.0  # tokens with x_0 > 0 all pick expert 0
    x = tokens(64).abs() + 0.1  # every x_0 > 0: expert 0 gets all the load
    return r, x


def test_bias_moves_away_from_overloaded_expert():
    r, x = overloaded_router()
    r.train()
    load = r(x, ctx_for(8, 8)).routing_map.sum(0)
    assert load[0] == 64
    calls = []
    r.after_step(lambda t: calls.append(1) or t)
    assert calls == [1] and r.load_counts is None
    assert r.expert_bias[0] == pytest.approx(-0.1) and (r.expert_bias[1:] == 0.1).all()


def test_bias_update_uses_reduced_counts_and_every_rank_reduces():
    r, x = overloaded_router()
    r.after_step(lambda t: t + torch.tensor([0, 5, 5, 5]))  # no local forward; "other ranks" overloaded 1..3
    assert r.expert_bias[0] == pytest.approx(0.1) and (r.expert_bias[1:] == -0.1).all()
    r.eval()
    r(x, ctx_for(8, 8))
    assert r.load_counts is None  # evaluation does not count


def test_bias_changes_selection_not_weights():
    r, x = overloaded_router(top_k=2)
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([-10.0, 0.0, 0.0, 0.0]))
    out = r(x, ctx_for(8, 8))
    assert not out.routing_map[:, 0].any()  # the highest score is never selected...
    scores = (x @ r.gate.weight.T).softmax(-1)
    picked = scores * out.routing_map
    torch.testing.assert_close(out.probs, picked / picked.sum(1, keepdim=True))  # ...weights are unbiased scores
    unbiased, _, _, _ = select_top_k(x @ r.gate.weight.T, r.cfg)
    assert unbiased[:, 0].gt(0).all()


def naive_experts(experts, x, index, counts, weights):
    """out[index[i]] += weights[i] * (expert_e(x[index[i]]) - b2[e]), one assignment at a time."""
    out = torch.zeros(x.shape[0], experts.dim, dtype=torch.float32)
    expert_of = torch.repeat_interleave(torch.arange(experts.num_experts), counts)
    for row, (i, e) in enumerate(zip(index.tolist(), expert_of.tolist())):
        h = F.gelu(x[i].float() @ experts.w1[e].float() + experts.b1[e].float(), approximate="tanh")
        out[i] = out[i] + weights[row] * (h @ experts.w2[e].float())
    return out


@pytest.mark.parametrize(
    "dim,hidden,dtype", [(16, 32, torch.float32), (24, 40, torch.float32), (8, 16, torch.bfloat16)]
)
@pytest.mark.parametrize("use_grouped_mm", [False, True])
def test_fused_experts_equal_naive_loop(dim, hidden, dtype, use_grouped_mm):
    """Both paths of the fused gather -> FFN -> weighted scatter-add, output and every gradient
    (input, weights, w1, b1, w2), against one assignment at a time; some tokens get two rows,
    some none, one expert none."""
    torch.manual_seed(0)
    experts = GroupedExperts(4, dim, hidden).to(dtype)
    experts.use_grouped_mm = use_grouped_mm
    with torch.no_grad():
        experts.b1.normal_()
    counts = torch.tensor([3, 0, 5, 1])
    index = torch.tensor([0, 2, 5, 1, 2, 3, 4, 6, 0])  # token 0 and 2 twice, token 7 never
    x = torch.randn(8, dim, dtype=dtype, requires_grad=True)
    weights = torch.rand(9, requires_grad=True)
    cotangent = torch.randn(8, dim)
    inputs = [x, weights, experts.w1, experts.b1, experts.w2]
    y = experts(x, index, counts, weights)
    y_ref = naive_experts(experts, x, index, counts, weights)
    assert y.dtype == torch.float32  # fp32 weights: the sum is fp32 whatever the experts' dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    assert (y[7] == 0).all()
    grads = torch.autograd.grad(y, inputs, cotangent)
    grads_ref = torch.autograd.grad(y_ref, inputs, cotangent)
    for name, g, g_ref in zip(["x", "weights", "w1", "b1", "w2"], grads, grads_ref):
        torch.testing.assert_close(g.float(), g_ref.float(), **tol, msg=lambda m: f"gradient of {name}: {m}")
    assert (grads[2][1] == 0).all()  # the expert with no tokens: zero (not missing) gradients


def test_grouped_mm_rules():
    experts = GroupedExperts(2, 6, 12)  # 24-byte rows: not 16-byte aligned
    x, index, w = torch.randn(4, 6), torch.arange(4), torch.ones(4)
    experts(x, index, torch.tensor([1, 3]), w)  # auto takes the loop
    experts.use_grouped_mm = True
    with pytest.raises(ValueError, match="grouped_mm"):
        experts(x, index, torch.tensor([1, 3]), w)
    empty = GroupedExperts(2, 16, 32)
    empty.use_grouped_mm = True  # zero rows still run (on the loop)
    w1 = empty.w1
    x = torch.zeros(3, 16, requires_grad=True)
    empty(x, torch.zeros(0, dtype=torch.long), torch.tensor([0, 0]), torch.zeros(0)).sum().backward()
    assert w1.grad is not None and (w1.grad == 0).all()  # no tokens: zero (not missing) gradients


def test_assignments_from_top_k_lists_equal_the_map_scan():
    """The sort of [N, k] ids and the scan of the [N, E] map give the same expert-major order,
    counts and weights, null experts dropped, and the weights carry the router's gradient."""
    torch.manual_seed(0)
    n, e_real, e_null, k = 50, 6, 2, 3
    logits = torch.randn(n, e_real + e_null, requires_grad=True)
    picked = logits.topk(k, dim=-1).indices
    routing_map = torch.zeros(n, e_real + e_null, dtype=torch.bool).scatter_(1, picked, True)
    probs = logits.softmax(-1) * routing_map
    by_sort = expert_assignments(probs, routing_map, e_real, picked)
    by_scan = expert_assignments(probs, routing_map, e_real)
    for field in ("token_index", "expert_index", "tokens_per_expert", "weights"):
        torch.testing.assert_close(getattr(by_sort, field), getattr(by_scan, field), atol=0, rtol=0)
    assert by_sort.tokens_per_expert.sum() < n * k  # some assignments went to null experts
    assert (by_sort.expert_index < e_real).all() and by_sort.expert_index.diff().ge(0).all()
    (g_sort,) = torch.autograd.grad(by_sort.weights.square().sum(), logits, retain_graph=True)
    (g_scan,) = torch.autograd.grad(by_scan.weights.square().sum(), logits)
    torch.testing.assert_close(g_sort, g_scan)


def test_local_dispatch_names_rows_expert_major():
    x = torch.arange(4.0)[:, None].repeat(1, 3)
    routing_map = torch.tensor([[0, 1, 1], [0, 0, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    probs = routing_map * torch.tensor([0.5, 0.25, 2.0])
    rows, index, counts, weights, state = (
        LocalDispatcher().dispatch(x, expert_assignments(probs, routing_map, 3)).wait()
    )
    assert rows is x and counts.tolist() == [1, 2, 2] and index.tolist() == [2, 0, 3, 0, 2]
    assert weights.tolist() == [0.5, 0.25, 0.25, 2.0, 2.0]


def test_balance_and_z_loss_closed_forms():
    e, n = 4, 8
    uniform = torch.full((n, e), 1 / e)
    cyclic = torch.eye(e, dtype=torch.bool).repeat(2, 1)
    assert switch_balance_loss(uniform, cyclic, e, 2, 4, "micro_batch").item() == pytest.approx(1.0)
    collapsed = torch.zeros(n, e, dtype=torch.bool)
    collapsed[:, 0] = True
    assert switch_balance_loss(collapsed.float(), collapsed, e, 2, 4, "sequence").item() == pytest.approx(e)
    # Per sequence: sample 0 all on expert 0, sample 1 all on expert 1 -> batch-balanced-ish, sequence-collapsed.
    split = torch.zeros(n, e, dtype=torch.bool)
    split[:4, 0] = split[4:, 1] = True
    assert switch_balance_loss(split.float(), split, e, 2, 4, "sequence").item() == pytest.approx(e)
    assert switch_balance_loss(split.float(), split, e, 2, 4, "micro_batch").item() == pytest.approx(e / 2)
    assert z_loss(torch.zeros(n, e)).item() == pytest.approx(math.log(e) ** 2)


def test_token_choice_aux_only_when_enabled():
    off = build_router(DIM, MoEConfig(num_experts=4))(tokens(), ctx_for())
    on = build_router(DIM, MoEConfig(num_experts=4, balance_loss=0.1, z_loss=0.1))(tokens(), ctx_for())
    assert off.aux == {} and set(on.aux) == {"balance", "z"} and on.aux["balance"].requires_grad


def model_cfg(layers, n=6, experts=4):
    return ModelConfig(num_layers=n, moe=MoEConfig(num_experts=experts, layers=layers))


def test_moe_layer_indices():
    assert moe_layer_indices(model_cfg("all")) == set(range(6))
    assert moe_layer_indices(model_cfg("every_other")) == {1, 3, 5}
    assert moe_layer_indices(model_cfg("0,4, 5")) == {0, 4, 5}
    assert moe_layer_indices(model_cfg("all", experts=0)) == set()
    for bad in ("odd", "0,6", "", "1,,2", "-1"):
        with pytest.raises(ValueError, match="model.moe.layers"):
            moe_layer_indices(model_cfg(bad))


def test_bad_router_config_names_the_key():
    with pytest.raises(ValueError, match="model.moe.top_k"):
        build_router(DIM, MoEConfig(num_experts=2, top_k=3))
    with pytest.raises(ValueError, match="model.moe.score_func"):
        build_router(DIM, MoEConfig(num_experts=2, score_func="relu"))
    with pytest.raises(ValueError, match="model.moe.router"):
        build_router(DIM, MoEConfig(num_experts=2, router="nope"))
