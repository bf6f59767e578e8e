"""Expert Race's options (score function, MLP gate, global race) against a naive reference.

The reference races by hand: logits from plain matmuls, the activation, every (token, expert)
score sorted in one Python list, the K-th largest (K = top_k x tokens) as the bar, selected =
score >= bar, weight = score where selected (Race-DiT, Yuan et al. 2025, arXiv:2503.16057).
"""

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megamoe.config import ConfigError, MoEConfig
from megamoe.moe.routers.base import RoutingContext, check_router_config
from megamoe.moe.routers.expert_race import ExpertRaceRouter
from megamoe.moe.token_shards import TokenShards
from tests.distributed.launch_helpers import spawn

DIM, E, K = 8, 4, 2
OPTIONS = [
    dict(race_score_func=func, race_gate=gate, **({"router_hidden_dim": 6} if gate == "mlp" else {}))
    for func in ("identity", "softmax", "sigmoid")
    for gate in ("linear", "mlp")
]


def make_router(**options):
    torch.manual_seed(0)
    return ExpertRaceRouter(DIM, MoEConfig(num_experts=E, top_k=K, router="expert_race", **options)).train()


def naive_scores(router, x):
    """The gate and activation with plain matmuls, one formula per option."""
    gate = router.gate
    if router.cfg.race_gate == "mlp":
        h = x @ gate[0].weight.t() + gate[0].bias
        h = 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h**3)))  # GELU, tanh form
        logits = h @ gate[2].weight.t()
    else:
        logits = x @ gate.weight.t()
    func = router.cfg.race_score_func
    if func == "softmax":
        return torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    return 1 / (1 + torch.exp(-logits)) if func == "sigmoid" else logits


def naive_race(scores, top_k):
    """(mask, bar): every pair whose score reaches the K-th largest of all of them."""
    values = sorted(scores.detach().flatten().tolist(), reverse=True)
    bar = values[top_k * scores.shape[0] - 1]
    return scores.detach() >= bar, bar


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: f"{o['race_score_func']}-{o['race_gate']}")
def test_selection_weights_and_gradients_match_the_naive_race(options):
    router = make_router(**options)
    x = torch.randn(24, DIM, generator=torch.Generator().manual_seed(1))
    out = router(x, RoutingContext(3, 8))
    scores = naive_scores(router, x)
    mask, bar = naive_race(scores, K)
    assert torch.equal(out.routing_map, mask) and mask.sum() == K * 24
    torch.testing.assert_close(out.probs, scores * mask, rtol=1e-5, atol=1e-6)
    # the gradient reaches the gate through the selected scores only
    weight = torch.randn(24, E, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad((out.probs * weight).sum(), list(router.gate.parameters()))
    ref = torch.autograd.grad((scores * mask * weight).sum(), list(router.gate.parameters()))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # the threshold learns the K-th score in the activation's own units, and eval uses it
    router.after_step(lambda t: t)
    assert router.threshold.item() == pytest.approx(bar, rel=1e-6)
    router.eval()
    y = torch.randn(5, DIM, generator=torch.Generator().manual_seed(3))
    assert torch.equal(router(y, RoutingContext(1, 5)).routing_map, naive_scores(router, y).detach() >= bar)


def test_mlp_gate_keeps_the_mlp_router_layout_and_routes_in_fp32():
    router = make_router(race_gate="mlp", router_hidden_dim=6)
    assert [name for name, _ in router.gate.named_parameters()] == ["0.weight", "0.bias", "2.weight"]
    x = torch.randn(8, DIM, generator=torch.Generator().manual_seed(4))
    ref = router(x, RoutingContext(1, 8)).probs
    router.bfloat16()
    out = router(x.bfloat16(), RoutingContext(1, 8)).probs
    assert out.dtype == torch.float32
    # bf16 weights, fp32 maths: within the weights' rounding, not the activations'
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(router_hidden_dim=16), "router_hidden_dim=16 has no effect with model.moe.race_gate=linear"),
        (dict(race_gate="mlp", router_hidden_dim=0), "router_hidden_dim must be >= 1"),
        (dict(race_score_func="tanh"), "race_score_func must be one of identity, softmax, sigmoid"),
        (dict(race_gate="attention"), "race_gate must be one of linear, mlp"),
        (dict(race_scope="epoch"), "race_scope must be one of micro_batch, global"),
    ],
)
def test_bad_or_ignored_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        check_router_config(MoEConfig(num_experts=E, router="expert_race", **settings))


