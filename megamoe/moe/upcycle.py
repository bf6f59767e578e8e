"""Turn a dense Wan DiT into an MoE one by the seed study's three laws, one tensor block at a time.

1. Routed experts are the dense FFN. Cloned experts (moe.expert_ffn_dim = model.ffn_dim, the
   default) are exact copies. Fine-grained experts (expert_ffn_dim = ffn_dim / G) are the G equal
   hidden slices of the dense FFN, slice s = hidden units [s*H_e, (s+1)*H_e); expert e is slice
   e % G of replica e // G, so num_experts must be a multiple of G. Each slice gets b2 / G, so
   the G slices of one replica, each taken with weight 1, sum exactly to the dense FFN output.
   A renormalised top-k router gives weights that sum to 1 rather than 1 each, so only cloned
   experts reproduce the dense model under it; fine-grained upcycling starts close, not equal.
2. Shared experts: mode 'verify' makes them exactly zero, so the MoE output is the routed
   output and (cloned experts, weights summing to 1 per token) equals the dense model; mode
   'train' gives them N(0, moe.shared_init_std) noise so they get gradient and break symmetry.
3. Only the routers (every key under '.router.') are new: each router is built by its own
   constructor (so balancing biases, thresholds, prototypes start as its author chose), its
   Linear layers re-initialised as `WanDiT.reset_parameters` does for a model trained from scratch.
   Every other weight is copied exactly.

Upcycling fills a model in place (`upcycle_into`), also a parallelized one: each rank reads from
the dense checkpoint only the slices its experts and tensor-parallel blocks are made of. The
random parts are functions of (seed, tensor name, coordinates), never of the order anything is
drawn in: a router's seed is derived from its module name, shared-expert noise row by row from
the row's global index (`coordinate_seed`). So every layout, and the one-process
`launcher/upcycle.py`, produces the same model for the same seed.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import zlib

import numpy as np
import torch

from megamoe.config import ModelConfig, MoEConfig
from megamoe.model.dit import WanDiT, build_model
from megamoe.model.weights import (
    LocalShard,
    WeightsError,
    WeightSource,
    config_fix_for,
    first_keys,
    model_fields_from_diffusers_config,
    model_fields_from_shapes,
    whole_shards,
)
from megamoe.moe.routers.base import Router

MODES = ("verify", "train")
_EXPERT_KEY = re.compile(r"(blocks\.\d+\.ffn)\.experts\.(w1|b1|w2|b2)$")
_SHARED_KEY = re.compile(r"blocks\.\d+\.ffn\.shared\.")


def dense_config(cfg: ModelConfig) -> ModelConfig:
    """The same model with plain FFNs in every block."""
    return dataclasses.replace(cfg, moe=MoEConfig())


def mode_of(cfg: ModelConfig) -> str:
    """The upcycling mode model.moe.shared_init asks for: 'zero' -> verify, 'noise' -> train."""
    return "verify" if cfg.moe.shared_init == "zero" else "train"


def slices_per_ffn(cfg: ModelConfig) -> int:
    """G: how many routed experts one dense FFN is cut into; raises ValueError on configs that cannot be upcycled."""
    moe = cfg.moe
    if moe.num_experts <= 0:
        raise ValueError("model.moe.num_experts is 0 (a dense model); set it > 0 to upcycle")
    if moe.merged_from:
        raise ValueError(
            f"model.moe.merged_from={moe.merged_from}: a dense model cannot be upcycled into a merged one; "
            f"upcycle with merged_from=0, train, then merge (launcher/merge_experts.py)"
        )
    width = moe.expert_ffn_dim or cfg.ffn_dim
    if width <= 0 or cfg.ffn_dim % width:
        raise ValueError(
            f"model.moe.expert_ffn_dim={width} does not divide model.ffn_dim={cfg.ffn_dim}; "
            f"use ffn_dim / G for G slices per dense FFN (or null for cloned experts)"
        )
    g = cfg.ffn_dim // width
    if moe.num_experts % g:
        raise ValueError(
            f"model.moe.num_experts={moe.num_experts} is not a multiple of the {g} slices per dense FFN "
            f"(ffn_dim {cfg.ffn_dim} / expert_ffn_dim {width}); use a multiple of {g}"
        )
    return g


def is_dense(source: WeightSource) -> bool:
    return not any(".ffn.experts." in k or ".ffn.router." in k for k in source.shapes)


def check_dense(source: WeightSource, cfg: ModelConfig) -> None:
    """Raise WeightsError unless `source` is the dense model of MoE config `cfg` (headers only)."""
    what, shapes = source.what, source.shapes
    slices_per_ffn(cfg)
    if source.config is not None:
        fix = config_fix_for(cfg, model_fields_from_diffusers_config(source.config, f"config.json of {what}"))
        if fix:
            raise WeightsError(f"dense {what} does not match the config: {fix}")
    if not is_dense(source):
        raise WeightsError(
            f"{what} is already an MoE checkpoint; upcycle from a dense one (or load it directly with train.init_from)"
        )
    expected = {k: tuple(v.shape) for k, v in build_model(dense_config(cfg), "meta").state_dict().items()}
    fix = config_fix_for(cfg, model_fields_from_shapes(shapes)) or "the checkpoint is not a dense WanDiT of this shape"
    wrong = sorted(
        (k for k in expected.keys() & shapes.keys() if expected[k] != tuple(shapes[k])),
        key=lambda k: (k.endswith("bias"), k),
    )  # a weight's shape names the config field
    if wrong:
        k = wrong[0]
        raise WeightsError(
            f"dense {what} has {k} of shape {tuple(shapes[k])} but model config expects {expected[k]}; {fix}"
        )
    missing, unexpected = expected.keys() - shapes.keys(), shapes.keys() - expected.keys()
    if missing or unexpected:
        parts = ([f"lacks {first_keys(missing)}"] if missing else []) + (
            [f"has unexpected {first_keys(unexpected)}"] if unexpected else []
        )
        raise WeightsError(f"dense {what} does not match the model config: {'; '.join(parts)}; {fix}")


# ---------------------------------------------------------------------------------------------
# The three laws, for the block of one tensor that a rank holds.


def coordinate_seed(seed: int, name: str, *coords: int) -> int:
    """A 64-bit seed that depends only on (seed, name, coordinates): random values that are the
    same whichever rank draws them and in whatever order."""
    words = np.random.SeedSequence([seed, zlib.crc32(name.encode()), *coords]).generate_state(2, dtype=np.uint32)
    return int(words[0]) << 32 | int(words[1])


def shared_noise(seed: int, key: str, shard: LocalShard, std: float) -> torch.Tensor:
    """The block `shard` of N(0, std^2) fp32 noise for the full tensor `key`.

    Row r (the tensor viewed as [rows, last dim]) is drawn whole from `coordinate_seed(seed, key, r)`
    and cut to the block's columns, so a tensor-parallel block along either dimension equals
    that block of the noise drawn in one process.
    """
    shape = tuple(shard.shape)
    index = list(shard.index) + [slice(None)] * (len(shape) - len(shard.index))
    row_ranges = [range(*s.indices(n)) for s, n in zip(index[:-1], shape[:-1])]
    rows = []
    for coords in itertools.product(*row_ranges):
        flat = int(np.ravel_multi_index(coords, shape[:-1])) if coords else 0
        generator = torch.Generator().manual_seed(coordinate_seed(seed, key, flat))
        rows.append(torch.randn(shape[-1], generator=generator)[index[-1]])
    block_shape = [len(r) for r in row_ranges] + [rows[0].shape[0]]
    return torch.stack(rows).reshape(block_shape) * std


@torch.no_grad()
def fresh_router_state(name: str, router: Router, seed: int) -> dict[str, torch.Tensor]:
    """{key: tensor} of a newly initialised router at module path `name`, seeded by (seed, name)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(coordinate_seed(seed, name))
        with torch.device("cpu"):
            rebuilt = type(router)(router.dim, router.cfg, **router.init_kwargs)
        for m in rebuilt.modules():  # as WanDiT.reset_parameters: upcycled and from-scratch gates start alike
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    torch.nn.init.zeros_(m.bias)
    return {f"{name}.{k}": v for k, v in rebuilt.state_dict().items()}


