"""Each of DeepSpeed's internals that megamoe relies on (megamoe/deepspeed_adapter.py), on the installed DeepSpeed.

One test per function of the adapter, each on a real ZeRO-2 engine in a world of one (gloo, built
by megamoe's own `init_distributed` and `build_engine`): a DeepSpeed upgrade that renames or
changes one of them fails its test here, not a training run.
"""

import inspect
import os
import warnings

import pytest
import torch

from megamoe import deepspeed_adapter as adapter

EXPERTS = "ep_size_1"
"""DeepSpeed's name for the expert groups at expert-parallel size 1."""


class ToyMoE(torch.nn.Module):
    """A dense weight and two experts tagged as megamoe's expert parallelism tags them."""

    def __init__(self):
        super().__init__()
        self.dense = torch.nn.Linear(4, 4)
        self.experts = torch.nn.Parameter(torch.randn(2, 4, 4))
        self.experts.allreduce = False
        self.experts.group_name = EXPERTS

    def forward(self, x):
        return (self.dense(x) @ self.experts).sum(0)


@pytest.fixture(scope="module")
def engine():
    """A ZeRO-2 engine with two micro-batches per step, after one optimizer step."""
    from megamoe.config import Config
    from megamoe.parallel.topology import destroy_distributed, init_distributed
    from megamoe.train.engine import build_engine

    environ = dict(os.environ)  # init_distributed sets RANK, WORLD_SIZE, MASTER_* for its world of one
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    try:
        cfg = Config()
        cfg.model.moe.num_experts = 2
        cfg.optim.zero_stage, cfg.train.grad_accum, cfg.data.micro_batch_size = 2, 2, 1
        init_distributed(cfg.parallel, torch.device("cpu"))
        torch.manual_seed(0)
        engine = build_engine(ToyMoE(), cfg)
        optimizer_step(engine)
        yield engine
    finally:
        destroy_distributed()
        os.environ.clear()
        os.environ.update(environ)


def micro_step(engine, after_backward=None) -> None:
    engine.backward(engine(torch.randn(1, 4)).square().mean())
    if after_backward is not None:
        after_backward()
    engine.step()


def optimizer_step(engine, after_last_backward=None) -> None:
    """Micro-steps up to and including the next accumulation boundary."""
    while not engine.is_gradient_accumulation_boundary():
        micro_step(engine)
    micro_step(engine, after_last_backward)


