"""Dropless token dispatch: which rows the experts run, and how their outputs come back.

A dispatcher has three methods and owns everything between the router and the experts:

    dispatch(tokens [N, dim], assignments) -> pending; pending.wait() -> Dispatch(
        rows [S, dim], index [M], tokens_per_expert [E_local], weights [M], state)
    combine(out [S, dim], state) -> [N, dim]
    gather_experts(param [E_local, ...]) -> [E, ...]   (all experts' slices, differentiable)

Between `dispatch` and `wait` the tokens may be in flight (an asynchronous all-to-all), so the
layer runs work that does not need them there: its shared experts.

M is the number of (token, expert) assignments: a token routed to two experts counts twice,
a token routed to none not at all. Every assignment is executed (no capacity, no dropping).
The experts read row index[i] of rows and add their weighted output into row index[i] of out
(see experts.py), so `index` names rows and the experts never build the permuted copy.

`LocalDispatcher` runs all E experts in this process: rows are the tokens themselves, index the
source token of each assignment in expert-major order, and combine has nothing left to do.
The expert-parallel dispatcher (megamoe/parallel/expert.py) keeps this contract: its rows are
those an all-to-all delivered, its combine the inverse all-to-all and the per-token sum, and its
gather_experts an all-gather over the group. The MoE layer never needs to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass
class Assignments:
    """Every (token, expert) pair a router chose among the real experts, in expert-major order
    (tokens ascending within an expert): the order the grouped experts consume."""

    token_index: torch.Tensor
    """[M] int64: the token of each assignment."""
    expert_index: torch.Tensor
    """[M] int64: its expert (non-decreasing)."""
    tokens_per_expert: torch.Tensor
    """[E] int64: assignments per expert."""
    weights: torch.Tensor
    """[M] fp32: the combine weight probs[token, expert], differentiable (the router's gradient)."""
    num_tokens: int
    """N, the number of tokens routed."""


def expert_assignments(
    probs: torch.Tensor, routing_map: torch.Tensor, num_experts: int, topk_indices: torch.Tensor | None = None
) -> Assignments:
    """The assignments of a router's output (probs, routing_map [N, E_total]) to the first
    `num_experts` columns; null-expert columns beyond them are dropped here (they cost nothing).

    With `topk_indices` [N, k] (routers that pick exactly k per token hand it over), counts come
    from one bincount and the order from one stable sort of the N * k ids, with no pass over the
    [N, E] map; otherwise the map's [E, N] view is scanned. Both give the same order.
    """
    n = routing_map.shape[0]
    if routing_map.dtype != torch.bool or probs.shape != routing_map.shape:
        raise ValueError(
            f"routing_map must be bool and shaped like probs {tuple(probs.shape)}, got "
            f"{routing_map.dtype} {tuple(routing_map.shape)}"
        )
    if topk_indices is not None:
        k = topk_indices.shape[1]
        flat = topk_indices.reshape(-1)
        tokens_per_expert = torch.bincount(flat, minlength=routing_map.shape[1])[:num_experts]
        # Stable: tokens stay ascending within an expert; null ids (>= num_experts) sort last.
        order = torch.argsort(flat, stable=True)[: int(tokens_per_expert.sum())]
        token_index, expert_index = order // k, flat[order]
        weights = probs.gather(1, topk_indices).reshape(-1)[order]
    else:
        real = routing_map[:, :num_experts]
        # nonzero of the [E, N] view lists assignments expert-major, tokens ascending: no sort.
        expert_index, token_index = real.t().nonzero(as_tuple=True)
        tokens_per_expert = real.sum(0)
        weights = probs[token_index, expert_index]
    return Assignments(token_index, expert_index, tokens_per_expert, weights, n)


@dataclass
class DispatchState:
    num_tokens: int
    """N, the number of tokens before dispatch."""


class Dispatch(NamedTuple):
    """What the experts run: rows [S, dim], index [M] (rows of `rows`, expert-major),
    tokens_per_expert [E_local], weights [M], and the dispatcher's state for `combine`."""

    rows: torch.Tensor
    index: torch.Tensor
    tokens_per_expert: torch.Tensor
    weights: torch.Tensor
    state: DispatchState


class Ready:
    """A dispatch with nothing in flight."""

    def __init__(self, dispatch: Dispatch):
        self.dispatch = dispatch

    def wait(self) -> Dispatch:
        return self.dispatch


class _SumRowsPerToken(torch.autograd.Function):
    """out[index[i]] += rows[i] into [num_tokens, dim] of `dtype`; backward gathers grad[index].

    The un-permutation of the expert-parallel combine. Unlike `Tensor.index_add`, whose backward
    keeps the [M, dim] source, it saves only the index."""

    @staticmethod
    def forward(ctx, rows, index, num_tokens, dtype):
        ctx.save_for_backward(index)
        ctx.rows_dtype = rows.dtype
        out = rows.new_zeros(num_tokens, rows.shape[1], dtype=dtype)
        return out.index_add_(0, index, rows.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index).to(ctx.rows_dtype), None, None, None


def sum_rows_per_token(rows: torch.Tensor, index: torch.Tensor, num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """rows [M, dim], index [M] token of each row -> [num_tokens, dim] in `dtype`: each token's rows
    summed (tokens without a row get 0). Differentiable in rows; saves only the index."""
    return _SumRowsPerToken.apply(rows, index, num_tokens, dtype)


class LocalDispatcher:
    def dispatch(self, tokens: torch.Tensor, assignments: Assignments) -> Ready:
        if tokens.shape[0] != assignments.num_tokens:
            raise ValueError(f"{tokens.shape[0]} tokens but assignments for {assignments.num_tokens}")
        a = assignments
        return Ready(Dispatch(tokens, a.token_index, a.tokens_per_expert, a.weights, DispatchState(tokens.shape[0])))

    def combine(self, out: torch.Tensor, state: DispatchState) -> torch.Tensor:
        return out  # the experts already summed each token's rows into its own row

    def gather_experts(self, param: torch.Tensor) -> torch.Tensor:
        return param
