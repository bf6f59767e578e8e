"""Expert choice, Expert Race, ProMoE and Sinkhorn routers against closed forms and brute force."""

import math

import pytest
import torch

from megamoe.config import MoEConfig
from megamoe.moe.router_losses import layer_reg_loss, router_similarity_loss, routing_contrastive_loss
from megamoe.moe.routers.base import RoutingContext
from megamoe.moe.routers.expert_choice import ExpertChoiceRouter, expert_capacity
from megamoe.moe.routers.expert_race import ExpertRaceRouter
from megamoe.moe.routers.promoe import ProMoERouter
from megamoe.moe.routers.sinkhorn import SinkhornRouter

DIM = 16


def _cfg(**kw):
    base = dict(num_experts=4, top_k=2)
    base.update(kw)
    return MoEConfig(**base)


def _tokens(b, l, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b * l, DIM, generator=g), RoutingContext(batch_size=b, seq_len=l)


def _gate_scores(router, x):
    return x @ router.gate.weight.t()


# ---------------------------------------------------------------- expert choice


@pytest.mark.parametrize("scope", ["sample", "batch"])
def test_expert_choice_every_expert_takes_exactly_capacity(scope):
    torch.manual_seed(0)
    b, l, e, k = 3, 16, 4, 2
    router = ExpertChoiceRouter(DIM, _cfg(num_experts=e, top_k=k, expert_choice_scope=scope, capacity_factor=1.0))
    x, ctx = _tokens(b, l)
    out = router(x, ctx)
    scores = torch.softmax(_gate_scores(router, x), dim=-1)
    groups = out.routing_map.view(b, l, e) if scope == "sample" else out.routing_map.view(1, b * l, e)
    group_scores = scores.view(groups.shape)
    c = l * k // e if scope == "sample" else b * l * k // e
    assert (groups.sum(dim=1) == c).all()
    # The chosen tokens of each expert are its top-C by score (brute force per group and expert).
    for g in range(groups.shape[0]):
        for j in range(e):
            col = group_scores[g, :, j]
            assert col[groups[g, :, j]].min() >= col[~groups[g, :, j]].max()
    assert torch.equal(out.probs != 0, out.routing_map)
    torch.testing.assert_close(out.probs, scores * out.routing_map)


def test_expert_capacity_rounds_half_up_and_clamps():
    assert expert_capacity(1.0, 10, 1, 4) == 3  # 2.5 -> 3
    assert expert_capacity(0.01, 10, 1, 4) == 1
    assert expert_capacity(8.0, 10, 2, 4) == 10


# ---------------------------------------------------------------- expert race


def test_expert_race_training_selects_exactly_k_global_top_scores():
    torch.manual_seed(0)
    b, l, e, k = 2, 8, 4, 2
    router = ExpertRaceRouter(DIM, _cfg(num_experts=e, top_k=k)).train()
    x, ctx = _tokens(b, l)
    out = router(x, ctx)
    scores = _gate_scores(router, x)
    assert out.routing_map.sum() == b * l * k
    assert scores[out.routing_map].min() >= scores[~out.routing_map].max()
    torch.testing.assert_close(out.probs, scores * out.routing_map)  # identity scores are the weights


def test_expert_race_threshold_ema_closed_form():
    torch.manual_seed(0)
    e, k = 4, 2
    router = ExpertRaceRouter(DIM, _cfg(num_experts=e, top_k=k, race_threshold_decay=0.5)).train()

    def kth(x):
        return _gate_scores(router, x).flatten().topk(x.shape[0] * k).values[-1].item()

    def two_ranks(t):  # two identical data-parallel ranks: the average is unchanged
        return 2 * t

    x1, ctx1 = _tokens(2, 8, seed=1)
    router(x1, ctx1)
    router.after_step(two_ranks)
    assert router.threshold.item() == pytest.approx(kth(x1), abs=1e-6)  # the first update copies
    # Gradient accumulation: two forwards, one step; the step value is their mean.
    x2, ctx2 = _tokens(2, 8, seed=2)
    x3, ctx3 = _tokens(3, 4, seed=3)
    router(x2, ctx2)
    router(x3, ctx3)
    router.after_step(two_ranks)
    expected = 0.5 * kth(x1) + 0.5 * 0.5 * (kth(x2) + kth(x3))
    assert router.threshold.item() == pytest.approx(expected, abs=1e-6)
    # A step with no forward leaves it alone; decay 0 makes it the last step's K-th score.
    router.after_step(two_ranks)
    assert router.threshold.item() == pytest.approx(expected, abs=1e-6)
    router.cfg.race_threshold_decay = 0.0
    router(x3, ctx3)
    router.after_step(lambda t: t)
    assert router.threshold.item() == pytest.approx(kth(x3), abs=1e-6)
    assert "threshold" in router.state_dict() and "threshold_initialized" in router.state_dict()


