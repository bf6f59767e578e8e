"""The training loop's reductions over ranks: loss parts, routing statistics, data counts, flags.

Which ranks a statistic is reduced over depends on what the ranks hold. Ranks of one tensor
parallel group (without sequence parallelism) hold the same tokens and must be counted once;
ranks of one context or sequence parallel group hold different tokens of the same samples;
data-parallel ranks hold different samples. `token_batch_group` (parallelize.py) is the group
of ranks that hold different tokens of the global batch: the group every per-token statistic
is summed or averaged over.

All functions here are collectives over the group they name: every rank of it calls them in the
same order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
import torch.distributed as dist

from megamoe.config import ParallelConfig
from megamoe.parallel.megatron_state import parallel_state
from megamoe.parallel.parallelize import token_batch_group


def sum_over_token_shards(parallel: ParallelConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """`reduce` for statistics additive over tokens (expert loads, routing diagnostics): each rank's
    routers see only its shard of the sequence under CP / SP and of the batch under DP, so the sum
    runs over every shard. Returns a function of a tensor that leaves its argument unchanged."""
    group = token_batch_group(parallel)

    def reduce(value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        dist.all_reduce(value, group=group)
        return value

    return reduce


def mean_over_token_shards(values: dict[str, torch.Tensor], parallel: ParallelConfig) -> dict[str, float]:
    """Each 0-dim value averaged over the ranks that hold different tokens, as floats on the host.

    For a loss part that is the same on the ranks of one TP/CP group (the prediction is gathered
    and router losses reduce their statistics over the shards; see train/objective.py), this is its
    data-parallel mean. One all-reduce for all values.
    """
    group = token_batch_group(parallel)
    names = sorted(values)
    stacked = torch.stack([values[n].float() for n in names])
    dist.all_reduce(stacked, group=group)
    return {n: v.item() for n, v in zip(names, stacked.cpu() / dist.get_world_size(group))}


def sum_counts_over_data_parallel(counts: dict[str, int]) -> dict[str, int]:
    """Integer counters (samples read, bad samples by cause) summed over the data-parallel ranks;
    a counter missing on some ranks counts 0 there."""
    everyone = [None] * parallel_state.get_data_parallel_world_size()
    dist.all_gather_object(everyone, counts, group=parallel_state.get_data_parallel_group())
    return dict(sum((Counter(c) for c in everyone), Counter()))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (collective over all ranks)."""
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
