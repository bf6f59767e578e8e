"""Process groups: megatron-core's `parallel_state` owns them, DeepSpeed borrows them.

megatron-core builds every group megamoe needs (data, tensor, context, expert and
expert-data parallel) and its group bookkeeping runs on CPU with gloo as well as on NCCL.
DeepSpeed gets the same groups through `DeepSpeedMPU`, so gradients are reduced and
optimizer state is sharded over exactly the ranks megamoe believes are data-parallel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megamoe.config import ParallelConfig
from megamoe.device import backend_for


@dataclass(frozen=True)
class Topology:
    """Where this process sits in the layout."""

    rank: int
    world_size: int
    local_rank: int
    dp_rank: int
    dp_size: int
    device: torch.device
    expert_parallel_size: int = 1
    """Ranks that split the experts; they exchange tokens by all-to-all."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(parallel: ParallelConfig, device: torch.device, timeout_minutes: int = 30) -> Topology:
    """Create the default process group (also for a single process) and megatron-core's groups."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python launcher/pretrain.py`: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(backend_for(device), timeout=timedelta(minutes=timeout_minutes))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel_size,
        pipeline_model_parallel_size=1,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_parallel_size,
    )
    return Topology(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        device=device,
        expert_parallel_size=parallel.expert_parallel_size,
    )


def expert_groups() -> tuple:
    """(expert-parallel group, expert-data-parallel group) of this rank, from megatron-core."""
    return parallel_state.get_expert_model_parallel_group(), parallel_state.get_expert_data_parallel_group()


def share_expert_groups_with_deepspeed(expert_parallel_size: int) -> str:
    """Create DeepSpeed's expert groups and prove they are megatron-core's; returns their name.

    DeepSpeed reduces and partitions expert parameters over the groups it keeps under the
    name `ep_size_<EP>`. Expert gradients are only right if that expert-data-parallel group
    holds exactly the ranks that keep copies of the same experts, i.e. the complement of the
    expert-parallel group megamoe's dispatcher exchanges tokens with; a mismatch would average
    different experts' gradients, so it is an error, not a warning.
    """
    import deepspeed
    from deepspeed.utils import groups

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the existing process group
    name = f"ep_size_{expert_parallel_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(expert_parallel_size)
    ep_group, edp_group = expert_groups()
    ours = (dist.get_process_group_ranks(ep_group), dist.get_process_group_ranks(edp_group))
    theirs = (dist.get_process_group_ranks(groups._get_expert_parallel_group(name)),
              dist.get_process_group_ranks(groups._get_expert_data_parallel_group(name)))
    if ours != theirs:
        raise RuntimeError(f"rank {dist.get_rank()}: DeepSpeed's expert groups {theirs} differ from megatron-core's "
                           f"{ours}; expert gradients would be reduced over the wrong ranks")
    return name


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class DeepSpeedMPU:
    """The `mpu` object DeepSpeed asks for its groups, answered from megatron-core."""

    def get_data_parallel_group(self):
        return parallel_state.get_data_parallel_group()

    def get_data_parallel_rank(self):
        return parallel_state.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return parallel_state.get_data_parallel_world_size()

    def get_model_parallel_group(self):
        return parallel_state.get_model_parallel_group()

    def get_model_parallel_rank(self):
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return parallel_state.get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self):
        return parallel_state.get_tensor_model_parallel_src_rank()

    def get_sequence_parallel_world_size(self):
        return parallel_state.get_context_parallel_world_size()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
