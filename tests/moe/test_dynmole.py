"""DynMoLE hybrid routing against closed forms of the Tsallis entropy and a naive per-token loop."""

import math

import pytest
import torch

from megamoe.config import ConfigError, MoEConfig
from megamoe.moe.losses import switch_balance_loss
from megamoe.moe.routers.base import RoutingContext
from megamoe.moe.routers.dynmole import DynMoLERouter, tsallis_entropy

DIM, B, L, E = 16, 4, 16, 8


def _router(**kw) -> DynMoLERouter:
    torch.manual_seed(0)
    base = dict(num_experts=E, top_k=4, router="dynmole")
    base.update(kw)
    return DynMoLERouter(DIM, MoEConfig(**base)).train()


def _tokens(seed=1):
    """Tokens of varied sharpness: some confident (large norm), some uncertain (small)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B * L, DIM, generator=g) * torch.logspace(-1.0, 1.5, B * L)[:, None]
    return x, RoutingContext(batch_size=B, seq_len=L)


def naive_routing(p: torch.Tensor, q, threshold, top_p, k_min, cap):
    """One token at a time: Tsallis entropy by its definition, then soft (the cap's most probable
    experts) or the smallest prefix of the descending order whose mass reaches top_p, clamped to
    [k_min, cap]; weights p renormalised over the set. Returns (probs, routing map)."""
    probs, chosen_map = torch.zeros_like(p), torch.zeros_like(p, dtype=torch.bool)
    for t in range(p.shape[0]):
        row = p[t].tolist()
        entropy = (1 - sum(v**q for v in row)) / (q - 1)
        order = sorted(range(len(row)), key=lambda j: -row[j])
        if entropy > threshold:
            count = cap
        else:
            count, mass = 0, 0.0
            while mass < top_p and count < len(row):
                mass += row[order[count]]
                count += 1
            count = min(max(count, k_min), cap)
        chosen = order[:count]
        total = sum(row[j] for j in chosen)
        for j in chosen:
            probs[t, j] = row[j] / total
            chosen_map[t, j] = True
    return probs, chosen_map


def test_tsallis_entropy_closed_forms():
    uniform = torch.full((E,), 1.0 / E, dtype=torch.float64)
    for q in (0.5, 1.1, 2.0):
        assert tsallis_entropy(uniform, q).item() == pytest.approx((1 - E ** (1 - q)) / (q - 1), rel=1e-12)
    assert tsallis_entropy(uniform, 2.0).item() == pytest.approx(1 - 1 / E, rel=1e-12)  # q = 2: Gini impurity
    assert tsallis_entropy(torch.eye(E, dtype=torch.float64)[2], 1.1).item() == 0.0
    p = torch.randn(5, E, generator=torch.Generator().manual_seed(0), dtype=torch.float64).softmax(-1)
    shannon = -(p * p.log()).sum(-1)
    torch.testing.assert_close(tsallis_entropy(p, 1.0), shannon, atol=1e-12, rtol=0)
    torch.testing.assert_close(tsallis_entropy(p, 1.0 + 1e-7), shannon, atol=1e-6, rtol=0)  # q -> 1
    assert (tsallis_entropy(p, 1.1) <= tsallis_entropy(uniform, 1.1)).all()  # the uniform is the largest


@pytest.mark.parametrize(
    "q, threshold, top_p, k_min, cap",
    [
        (1.1, 0.9, 0.75, 1, 4),
        (1.1, 1.5, 0.5, 2, 3),
        (2.0, 0.6, 0.9, 1, 8),
        (0.7, 10.0, 0.95, 1, 8),
        (1.1, 10.0, 1.0, 1, 8),
    ],
)
def test_routing_matches_a_naive_per_token_loop(q, threshold, top_p, k_min, cap):
    router = _router(
        top_k=cap, dynmole_q=q, dynmole_entropy_threshold=threshold, dynmole_top_p=top_p, dynmole_min_experts=k_min
    )
    x, ctx = _tokens()
    out = router(x, ctx)
    p = (x @ router.gate.weight.t()).softmax(-1)
    expected, expected_map = naive_routing(p, q, threshold, top_p, k_min, cap)
    torch.testing.assert_close(out.probs, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(out.routing_map, expected_map)
    counts = out.routing_map.sum(1)
    assert counts.min() >= k_min and counts.max() <= cap
    assert out.aux["experts_per_token"].item() == pytest.approx(counts.float().mean().item())
    assert not out.aux["experts_per_token"].requires_grad


def test_top_p_sets_are_the_smallest_reaching_p():
    router = _router(dynmole_entropy_threshold=100.0, top_k=E, dynmole_top_p=0.6)  # no soft token, no cap
    x, ctx = _tokens()
    out = router(x, ctx)
    p = (x @ router.gate.weight.t()).softmax(-1)
    mass = (p * out.routing_map).sum(1)
    smallest_chosen = torch.where(out.routing_map, p, torch.inf).min(1).values
    assert (mass >= 0.6 - 1e-6).all()
    assert ((mass - smallest_chosen < 0.6) | (out.routing_map.sum(1) == 1)).all()
    assert len(set(out.routing_map.sum(1).tolist())) > 2, "tokens should take different numbers of experts"


def test_soft_tokens_take_every_expert_up_to_the_cap():
    x, ctx = _tokens()
    uncapped = _router(top_k=E, dynmole_entropy_threshold=0.0)  # S_q > 0: every token soft: the paper's soft routing
    out = uncapped(x, ctx)
    assert out.routing_map.all() and out.aux["soft_fraction"].item() == 1.0
    torch.testing.assert_close(out.probs, (x @ uncapped.gate.weight.t()).softmax(-1))
    capped = _router(top_k=3, dynmole_entropy_threshold=0.0)  # the cap: the 3 most probable, as top-3 routing
    out = capped(x, ctx)
    p = (x @ capped.gate.weight.t()).softmax(-1)
    assert torch.equal(out.routing_map, torch.zeros_like(out.routing_map).scatter(1, p.topk(3).indices, True))


def test_losses_tsallis_mean_and_switch_balance():
    router = _router(tsallis_loss=0.1, balance_loss=0.01, dynmole_q=1.5)
    x, ctx = _tokens()
    out = router(x, ctx)
    p = (x @ router.gate.weight.t()).softmax(-1)
    torch.testing.assert_close(out.aux["tsallis"], ((1 - p.pow(1.5).sum(-1)) / 0.5).mean())
    torch.testing.assert_close(out.aux["balance"], switch_balance_loss(p, out.routing_map, E, B, L))
    (g,) = torch.autograd.grad(out.aux["tsallis"], router.gate.weight)
    assert g.abs().sum() > 0
    assert "tsallis" not in _router()(x, ctx).aux


def test_the_routing_map_passes_through_replay_and_fixes_the_weights():
    router = _router()
    x, ctx = _tokens()
    replayed = torch.zeros(B * L, E, dtype=torch.bool)
    replayed[:, [1, 5]] = True
    calls = []
    router.replay = lambda selection: calls.append(selection) or replayed
    out = router(x, ctx)
    assert len(calls) == 1 and calls[0].shape == (B * L, E) and calls[0].dtype == torch.bool
    p = (x @ router.gate.weight.t()).softmax(-1)
    chosen = p * replayed
    torch.testing.assert_close(out.probs, chosen / chosen.sum(-1, keepdim=True))


def test_settings_it_would_ignore_or_cannot_run_are_refused():
    with pytest.raises(ConfigError, match="model.moe.dynmole_min_experts"):
        _router(top_k=2, dynmole_min_experts=3)
    with pytest.raises(ConfigError, match="model.moe.dynmole_top_p"):
        _router(dynmole_top_p=0.0)
    with pytest.raises(ConfigError, match="model.moe.z_loss"):
        _router(z_loss=0.01)
    with pytest.raises(ConfigError, match="dynmole_entropy_threshold must be >= 0"):
        _router(dynmole_entropy_threshold=-0.1)
    assert math.isfinite(_router(dynmole_q=1.0)(*_tokens()).probs.sum().item())
