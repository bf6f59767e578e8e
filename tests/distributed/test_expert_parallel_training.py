"""Expert-parallel training under DeepSpeed ZeRO on gloo ranks.

The reference is the same data-parallel run with every expert on every rank (EP=1): the data
each rank reads, the noise it draws and the routing of its micro-batch are identical, so any
difference comes from expert parallelism itself (dispatch, expert-data-parallel gradient
reduction, gradient norm, checkpoints).
"""

import pytest
import torch.distributed as dist

from tests.distributed.launch_helpers import REPO, pretrain, read_metrics, spawn

SMALL_MOE = [
    "--config",
    str(REPO / "configs" / "tiny_moe.yaml"),
    "model.dim=64",
    "model.num_layers=2",
    "model.ffn_dim=256",
    "model.moe.num_experts=4",
    "data.micro_batch_size=4",
    "optim.warmup_steps=2",
    "logging.every_steps=1",
    "model.moe.diagnostics_every=5",
]


def run(nproc, args, output_dir):
    pretrain([*SMALL_MOE, *args, f"train.output_dir={output_dir}"], nproc)
    return read_metrics(output_dir)


ARGS = [
    "train.steps=10",
    "checkpoint.every_steps=10",
    "optim.grad_clip=1.0",
    "model.patch_size=[1,2,2]",  # Wan's patch: its first steps' gradient norms pass the clip (4x4 patches' stayed under 1)
    "logging.val_every=10",  # the held-out forward dispatches tokens to the other rank's experts too
    "logging.val_batches=3",  # odd: one rank runs a batch again, uncounted, to keep the all-to-alls in step
]


@pytest.fixture(scope="module")
def replicated(tmp_path_factory, data_cache):
    """The reference: the same run with every expert on both ranks (EP=1), under ZeRO-1. ZeRO-2
    partitions the same sums differently, which changes fp32 round-off only (well below 1e-5),
    so it is the reference for both stages."""
    out = tmp_path_factory.mktemp("ep1") / "run"
    return run(2, [f"data.cache_dir={data_cache}", *ARGS, "optim.zero_stage=1"], out), out


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_ten_steps_at_ep2_match_the_replicated_run(zero_stage, replicated, tmp_path, data_cache):
    """EP=2 through the launcher against the same run with replicated experts. (Four ranks, where
    each expert lives on 2 of them, are compared with a single process in
    test_parallel_training.py::test_ep2_on_four_ranks_ten_steps_match_single_process.)"""
    reference, reference_dir = replicated
    args = [f"data.cache_dir={data_cache}", *ARGS, f"optim.zero_stage={zero_stage}", "parallel.expert_parallel_size=2"]
    sharded = run(2, args, tmp_path / "ep2")
    assert sorted(sharded) == list(range(1, 11))
    assert any(m["grad_norm"] > 1.0 for m in reference.values())  # clipping is exercised
    for step in sharded:
        assert abs(sharded[step]["loss"] - reference[step]["loss"]) < 1e-5, step
        assert abs(sharded[step]["grad_norm"] - reference[step]["grad_norm"]) < 1e-5, step
    for name, value in sharded[10]["val"].items():
        assert abs(value - reference[10]["val"][name]) < 1e-5, name

    # The exported weights hold every rank's experts: the full, layout-independent model.
    from megamoe.model.weights import read_state_dict

    name = "checkpoints/step_00000010/weights"
    a, b = read_state_dict(reference_dir / name), read_state_dict(tmp_path / "ep2" / name)
    assert a.keys() == b.keys() and b["blocks.0.ffn.experts.w1"].shape[0] == 4
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def _group_worker(rank, world):
    import torch

    from megamoe.config import ParallelConfig
    from megamoe.parallel.topology import expert_groups, init_distributed, share_expert_groups_with_deepspeed

    init_distributed(ParallelConfig(expert_parallel_size=2), torch.device("cpu"))
    from deepspeed.utils import groups

    name = share_expert_groups_with_deepspeed(2)
    ep_group, _ = expert_groups()
    # The ranks the dispatcher exchanges tokens with are DeepSpeed's expert-parallel group,
    # and DeepSpeed reduces expert gradients over their complement.
    assert (
        dist.get_process_group_ranks(ep_group)
        == dist.get_process_group_ranks(groups._get_expert_parallel_group(name))
        == ([0, 1] if rank < 2 else [2, 3])
    )
    assert dist.get_process_group_ranks(groups._get_expert_data_parallel_group(name)) == [rank % 2, rank % 2 + 2]
    dist.destroy_process_group()


def test_deepspeed_expert_groups_are_the_dispatcher_groups():
    spawn(_group_worker, 4)
