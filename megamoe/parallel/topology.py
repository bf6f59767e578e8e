"""Process groups: megatron-core's `parallel_state` owns them, DeepSpeed borrows them.

megatron-core builds every group megamoe needs (data, tensor, context, expert and
expert-data parallel) and its group bookkeeping runs on CPU with gloo as well as on NCCL.
DeepSpeed gets the same groups through `DeepSpeedMPU`, so gradients are reduced and
optimizer state is sharded over exactly the ranks megamoe believes are data-parallel.

Rank layout (megatron-core's order "tp-cp-ep-dp-pp", pipeline size 1): tensor-parallel
ranks are neighbours, then context-parallel, then data-parallel. With 8 ranks, TP=2, CP=2:

    TP groups [0,1] [2,3] [4,5] [6,7]     CP groups [0,2] [1,3] [4,6] [5,7]
    DP groups [0,4] [1,5] [2,6] [3,7]     DP x CP   [0,2,4,6] [1,3,5,7]

Experts are not split by tensor parallelism (expert_tensor_parallel_size=1), so expert
parallelism folds over all TP x CP x DP ranks ("parallel folding"): with EP=4 the expert
groups are [0..3] [4..7] and each expert is replicated over an expert-data-parallel group
[0,4] [1,5] [2,6] [3,7].
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megamoe.config import ParallelConfig
from megamoe.device import backend_for
from megamoe.parallel.megatron_state import parallel_state


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
    ep_rank: int = 0
    """This rank's place in its expert-parallel group (which slice of the experts it holds)."""
    tp_size: int = 1
    """Ranks that split each layer's weights (and, with sequence parallelism, the tokens between layers)."""
    tp_rank: int = 0
    cp_size: int = 1
    """Ranks that split each sequence (Ulysses context parallelism)."""
    cp_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        """The layout in one phrase for the start-up line, e.g. 'tp 2 x cp 1 x dp 2, ep 2'."""
        return f"tp {self.tp_size} x cp {self.cp_size} x dp {self.dp_size}, ep {self.expert_parallel_size}"


def init_distributed(parallel: ParallelConfig, device: torch.device, timeout_minutes: int = 30) -> Topology:
    """Create the default process group (also for a single process) and megatron-core's groups."""
    if not dist.is_initialized():
        timeout = timedelta(minutes=timeout_minutes)
        if "RANK" not in os.environ:  # plain `python launcher/pretrain.py`: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))  # for libraries that read it
            # An in-process store: no port to bind, so concurrent one-process jobs cannot collide.
            store = {"store": dist.HashStore(), "rank": 0, "world_size": 1}
        else:
            store = _store_of_this_attempt(timeout)
        dist.init_process_group(backend_for(device), timeout=timeout, **store)
    return _model_parallel_groups(parallel, device)


def init_rehearsal_distributed(
    parallel: ParallelConfig, device: torch.device, rank: int, world_size: int, gpus_per_node: int
) -> Topology:
    """One process plays global rank `rank` of a `world_size` layout (launcher/rehearse.py).

    torch's fake process group accepts every collective and moves no data (an all-reduce leaves
    the input as it is, an all-to-all hands each rank back what it sent), so everything that
    depends on the layout (which shard of each weight, which experts, which optimizer partition)
    is real and only the values are not. megatron-core builds its groups on it unchanged, except
    its gloo side groups, which the fake store cannot back.
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank % gpus_per_node),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=os.environ.get("MASTER_PORT", "29500"),
    )
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    return _model_parallel_groups(parallel, device, gloo_side_groups=False)


def _model_parallel_groups(parallel: ParallelConfig, device: torch.device, gloo_side_groups: bool = True) -> Topology:
    """megatron-core's groups over the default process group, and this rank's place in them."""
    if device.type != "cuda":  # before DeepSpeed's first init_distributed (engine or expert groups)
        from megamoe.deepspeed_adapter import skip_shared_memory_all_reduce

        skip_shared_memory_all_reduce()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel_size,
        pipeline_model_parallel_size=1,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_parallel_size,
        # Experts are not split by tensor parallelism: expert parallelism folds over the
        # tensor x context x data ranks (megatron-core's "parallel folding").
        expert_tensor_parallel_size=1,
        **({} if gloo_side_groups else {"create_gloo_process_groups": False}),
    )
    return Topology(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        device=device,
        expert_parallel_size=parallel.expert_parallel_size,
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        cp_size=parallel_state.get_context_parallel_world_size(),
        cp_rank=parallel_state.get_context_parallel_rank(),
    )


def _store_of_this_attempt(timeout: timedelta) -> dict:
    """Under torchrun, the process groups' keys go under a prefix of the restart attempt.

    With c10d rendezvous, workers restarted by `--max-restarts` are handed the same key-value
    store as the attempt before, keys included: a new rank could read a dead rank's address for
    a group and wait for it until the timeout. Empty (the usual env:// set-up) outside torchrun.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return {}
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    hosts_own_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank == 0
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=hosts_own_store,
        timeout=timeout,
    )
    return {"store": dist.PrefixStore(f"megamoe/attempt_{attempt}", store), "rank": rank, "world_size": world_size}