def test_other_routers_refuse_the_race_keys():
    with pytest.raises(ConfigError, match="race_score_func=sigmoid has no effect with model.moe.router=linear"):
        check_router_config(MoEConfig(num_experts=E, race_score_func="sigmoid"))


ROWS = (10, 6)  # tokens per rank: uneven, as under token-budget buckets


def _global_race_worker(rank, world):
    """Each rank races its own micro-batch against every rank's (race_scope=global): its selection
    and weights equal the rows of a one-process race over the concatenated global batch, and every
    rank learns the same threshold."""
    dist.init_process_group("gloo", rank=rank, world_size=world)
    options = dict(race_scope="global", race_score_func="sigmoid")
    sharded, single = make_router(**options), make_router(**options)
    sharded.token_shards = TokenShards(None, dist.group.WORLD)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(sum(ROWS), DIM, generator=g)
    x[ROWS[0] :] *= 4  # rank 1's tokens score more extremely: the global race gives it more pairs
    start = sum(ROWS[:rank])
    mine = x[start : start + ROWS[rank]]
    out = sharded(mine, RoutingContext(1, ROWS[rank]))
    ref = single(x, RoutingContext(1, sum(ROWS)))
    assert torch.equal(out.routing_map, ref.routing_map[start : start + ROWS[rank]]), rank
    torch.testing.assert_close(out.probs, ref.probs[start : start + ROWS[rank]], rtol=0, atol=0)
    mask, bar = naive_race(naive_scores(single, x), K)
    assert torch.equal(ref.routing_map, mask)
    # not what a local race selects, K x its own tokens (else the test would prove nothing)
    assert out.routing_map.sum().item() != K * ROWS[rank]

    def all_reduce(t):
        dist.all_reduce(t)
        return t

    sharded.after_step(all_reduce)
    single.after_step(lambda t: t)
    assert sharded.threshold.item() == pytest.approx(single.threshold.item(), rel=1e-6)
    assert sharded.threshold.item() == pytest.approx(bar, rel=1e-6)
    # every one of the K = 2 x 16 best scores on rank 0: the bar is rank 0's own 32nd value, 139 - 31
    values = (100.0 + torch.arange(40.0) if rank == 0 else torch.arange(24.0)).view(ROWS[rank], E)
    assert sharded.token_shards.kth_largest_over_batch(values, K).item() == 108.0
    dist.destroy_process_group()


def test_global_race_on_two_ranks_equals_one_process_over_the_global_batch():
    spawn(_global_race_worker, 2)


def test_global_race_in_one_process_is_the_micro_batch_race():
    x = torch.randn(12, DIM, generator=torch.Generator().manual_seed(8))
    got = make_router(race_scope="global")(x, RoutingContext(2, 6))
    ref = make_router()(x, RoutingContext(2, 6))
    assert torch.equal(got.routing_map, ref.routing_map)
    assert F.mse_loss(got.probs, ref.probs).item() == 0.0


def test_a_global_race_on_one_data_parallel_rank_is_refused():
    from megamoe.config import load_config
    from megamoe.config_checks import validate

    cfg = load_config(
        "configs/tiny_moe.yaml",
        [
            "model.moe.router=expert_race",
            "model.moe.race_scope=global",
            "model.moe.balance_loss=0",
            "model.moe.z_loss=0",
        ],
    )
    with pytest.raises(ConfigError, match="race_scope=global has no effect with one data-parallel rank"):
        validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match="race_scope=global has no effect"):  # 2 ranks, both sharding one sequence
        validate(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, context_parallel_size=2)), 2)
    validate(cfg, world_size=2)
