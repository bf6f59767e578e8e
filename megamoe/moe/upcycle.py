"""Turn a dense Wan DiT into an MoE one by the seed study's three laws.

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
   constructor under a seed drawn from `generator` (so balancing biases, thresholds, prototypes
   start as its author chose), its Linear layers re-initialised as `WanDiT.reset_parameters`
   does for a model trained from scratch. Every other weight is copied exactly.

MoE weights are saved in the diffusers file layout (config.json + diffusion_pytorch_model.
safetensors, extra MoE keys included) plus megamoe_config.json holding the model config with
its moe section, so `weights.load_diffusers_weights` (the training loop's `train.init_from`)
loads them into an MoE WanDiT unchanged; `load_moe_weights` additionally checks the MoE config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import torch

from megamoe.config import ModelConfig, MoEConfig
from megamoe.model.dit import WanDiT, build_model
from megamoe.model.weights import (_atomic_write, _config_fix, _fields_from_diffusers_config, _fields_from_shapes,
                                   _first, _resolve, load_diffusers_weights, write_diffusers_weights)
from megamoe.moe.routers.base import Router

MODES = ("verify", "train")
MOE_CONFIG_NAME = "megamoe_config.json"
_EXPERT_KEY = re.compile(r"(blocks\.\d+\.ffn)\.experts\.(w1|b1|w2|b2)$")
_SHARED_KEY = re.compile(r"blocks\.\d+\.ffn\.shared\.")


def dense_config(cfg: ModelConfig) -> ModelConfig:
    """The same model with plain FFNs in every block."""
    return dataclasses.replace(cfg, moe=MoEConfig())


def slices_per_ffn(cfg: ModelConfig) -> int:
    """G: how many routed experts one dense FFN is cut into; raises ValueError on configs that cannot be upcycled."""
    moe = cfg.moe
    if moe.num_experts <= 0:
        raise ValueError("model.moe.num_experts is 0 (a dense model); set it > 0 to upcycle")
    width = moe.expert_ffn_dim or cfg.ffn_dim
    if width <= 0 or cfg.ffn_dim % width:
        raise ValueError(f"model.moe.expert_ffn_dim={width} does not divide model.ffn_dim={cfg.ffn_dim}; "
                         f"use ffn_dim / G for G slices per dense FFN (or null for cloned experts)")
    g = cfg.ffn_dim // width
    if moe.num_experts % g:
        raise ValueError(f"model.moe.num_experts={moe.num_experts} is not a multiple of the {g} slices per dense FFN "
                         f"(ffn_dim {cfg.ffn_dim} / expert_ffn_dim {width}); use a multiple of {g}")
    return g


def _check_dense(shapes: dict, what: str, conf: dict | None, cfg: ModelConfig) -> None:
    if conf is not None:
        fix = _config_fix(cfg, _fields_from_diffusers_config(conf, f"config.json of {what}"))
        if fix:
            raise ValueError(f"dense {what} does not match the config: {fix}")
    if any(".ffn.experts." in k or ".ffn.router." in k for k in shapes):
        raise ValueError(f"{what} is already an MoE checkpoint; upcycle from a dense one "
                         f"(or load it directly with train.init_from)")
    expected = {k: tuple(v.shape) for k, v in build_model(dense_config(cfg), "meta").state_dict().items()}
    fix = _config_fix(cfg, _fields_from_shapes(shapes)) or "the checkpoint is not a dense WanDiT of this shape"
    wrong = sorted((k for k in expected.keys() & shapes.keys() if expected[k] != tuple(shapes[k])),
                   key=lambda k: (k.endswith("bias"), k))  # a weight's shape names the config field
    if wrong:
        k = wrong[0]
        raise ValueError(f"dense {what} has {k} of shape {tuple(shapes[k])} but model config expects {expected[k]}; {fix}")
    missing, unexpected = expected.keys() - shapes.keys(), shapes.keys() - expected.keys()
    if missing or unexpected:
        parts = ([f"lacks {_first(missing)}"] if missing else []) + \
                ([f"has unexpected {_first(unexpected)}"] if unexpected else [])
        raise ValueError(f"dense {what} does not match the model config: {'; '.join(parts)}; {fix}")


def _expert_tensor(name: str, ffn: dict, g: int, num_experts: int) -> torch.Tensor:
    """Expert e = hidden slice e % g of the dense FFN; expand() views, so cloning costs no memory."""
    w_in, b_in = ffn["net.0.proj.weight"], ffn["net.0.proj.bias"]  # [F, dim], [F]
    w_out, b_out = ffn["net.2.weight"], ffn["net.2.bias"]  # [dim, F], [dim]
    if name == "b2":
        per_slice = (b_out / g if g > 1 else b_out)[None]  # the g slices of a replica sum to b_out
        return per_slice.expand(num_experts, -1)
    width = w_in.shape[0] // g
    if name == "w1":
        slices = w_in.t().unflatten(1, (g, width)).permute(1, 0, 2)  # [g, dim, H]
    elif name == "b1":
        slices = b_in.unflatten(0, (g, width))  # [g, H]
    else:
        slices = w_out.t().unflatten(0, (g, width))  # [g, H, dim]
    replicas = num_experts // g
    return slices[None].expand(replicas, *slices.shape).flatten(0, 1)


@torch.no_grad()
def upcycle_state_dict(dense, model_cfg: ModelConfig, mode: str, generator: torch.Generator) -> dict:
    """The state dict of the MoE WanDiT described by `model_cfg`, upcycled from `dense`.

    dense: a megamoe/diffusers-layout state dict, a .safetensors file (or index) or a diffusers
    model directory of the dense model (same config with moe.num_experts = 0). Expert tensors are
    expand()ed views of the dense FFN (they share storage): clone them before editing in place.
    """
    if mode not in MODES:
        raise ValueError(f"upcycling mode '{mode}' is unknown; use 'verify' (zero shared experts) or 'train'")
    g = slices_per_ffn(model_cfg)
    if mode == "train" and model_cfg.moe.shared_init_std < 0:
        raise ValueError(f"model.moe.shared_init_std={model_cfg.moe.shared_init_std} must be >= 0")
    shapes, loaders, what, conf = _resolve(dense)
    _check_dense(shapes, what, conf, model_cfg)

    moe = build_model(model_cfg, "meta")  # keys and shapes only, nothing allocated
    routers = {name: m for name, m in moe.named_modules() if isinstance(m, Router)}
    router_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    fresh = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(router_seed)
        for name, router in routers.items():  # named_modules order: deterministic
            rebuilt = type(router)(router.dim, router.cfg, **router.init_kwargs)
            for m in rebuilt.modules():  # as WanDiT.reset_parameters: upcycled and from-scratch gates start alike
                if isinstance(m, torch.nn.Linear):
                    torch.nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        torch.nn.init.zeros_(m.bias)
            fresh.update({f"{name}.{k}": v for k, v in rebuilt.state_dict().items()})

    dense_ffn = {"prefix": None}  # one block's dense FFN at a time: read once for its four expert tensors
    out = {}
    for key, meta in moe.state_dict().items():
        if key in fresh:
            out[key] = fresh[key]
        elif m := _EXPERT_KEY.match(key):
            if dense_ffn["prefix"] != m.group(1):
                names = ("net.0.proj.weight", "net.0.proj.bias", "net.2.weight", "net.2.bias")
                dense_ffn = {"prefix": m.group(1), **{n: loaders[f"{m.group(1)}.{n}"]() for n in names}}
            out[key] = _expert_tensor(m.group(2), dense_ffn, g, model_cfg.moe.num_experts)
        elif _SHARED_KEY.match(key):
            if mode == "verify":
                out[key] = torch.zeros(meta.shape, dtype=meta.dtype)
            else:
                out[key] = torch.randn(meta.shape, generator=generator, dtype=meta.dtype) * model_cfg.moe.shared_init_std
        elif key in loaders:
            out[key] = loaders[key]()
        else:
            raise ValueError(f"upcycling does not know how to initialise MoE key {key}; "
                             f"teach megamoe/moe/upcycle.py about it")
        if tuple(out[key].shape) != tuple(meta.shape):
            raise ValueError(f"upcycled {key} has shape {tuple(out[key].shape)} but the MoE model expects "
                             f"{tuple(meta.shape)}; check model.moe.expert_ffn_dim / shared_ffn_dim")
    return out


def _materialise(cfg: ModelConfig) -> WanDiT:
    """An MoE WanDiT to load into, without paying for a random init of every expert when possible."""
    model = build_model(cfg, "meta")
    if set(dict(model.named_buffers())) - set(model.state_dict()):
        return build_model(cfg)  # non-persistent buffers would be garbage after to_empty
    return model.to_empty(device="cpu")


@torch.no_grad()
def upcycle_model(dense_model_or_source, moe_model_cfg: ModelConfig, mode: str = "train", seed: int = 0) -> WanDiT:
    """An MoE WanDiT (CPU, the dense weights' dtype cast to the model's) upcycled from a dense
    WanDiT or any source `upcycle_state_dict` accepts; `seed` fixes routers and shared noise."""
    source = dense_model_or_source
    if isinstance(source, torch.nn.Module):
        source = source.state_dict()
    generator = torch.Generator().manual_seed(seed)
    state = upcycle_state_dict(source, moe_model_cfg, mode, generator)
    model = _materialise(moe_model_cfg)
    model.load_state_dict(state, strict=True)
    return model


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


def save_moe_weights(model: WanDiT, directory: str) -> None:
    """config.json + diffusion_pytorch_model.safetensors (diffusers file layout, MoE keys included)
    + megamoe_config.json (the full model config). diffusers itself cannot load the MoE keys."""
    write_diffusers_weights(model.state_dict(), model.cfg, directory)
    text = json.dumps({"model": dataclasses.asdict(model.cfg)}, indent=2, sort_keys=True) + "\n"
    _atomic_write(os.path.join(os.fspath(directory), MOE_CONFIG_NAME), lambda tmp: open(tmp, "w").write(text))


def load_moe_weights(model: WanDiT, directory: str) -> None:
    """Load what `save_moe_weights` wrote, checking first that the MoE config matches."""
    path = os.path.join(os.fspath(directory), MOE_CONFIG_NAME)
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f).get("model", {}).get("moe", {})
        current = dataclasses.asdict(model.cfg.moe)
        # Only what changes the parameter set; losses, schedules and diagnostics may differ.
        structural = ("num_experts", "layers", "expert_ffn_dim", "num_shared_experts", "shared_ffn_dim",
                      "num_null_experts", "router", "router_hidden_dim", "num_prototypes_per_expert")
        diffs = [f"model.moe.{k}={saved[k]}" for k in structural if k in saved and saved[k] != current[k]]
        if diffs:
            raise ValueError(f"MoE weights in '{directory}' were saved with {', '.join(diffs)}; set that to load them")
    load_diffusers_weights(model, directory)
