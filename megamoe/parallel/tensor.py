"""Megatron-style tensor parallelism (TP), optionally with sequence parallelism (SP).

A column-parallel linear keeps a contiguous block of output features on each TP rank (for
attention: a block of whole heads, since q/k/v features are head-major), a row-parallel linear
the matching block of input features; each rank's partial product is summed over the TP group.

    without SP: tokens are replicated over TP          with SP: each TP rank holds a chunk of tokens
      module input: identity fwd, all-reduce bwd         module input: all-gather fwd, reduce-scatter bwd
      row output:   all-reduce fwd, identity bwd         row output:   reduce-scatter fwd, all-gather bwd

The input collective runs once per attention / FFN module (a forward pre-hook on it), not once
per column-parallel linear: q, k and v share one gathered input, and their input gradients are
summed locally before one reduce-scatter (or all-reduce), as with Megatron's fused QKV.

The modules replace `nn.Linear` / `nn.RMSNorm` in place under the same attribute names and
with parameters named `weight` and `bias`, so parameter names stay diffusers' keys. A sharded
parameter carries `tensor_model_parallel = True` and `partition_dim`: the full tensor is the
concatenation of the TP ranks' shards, in TP-rank order, along that dimension.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megamoe.model.feed_forward import FeedForward
from megamoe.parallel.collectives import (
    all_reduce_sum,
    copy_to_group,
    gather_sequence,
    reduce_from_group,
    reduce_scatter_sequence,
)


def _tag(param: nn.Parameter, dim: int) -> nn.Parameter:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    return param


def _shard(tensor: torch.Tensor, dim: int, group) -> torch.Tensor:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if tensor.shape[dim] % size:
        raise ValueError(
            f"cannot split {tuple(tensor.shape)} into {size} tensor-parallel shards along dim {dim}; "
            f"choose a parallel.tensor_parallel_size that divides {tensor.shape[dim]}"
        )
    return tensor.detach().chunk(size, dim)[rank].clone()


class ColumnParallelLinear(nn.Module):
    """y[..., my output block] = x @ W[my block].T + b[my block]; the input arrives prepared
    (gathered or copied) by the enclosing module's `prepare_input` hook."""

    PARTITION_DIMS = {"weight": 0, "bias": 0}
    """Dimension TP splits, by parameter name (here and in the classes below)."""

    def __init__(self, linear: nn.Linear, group, sequence_parallel: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = _tag(nn.Parameter(_shard(linear.weight, 0, group)), 0)
        self.bias = None if linear.bias is None else _tag(nn.Parameter(_shard(linear.bias, 0, group)), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features} (sharded)"


class RowParallelLinear(nn.Module):
    """y = sum over TP ranks of x[..., my input block] @ W[:, my block].T, + b (full, added once).
    With sequence parallelism the sum is reduce-scattered over the sequence instead of all-reduced."""

    PARTITION_DIMS = {"weight": 1}

    def __init__(self, linear: nn.Linear, group, scatter_sequence: bool):
        super().__init__()
        self.group, self.scatter_sequence = group, scatter_sequence
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = _tag(nn.Parameter(_shard(linear.weight, 1, group)), 1)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)
        y = (
            reduce_scatter_sequence(partial, 1, self.group)
            if self.scatter_sequence
            else reduce_from_group(partial, self.group)
        )
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features} (sharded), out={self.out_features}, scatter_sequence={self.scatter_sequence}"