def test_expert_race_inference_uses_threshold_and_is_batch_independent():
    torch.manual_seed(0)
    router = ExpertRaceRouter(DIM, _cfg(num_experts=4, top_k=2)).train()
    x, ctx = _tokens(4, 8)
    router(x, ctx)
    router.after_step(lambda t: t)
    router.eval()
    out = router(x, ctx)
    scores = _gate_scores(router, x)
    assert torch.equal(out.routing_map, scores >= router.threshold)
    torch.testing.assert_close(out.probs, scores * out.routing_map)
    one = router(x[:8], RoutingContext(batch_size=1, seq_len=8))  # sample 0 alone
    assert torch.equal(one.routing_map, out.routing_map[:8])
    torch.testing.assert_close(one.probs, out.probs[:8])


def test_expert_race_threshold_stays_fp32_under_module_casts():
    router = ExpertRaceRouter(DIM, _cfg(race_threshold_decay=0.99))
    router.threshold.fill_(1.0 + 1e-4)  # not representable in bf16
    router.to(torch.bfloat16)
    assert router.threshold.dtype == torch.float32 and router.threshold.item() == pytest.approx(1.0 + 1e-4)
    assert router.gate.weight.dtype == torch.bfloat16


def test_expert_race_eval_before_any_step_falls_back_to_top_k():
    router = ExpertRaceRouter(DIM, _cfg(num_experts=4, top_k=2)).eval()
    x, ctx = _tokens(2, 8)
    assert router(x, ctx).routing_map.sum() == 2 * 8 * 2


def test_expert_race_losses_contract():
    torch.manual_seed(0)
    cfg = _cfg(num_experts=4, top_k=2, similarity_loss=0.1, layer_reg_loss=0.5)
    with pytest.raises(ValueError, match="layer_reg_out_dim"):
        ExpertRaceRouter(DIM, cfg)
    router = ExpertRaceRouter(DIM, cfg, layer_reg_out_dim=12).train()
    x, ctx = _tokens(2, 8)
    x.requires_grad_(True)
    out = router(x, ctx)
    pred = out.aux["layer_reg_prediction"]
    assert pred.shape == (16, 12) and pred.dtype == torch.float32
    torch.testing.assert_close(pred, router.layer_reg_head(x))
    loss = layer_reg_loss(pred, torch.zeros(16, 12)) + out.aux["similarity"]
    loss.backward()
    assert router.layer_reg_head.weight.grad.abs().sum() > 0 and router.gate.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0  # the regularization reaches the layer's tokens, i.e. the backbone


def test_router_similarity_loss_matches_the_pairwise_formula():
    torch.manual_seed(0)
    n, e = 24, 4
    logits = torch.randn(n, e)
    routing_map = torch.rand(n, e) < 0.4
    p, m = torch.softmax(logits, -1), routing_map.float()
    hard = m.t() @ m
    diag_sum = hard.diagonal().sum()
    off_sum = hard.sum() - diag_sum
    expected = 0.0
    for i in range(e):
        for j in range(e):
            w = e * hard[i, i] / diag_sum if i == j else e * (e - 1) * hard[i, j] / off_sum
            expected += w * (p[:, i] * p[:, j]).sum() / n
    assert router_similarity_loss(logits, routing_map).item() == pytest.approx(expected.item(), rel=1e-5)


def test_router_similarity_loss_closed_forms():
    n, e = 8, 4
    sharp = torch.full((n, e), -50.0)
    sharp[torch.arange(n), torch.arange(n) % e] = 50.0
    # Balanced, one expert per token: 1.
    assert router_similarity_loss(sharp, sharp > 0).item() == pytest.approx(1.0, abs=1e-5)
    # Every token on expert 0: E.
    collapsed = torch.full((n, e), -50.0)
    collapsed[:, 0] = 50.0
    assert router_similarity_loss(collapsed, collapsed > 0).item() == pytest.approx(e, abs=1e-5)
    # Uniform soft routing with expert pairs selected: 1, whatever the pairs.
    pairs = torch.zeros(n, e, dtype=torch.bool)
    pairs[:, :2] = True
    assert router_similarity_loss(torch.zeros(n, e), pairs).item() == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------- ProMoE


def test_promoe_null_samples_go_to_the_unconditional_expert_only():
    torch.manual_seed(0)
    b, l, e, k = 3, 8, 5, 2
    router = ProMoERouter(DIM, _cfg(num_experts=e, top_k=k, num_prototypes_per_expert=2))
    x, _ = _tokens(b, l)
    ctx = RoutingContext(batch_size=b, seq_len=l, is_null=torch.tensor([False, True, False]))
    out = router(x, ctx)
    maps, probs = out.routing_map.view(b, l, e), out.probs.view(b, l, e)
    assert maps[1, :, e - 1].all() and maps[1, :, : e - 1].sum() == 0
    assert (probs[1, :, e - 1] == 1).all() and probs[1, :, : e - 1].abs().sum() == 0
    cond_maps, cond_probs = maps[[0, 2]], probs[[0, 2]]
    assert cond_maps[..., e - 1].sum() == 0
    assert (cond_maps.sum(-1) == k).all()
    torch.testing.assert_close(cond_probs.sum(-1), torch.ones(2, l))  # renormalised
    assert torch.equal(out.probs != 0, out.routing_map)
    # Selection is by the best prototype's cosine (brute force).
    protos = torch.nn.functional.normalize(router.prototypes, dim=-1).view(e - 1, 2, DIM)
    cos = torch.einsum("nd,epd->nep", torch.nn.functional.normalize(x, dim=-1), protos).amax(-1)
    cond_rows = torch.cat([torch.arange(0, 8), torch.arange(16, 24)])
    expected = torch.zeros(16, e - 1, dtype=torch.bool)
    expected.scatter_(1, cos[cond_rows].topk(k, dim=-1).indices, True)
    assert torch.equal(out.routing_map[cond_rows, : e - 1], expected)