def expert_block(param: str, ffn: str, source: WeightSource, shard: LocalShard, g: int) -> torch.Tensor:
    """Experts [start, stop) of the stacked expert tensor `param` (w1 [E, dim, H], b1 [E, H],
    w2 [E, H, dim], b2 [E, dim]) of the MoE layer at module path `ffn`, read from that block's
    dense FFN: only the hidden slices these experts are made of."""
    if shard.dim not in (None, 0):
        raise ValueError(f"experts are split along dim 0 only, got {shard}")
    lo, hi = (0, shard.shape[0]) if shard.dim is None else (shard.start, shard.stop)
    width = source.shapes[f"{ffn}.net.0.proj.weight"][0] // g
    pieces = {}
    for s in sorted({e % g for e in range(lo, hi)}):
        hidden = slice(s * width, (s + 1) * width)
        if param == "w1":
            pieces[s] = source.read(f"{ffn}.net.0.proj.weight", (hidden,)).t()  # [F, dim] rows -> [dim, H]
        elif param == "b1":
            pieces[s] = source.read(f"{ffn}.net.0.proj.bias", (hidden,))
        elif param == "w2":
            pieces[s] = source.read(f"{ffn}.net.2.weight", (slice(None), hidden)).t()  # [dim, F] cols -> [H, dim]
        else:
            bias = source.read(f"{ffn}.net.2.bias")
            pieces[s] = bias / g if g > 1 else bias  # the g slices of a replica sum to b_out
    return torch.stack([pieces[e % g] for e in range(lo, hi)])


