"""Aux-loss-free balancing's step-size schedules and update forms against their closed forms.

The reference is the update written out by hand: b_i += eta_t * sign(mean(c) - c_i) (DeepSeek-V3)
or eta_t * (mean(c) - c_i) / mean(c) (proportional), then b -= mean(b) when centred, with eta_t
= rate, rate / t, or rate until the freeze step and 0 after (ALF-LB, Han et al. 2025).
"""

import pytest
import torch
import torch.distributed as dist

from megamoe.config import ConfigError, MoEConfig
from megamoe.moe.routers import RoutingContext, build_router
from megamoe.moe.routers.base import check_router_config
from megamoe.moe.routers.token_choice import bias_step_size
from tests.distributed.launch_helpers import spawn

DIM, E = 8, 4


def router(top_k=1, **kw):
    cfg = MoEConfig(num_experts=E, top_k=top_k, bias_balancing=True, bias_update_rate=0.1, **kw)
    torch.manual_seed(0)
    return build_router(DIM, cfg).train()


def step_with_loads(r, loads):
    """One applied step whose global loads (real experts) are `loads`: the reduce returns them."""
    r.after_step(lambda counts: torch.tensor([*loads, *counts[E:].tolist()], dtype=counts.dtype))


@pytest.mark.parametrize(
    "schedule,extra,expected",
    [
        ("constant", {}, lambda t: 0.1),
        ("inverse_time", {}, lambda t: 0.1 / t),
        ("frozen", {"bias_freeze_step": 3}, lambda t: 0.1 if t <= 3 else 0.0),
    ],
)
def test_step_size_over_t_is_the_closed_form(schedule, extra, expected):
    cfg = MoEConfig(num_experts=E, bias_balancing=True, bias_update_rate=0.1, bias_update_schedule=schedule, **extra)
    for t in range(1, 9):
        assert bias_step_size(cfg, torch.tensor(t)).item() == pytest.approx(expected(t), rel=1e-6), t
    # and what the router applies: the sign update moves the one overloaded expert by -eta_t each step
    r, bias = router(bias_update_schedule=schedule, **extra), 0.0
    for t in range(1, 9):
        step_with_loads(r, [10, 2, 2, 2])
        bias -= expected(t)
        assert r.expert_bias[0].item() == pytest.approx(bias, abs=1e-6), t
        assert r.last_bias_update.tolist() == pytest.approx([10 / 4, expected(t)], rel=1e-6)
    assert int(r.bias_update_count) == 8


def test_proportional_update_closed_form():
    r = router(bias_update_form="proportional")
    loads = torch.tensor([9.0, 3.0, 0.0, 4.0])
    step_with_loads(r, loads.tolist())
    mean = loads.mean()
    torch.testing.assert_close(r.expert_bias, 0.1 * (mean - loads) / mean, rtol=1e-6, atol=0)
    step_with_loads(r, [0, 0, 0, 0])  # a step that routed nothing moves nothing (no 0 / 0)
    torch.testing.assert_close(r.expert_bias, 0.1 * (mean - loads) / mean, rtol=1e-6, atol=0)


def test_centred_update_keeps_mean_zero_and_the_selection():
    """Centring adds the same constant to every expert's bias; without null experts each token's
    top-k is unchanged by such a shift, so centred and uncentred runs select identically."""
    plain, centred = router(), router(bias_update_centered=True)
    x = torch.randn(64, DIM, generator=torch.Generator().manual_seed(1)) + 0.5
    ctx = RoutingContext(8, 8)
    with torch.no_grad():
        plain.gate.weight[0] += 1.0  # expert 0 overloaded: one sign below the mean, three above
        centred.gate.weight.copy_(plain.gate.weight)
    drift = 0.0
    for step in range(6):
        got, ref = centred(x[step:], RoutingContext(1, 64 - step)), plain(x[step:], RoutingContext(1, 64 - step))
        assert torch.equal(got.routing_map, ref.routing_map), step
        plain.after_step(lambda c: c)
        centred.after_step(lambda c: c)
        assert abs(centred.expert_bias.sum().item()) < 1e-6
        drift = max(drift, plain.expert_bias.sum().abs().item())
        shift = plain.expert_bias - centred.expert_bias
        torch.testing.assert_close(shift, shift.mean().expand(E), rtol=0, atol=1e-6)
    assert drift > 0.1  # the uncentred biases drifted: centring had something to remove
    assert torch.equal(centred(x, ctx).routing_map, plain(x, ctx).routing_map)


