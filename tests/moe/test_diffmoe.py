"""DiffMoE against naive references: the pool selection, the predictor's BCE, the threshold EMA, inference."""

import threading

import pytest
import torch
import torch.nn.functional as F

from megamoe.config import ConfigError, MoEConfig
from megamoe.moe.routers import diffmoe
from megamoe.moe.routers.base import RoutingContext
from megamoe.moe.routers.diffmoe import DiffMoERouter

DIM, E, K = 16, 4, 2


def make_router(**kw) -> DiffMoERouter:
    torch.manual_seed(0)
    return DiffMoERouter(DIM, MoEConfig(**{"num_experts": E, "top_k": K, "router_hidden_dim": 8, **kw})).train()


def batch(b, l, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b * l, DIM, generator=g), RoutingContext(batch_size=b, seq_len=l)


def naive_scores(router, x, score_func="softmax"):
    logits = x @ router.gate.weight.t()
    return logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()


def naive_predictor(router, x):
    """W2 silu(W1 x + b1) + b2 (logits), one token at a time."""
    l1, l2 = router.predictor[0], router.predictor[2]
    rows = [F.silu(l1.weight @ t + l1.bias) @ l2.weight.t() + l2.bias for t in x]
    return torch.stack(rows)


def naive_top_c(scores, c):
    """Each expert (column) takes the tokens whose score reaches its C-th largest, by sorting."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for e in range(scores.shape[1]):
        cth = sorted(scores[:, e].tolist(), reverse=True)[c - 1]
        for t in range(scores.shape[0]):
            mask[t, e] = scores[t, e].item() >= cth
    return mask


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("capacity_factor", [1.0, 0.5])
def test_training_selection_is_each_experts_top_c_over_the_whole_pool(score_func, capacity_factor):
    router = make_router(score_func=score_func, capacity_factor=capacity_factor)
    x, ctx = batch(3, 5)
    out = router(x, ctx)
    c = int(capacity_factor * 15 * K / E + 0.5)  # over all B * L = 15 tokens, not per sample
    scores = naive_scores(router, x, score_func)
    mask = naive_top_c(scores, c)
    assert torch.equal(out.routing_map, mask)
    assert (out.routing_map.sum(0) == c).all()  # continuous scores: no ties
    torch.testing.assert_close(out.probs, scores * mask)
    assert out.topk_indices is None


def test_capacity_loss_is_the_bce_against_the_selection_and_trains_only_the_predictor():
    router = make_router()
    x, ctx = batch(2, 6, seed=1)
    x.requires_grad_(True)
    out = router(x, ctx)
    p = naive_predictor(router, x.detach()).sigmoid()
    m = out.routing_map.float()
    expected = -(m * p.log() + (1 - m) * (1 - p).log()).mean()
    torch.testing.assert_close(out.aux["capacity"], expected)
    out.aux["capacity"].backward()
    assert x.grad is None and router.gate.weight.grad is None  # tokens and gate untouched
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in router.predictor.parameters())


def kth_predicted(router, x, c):
    return naive_predictor(router, x).sigmoid().topk(c, dim=0).values[-1]  # [E]


def test_threshold_is_the_ema_of_the_cth_predictor_score(monkeypatch):
    router = make_router(diffmoe_threshold_decay=0.25)
    x1, ctx1 = batch(2, 8, seed=1)  # C = 2 * 8 * 2 / 4 = 8
    x2, ctx2 = batch(2, 8, seed=2)
    x3, ctx3 = batch(3, 4, seed=3)  # C = 6
    with torch.no_grad():
        k1, k2, k3 = kth_predicted(router, x1, 8), kth_predicted(router, x2, 8), kth_predicted(router, x3, 6)

    def two_identical_ranks(t):  # the sum over two ranks that saw the same: the average is unchanged
        return 2 * t

    router(x1, ctx1)
    router.after_step(two_identical_ranks)
    torch.testing.assert_close(router.threshold, k1)  # the first update copies
    router(x2, ctx2)
    router(x3, ctx3)  # gradient accumulation: the step's value is the mean of its forwards
    with monkeypatch.context() as m:  # a recomputed forward is not counted again
        m.setattr(diffmoe, "is_recomputing", lambda: True)
        router(x1, ctx1)
    router.after_step(two_identical_ranks)
    expected = 0.25 * k1 + 0.75 * 0.5 * (k2 + k3)
    torch.testing.assert_close(router.threshold, expected)
    router(x1, ctx1)
    router.discard_step()  # a skipped step leaves no trace
    router.after_step(two_identical_ranks)  # nor does a step without forwards
    torch.testing.assert_close(router.threshold, expected)
    assert router.threshold.dtype == torch.float32 and {"threshold", "threshold_initialized"} <= set(
        router.state_dict()
    )
    router.to(torch.bfloat16)
    assert router.threshold.dtype == torch.float32 and router.gate.weight.dtype == torch.bfloat16


def test_threshold_is_the_mean_over_data_parallel_ranks_and_the_same_on_each():
    """Two data-parallel ranks (threads here; `reduce` sums like an all-reduce) with different batches."""
    routers = [make_router(), make_router()]  # the same weights on both ranks
    batches = [batch(2, 8, seed=10), batch(3, 8, seed=11)]
    parts, barrier = [None, None], threading.Barrier(2)

    def step(rank):
        def reduce(t):  # sum over the ranks, as dist.all_reduce
            parts[rank] = t.clone()
            barrier.wait()
            total = parts[0] + parts[1]
            barrier.wait()
            return total

        routers[rank](*batches[rank])
        routers[rank].after_step(reduce)

    threads = [threading.Thread(target=step, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with torch.no_grad():
        expected = 0.5 * (kth_predicted(routers[0], batches[0][0], 8) + kth_predicted(routers[0], batches[1][0], 12))
    torch.testing.assert_close(routers[0].threshold, expected)
    assert torch.equal(routers[0].threshold, routers[1].threshold)


def test_inference_routes_by_the_predictor_and_threshold_independent_of_the_batch():
    router = make_router()
    x, ctx = batch(4, 8)
    router.eval()
    before = router(x, ctx)  # before any threshold: the training rule
    assert torch.equal(before.routing_map, naive_top_c(naive_scores(router, x), 16))
    router.train()
    router(x, ctx)
    router.after_step(lambda t: t)
    router.eval()
    out = router(x, ctx)
    with torch.no_grad():
        mask = naive_predictor(router, x).sigmoid() >= router.threshold
    assert torch.equal(out.routing_map, mask) and "capacity" not in out.aux
    torch.testing.assert_close(out.probs, naive_scores(router, x) * mask)
    # The threshold reproduces the training capacity on the batch it was measured on.
    assert (out.routing_map.sum(0) == 16).all()
    # Token t's routing is the same whatever else is in the batch.
    alone = router(x[8:16], RoutingContext(batch_size=1, seq_len=8))
    shuffled = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    mixed = router(x[shuffled], ctx)
    assert torch.equal(alone.routing_map, out.routing_map[8:16])
    torch.testing.assert_close(alone.probs, out.probs[8:16])
    assert torch.equal(mixed.routing_map, out.routing_map[shuffled])


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(capacity_loss=0.0, router_hidden_dim=8), "router_hidden_dim=8 has no effect with router=diffmoe and"),
        (dict(capacity_loss=0.0, diffmoe_threshold_decay=0.5), "diffmoe_threshold_decay=0.5 has no effect"),
        (dict(diffmoe_threshold_decay=1.0), "diffmoe_threshold_decay must be in"),
        (dict(balance_loss=0.01), "balance_loss=0.01 has no effect with model.moe.router=diffmoe"),
        (dict(num_null_experts=1), "num_null_experts=1 has no effect"),
    ],
)
def test_config_errors_name_the_key(change, match):
    with pytest.raises(ConfigError, match=match):
        DiffMoERouter.check_config(MoEConfig(num_experts=E, top_k=K, router="diffmoe", **change))


def test_the_selection_is_what_replay_returns():
    """Routing replay hands back a recorded mask: weights and the predictor's target follow it."""
    router = make_router()
    x, ctx = batch(2, 4)
    forced = torch.zeros(8, E, dtype=torch.bool)
    forced[:, 0] = True
    router.replay = lambda selection: forced
    out = router(x, ctx)
    assert torch.equal(out.routing_map, forced)
    torch.testing.assert_close(out.probs, naive_scores(router, x) * forced)
    torch.testing.assert_close(
        out.aux["capacity"], F.binary_cross_entropy_with_logits(naive_predictor(router, x), forced.float())
    )


def test_without_a_predictor_inference_keeps_the_pool_rule():
    """capacity_loss = 0: no predictor, no threshold, no capacity loss; eval selects as training does."""
    router = make_router(capacity_loss=0.0, router_hidden_dim=MoEConfig().router_hidden_dim)
    assert router.predictor is None and "threshold" not in router.state_dict()
    x, ctx = batch(2, 8)
    out = router(x, ctx)
    assert set(out.aux) == {"unrouted_fraction"}
    router.after_step(lambda t: t)
    assert torch.equal(router.eval()(x, ctx).routing_map, naive_top_c(naive_scores(router, x), 8))
