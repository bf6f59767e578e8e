"""The groups DeepSpeed reduces and shards over are megatron-core's, at every layout.

megatron-core folds expert parallelism over the tensor x context x data ranks; DeepSpeed must
reduce expert gradients over megatron-core's expert-data-parallel group (not a group of its
own arithmetic), sum dense gradients over DP x CP and average them over DP, and sum gradient
norms over the tensor-parallel group. Checked on a real engine, on 4 gloo ranks.
"""

import pytest
import torch
import torch.distributed as dist

from tests.distributed.launch_helpers import spawn

# world 4, megatron-core order tp-cp-ep-dp: (sizes, groups of rank 0..3 by kind)
LAYOUTS = {
    "tp2_ep2": (
        dict(tensor_parallel_size=2, expert_parallel_size=2),
        {
            "tp": [[0, 1], [0, 1], [2, 3], [2, 3]],
            "cp": [[0], [1], [2], [3]],
            "dp": [[0, 2], [1, 3], [0, 2], [1, 3]],
            "dp_cp": [[0, 2], [1, 3], [0, 2], [1, 3]],
            "ep": [[0, 1], [0, 1], [2, 3], [2, 3]],
            "edp": [[0, 2], [1, 3], [0, 2], [1, 3]],
        },
    ),
    "cp2_ep2": (
        dict(context_parallel_size=2, expert_parallel_size=2),
        {
            "tp": [[0], [1], [2], [3]],
            "cp": [[0, 1], [0, 1], [2, 3], [2, 3]],
            "dp": [[0, 2], [1, 3], [0, 2], [1, 3]],
            "dp_cp": [[0, 1, 2, 3]] * 4,
            "ep": [[0, 1], [0, 1], [2, 3], [2, 3]],
            "edp": [[0, 2], [1, 3], [0, 2], [1, 3]],
        },
    ),
    "tp2_ep4": (
        dict(tensor_parallel_size=2, expert_parallel_size=4),
        {
            "tp": [[0, 1], [0, 1], [2, 3], [2, 3]],
            "cp": [[0], [1], [2], [3]],
            "dp": [[0, 2], [1, 3], [0, 2], [1, 3]],
            "dp_cp": [[0, 2], [1, 3], [0, 2], [1, 3]],
            "ep": [[0, 1, 2, 3]] * 4,
            "edp": [[0], [1], [2], [3]],
        },
    ),
}


class ToyMoE(torch.nn.Module):
    """A dense weight and a local expert weight tagged as megamoe's expert parallelism tags them."""

    def __init__(self, ep_size):
        super().__init__()
        self.dense = torch.nn.Linear(4, 4)
        self.experts = torch.nn.Parameter(torch.randn(2, 4, 4))
        self.experts.allreduce = False
        self.experts.group_name = f"ep_size_{ep_size}"

    def forward(self, x):
        return self.dense(x) @ self.experts[0]


def _worker(rank, world, layout):
    from megatron.core import parallel_state

    from megamoe.config import Config, ParallelConfig
    from megamoe.parallel.topology import DeepSpeedMPU, init_distributed
    from megamoe.train.engine import build_engine

    sizes, expected = LAYOUTS[layout]
    topology = init_distributed(ParallelConfig(**sizes), torch.device("cpu"))
    ranks = dist.get_process_group_ranks
    mine = {kind: groups[rank] for kind, groups in expected.items()}
    assert ranks(parallel_state.get_tensor_model_parallel_group()) == mine["tp"]
    assert ranks(parallel_state.get_data_parallel_group()) == mine["dp"]
    assert ranks(parallel_state.get_expert_model_parallel_group()) == mine["ep"]
    assert (topology.tp_size, topology.cp_size, topology.dp_size) == (len(mine["tp"]), len(mine["cp"]), len(mine["dp"]))

    mpu = DeepSpeedMPU()
    assert ranks(mpu.get_model_parallel_group()) == mine["tp"]
    assert ranks(mpu.get_data_parallel_group()) == mine["dp"]
    assert ranks(mpu.get_sequence_parallel_group()) == mine["cp"]
    assert ranks(mpu.get_sequence_data_parallel_group()) == mine["dp_cp"]
    assert mpu.get_sequence_parallel_world_size() == len(mine["cp"])

    cfg = Config()
    cfg.parallel = ParallelConfig(**sizes)
    cfg.model.moe.num_experts = 2 * sizes["expert_parallel_size"]
    cfg.optim.zero_stage, cfg.data.micro_batch_size = 2, 1
    engine = build_engine(ToyMoE(sizes["expert_parallel_size"]), cfg)
    name = f"ep_size_{sizes['expert_parallel_size']}"
    # What DeepSpeed's engine and ZeRO-2 optimizer actually reduce and partition over:
    assert ranks(engine.seq_data_parallel_group) == mine["dp_cp"]
    assert engine.dp_world_size == len(mine["dp"]) and engine.sequence_parallel_size == len(mine["cp"])
    assert engine.mp_world_size == len(mine["tp"])
    optimizer = engine.optimizer
    assert ranks(optimizer.dp_process_group) == mine["dp_cp"]
    assert ranks(optimizer.model_parallel_group) == mine["tp"]
    assert ranks(optimizer.expert_dp_process_group[name]) == mine["edp"]
    assert ranks(optimizer.ep_process_group[name]) == mine["ep"]
    assert ranks(parallel_state.get_expert_data_parallel_group()) == mine["edp"]
    moe_groups = [g for g, is_moe in zip(optimizer.real_dp_process_group, optimizer.is_moe_param_group) if is_moe]
    assert moe_groups and all(ranks(g) == mine["edp"] for g in moe_groups)
    # Experts are counted in the gradient norm on every TP rank (each holds other experts).
    assert engine.module.experts.model_parallel is True
    dist.destroy_process_group()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_deepspeed_reduces_over_megatron_groups(layout):
    spawn(_worker, 4, layout)
