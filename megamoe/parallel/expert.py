"""Expert parallelism: each rank of an expert-parallel group holds E / EP experts, and tokens
travel to them by all-to-all.

    rank r: tokens [N, dim], assignments (expert-major, over all E experts, routed locally)
      gather the assigned tokens                   rows [M, dim], expert-major
      all-to-all (splits: rows per destination)    rows for my experts, ordered (source, expert),
                                                   and their routing weights the same way
      experts read them in expert-major order      out [M', dim], received order (index = regroup)
      inverse all-to-all                           rows [M, dim] back in send order
      sum each token's rows                        [N, dim]

Dropless: split sizes come from the assignment counts, so any number of tokens per expert,
zero included, is exchanged. Expert e lives on rank e // (E / EP) of the group. The gather
(index_select) and the per-token sum (`sum_rows_per_token`) save only their index for backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megamoe.moe.dispatch import Assignments, Dispatch, DispatchState, Ready, sum_rows_per_token
from megamoe.moe.experts import GroupedExperts
from megamoe.parallel.collectives import Exchange, all_to_all, all_to_all_counts, gather_sequence, start_all_to_all


@dataclass
class ExpertParallelState(DispatchState):
    token_index: torch.Tensor
    """[M] int64: the token of each row this rank sent, in send order."""
    send_splits: list
    """Rows this rank sends to each rank of the group (its tokens for their experts)."""
    recv_splits: list
    """Rows this rank receives from each rank of the group."""
    dtype: torch.dtype
    """The tokens' dtype: rows travel back in it (bf16 under bf16 training, not the fp32 sum)."""


@dataclass
class InFlightDispatch:
    """The token and weight exchanges of one dispatch, started; `wait` completes them."""

    rows: torch.Tensor
    rows_exchange: Exchange
    weights: torch.Tensor
    weights_exchange: Exchange
    regroup: torch.Tensor
    tokens_per_expert: torch.Tensor
    state: ExpertParallelState

    def wait(self) -> Dispatch:
        rows = self.rows_exchange.wait(self.rows)
        weights = self.weights_exchange.wait(self.weights).index_select(0, self.regroup)
        return Dispatch(rows, self.regroup, self.tokens_per_expert, weights, self.state)


class AllToAllDispatcher:
    """The `LocalDispatcher` contract (see megamoe/moe/dispatch.py) across an expert-parallel group."""

    def __init__(self, group, num_local_experts: int):
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.num_local_experts = num_local_experts
        self.overlap = True
        """Return from `dispatch` with the tokens still in flight (asynchronous all-to-all), so
        the layer's shared experts run meanwhile; False waits inside `dispatch`."""

    def dispatch(self, tokens: torch.Tensor, assignments: Assignments):
        ep, local = self.ep_size, self.num_local_experts
        a = assignments
        if a.tokens_per_expert.shape[0] != ep * local:
            raise ValueError(f"assignments cover {a.tokens_per_expert.shape[0]} experts, expected {ep} ranks x {local}")
        per_expert = a.tokens_per_expert.view(ep, local)  # [destination rank, its local expert]
        # received[s, e]: rows source rank s sends for my local expert e
        received = all_to_all_counts(per_expert, self.group)
        send_splits = per_expert.sum(1).tolist()
        recv_splits = received.sum(1).tolist()
        rows, rows_exchange = start_all_to_all(
            tokens.index_select(0, a.token_index), recv_splits, send_splits, self.group
        )
        weights, weights_exchange = start_all_to_all(a.weights, recv_splits, send_splits, self.group)
        # Rows arrive grouped by source, then expert; the experts read them expert-major.
        expert_of_row = torch.arange(ep * local, device=tokens.device).repeat_interleave(received.flatten()) % local
        regroup = torch.argsort(expert_of_row, stable=True)
        state = ExpertParallelState(tokens.shape[0], a.token_index, send_splits, recv_splits, tokens.dtype)
        pending = InFlightDispatch(rows, rows_exchange, weights, weights_exchange, regroup, received.sum(0), state)
        return pending if self.overlap else Ready(pending.wait())

    def combine(self, out: torch.Tensor, state: ExpertParallelState) -> torch.Tensor:
        rows = all_to_all(out.to(state.dtype), state.send_splits, state.recv_splits, self.group)
        return sum_rows_per_token(rows, state.token_index, state.num_tokens, out.dtype)

    def gather_experts(self, param: torch.Tensor) -> torch.Tensor:
        """All experts' slices of `param` [E_local, ...] -> [E, ...]; backward sums every rank's
        gradient into the owner's slice (reduce-scatter)."""
        return gather_sequence(param, 0, self.group)


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
    shard.requires_grad_(experts.w1.requires_grad)  # a frozen base (model.lora) stays frozen when sliced
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
