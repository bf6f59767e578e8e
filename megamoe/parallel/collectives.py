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


class Exchange:
    """One all-to-all in flight, started by `start_all_to_all` and completed by `Exchange.wait`.

    Forward: start sends, the caller computes something independent, wait blocks. Backward
    mirrors it: wait's backward starts the reverse exchange of the gradient and start's backward
    blocks on it, so autograd runs the nodes recorded between the two (the same independent
    work's backward, which it orders by recording time) while the gradient travels. On gloo the
    exchange runs on the process group's worker thread; on NCCL on NCCL's stream.
    """

    def __init__(self, output_splits: list[int], input_splits: list[int], group):
        self.output_splits, self.input_splits, self.group = list(output_splits), list(input_splits), group
        self.work = None
        self.grad_work = None
        self.grad_pending: tuple | None = None  # (gradient being sent, buffer receiving its adjoint)

    def wait(self, received: torch.Tensor) -> torch.Tensor:
        """`received` (start_all_to_all's result) once the rows have arrived."""
        return _AllToAllWait.apply(received, self)


class _AllToAllStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, exchange):
        ctx.exchange = exchange
        out = x.new_empty((sum(exchange.output_splits),) + tuple(x.shape[1:]))
        exchange.work = dist.all_to_all_single(
            out, x.contiguous(), exchange.output_splits, exchange.input_splits, group=exchange.group, async_op=True
        )
        return out

    @staticmethod
    def backward(ctx, grad):
        exchange = ctx.exchange
        exchange.grad_work.wait()
        grad_input = exchange.grad_pending[1]
        exchange.grad_work, exchange.grad_pending = None, None
        return grad_input, None


class _AllToAllWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, received, exchange):
        ctx.exchange = exchange
        exchange.work.wait()
        exchange.work = None
        return received.view_as(received)

    @staticmethod
    def backward(ctx, grad):
        exchange = ctx.exchange
        grad = grad.contiguous()
        grad_input = grad.new_empty((sum(exchange.input_splits),) + tuple(grad.shape[1:]))
        exchange.grad_work = dist.all_to_all_single(
            grad_input, grad, exchange.input_splits, exchange.output_splits, group=exchange.group, async_op=True
        )
        exchange.grad_pending = (grad, grad_input)  # both must outlive the exchange
        return grad, None


def start_all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group):
    """`all_to_all` split in two: returns (received, exchange) at once, with `received` filled only
    after `exchange.wait(received)`, whose result is the tensor to use. Differentiable."""
    exchange = Exchange(output_splits, input_splits, group)
    return _AllToAllStart.apply(x, exchange), exchange


def all_to_all_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """Exchange a [world, k] table of counts: row i goes to rank i; returns what each rank sent."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out


# ---------------------------------------------------------------------------------------------
# Tensor, sequence and context parallelism. Every function works along one tensor dimension
# (the sequence, dim 1 of [B, L, ...]) by moving it to the front, because the collectives
# gloo offers (all_gather_into_tensor, reduce_scatter_tensor) concatenate and split along dim 0.
# torch 2.13 renamed them *_single (the old names warn); older releases have only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def gather_along_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """The group's tensors concatenated along `dim` in group-rank order (no autograd)."""
    world = dist.get_world_size(group)
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((world * front.shape[0],) + tuple(front.shape[1:]))
    _all_gather_single(out, front, group=group)
    return out.movedim(0, dim)


def _reduce_scatter_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    front = x.movedim(dim, 0).contiguous()
    if front.shape[0] % world:
        raise ValueError(f"cannot reduce-scatter {front.shape[0]} rows over {world} ranks")
    out = front.new_empty((front.shape[0] // world,) + tuple(front.shape[1:]))
    _reduce_scatter_single(out, front, group=group)
    return out.movedim(0, dim)


def _own_chunk(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = x.shape[dim] // world
    return x.narrow(dim, rank * n, n).contiguous()


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward, all-reduce backward: the input of a column-parallel linear whose input
    is replicated over `group` and whose gradient each rank must see in full (Megatron's
    copy_to_tensor_model_parallel_region)."""
    return _CopyToGroup.apply(x, group)


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward, identity backward: the partial sums of a row-parallel linear."""
    return _ReduceFromGroup.apply(x, group)


class _AllReduceBoth(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward and backward: a sum whose result every rank uses for its own, distinct
    part of the loss (e.g. the sum of squares of an RMSNorm whose channels are split), so the
    gradient of each rank's addend is the sum of every rank's gradient of the total."""
    return _AllReduceBoth.apply(x, group)


class _GatherReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return gather_along_dim(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_dim(grad, ctx.dim, ctx.group), None, None


def gather_sequence(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """All-gather forward, reduce-scatter backward: sequence-parallel chunks into the input of a
    column-parallel linear. Each rank's gradient for the gathered tokens covers only its own
    heads/channels, so the chunk's full gradient is their sum (Megatron's
    gather_from_sequence_parallel_region)."""
    return _GatherReduceScatter.apply(x, dim, group)


class _ReduceScatterGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter_dim(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return gather_along_dim(grad, ctx.dim, ctx.group), None, None


def reduce_scatter_sequence(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Reduce-scatter forward, all-gather backward: a row-parallel linear's partial sums back
    to this rank's sequence chunk (Megatron's reduce_scatter_to_sequence_parallel_region)."""
    return _ReduceScatterGather.apply(x, dim, group)


class _GatherOwnChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return gather_along_dim(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _own_chunk(grad, ctx.dim, ctx.group), None, None


def gather_output(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """All-gather forward; backward keeps only this rank's chunk of the gradient.

    For a result that every rank then uses identically (the model's prediction, from which each
    rank computes the same full loss): the gradient arriving here is the same on every rank, and
    keeping one's own chunk makes each rank's parameter gradients its partial contribution, which
    the optimizer's sum over the group completes. Backward needs no communication.
    """
    return _GatherOwnChunk.apply(x, dim, group)