class HeadShardedRMSNorm(nn.Module):
    """Wan's QK RMSNorm over the full width when this rank holds only a block of heads.

    The mean square runs over all heads, so the sum of squares of the local channels is summed
    over TP (all-reduce forward and backward: each rank normalises its own heads with the common
    total). Computed in float32, as nn.RMSNorm's fused kernels do, and cast back.
    """

    PARTITION_DIMS = {"weight": 0}

    def __init__(self, norm: nn.RMSNorm, group, sequence_parallel: bool = False):
        super().__init__()
        self.group = group
        self.full_dim = norm.normalized_shape[-1]
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        self.weight = _tag(nn.Parameter(_shard(norm.weight, 0, group)), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sum_sq = all_reduce_sum(xf.square().sum(-1, keepdim=True), self.group)
        out = xf * torch.rsqrt(sum_sq / self.full_dim + self.eps) * self.weight.float()
        return out.to(x.dtype)


def prepare_input(module: nn.Module, group, sequence_parallel: bool) -> None:
    """Forward pre-hook on an attention / FFN module whose first linears are column-parallel.

    The tokens (first positional argument) are all-gathered over TP with SP, or copied (gradient
    all-reduced) without. A cross-attention's `context` (the text, whole on every TP rank) is
    copied without SP; with SP it is left alone: each TP rank's gradient for it is then its
    partial contribution (its heads for its sequence chunk), and the hooks of
    `sum_partial_gradients` sum the text embedder's parameter gradients over TP; an all-reduce
    here would count every contribution TP times.
    """

    def hook(_module, args, kwargs):
        x = gather_sequence(args[0], 1, group) if sequence_parallel else copy_to_group(args[0], group)
        if kwargs.get("context") is not None and not sequence_parallel:
            kwargs = dict(kwargs, context=copy_to_group(kwargs["context"], group))
        return (x,) + tuple(args[1:]), kwargs

    module.register_forward_pre_hook(hook, with_kwargs=True)


# The submodules TP replaces, by path inside a WanAttention / a FeedForward, and the class that
# replaces each: attention splits whole heads, an FFN its hidden units (GELU is per unit).
ATTENTION_SHARDS = {
    "to_q": ColumnParallelLinear,
    "to_k": ColumnParallelLinear,
    "to_v": ColumnParallelLinear,
    "to_out.0": RowParallelLinear,
    "norm_q": HeadShardedRMSNorm,
    "norm_k": HeadShardedRMSNorm,
}
FEED_FORWARD_SHARDS = {"net.0.proj": ColumnParallelLinear, "net.2": RowParallelLinear}


def partition_dims(shards: dict) -> dict[str, int]:
    """{parameter path inside the module: dimension TP splits} for a table like ATTENTION_SHARDS;
    parameters not listed stay whole on every TP rank."""
    return {f"{path}.{name}": dim for path, cls in shards.items() for name, dim in cls.PARTITION_DIMS.items()}


def shard_module(module: nn.Module, shards: dict, group, sequence_parallel: bool) -> None:
    """Split a WanAttention (ATTENTION_SHARDS) or a FeedForward (FEED_FORWARD_SHARDS) over the TP group, in place."""
    size = dist.get_world_size(group)
    if hasattr(module, "num_heads"):
        if module.num_heads % size:
            raise ValueError(
                f"model.num_heads={module.num_heads} is not divisible by parallel.tensor_parallel_size={size}"
            )
        module.num_heads //= size
    for path, cls in shards.items():
        module.set_submodule(path, cls(module.get_submodule(path), group, sequence_parallel))
    prepare_input(module, group, sequence_parallel)


def tensor_parallel_modules(model: nn.Module) -> list[tuple[str, nn.Module, dict]]:
    """(name, module, table of what TP replaces in it) of every attention and FFN of a WanDiT that TP
    splits (`parallelize` applies them; the planner reads them off a meta-device model)."""
    found = []
    for i, block in enumerate(model.blocks):
        found += [(f"blocks.{i}.{name}", getattr(block, name), ATTENTION_SHARDS) for name in ("attn1", "attn2")]
        if isinstance(block.ffn, FeedForward):
            found.append((f"blocks.{i}.ffn", block.ffn, FEED_FORWARD_SHARDS))
        elif block.ffn.shared is not None:  # routed experts stay whole (expert TP = 1); shared ones split
            found.append((f"blocks.{i}.ffn.shared", block.ffn.shared, FEED_FORWARD_SHARDS))
    return found


def tensor_parallel_dims(model: nn.Module) -> dict[str, int]:
    """{parameter name of the plain model: dimension TP splits it along}; every other parameter stays
    whole on each TP rank. What `parallelize` does, read off an unsharded (e.g. meta-device) model."""
    return {
        f"{name}.{path}": dim
        for name, _, shards in tensor_parallel_modules(model)
        for path, dim in partition_dims(shards).items()
    }


def sum_partial_gradients(model: nn.Module, group) -> None:
    """Under SP, sum over the TP group the gradient of every parameter that is neither TP-sharded
    nor an expert, before it is accumulated.

    Each TP rank then ran the replicated parts (norms, modulation, embeddings, routers, shared
    experts, row-parallel biases) on its own chunk of the tokens, so its gradient is a partial sum
    (Megatron all-reduces layer-norm gradients over TP for the same reason). A tensor hook runs
    before accumulation, so the data-parallel reduction that follows (DeepSpeed's, which hooks
    accumulation) already sees the TP sum. Expert parameters are left alone: their gradient
    already holds every token that reached them (through the expert all-to-all, or, unsharded
    with EP=1, they are not tagged as experts and get the hook like any replicated weight).

    The hooks run collectives during backward, so every TP rank must produce these gradients,
    all of them and in the same order: the ranks run the same layers in the same order (only the
    token counts inside MoE dispatch differ), and every parameter is in the graph on every rank
    (GroupedExperts runs even empty experts for this reason).
    """
    for param in model.parameters():
        if getattr(param, "tensor_model_parallel", False) or getattr(param, "allreduce", True) is False:
            continue
        param.register_hook(lambda grad: _sum_over(grad, group))


def _sum_over(grad: torch.Tensor, group) -> torch.Tensor:
    grad = grad.contiguous().clone()
    dist.all_reduce(grad, group=group)
    return grad