def expert_groups() -> tuple:
    """(expert-parallel group, expert-data-parallel group) of this rank, from megatron-core."""
    return parallel_state.get_expert_model_parallel_group(), parallel_state.get_expert_data_parallel_group()


def share_expert_groups_with_deepspeed(expert_parallel_size: int) -> str:
    """Give DeepSpeed megatron-core's expert groups, check them, and return their name.

    DeepSpeed reduces and partitions expert parameters over the groups it keeps under the
    name `ep_size_<EP>`. Left to itself it would build them with its own rank arithmetic,
    which knows nothing of megatron-core's folding of experts over tensor and context
    parallel ranks; instead megatron-core's groups are registered under that name, so the
    ranks the dispatcher exchanges tokens with and the ranks DeepSpeed reduces expert
    gradients over come from one place.

    Expert gradients are only right if the expert-data-parallel group holds exactly the ranks
    that keep copies of the same experts: every member has this rank's expert-parallel rank,
    and it meets the expert-parallel group in this rank alone. A mismatch (or a different
    group already registered under the name) would average different experts' gradients, so
    it is an error, not a warning. Collective over the expert-data-parallel group.
    """
    import deepspeed

    from megamoe.deepspeed_adapter import register_expert_groups, registered_expert_groups

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the existing process group
    name = f"ep_size_{expert_parallel_size}"
    ep_group, edp_group = expert_groups()
    ours = (dist.get_process_group_ranks(ep_group), dist.get_process_group_ranks(edp_group))
    register_expert_groups(name, ep_group, edp_group)
    deepspeeds_ep_group, deepspeeds_edp_group = registered_expert_groups(name)
    theirs = (dist.get_process_group_ranks(deepspeeds_ep_group), dist.get_process_group_ranks(deepspeeds_edp_group))
    if ours != theirs:
        raise RuntimeError(
            f"rank {dist.get_rank()}: DeepSpeed's expert groups {theirs} differ from megatron-core's "
            f"{ours}; expert gradients would be reduced over the wrong ranks"
        )
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    replicas = [None] * len(ours[1])
    dist.all_gather_object(replicas, ep_rank, group=edp_group)
    if set(replicas) != {ep_rank} or set(ours[0]) & set(ours[1]) != {dist.get_rank()}:
        raise RuntimeError(
            f"rank {dist.get_rank()}: expert-data-parallel group {ours[1]} holds expert-parallel ranks "
            f"{replicas}, expected only {ep_rank}; its members do not keep the same experts"
        )
    return name


def destroy_distributed() -> None:
    from megamoe.deepspeed_adapter import forget_expert_groups

    forget_expert_groups()  # the groups lent to DeepSpeed go with them
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class DeepSpeedMPU:
    """The `mpu` object DeepSpeed asks for its groups, answered from megatron-core.

    DeepSpeed 0.19 reads three groups from it:
      - data parallel (pure DP, without CP): batch-size arithmetic and the divisor of the
        gradient average (ZeRO divides by |DP x CP| / CP = |DP|);
      - sequence-data parallel (DP x CP, megatron's data-parallel group with context
        parallelism): where gradients are summed and ZeRO partitions optimizer state. Each
        context-parallel rank's backward gives its partial gradient, so summing over CP and
        averaging over DP gives the gradient of the global-batch mean loss;
      - model parallel = the tensor-parallel group: the gradient norm is summed over it, each
        `tensor_model_parallel` parameter counted on every TP rank (each holds a different
        shard) and every other parameter on TP rank 0 only; DeepSpeed also names per-TP-rank
        checkpoint files by this rank.
    Pipeline parallelism is not used (size 1).
    """

    def get_data_parallel_group(self):
        return parallel_state.get_data_parallel_group()

    def get_data_parallel_rank(self):
        return parallel_state.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return parallel_state.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(parallel_state.get_data_parallel_group())

    def get_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self):
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return parallel_state.get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self):
        return parallel_state.get_tensor_model_parallel_src_rank()

    def get_sequence_parallel_group(self):
        return parallel_state.get_context_parallel_group()

    def get_sequence_parallel_world_size(self):
        return parallel_state.get_context_parallel_world_size()

    def get_sequence_parallel_rank(self):
        return parallel_state.get_context_parallel_rank()

    def get_sequence_data_parallel_group(self):
        return parallel_state.get_data_parallel_group(with_context_parallel=True)

    def get_sequence_data_parallel_world_size(self):
        return parallel_state.get_data_parallel_world_size(with_context_parallel=True)

    def get_sequence_data_parallel_rank(self):
        return parallel_state.get_data_parallel_rank(with_context_parallel=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
