"""Autograd-aware collectives that run on gloo (CPU) and NCCL (CUDA) alike.

megatron-core's mappings allocate on CUDA, so megamoe keeps its own: each is a
torch.autograd.Function whose backward is the adjoint collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """Rows [sum(input_splits), ...] -> rows [sum(output_splits), ...]: chunk i goes to rank i."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        # The adjoint of sending chunk i to rank i is receiving it back: swap the splits.
        return all_to_all(grad, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Differentiable `all_to_all_single` with uneven (also zero) split sizes along dim 0."""
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


def all_to_all_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """Exchange a [world, k] table of counts: row i goes to rank i; returns what each rank sent."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out
