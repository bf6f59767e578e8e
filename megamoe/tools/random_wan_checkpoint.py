"""A random-weight Wan transformer in diffusers layout: sharded safetensors + index + config.

The released Wan2.2-TI2V-5B cannot be downloaded everywhere (and is not needed to measure memory):
`write_random_wan` writes a checkpoint with the same names, shapes, dtype and file layout, so that a
dense -> MoE `train.init_from` and `launcher/rehearse.py` read real-sized slices from real-sized
files. For the 5B config in bf16 that is about 10 GB in 5 shards. Values are N(0, std) per tensor
(norm weights 1), drawn from a generator seeded by (seed, tensor name), so the output does not
depend on the shard size. No tensor larger than one shard is ever held in memory.
`data/make_random_wan.py` is its command line.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import torch
from safetensors.torch import save_file

from megamoe.config import ConfigError, load_config
from megamoe.model.dit import build_model
from megamoe.model.weights import CONFIG_NAME, INDEX_NAME, diffusers_config

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def tensor_shapes(config_path: str, overrides=()) -> tuple[dict[str, tuple], object]:
    """Diffusers state-dict names and shapes of the dense model of a config (built on the meta device)."""
    cfg = load_config(config_path, list(overrides))
    if cfg.model.moe is not None and cfg.model.moe.num_experts > 0:
        raise ConfigError(
            f"{config_path} is an MoE config; give its dense counterpart (diffusers' "
            f"WanTransformer3DModel is dense), e.g. configs/wan2.2_ti2v_5b.yaml"
        )
    model = build_model(cfg.model, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, cfg.model


def random_tensor(name: str, shape: tuple, seed: int, std: float, dtype: torch.dtype) -> torch.Tensor:
    """N(0, std) of `shape` (ones for norm weights), a function of (seed, name) only."""
    if "norm" in name and name.endswith("weight"):
        return torch.ones(shape, dtype=dtype)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return (torch.randn(shape, generator=generator) * std).to(dtype)


def plan_shards(shapes: dict[str, tuple], bytes_per_value: int, max_shard_bytes: int) -> list[list[str]]:
    """Names grouped into consecutive shards of at most max_shard_bytes (a larger tensor gets its own)."""
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = bytes_per_value * int(torch.Size(shape).numel())
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_random_wan(
    config_path: str,
    out: str,
    dtype: str = "bf16",
    seed: int = 0,
    std: float = 0.02,
    max_shard_gb: float = 2.0,
    overrides=(),
    log=print,
) -> dict:
    """Write the checkpoint; returns its index json as a dict. Refuses to write into a non-empty directory."""
    if os.path.isdir(out) and os.listdir(out):
        raise ConfigError(f"--out {out} exists and is not empty; choose a new directory")
    shapes, model_cfg = tensor_shapes(config_path, overrides)
    torch_dtype = DTYPES[dtype]
    itemsize = torch.tensor([], dtype=torch_dtype).element_size()
    groups = plan_shards(shapes, itemsize, int(max_shard_gb * 1e9))
    os.makedirs(out, exist_ok=True)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        start = time.perf_counter()
        tensors = {n: random_tensor(n, shapes[n], seed, std, torch_dtype) for n in names}
        save_file(tensors, os.path.join(out, file), metadata={"format": "pt"})
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        total += nbytes
        weight_map.update({n: file for n in names})
        log(f"wrote {file}: {len(names)} tensors, {nbytes / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s")
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(out, INDEX_NAME), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    with open(os.path.join(out, CONFIG_NAME), "w") as f:
        json.dump(diffusers_config(model_cfg), f, indent=2, sort_keys=True)
    log(
        f"{out}: {len(shapes)} tensors, {sum(torch.Size(s).numel() for s in shapes.values()) / 1e9:.3f}B "
        f"parameters, {total / 1e9:.2f} GB {dtype} in {len(groups)} shard(s)"
    )
    return index