def test_update_count_survives_a_state_dict_round_trip():
    r = router(bias_update_schedule="inverse_time")
    for _ in range(3):
        step_with_loads(r, [8, 0, 0, 0])
    state = r.state_dict()
    assert int(state["bias_update_count"]) == 3
    resumed = router(bias_update_schedule="inverse_time")
    resumed.load_state_dict(state)
    for other in (r, resumed):
        step_with_loads(other, [8, 0, 0, 0])
    assert torch.equal(resumed.expert_bias, r.expert_bias)
    assert r.last_bias_update[1].item() == pytest.approx(0.1 / 4)  # t = 4 continues the schedule
    assert int(resumed.bias_update_count) == 4


def test_bf16_cast_keeps_the_count_and_the_bias_fp32():
    r = router().bfloat16()
    assert r.expert_bias.dtype == torch.float32 and r.bias_update_count.dtype == torch.long


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(bias_update_schedule="inverse_time"), "bias_update_schedule=inverse_time has no effect"),
        (dict(bias_update_centered=True), "bias_update_centered=True has no effect"),
        (dict(bias_update_form="proportional"), "bias_update_form=proportional has no effect"),
        (dict(bias_freeze_step=5), "bias_freeze_step=5 has no effect"),
        (dict(bias_balancing=True, bias_freeze_step=5), "bias_freeze_step=5 has no effect with"),
        (dict(bias_balancing=True, bias_update_schedule="frozen"), "needs model.moe.bias_freeze_step >= 1"),
        (dict(bias_balancing=True, bias_update_schedule="cosine"), "bias_update_schedule must be one of"),
        (dict(bias_balancing=True, bias_update_form="square"), "bias_update_form must be one of"),
        (
            dict(bias_balancing=True, bias_update_form="proportional", bias_update_centered=True),
            "bias_update_centered=true has no effect with model.moe.bias_update_form=proportional",
        ),
    ],
)
def test_ignored_or_bad_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        check_router_config(MoEConfig(num_experts=E, **settings))


def test_other_routers_refuse_the_schedule_keys():
    with pytest.raises(ConfigError, match="only .*linear.* read it"):
        check_router_config(MoEConfig(num_experts=E, router="expert_race", bias_update_centered=True))


def _two_rank_worker(rank, world):
    """Each rank routes its half of the batch and reduces with a real all-reduce: after every step
    the bias equals one process's that routed the whole batch (proportional, 1/t)."""
    dist.init_process_group("gloo", rank=rank, world_size=world)
    settings = dict(bias_update_form="proportional", bias_update_schedule="inverse_time")
    sharded, single = router(top_k=2, **settings), router(top_k=2, **settings)
    with torch.no_grad():
        single.gate.weight[1] += 1.0
        sharded.gate.weight.copy_(single.gate.weight)
    g = torch.Generator().manual_seed(5)

    def all_reduce(t):
        dist.all_reduce(t)
        return t

    for step in range(4):
        x = torch.randn(world, 16, DIM, generator=g)
        sharded(x[rank], RoutingContext(2, 8))
        single(x.flatten(0, 1), RoutingContext(2 * world, 8))
        sharded.after_step(all_reduce)
        single.after_step(lambda c: c)
        torch.testing.assert_close(sharded.expert_bias, single.expert_bias, rtol=0, atol=1e-7, msg=f"step {step}")
    assert single.expert_bias.abs().sum() > 0
    dist.destroy_process_group()


def test_two_rank_reduce_equals_one_process():
    spawn(_two_rank_worker, 2)
