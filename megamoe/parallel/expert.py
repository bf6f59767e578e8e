"""Expert parallelism: each rank of an expert-parallel group holds E / EP experts, and tokens
travel to them by all-to-all.

    rank r: tokens [N, dim], routing_map [N, E]  (routed over all E experts, locally)
      permute by global expert                     rows [M, dim], expert-major
      all-to-all (splits: rows per destination)    rows for my experts, ordered (source, expert)
      regroup by local expert                      rows [M', dim], expert-major  -> grouped GEMM
      ... and the same steps backwards, then the weighted un-permutation of LocalDispatcher.

Dropless: split sizes come from the routing map itself, so any number of tokens per expert,
zero included, is exchanged. Expert e lives on rank e // (E / EP) of the group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megamoe.moe.dispatch import DispatchState, weighted_unpermute
from megamoe.moe.experts import GroupedExperts
from megamoe.parallel.collectives import all_to_all, all_to_all_counts


@dataclass
class ExpertParallelState(DispatchState):
    send_splits: list = None
    """Rows this rank sends to each rank of the group (its tokens for their experts)."""
    recv_splits: list = None
    """Rows this rank receives from each rank of the group."""
    regroup: torch.Tensor = None
    """Permutation from received order (source, expert) to expert-major order."""


class AllToAllDispatcher:
    """The `LocalDispatcher` contract (see megamoe/moe/dispatch.py) across an expert-parallel group."""

    def __init__(self, group, num_local_experts: int):
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.num_local_experts = num_local_experts

    def dispatch(self, tokens: torch.Tensor, routing_map: torch.Tensor):
        ep, local = self.ep_size, self.num_local_experts
        if routing_map.shape[1] != ep * local:
            raise ValueError(f"routing_map has {routing_map.shape[1]} experts, expected {ep} ranks x {local}")
        expert_index, token_index = routing_map.t().nonzero(as_tuple=True)
        rows = tokens.index_select(0, token_index)
        per_expert = routing_map.sum(0).view(ep, local)  # [destination rank, its local expert]
        # received[s, e]: rows source rank s sends for my local expert e
        received = all_to_all_counts(per_expert, self.group)
        send_splits = per_expert.sum(1).tolist()
        recv_splits = received.sum(1).tolist()
        rows = all_to_all(rows, recv_splits, send_splits, self.group)
        # Rows arrive grouped by source, then expert; the grouped GEMM wants expert-major.
        expert_of_row = torch.arange(ep * local, device=rows.device).repeat_interleave(received.flatten()) % local
        regroup = torch.argsort(expert_of_row, stable=True)
        state = ExpertParallelState(token_index, expert_index, tokens.shape[0], send_splits, recv_splits, regroup)
        return rows.index_select(0, regroup), received.sum(0), state

    def combine(self, expert_out: torch.Tensor, probs: torch.Tensor, state: ExpertParallelState) -> torch.Tensor:
        back = torch.empty_like(state.regroup)
        back[state.regroup] = torch.arange(state.regroup.numel(), device=back.device)
        rows = expert_out.index_select(0, back)  # received order again
        rows = all_to_all(rows, state.send_splits, state.recv_splits, self.group)
        return weighted_unpermute(rows, probs, state)


def shard_experts(experts: GroupedExperts, ep_rank: int, ep_size: int) -> GroupedExperts:
    """The slice of the stacked experts that expert-parallel rank `ep_rank` holds."""
    if experts.num_experts % ep_size:
        raise ValueError(
            f"model.moe.num_experts={experts.num_experts} is not divisible by "
            f"parallel.expert_parallel_size={ep_size}; choose sizes that divide"
        )
    local = experts.num_experts // ep_size
    start = ep_rank * local
    with torch.device(experts.w1.device):  # on the meta device: nothing allocated, nothing drawn
        shard = GroupedExperts(local, experts.dim, experts.hidden).to(experts.w1.dtype)
    with torch.no_grad():
        for name in ("w1", "b1", "w2", "b2"):
            getattr(shard, name).copy_(getattr(experts, name)[start : start + local])
    shard.use_grouped_mm = experts.use_grouped_mm
    return shard


def apply_expert_parallel(model: nn.Module, group) -> nn.Module:
    """Give every MoE layer of `model` its expert slice and the all-to-all dispatcher, in place.

    Expert parameters are tagged as DeepSpeed tags its own (`allreduce = False`, `group_name`),
    so the optimizer reduces them over the expert-data-parallel group, not the data-parallel one.
    """
    from megamoe.moe.layer import moe_layers

    ep_rank, ep_size = dist.get_rank(group), dist.get_world_size(group)
    for layer in moe_layers(model):
        layer.experts = shard_experts(layer.experts, ep_rank, ep_size)
        layer.dispatcher = AllToAllDispatcher(group, layer.experts.num_experts)
        for param in layer.experts.parameters():
            param.allreduce = False
            param.group_name = f"ep_size_{ep_size}"
    return model
