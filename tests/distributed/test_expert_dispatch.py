"""The all-to-all expert dispatcher on 2 and 4 gloo ranks against the single-process MoE layer.

Each rank routes its own micro-batch (so routers that select over a micro-batch see the same
tokens as the reference), sends tokens to the ranks holding their experts, and must give the
reference layer's output and gradients: input and router gradients per rank, expert gradients
summed over the ranks whose tokens reached them.
"""

import copy

import pytest
import torch
import torch.distributed as dist

from megamoe.config import MoEConfig
from megamoe.moe.layer import MoEFeedForward
from megamoe.moe.routers.base import RoutingContext
from megamoe.parallel.expert import apply_expert_parallel
from tests.distributed.launch_helpers import spawn

DIM, FFN, B, L = 16, 32, 2, 12

CASES = {
    "linear": dict(router="linear", top_k=2),
    "linear_shared": dict(router="linear", top_k=2, num_shared_experts=1),
    "linear_shared_no_overlap": dict(router="linear", top_k=2, num_shared_experts=1),  # dispatch waits at once
    "aux_free": dict(router="linear", top_k=2, bias_balancing=True, num_null_experts=1),
    "expert_race": dict(router="expert_race", top_k=2, num_shared_experts=1),
    "expert_race_mlp_sigmoid": dict(
        router="expert_race", top_k=2, race_gate="mlp", router_hidden_dim=16, race_score_func="sigmoid"
    ),
    "expert_choice": dict(router="expert_choice", top_k=2, expert_choice_scope="batch"),
    "sinkhorn": dict(router="sinkhorn", top_k=2, num_shared_experts=1),
    "promoe": dict(router="promoe", top_k=2),  # top-1 renormalised has a zero router gradient: only noise to compare
    "all_on_one_expert": dict(router="linear", top_k=1),
    "selective_sinkhorn": dict(router="selective_sinkhorn", top_k=2, ssr_probability=1.0),  # the plan's weights
    "selective_sinkhorn_top_k": dict(router="selective_sinkhorn", top_k=2, ssr_probability=0.0),  # noise 0
    # Soft and top-p tokens mixed: 1 to 3 experts per token.
    "dynmole": dict(router="dynmole", top_k=3, dynmole_entropy_threshold=1.75, dynmole_top_p=0.3),
    "diffmoe": dict(router="diffmoe", top_k=2, router_hidden_dim=16),  # the pool is each rank's micro-batch
    "timestep_band": dict(
        router="timestep_band", top_k=2, timestep_band_router="linear", timestep_band_boundaries=[500.0]
    ),
    # Wan2.2-A14B style, one expert per band: 8 bands of 125 timesteps.
    "timestep_band_one_per_band": dict(
        router="timestep_band", top_k=1, timestep_band_boundaries=[125.0 * i for i in range(1, 8)]
    ),
    "merged": dict(router="linear", top_k=3, merged_from=11),  # MC-SMoE: 11 router columns folded onto the experts
}


def build_layer(case, num_experts):
    torch.manual_seed(0)
    layer = MoEFeedForward(DIM, FFN, MoEConfig(num_experts=num_experts, **CASES[case]))
    with torch.no_grad():  # non-zero biases, so a bias applied to the wrong expert or rank shows
        # (0.1: the scale of the expert outputs; at 1, ProMoE's prototype gradient, a sum of terms
        # near 100, cancels to ~0.3 and the grouping-dependent rounding exceeds the tolerance)
        layer.experts.b1.normal_(0, 0.1)
        layer.experts.b2.normal_(0, 0.1)
    if case == "merged":  # uneven groups of columns; the last two experts get none (no tokens)
        with torch.no_grad():
            layer.expert_map.copy_(torch.arange(11) % (num_experts - 2))
    if case == "all_on_one_expert":  # extreme imbalance: every token picks expert 0
        with torch.no_grad():
            layer.router.gate.weight.zero_()
            layer.router.gate.weight[0].fill_(1.0)
    return layer.train()


def micro_batch(rank, case):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(B, L, DIM, generator=g)
    if case == "all_on_one_expert":
        x = x.abs() + 0.1  # positive tokens score highest on the all-ones row
    ctx = RoutingContext(
        batch_size=B,
        seq_len=L,
        temb=torch.randn(B, DIM, generator=g),
        text=torch.randn(B, 3, DIM, generator=g),
        is_null=torch.tensor([rank % 2 == 0, False]),
        timestep=torch.rand(B, generator=g) * 1000,
    )
    weight = torch.randn(B, L, DIM, generator=g)
    return x.requires_grad_(), ctx, weight


def grads(layer, x):
    out = {"x": x.grad.clone()}
    out.update({n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in layer.named_parameters()})
    return out


def check_case(rank, world, case, num_experts):
    reference = build_layer(case, num_experts)
    parallel = apply_expert_parallel(copy.deepcopy(reference), dist.group.WORLD)
    parallel.dispatcher.overlap = not case.endswith("_no_overlap")

    x, ctx, weight = micro_batch(rank, case)
    y_ref = reference(x, ctx)
    (y_ref * weight).sum().backward()
    ref = grads(reference, x)

    x2 = x.detach().clone().requires_grad_()
    y = parallel(x2, ctx)
    (y * weight).sum().backward()
    got = grads(parallel, x2)

    local = num_experts // world
    for name, value in ref.items():  # every collective before any comparison, so a failing rank cannot hang the rest
        if name.startswith("experts."):
            dist.all_reduce(value)  # an expert's gradient collects every rank's tokens
            ref[name] = value[rank * local : (rank + 1) * local]
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5, msg=lambda m: f"{case}, output: {m}")
    for name, value in ref.items():
        # rtol too: ProMoE's prototype gradients reach ~100, where one fp32 ulp is 7.6e-6 and
        # the grouped GEMM over other row groupings rounds differently (measured: 4e-7 relative).
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case}, {name}: {m}")


def worker(rank, world, num_experts):
    """Every case on the same ranks (starting ranks costs more than the cases); all failures reported."""
    dist.init_process_group("gloo", rank=rank, world_size=world)
    failures = []
    for case in sorted(CASES):
        try:
            check_case(rank, world, case, num_experts)
        except AssertionError as exc:
            failures.append(str(exc))
    dist.destroy_process_group()
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_layer_matches_single_process(world):
    spawn(worker, world, 8)
