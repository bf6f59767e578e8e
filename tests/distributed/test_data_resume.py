"""Data distribution over real process groups, and exact resume of training with loader workers.

- The split rule on 4 gloo ranks with megatron-core's groups: ranks of one tensor- or
  context-parallel group read identical samples, data-parallel ranks disjoint ones (expert-parallel
  ranks are data-parallel ranks for the data).
- torchrun, 2 ranks x 2 loader workers: 6 steps uninterrupted vs resumed after step 3 give
  identical per-step losses and end at the same stream position.
"""

import json
from pathlib import Path

import torch

from tests.distributed.launch_helpers import REPO, pretrain, read_metrics, spawn

TINY = str(REPO / "configs" / "tiny.yaml")
LAYOUTS = {"tp2": {"tensor_parallel_size": 2}, "cp2": {"context_parallel_size": 2}, "ep2": {"expert_parallel_size": 2}}


def _read_on_layouts(rank, world, shard_dir, out_dir):
    import torch.distributed as dist

    from megamoe.config import ParallelConfig, load_config
    from megamoe.data.loader import build_loader
    from megamoe.parallel.topology import destroy_distributed, init_distributed

    cfg = load_config(
        None,
        [
            f"data.path={shard_dir}",
            "data.micro_batch_size=2",
            "model.in_channels=3",
            "model.text_dim=4",
            "data.text_len=4",
        ],
    )
    from megatron.core import parallel_state

    results = {}
    for name, sizes in LAYOUTS.items():
        topology = init_distributed(ParallelConfig(**sizes), torch.device("cpu"))
        loader = build_loader(cfg, topology.dp_rank, topology.dp_size)
        keys = [k for _ in range(3) for k in next(loader)["key"]]
        gathered = [None] * world
        dist.all_gather_object(gathered, (topology.dp_rank, topology.dp_size, keys))
        results[name] = gathered
        parallel_state.destroy_model_parallel()
    if rank == 0:
        Path(out_dir, "results.json").write_text(json.dumps(results))
    destroy_distributed()


def test_model_parallel_ranks_share_samples_and_data_parallel_ranks_do_not(tmp_path):
    from megamoe.tools.synthetic_data import dataset_params, write_synthetic_dataset

    shard_dir = tmp_path / "shards"  # 8 shards of 4 clips: 3 batches of 2 stay inside epoch 0 on every rank
    write_synthetic_dataset(
        str(shard_dir), dataset_params(num_clips=32, frames=2, size=4, channels=3, text_len=4, text_dim=4)
    )
    # Spawned, not forked: this test process may already run threads (OpenMP, gloo) that a fork would break.
    spawn(_read_on_layouts, 4, str(shard_dir), str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    for name, expected_dp in (("tp2", [0, 0, 1, 1]), ("cp2", [0, 0, 1, 1]), ("ep2", [0, 1, 2, 3])):
        per_rank = results[name]
        assert [dp for dp, _, _ in per_rank] == expected_dp, name  # megatron-core's order: tp, cp fastest
        by_dp = {}
        for dp, _, keys in per_rank:
            by_dp.setdefault(dp, []).append(keys)
        for copies in by_dp.values():
            assert all(c == copies[0] for c in copies), name  # one model replica, one stream of samples
        streams = [set(copies[0]) for copies in by_dp.values()]
        assert all(not (a & b) for i, a in enumerate(streams) for b in streams[i + 1 :]), name


# --- end to end -------------------------------------------------------------------------------


def test_resume_with_two_workers_per_rank_reproduces_the_losses(tmp_path, data_cache):
    common = [
        "--config",
        TINY,
        f"data.cache_dir={data_cache}",
        "data.synthetic_num_clips=64",
        "data.num_workers=2",
        "model.dim=64",
        "model.num_layers=2",
        "logging.every_steps=1",
        "checkpoint.every_steps=3",
        "optim.warmup_steps=2",
        "train.steps=6",
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    pretrain(common + [f"train.output_dir={full}"])
    # The step-3 checkpoint of the full run is what a run interrupted after step 3 leaves behind
    # (its workers had prefetched past step 3 just the same); resume from it into a new directory.
    resumed = pretrain(common + [f"train.output_dir={part}", "--resume", str(full / "checkpoints" / "step_00000003")])
    assert "resumed from" in resumed.stdout

    uninterrupted, continued = read_metrics(full), read_metrics(part)
    assert sorted(continued) == [4, 5, 6]
    for step in range(4, 7):
        for name in ("loss", "grad_norm"):
            assert continued[step][name] == uninterrupted[step][name], (step, name)
    # The stream position is saved per rank and per worker, and both runs end at the same one.
    for rank in range(2):
        saved = [
            torch.load(run / "checkpoints" / "step_00000006" / f"rank_{rank:05d}.pt", weights_only=True)["data"]
            for run in (full, part)
        ]
        assert saved[0] == saved[1]
        assert saved[0]["dp_rank"] == rank and saved[0]["num_workers"] == 2 and len(saved[0]["workers"]) == 2
