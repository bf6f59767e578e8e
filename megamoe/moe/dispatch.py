"""Dropless token dispatch: permute tokens into expert order, and back.

A dispatcher has two methods and owns everything between the router and the experts:

    dispatch(tokens [N, dim], routing_map bool [N, E])
        -> (sorted_tokens [M, dim], tokens_per_expert [E], state)
    combine(expert_out [M, dim], probs [N, E], state) -> [N, dim]

M is the number of (token, expert) assignments: a token routed to two experts appears twice,
a token routed to none not at all. Every assignment is executed (no capacity, no dropping).

`LocalDispatcher` runs all E experts in this process. The expert-parallel dispatcher keeps
this contract: its `dispatch` does the same local permutation, then an all-to-all that sends
each expert's rows to the rank holding it (split sizes from the per-rank sums of
`tokens_per_expert`) and returns only the local experts' rows and counts; its `combine`
runs the inverse all-to-all and then this same weighted un-permutation. `state` is opaque to
the layer, so it can carry the split sizes as well. The MoE layer never needs to change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DispatchState:
    token_index: torch.Tensor
    """[M] int64: the source token of each sorted row."""
    expert_index: torch.Tensor
    """[M] int64: the expert of each sorted row (non-decreasing)."""
    num_tokens: int
    """N, the number of tokens before dispatch."""


class LocalDispatcher:
    def dispatch(self, tokens: torch.Tensor, routing_map: torch.Tensor):
        if routing_map.dtype != torch.bool or routing_map.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"routing_map must be bool [{tokens.shape[0]}, E], got {routing_map.dtype} {tuple(routing_map.shape)}"
            )
        # nonzero of the [E, N] view lists assignments expert-major, tokens in order within an
        # expert: exactly the grouping the experts expect, without a sort. (On GPU this is the
        # one host sync of the layer; a dropless layer needs the sizes anyway.)
        expert_index, token_index = routing_map.t().nonzero(as_tuple=True)
        tokens_per_expert = routing_map.sum(0)
        sorted_tokens = tokens.index_select(0, token_index)
        return sorted_tokens, tokens_per_expert, DispatchState(token_index, expert_index, tokens.shape[0])

    def combine(self, expert_out: torch.Tensor, probs: torch.Tensor, state: DispatchState) -> torch.Tensor:
        return weighted_unpermute(expert_out, probs, state)


def weighted_unpermute(rows: torch.Tensor, probs: torch.Tensor, state: DispatchState) -> torch.Tensor:
    """Sum of probs[t, e] * rows over each token's rows; tokens with no expert get 0.

    The sum runs in the promoted dtype of rows and probs (fp32 probs: fp32 sum, so bf16
    expert outputs are accumulated without further rounding); the caller casts.
    """
    weight = probs[state.token_index, state.expert_index]  # gradient flows to the router
    weighted = rows * weight[:, None]  # type promotion: bf16 * fp32 -> fp32
    out = weighted.new_zeros(state.num_tokens, rows.shape[1])
    return out.index_add(0, state.token_index, weighted)