@torch.no_grad()
def upcycle_into(model: WanDiT, source, mode: str, seed: int, shards: dict[str, LocalShard] | None = None) -> None:
    """Fill the MoE `model` (materialised; parallelized or not) by the three laws from a dense checkpoint.

    source: a WeightSource or anything it opens (state dict, file, index, directory) of the dense
    model (same config with moe.num_experts = 0). shards: the block of each full tensor `model`
    holds (default: all of it); only the dense slices those blocks need are read. Raises
    WeightsError (a ValueError) before anything is read when the source or config does not fit.
    """
    if mode not in MODES:
        raise ValueError(f"upcycling mode '{mode}' is unknown; use 'verify' (zero shared experts) or 'train'")
    cfg = model.cfg
    g = slices_per_ffn(cfg)
    if mode == "train" and cfg.moe.shared_init_std < 0:
        raise ValueError(f"model.moe.shared_init_std={cfg.moe.shared_init_std} must be >= 0")
    source = source if isinstance(source, WeightSource) else WeightSource(source)
    check_dense(source, cfg)
    shards = whole_shards(model) if shards is None else shards
    routers = {name: m for name, m in model.named_modules() if isinstance(m, Router)}
    fresh = {}  # the current router's new tensors: its keys are consecutive
    for key, target in model.state_dict(keep_vars=True).items():
        shard = shards[key]
        router = next((name for name in routers if key.startswith(name + ".")), None)
        if router is not None:
            if shard.dim is not None:
                raise ValueError(f"router tensor {key} is sharded; routers are replicated on every rank")
            if key not in fresh:
                fresh = fresh_router_state(router, routers[router], seed)
            value = fresh[key]
        elif m := _EXPERT_KEY.match(key):
            value = expert_block(m.group(2), m.group(1), source, shard, g)
        elif _SHARED_KEY.match(key):
            value = (
                torch.zeros(target.shape)
                if mode == "verify"
                else shared_noise(seed, key, shard, cfg.moe.shared_init_std)
            )
        elif key in source.shapes:
            value = source.read(key, shard.index)
        else:
            raise WeightsError(
                f"upcycling does not know how to initialise MoE key {key}; teach megamoe/moe/upcycle.py about it"
            )
        if tuple(value.shape) != tuple(target.shape):
            raise WeightsError(
                f"upcycled {key} has shape {tuple(value.shape)} but the MoE model expects "
                f"{tuple(target.shape)}; check model.moe.expert_ffn_dim / shared_ffn_dim"
            )
        target.copy_(value)


def _materialise(cfg: ModelConfig) -> WanDiT:
    """An MoE WanDiT to load into, without paying for a random init of every expert when possible."""
    model = build_model(cfg, "meta")
    if set(dict(model.named_buffers())) - set(model.state_dict()):
        return build_model(cfg)  # non-persistent buffers would be garbage after to_empty
    return model.to_empty(device="cpu")


def upcycle_model(dense_model_or_source, moe_model_cfg: ModelConfig, mode: str = "train", seed: int = 0) -> WanDiT:
    """An MoE WanDiT (CPU, fp32) upcycled in one process from a dense WanDiT or any source
    `upcycle_into` accepts; `seed` fixes routers and shared noise (as train.seed does for train.init_from)."""
    source = dense_model_or_source
    if isinstance(source, torch.nn.Module):
        source = source.state_dict()
    source = WeightSource(source)
    check_dense(source, moe_model_cfg)  # before allocating the model
    model = _materialise(moe_model_cfg)
    upcycle_into(model, source, mode, seed)
    return model


def upcycle_state_dict(dense, model_cfg: ModelConfig, mode: str, seed: int) -> dict:
    """The state dict of the MoE WanDiT `model_cfg` describes, upcycled from `dense` (see upcycle_model)."""
    return upcycle_model(dense, model_cfg, mode, seed).state_dict()


def parameter_counts(moe_model: WanDiT) -> dict[str, int]:
    """dense: the same config without MoE; moe_total: all parameters; activated: what one token
    uses, with top_k routed experts per MoE layer (the average for expert choice / Expert Race;
    an upper bound with null experts, which cost nothing)."""
    cfg = moe_model.cfg
    total = sum(p.numel() for p in moe_model.parameters())
    routed = active_routed = 0
    for name, module in moe_model.named_modules():
        if name.endswith(".experts") and hasattr(module, "w1"):
            n = sum(p.numel() for p in module.parameters())
            routed += n
            active_routed += n * cfg.moe.top_k // module.w1.shape[0]
    dense = sum(p.numel() for p in build_model(dense_config(cfg), "meta").parameters())
    return {"dense": dense, "moe_total": total, "activated": total - routed + active_routed}
