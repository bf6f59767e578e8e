"""Applies tensor, sequence, context and expert parallelism to a plain WanDiT, in place.

The model is written for one process; this file is the only place that knows the layout.
Process groups come from megatron-core's `parallel_state` (megamoe.parallel.topology.
init_distributed creates them; experts fold over the TP x CP x DP ranks).

What each rank computes, and the gradient it leaves for the optimizer
---------------------------------------------------------------------
DeepSpeed reduces the gradients of ordinary parameters over the data x context parallel group
and divides by the data-parallel size, i.e. it SUMS over CP and AVERAGES over DP; expert
parameters are summed over the expert-data-parallel group, also divided by DP. So a rank's
backward must leave its partial contribution: summed over its CP (and, with SP, TP) peers it
must give its data-parallel replica's full gradient.

- The prediction is gathered over the sequence shards and every rank computes the same full loss;
  the gather's backward keeps the rank's own chunk (SequenceSharding.gather).
- With SP, each TP rank runs the replicated parts on its own tokens: those gradients are summed
  over TP by hooks (tensor.sum_partial_gradients). Without SP the TP ranks compute the replicated
  parts identically and each already holds the full gradient (Megatron's convention).
- TP-sharded parameters hold the gradient of their shard; experts the sum over every token that
  reached them.

Routers see their rank's tokens; every router loss, and every selection that ranks tokens against
each other (expert choice, Expert Race, Sinkhorn, ProMoE's centroids), is formed from statistics
summed over the sequence shards, so it equals the unsharded computation. Each router learns where
the other tokens are from the `TokenShards` set here (megamoe/moe/token_shards.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from megamoe.config import Config, ParallelConfig
from megamoe.model.dit import WanDiT, build_model
from megamoe.model.init import inits_of, materialize
from megamoe.model.mixture_of_depths import mixture_of_depths_modules
from megamoe.moe.layer import moe_layers
from megamoe.moe.token_shards import TokenShards
from megamoe.parallel.collectives import gather_along_dim
from megamoe.parallel.context import SequenceSharding, UlyssesAttend
from megamoe.parallel.expert import apply_expert_parallel
from megamoe.parallel.megatron_state import parallel_state
from megamoe.parallel.tensor import shard_module, sum_partial_gradients, tensor_parallel_modules


def build_sharded_model(
    cfg: Config, device: str | torch.device, initialize: bool | Callable[[str], bool] = True
) -> WanDiT:
    """This rank's shard of the model of `cfg`, allocated on `device` only, initialised.

    Built on the meta device, sharded by `parallelize` for cfg.parallel (the process groups of
    `topology.init_distributed` must exist when any size is > 1), then each parameter is
    allocated and drawn where it lives: the full state dict gathered from any layout
    (`full_state_dict`) equals `build_model(cfg.model, device, cfg.train.seed)` bit for bit,
    and no rank ever holds more than its shard. initialize: see `megamoe.model.init.materialize`
    (False leaves the parameters uninitialised, to load a checkpoint into).
    """
    model = build_model(cfg.model, "meta")
    inits = inits_of(model)  # before sharding: the fans of the full layers
    layout = cfg.parallel
    sharded = max(layout.tensor_parallel_size, layout.context_parallel_size, layout.expert_parallel_size) > 1
    # With every size 1 sharding changes no weight, but still tells the routers their data-parallel
    # batch group (the `global` balance scope): whenever the groups exist.
    if sharded or parallel_state.model_parallel_is_initialized():
        _shard(model, layout)
    materialize(model, inits, device, cfg.train.seed, locate=shard_coordinates, initialize=initialize)
    if sharded:  # gradient hooks hold the parameters themselves: only once they are real
        _attach_gradient_hooks(model, layout)
    return model


def parallelize(model: WanDiT, parallel: ParallelConfig) -> WanDiT:
    """Shard `model` for this rank's place in the layout (in place; returns it).

    Call once, after the weights are initialised or loaded (all ranks equal) and before the
    optimizer sees the parameters. With every size 1 the model is left exactly as it was.
    `build_sharded_model` shards a model that is not yet allocated instead.
    """
    _shard(model, parallel)
    _attach_gradient_hooks(model, parallel)
    return model


def _shard(model: WanDiT, parallel: ParallelConfig) -> None:
    """Everything `parallelize` does but the gradient hooks; works on the meta device."""
    if getattr(model, "parallelized", False):
        raise RuntimeError("parallelize() was already applied to this model; it shards in place, call it once")
    tp, cp, ep = _sizes(parallel)
    sp = parallel.sequence_parallel and tp > 1
    heads = model.cfg.num_heads
    if heads % (tp * cp):
        raise ValueError(
            f"model.num_heads={heads} is not divisible by parallel.tensor_parallel_size x "
            f"context_parallel_size = {tp * cp}; choose sizes whose product divides the heads"
        )
    if tp > 1 and moe_layers(model) and not parallel.sequence_parallel:
        raise ValueError(
            "MoE layers with parallel.tensor_parallel_size > 1 need parallel.sequence_parallel=true "
            "(experts are not tensor-parallel: without SP every TP rank would route the same tokens)"
        )

    if tp > 1:
        tp_group = parallel_state.get_tensor_model_parallel_group()
        for _, module, shards in tensor_parallel_modules(model):
            shard_module(module, shards, tp_group, sp)
    if cp > 1:
        cp_group = parallel_state.get_context_parallel_group()
        for block in model.blocks:
            # Wraps whatever attention kernel is set; cross-attention needs no exchange.
            block.attn1.attend = UlyssesAttend(cp_group, inner=block.attn1.attend)
    if cp > 1 or sp:
        model.sequence_sharding = _sequence_sharding(sp)
    shard_group = model.sequence_sharding.group if cp > 1 or sp else None
    batch_group = token_batch_group(parallel)
    shards = TokenShards(shard_group, batch_group if dist.get_world_size(batch_group) > 1 else None)
    for layer in moe_layers(model):
        layer.router.token_shards = shards
    for module in mixture_of_depths_modules(model):  # token routers pick from the unsharded sequence
        module.token_shards = shards
    if ep > 1:
        apply_expert_parallel(model, parallel_state.get_expert_model_parallel_group())
    model.parallelized = True


def _attach_gradient_hooks(model: WanDiT, parallel: ParallelConfig) -> None:
    if parallel.sequence_parallel and parallel.tensor_parallel_size > 1:  # after EP: experts are tagged, skipped
        sum_partial_gradients(model, parallel_state.get_tensor_model_parallel_group())


def token_batch_group(parallel: ParallelConfig):
    """The ranks that hold different tokens of the global batch: data x context parallel, and the
    tensor-parallel ranks too under sequence parallelism (every rank then, as pipeline size is 1).
    Without SP the TP ranks of a group hold the same tokens and must be counted once."""
    if parallel.sequence_parallel and parallel.tensor_parallel_size > 1:
        return dist.group.WORLD
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def _sizes(parallel: ParallelConfig) -> tuple[int, int, int]:
    sizes = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_context_parallel_world_size(),
        parallel_state.get_expert_model_parallel_world_size(),
    )
    wanted = (parallel.tensor_parallel_size, parallel.context_parallel_size, parallel.expert_parallel_size)
    if sizes != wanted:
        raise RuntimeError(
            f"process groups are (TP, CP, EP) = {sizes} but parallel asks for {wanted}; "
            f"call megamoe.parallel.topology.init_distributed with the same ParallelConfig"
        )
    return sizes


def _sequence_sharding(sp: bool) -> SequenceSharding:
    cp_group = parallel_state.get_context_parallel_group()
    if not sp:
        return SequenceSharding(cp_group, cp_group)
    group = parallel_state.get_tensor_and_context_parallel_group()
    # Chunk cp * TP + tp must be the rank's place in the group the prediction is gathered over.
    expected = (
        parallel_state.get_context_parallel_rank() * parallel_state.get_tensor_model_parallel_world_size()
        + parallel_state.get_tensor_model_parallel_rank()
    )
    if dist.get_rank(group) != expected:
        raise RuntimeError(
            f"megatron-core's tensor-and-context group puts this rank at {dist.get_rank(group)}, "
            f"expected cp_rank * TP + tp_rank = {expected} (group order must be TP fastest)"
        )
    return SequenceSharding(group, cp_group)


@torch.no_grad()
def full_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The unsharded state dict of a parallelized model, keys as diffusers' (and as the plain model).

    Collective: every rank must call it. TP shards are concatenated along their partition_dim in
    TP-rank order, expert slices along the expert dimension in EP-rank order. `tensors`: another
    dict keyed by parameter name and sharded like the parameters (e.g. EMA weights) to unshard
    instead of the model's own state.
    """
    state = dict(model.state_dict()) if tensors is None else dict(tensors)
    for name, param in model.named_parameters():
        split = split_of(param)
        if name in state and split is not None:
            group, dim = split
            state[name] = gather_along_dim(state[name].detach(), dim, group)
    return state


def shard_coordinates(param: torch.Tensor) -> tuple[int, int, int] | None:
    """(dim, index, count): `param` is block `index` of the `count` equal blocks along `dim` that
    make up the full tensor (see `split_of`), or None when this rank holds it whole."""
    split = split_of(param)
    if split is None:
        return None
    group, dim = split
    return dim, dist.get_rank(group), dist.get_world_size(group)


def split_of(param: torch.Tensor) -> tuple | None:
    """(group whose ranks hold consecutive blocks of `param`, dimension), or None when every rank
    holds it whole: experts are split over the expert-parallel group along the expert dimension,
    tensor-parallel weights over TP along `partition_dim` (never both: expert TP is 1)."""
    if getattr(param, "allreduce", True) is False:
        return parallel_state.get_expert_model_parallel_group(), 0
    if getattr(param, "tensor_model_parallel", False):
        return parallel_state.get_tensor_model_parallel_group(), int(param.partition_dim)
    return None