def test_version_check_refuses_older_warns_on_newer_and_accepts_the_installed_one():
    low, high = adapter.TESTED_DEEPSPEED
    with pytest.raises(ImportError) as refused:
        adapter.check_deepspeed_version("0.17.0")
    message = str(refused.value)
    assert "\n" not in message and "0.17.0" in message and f"{low} to {high}" in message and "pip install" in message
    with pytest.warns(UserWarning, match=r"DeepSpeed 0\.20\.0 is newer .* tested range") as warned:
        adapter.check_deepspeed_version("0.20.0")
    assert "\n" not in str(warned[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for inside in (low, high, f"{high}+cpu", "0.18.3"):
            adapter.check_deepspeed_version(inside)
        # The installed DeepSpeed is one the adapter was checked against; after an upgrade that
        # passes every other test here, extend TESTED_DEEPSPEED.
        adapter.check_deepspeed_version()


def test_the_engine_hook_turns_on_deepspeeds_expert_handling(engine):
    from deepspeed.runtime.engine import DeepSpeedEngine

    hook = inspect.signature(DeepSpeedEngine._configure_distributed_model)
    assert list(hook.parameters) == ["self", "model"]
    assert "config_class" in inspect.signature(DeepSpeedEngine.__init__).parameters
    assert engine.has_moe_layers is True and engine.num_experts == [2]
    groups = {group.get("name"): group for group in adapter.torch_optimizer(engine).param_groups}
    assert groups[EXPERTS]["moe"] is True and not groups["dense-params"].get("moe", False)
    assert engine.optimizer.is_moe_param_group == [False, True]


def test_deepspeed_reduces_experts_over_the_registered_groups(engine):
    from deepspeed.utils import groups

    from megamoe.parallel.topology import expert_groups

    ep_group, edp_group = expert_groups()
    assert adapter.registered_expert_groups(EXPERTS) == (ep_group, edp_group)
    assert (
        groups._get_expert_parallel_group_ranks(EXPERTS) == groups._get_expert_data_parallel_group_ranks(EXPERTS) == [0]
    )
    # What the engine and ZeRO took from the tables when they were built:
    assert engine.expert_data_parallel_group[EXPERTS] is edp_group
    assert engine.optimizer.expert_dp_process_group[EXPERTS] is edp_group
    assert engine.optimizer.ep_process_group[EXPERTS] is ep_group
    # A name already registered is kept (share_expert_groups_with_deepspeed then compares).
    adapter.register_expert_groups(EXPERTS, torch.distributed.group.WORLD, torch.distributed.group.WORLD)
    assert adapter.registered_expert_groups(EXPERTS) == (ep_group, edp_group)


def test_torch_optimizer_is_the_adamw_that_holds_the_master_partitions(engine):
    inner = adapter.torch_optimizer(engine)
    assert isinstance(inner, torch.optim.AdamW) and inner is not engine.optimizer
    masters = adapter.fp32_master_partitions(engine)
    assert [id(p) for group in inner.param_groups for p in group["params"]] == [id(m) for m in masters]
    assert all(set(inner.state[m]) >= {"step", "exp_avg", "exp_avg_sq"} for m in masters)
    trainable = sum(p.numel() for p in engine.module.parameters())
    assert sum(m.numel() for m in masters) >= trainable


def test_fp32_fragments_are_where_deepspeeds_safe_functions_apply(engine):
    from deepspeed.utils import safe_get_full_fp32_param

    for param in engine.module.parameters():
        assert adapter.has_fp32_fragments(param)
        assert torch.equal(safe_get_full_fp32_param(param), param.detach())  # fp32: the master is the weight
    plain = torch.nn.Parameter(torch.zeros(3))
    assert not adapter.has_fp32_fragments(plain) and safe_get_full_fp32_param(plain) is None


def test_relinking_points_every_fragment_at_the_current_adam_state(engine):
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = adapter.torch_optimizer(engine)
    for master in adapter.fp32_master_partitions(engine):  # new tensors, as a resume's fresh state would be
        inner.state[master]["exp_avg"] = torch.full_like(master, 7.0)
    adapter.relink_optimizer_state(engine)
    for name, param in engine.module.named_parameters():
        assert torch.equal(safe_get_full_optimizer_state(param, "exp_avg"), torch.full_like(param, 7.0)), name


def test_zero_gradient_partitions_hold_the_reduced_gradients_before_the_step(engine):
    sizes = []
    optimizer_step(engine, lambda: sizes.append(sum(g.numel() for g in adapter.zero_gradient_partitions(engine))))
    assert sizes[0] >= sum(p.numel() for p in engine.module.parameters())


def test_skipping_a_micro_step_moves_the_accumulation_boundary_as_step_does(engine):
    optimizer_step(engine)  # at the start of an accumulation cycle of two micro-steps
    micro, steps = engine.micro_steps, engine.global_steps
    assert not engine.is_gradient_accumulation_boundary()
    micro_step(engine)  # DeepSpeed's own count: one per micro-step, the optimizer step at the boundary
    assert engine.micro_steps == micro + 1 and engine.is_gradient_accumulation_boundary()
    adapter.skip_micro_step(engine)
    assert engine.micro_steps == micro + 2 and not engine.is_gradient_accumulation_boundary()
    assert engine.global_steps == steps


def test_engine_counters_are_the_live_ones_deepspeed_saves(engine):
    saved = adapter.engine_counters(engine)
    assert set(saved) == {"global_steps", "global_samples", "skipped_steps"}
    assert all(isinstance(value, int) for value in saved.values())
    adapter.restore_engine_counters(engine, {"global_steps": 41, "global_samples": 82, "skipped_steps": 3})
    optimizer_step(engine)  # DeepSpeed counts on from the restored values
    assert adapter.engine_counters(engine) == {"global_steps": 42, "global_samples": 84, "skipped_steps": 3}
    adapter.restore_engine_counters(engine, saved)
    assert adapter.engine_counters(engine) == saved


def test_forgetting_the_expert_groups_empties_deepspeeds_tables(engine):
    from deepspeed.utils import groups

    tables = (
        groups._EXPERT_PARALLEL_GROUP,
        groups._EXPERT_PARALLEL_GROUP_RANKS,
        groups._EXPERT_DATA_PARALLEL_GROUP,
        groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
    )
    assert all(EXPERTS in table for table in tables) and groups.mpu is engine.mpu
    adapter.forget_expert_groups()
    assert not any(tables) and groups.mpu is None


def test_deepspeed_builds_no_shared_memory_all_reduce_on_cpu(engine):
    """init_distributed on gloo leaves DeepSpeed's backend without its compiled shm all-reduce (a C++
    build at the first start on every machine, for an all-reduce megamoe never calls)."""
    import deepspeed.comm.comm as ds_comm

    assert ds_comm.cdb is not None and ds_comm.cdb.shm_comm_op is None