def test_routing_contrastive_loss_two_prototype_closed_form():
    tau = 0.5
    protos = torch.eye(2, DIM)
    tokens = torch.eye(2, DIM) * 3.0  # each token sits on its prototype (norms do not matter)
    loss = routing_contrastive_loss(tokens, protos, torch.tensor([0, 1]), tau)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1 / tau)), rel=1e-5)
    # A token assigned to prototype 0 but halfway to prototype 1: moving it onto prototype 0 helps.
    off = torch.stack([protos[0] + protos[1], protos[1]])
    on = torch.stack([protos[0], protos[1]])
    assert routing_contrastive_loss(on, protos, torch.tensor([0, 1]), tau) < routing_contrastive_loss(
        off, protos, torch.tensor([0, 1]), tau
    )
    # One active prototype: no negative, zero loss.
    assert routing_contrastive_loss(tokens, protos, torch.tensor([0, 0]), tau).item() == 0.0
    # Prototypes of the same expert are not negatives of each other.
    grouped = routing_contrastive_loss(tokens, protos, torch.tensor([0, 1]), tau, groups=torch.tensor([0, 0]))
    assert grouped.item() == pytest.approx(0.0, abs=1e-6)


def test_promoe_contrastive_aux_has_gradient():
    torch.manual_seed(0)
    router = ProMoERouter(DIM, _cfg(num_experts=5, top_k=2, num_prototypes_per_expert=2, contrastive_loss=0.1))
    x, _ = _tokens(3, 8)
    ctx = RoutingContext(batch_size=3, seq_len=8, is_null=torch.tensor([False, True, False]))
    loss = router(x, ctx).aux["contrastive"]
    assert loss.item() > 0
    loss.backward()
    assert router.prototypes.grad.abs().sum() > 0


# ---------------------------------------------------------------- Sinkhorn


def test_sinkhorn_balances_a_selection_that_top_k_collapses():
    torch.manual_seed(0)
    n, e, k = 512, 8, 2
    x = torch.randn(n, DIM)
    x[:, 0] = 1.0

    def loads(iterations):
        router = SinkhornRouter(DIM, _cfg(num_experts=e, top_k=k, sinkhorn_iterations=iterations))
        with torch.no_grad():
            router.gate.weight.normal_(0, 0.3)
            router.gate.weight[:, 0] = 0.0
            router.gate.weight[0, 0] = 5.0  # every token prefers expert 0 by ~5 nats
        out = router(x, RoutingContext(batch_size=4, seq_len=n // 4))
        assert (out.routing_map.sum(-1) == k).all()
        torch.testing.assert_close(out.probs.sum(-1), torch.ones(n))
        return out.routing_map.sum(0).float()

    mean = n * k / e
    assert loads(0).max() > 3 * mean  # plain top-k: expert 0 takes every token
    assert loads(3).max() <= 1.5 * mean


# ---------------------------------------------------------------- all four


def _all_routers():
    return [
        ExpertChoiceRouter(DIM, _cfg()),
        ExpertRaceRouter(DIM, _cfg()),
        ProMoERouter(DIM, _cfg(num_experts=5)),
        SinkhornRouter(DIM, _cfg()),
    ]


@pytest.mark.parametrize("index", range(4))
def test_gradients_reach_the_gate_through_probs(index):
    torch.manual_seed(0)
    router = _all_routers()[index].train()
    x, ctx = _tokens(2, 8)
    router(x, ctx).probs.sum().backward()
    grads = [p.grad for n, p in router.named_parameters() if n.startswith(("gate", "prototypes"))]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("index", range(4))
def test_bf16_module_routes_in_fp32(index):
    torch.manual_seed(0)
    router = _all_routers()[index]
    x, ctx = _tokens(2, 8)
    ref = router(x, ctx)
    router.to(torch.bfloat16)
    out = router(x.bfloat16(), ctx)
    assert out.probs.dtype == torch.float32 and out.routing_map.dtype == torch.bool
    assert out.routing_map.sum(-1).float().mean() == pytest.approx(ref.routing_map.sum(-1).float().mean())


@pytest.mark.parametrize("cls", [ExpertChoiceRouter, ExpertRaceRouter, ProMoERouter, SinkhornRouter])
def test_null_experts_are_refused_with_the_key_named(cls):
    with pytest.raises(ValueError, match="num_null_experts"):
        cls(DIM, _cfg(num_experts=5, num_null_experts=2))
