"""Selective Sinkhorn Routing against a naive unrolled Sinkhorn, closed forms and finite differences."""

import pytest
import torch

from megamoe.config import ConfigError, MoEConfig
from megamoe.moe.routers.base import RoutingContext
from megamoe.moe.routers.selective_sinkhorn import SelectiveSinkhornRouter, draw_coin, sinkhorn_plan_log
from tests.moe.test_layer_reference import check_layer, make_cfg

DIM, N, E, K = 16, 24, 4, 2


def _router(**kw) -> SelectiveSinkhornRouter:
    torch.manual_seed(0)
    return SelectiveSinkhornRouter(DIM, MoEConfig(num_experts=E, top_k=K, router="selective_sinkhorn", **kw)).train()


def _tokens(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, DIM, generator=g), RoutingContext(batch_size=2, seq_len=N // 2)


def naive_plan(logits: torch.Tensor, iterations: int) -> torch.Tensor:
    """The plan P of exp(logits) in probability space, one column and one row at a time."""
    n, e = logits.shape
    a = [[logits[t, j].exp() for j in range(e)] for t in range(n)]
    for _ in range(iterations):
        for j in range(e):
            col = sum(a[t][j] for t in range(n))
            for t in range(n):
                a[t][j] = a[t][j] / col * (n / e)
        for t in range(n):
            row = sum(a[t])
            a[t] = [v / row for v in a[t]]
    return torch.stack([torch.stack(r) for r in a])


def plan_weights(plan: torch.Tensor, k: int):
    """Closed form: each token's top-k plan entries, renormalised to sum 1."""
    picked = plan.topk(k, dim=-1).indices
    w = plan.gather(1, picked)
    return torch.zeros_like(plan).scatter(1, picked, w / w.sum(-1, keepdim=True))


def top_k_weights(logits: torch.Tensor, k: int):
    """Closed form of the non-Sinkhorn rule: softmax scores at the top-k, renormalised."""
    return plan_weights(logits.softmax(-1), k)


def test_plan_marginals_rows_one_columns_n_over_e():
    logits = torch.randn(N, E, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    plan = sinkhorn_plan_log(logits, 300).exp()
    torch.testing.assert_close(plan.sum(1), torch.ones(N, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(plan.sum(0), torch.full((E,), N / E, dtype=torch.float64), atol=1e-6, rtol=0)
    # A few iterations: rows exact (the last normalisation), columns already near N / E.
    few = sinkhorn_plan_log(logits, 3).exp()
    torch.testing.assert_close(few.sum(1), torch.ones(N, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (few.sum(0) - N / E).abs().max() < (logits.softmax(-1).sum(0) - N / E).abs().max()
    torch.testing.assert_close(sinkhorn_plan_log(logits, 0), logits.log_softmax(-1))


def test_plan_and_its_gradient_match_a_naive_unrolled_sinkhorn():
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_()
    cotangent = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = sinkhorn_plan_log(logits, 4).exp()
    ref = naive_plan(logits, 4)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    (g,) = torch.autograd.grad((ours * cotangent).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref * cotangent).sum(), logits)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)
    assert g.abs().sum() > 0


def test_combine_weights_are_differentiable_by_finite_differences():
    """Weights = plan renormalised over a fixed selection; autograd == central differences."""
    logits = torch.randn(8, E, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    picked = sinkhorn_plan_log(logits, 3).topk(K, dim=-1).indices
    torch.autograd.gradcheck(
        lambda x: sinkhorn_plan_log(x, 3).gather(1, picked).softmax(-1), (logits.requires_grad_(),), eps=1e-6
    )


def test_sinkhorn_step_weights_are_the_renormalised_plan_and_the_gate_learns_through_it():
    router = _router(ssr_probability=1.0, sinkhorn_iterations=3)
    x, ctx = _tokens()
    out = router(x, ctx)
    logits = x @ router.gate.weight.t()
    expected = plan_weights(naive_plan(logits, 3), K)
    torch.testing.assert_close(out.probs, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(out.routing_map, expected > 0)
    assert torch.equal(out.routing_map.sum(1), torch.full((N,), K))
    # Gradient of the gate through the plan: the router's autograd == autograd of the naive plan.
    cotangent = torch.randn(N, E, generator=torch.Generator().manual_seed(4))
    (g,) = torch.autograd.grad((out.probs * cotangent).sum(), router.gate.weight)
    (g_ref,) = torch.autograd.grad((expected * cotangent).sum(), router.gate.weight)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)
    assert g.abs().sum() > 0
    # The plan, not the softmax, weights: on these logits the two rules differ.
    assert not torch.allclose(out.probs, top_k_weights(logits, K), atol=1e-3)


def test_top_k_steps_and_inference_route_by_plain_top_k():
    x, ctx = _tokens()
    tails = _router(ssr_probability=0.0)
    logits = x @ tails.gate.weight.t()
    torch.testing.assert_close(tails(x, ctx).probs, top_k_weights(logits, K))
    # Inference: plain top-k without noise, whatever the coin and the noise setting.
    routers = [_router(ssr_probability=p, ssr_noise_std=noise) for p, noise in ((1.0, 0.0), (0.5, 5.0), (0.0, 5.0))]
    for router in routers:
        torch.testing.assert_close(router.eval()(x, ctx).probs, top_k_weights(logits, K))


def test_noise_changes_the_selection_only_not_the_weights():
    router = _router(ssr_probability=0.0, ssr_noise_std=2.0)
    x, ctx = _tokens()
    torch.manual_seed(5)
    out = router(x, ctx)
    scores = (x @ router.gate.weight.t()).softmax(-1)
    assert not torch.equal(out.routing_map, top_k_weights(scores.log(), K) > 0), "noise should move some picks"
    chosen = scores * out.routing_map
    torch.testing.assert_close(out.probs, chosen / chosen.sum(-1, keepdim=True))


def _rule(router, x, ctx) -> str:
    """Which rule a training forward used: 'sinkhorn' or 'top_k' (noise-free)."""
    probs = router(x, ctx).probs
    logits = x @ router.gate.weight.t()
    if torch.allclose(probs, plan_weights(sinkhorn_plan_log(logits, router.cfg.sinkhorn_iterations).exp(), K)):
        return "sinkhorn"
    assert torch.allclose(probs, top_k_weights(logits, K))
    return "top_k"


def test_the_coin_is_one_per_step_agreed_by_every_layer_and_independent_of_the_global_rng():
    x, ctx = _tokens()
    layers = [_router(), _router()]
    seen = []
    for step in range(6):
        torch.manual_seed(100 + step)  # another rank's, or another layer's, global RNG state
        rules = {_rule(layer, x, ctx) for layer in layers for _ in range(2)}  # 2 micro-batches each
        assert len(rules) == 1, f"step {step}: layers or micro-batches disagree"
        assert rules == {"sinkhorn" if draw_coin(2, step, 0.5) else "top_k"}
        seen.append(rules.pop())
        for layer in layers:
            layer.after_step(lambda t: t)
    assert set(seen) == {"sinkhorn", "top_k"}


def test_discarded_step_keeps_its_coin():
    router = _router()
    router.discard_step()
    assert int(router.coin_step) == 0
    router.after_step(lambda t: t)
    assert int(router.coin_step) == 1


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_the_fraction_of_sinkhorn_steps_is_p(p):
    heads = sum(draw_coin(7, step, p) for step in range(2000)) / 2000
    assert abs(heads - p) < 0.04  # 4 standard deviations at p = 0.3
    assert sum(draw_coin(8, step, 0.5) != draw_coin(7, step, 0.5) for step in range(100)) > 20  # the seed matters


def test_state_dict_round_trip_continues_the_coin_sequence():
    x, ctx = _tokens()
    run = _router()
    for _ in range(5):
        run.after_step(lambda t: t)
    resumed = _router()
    resumed.load_state_dict(run.state_dict())
    assert int(resumed.coin_step) == 5
    for _ in range(10):
        assert _rule(resumed, x, ctx) == _rule(run, x, ctx)
        run.after_step(lambda t: t)
        resumed.after_step(lambda t: t)


def test_the_coin_and_the_selection_pass_through_replay():
    """The forward routes with what replay returns: a replayed coin switches the rule and a
    replayed selection fixes the experts, the weights following from it."""
    router = _router(ssr_probability=1.0)
    x, ctx = _tokens()
    calls = []

    def replay(selection):
        calls.append(selection)
        if selection.ndim == 0:
            return torch.tensor(False)  # the recorded coin said: top-k step
        return torch.zeros_like(selection).copy_(torch.tensor([0, 1]))  # the recorded selection: experts 0, 1

    router.replay = replay
    out = router(x, ctx)
    assert len(calls) == 2 and calls[0].ndim == 0 and calls[1].shape == (N, K)
    scores = (x @ router.gate.weight.t()).softmax(-1)[:, :2]
    torch.testing.assert_close(out.probs[:, :2], scores / scores.sum(-1, keepdim=True))
    assert out.routing_map[:, :2].all() and not out.routing_map[:, 2:].any()


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_layer_matches_the_naive_reference_on_both_rules(p):
    check_layer(make_cfg("selective_sinkhorn", ssr_probability=p))


def test_settings_it_would_ignore_or_cannot_run_are_refused():
    with pytest.raises(ConfigError, match="model.moe.balance_loss"):
        _router(balance_loss=0.01)
    with pytest.raises(ConfigError, match="model.moe.ssr_probability"):
        _router(ssr_probability=1.5)
    with pytest.raises(ConfigError, match="model.moe.ssr_noise_std"):
        _router(ssr_noise_std=-1.0)
    with pytest.raises(ConfigError, match="sinkhorn_iterations=10 has no effect with ssr_probability=0"):
        _router(ssr_probability=0.0, sinkhorn_iterations=10)
    with pytest.raises(ConfigError, match="ssr_noise_std=0.5 has no effect with ssr_probability=1"):
        _router(ssr_probability=1.0, ssr_noise_std=0.5)
    with pytest.raises(ConfigError, match="sinkhorn_iterations=0 makes the Sinkhorn plan the softmax"):
        _router(sinkhorn_iterations=0)
