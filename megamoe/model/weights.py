"""Import/export of WanDiT weights in diffusers' `WanTransformer3DModel` layout.

WanDiT's state-dict keys equal diffusers', so import and export are 1:1 copies; what this
module adds is checking. Loading is strict and fails with one line naming the offending keys
and the config field to change, because a silently half-loaded checkpoint wastes a training
run. Only safetensors is read (never pickle), and headers are checked before any tensor is
read, so a wrong 5B checkpoint fails in milliseconds.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megamoe.config import ModelConfig

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
CONFIG_NAME = "config.json"


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded; the one-line message names the keys or path and the fix."""


def diffusers_config(cfg: ModelConfig) -> dict:
    """The config.json that `WanTransformer3DModel.from_pretrained` reads for this model."""
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": [int(p) for p in cfg.patch_size],
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.dim // cfg.num_heads,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": cfg.rope_max_seq_len,
        "pos_embed_seq_len": None,
    }


# ---------------------------------------------------------------------------------------------
# What a checkpoint implies about the model config, for error messages that name the fix.

def _fields_from_diffusers_config(conf: dict, where: str) -> dict:
    if conf.get("_class_name", "WanTransformer3DModel") != "WanTransformer3DModel":
        raise WeightsError(f"{where} describes a {conf['_class_name']}, not a WanTransformer3DModel; "
                           f"point to the transformer/ folder of a Wan checkpoint")
    for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if conf.get(key) is not None:
            raise WeightsError(f"{where} has {key}={conf[key]} (image-conditioned Wan); "
                               f"only text-conditioned checkpoints (Wan2.x T2V / TI2V) are supported")
    if conf.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise WeightsError(f"{where} has qk_norm={conf['qk_norm']!r}; only 'rms_norm_across_heads' is supported")
    fields = {}
    if "num_attention_heads" in conf:
        fields["num_heads"] = conf["num_attention_heads"]
        if "attention_head_dim" in conf:
            fields["dim"] = conf["num_attention_heads"] * conf["attention_head_dim"]
    for key in ("in_channels", "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "eps"):
        if key in conf:
            fields[key] = conf[key]
    if "patch_size" in conf:
        fields["patch_size"] = [int(p) for p in conf["patch_size"]]
    if conf.get("out_channels") or "in_channels" in conf:  # diffusers: null out_channels = in_channels
        fields["out_channels"] = conf.get("out_channels") or conf["in_channels"]
    return fields


def _fields_from_shapes(shapes: Mapping[str, tuple]) -> dict:
    fields = {}
    if len(shapes.get("patch_embedding.weight", ())) == 5:
        dim, fields["in_channels"], *patch = shapes["patch_embedding.weight"]
        fields["dim"], fields["patch_size"] = dim, list(patch)
        if "proj_out.weight" in shapes:
            fields["out_channels"] = shapes["proj_out.weight"][0] // math.prod(patch)
    for field, key in (("freq_dim", "condition_embedder.time_embedder.linear_1.weight"),
                       ("text_dim", "condition_embedder.text_embedder.linear_1.weight")):
        if len(shapes.get(key, ())) == 2:
            fields[field] = shapes[key][1]
    if len(shapes.get("blocks.0.ffn.net.0.proj.weight", ())) == 2:
        fields["ffn_dim"] = shapes["blocks.0.ffn.net.0.proj.weight"][0]
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        fields["num_layers"] = max(blocks) + 1
        fields["cross_attn_norm"] = "blocks.0.norm2.weight" in shapes
    return fields


def _config_fix(cfg: ModelConfig, fields: dict) -> str:
    diffs = [f"model.{k}={v}" for k, v in fields.items() if getattr(cfg, k) != v
             and not (k == "patch_size" and [int(p) for p in cfg.patch_size] == v)]
    return f"set {', '.join(diffs)} to match the checkpoint" if diffs else ""


def _first(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


# ---------------------------------------------------------------------------------------------
# Reading checkpoints: {key: shape} first (headers only), tensors later.

def _header(path: str) -> dict[str, tuple]:
    if not os.path.isfile(path):
        raise WeightsError(f"weights path '{path}' does not exist; check the path (train.init_from)")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt files
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"'{path}' is not a valid safetensors file ({reason}); "
                           f"re-download or re-export it") from None


def _resolve(source) -> tuple[dict[str, tuple], dict[str, Callable[[], torch.Tensor]], str, dict | None]:
    """-> (shapes, loaders, description, diffusers config or None) for any supported source."""
    if isinstance(source, Mapping):
        return ({k: tuple(v.shape) for k, v in source.items()}, {k: (lambda v=v: v) for k, v in source.items()},
                "state dict", None)
    path = os.fspath(source)
    conf = None
    if os.path.isdir(path):
        conf_path = os.path.join(path, CONFIG_NAME)
        if os.path.isfile(conf_path):
            try:
                with open(conf_path) as f:
                    conf = json.load(f)
            except (OSError, ValueError) as exc:
                raise WeightsError(f"'{conf_path}' is not valid JSON ({exc}); re-export the checkpoint") from None
            if not isinstance(conf, dict):
                raise WeightsError(f"'{conf_path}' is not a JSON object; re-export the checkpoint")
        # Index first, as diffusers' from_pretrained does, so both load the same tensors.
        if os.path.isfile(os.path.join(path, INDEX_NAME)):
            files = _shards(os.path.join(path, INDEX_NAME))
        elif os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
            files = {os.path.join(path, WEIGHTS_NAME): None}
        else:
            inside = [os.path.join(path, d) for d in ("weights", "ema_weights", "transformer")
                      if any(os.path.isfile(os.path.join(path, d, n)) for n in (WEIGHTS_NAME, INDEX_NAME))]
            fix = (f"it is a checkpoint or pipeline directory: pass '{inside[0]}'" if inside else
                   "point to a diffusers transformer folder or a .safetensors file")
            raise WeightsError(f"directory '{path}' has neither {WEIGHTS_NAME} nor {INDEX_NAME}; {fix}")
    elif path.endswith(".index.json"):
        files = _shards(path)
    else:
        files = {path: None}

    shapes, loaders = {}, {}
    for file, keys in files.items():
        header = _header(file)
        if keys is not None and not keys <= header.keys():
            raise WeightsError(f"shard '{file}' lacks {_first(keys - header.keys())} that its index lists; "
                               f"re-download the shard")
        for k in (header if keys is None else keys):
            shapes[k] = header[k]
            loaders[k] = (lambda file=file, k=k: _read(file, k))
    return shapes, loaders, f"checkpoint '{path}'", conf


def _shards(index_path: str) -> dict[str, set]:
    if not os.path.isfile(index_path):
        raise WeightsError(f"index file '{index_path}' does not exist; check the path")
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"'{index_path}' is not a valid safetensors index ({exc!r}); re-download it") from None
    files: dict[str, set] = {}
    for key, name in weight_map.items():
        files.setdefault(os.path.join(os.path.dirname(index_path), name), set()).add(key)
    return files


def _read(file: str, key: str) -> torch.Tensor:
    with safe_open(file, framework="pt") as f:
        return f.get_tensor(key)


# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def load_diffusers_weights(model: torch.nn.Module, source) -> None:
    """Copy a diffusers-layout checkpoint into `model` (cast to each parameter's dtype and device).

    source: a state dict, a .safetensors file, a .safetensors.index.json, or a diffusers model
    directory (config.json + single or sharded safetensors). Raises WeightsError on any mismatch.
    """
    cfg: ModelConfig = model.cfg
    shapes, loaders, what, conf = _resolve(source)

    if conf is not None:
        fix = _config_fix(cfg, _fields_from_diffusers_config(conf, f"config.json of {what}"))
        if fix:
            raise WeightsError(f"config.json of {what} describes a different model; {fix}")

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = expected.keys() - shapes.keys(), shapes.keys() - expected.keys()
    # Weights before biases: a weight's shape shows which config field differs.
    wrong = sorted((k for k in expected.keys() & shapes.keys() if expected[k] != shapes[k]),
                   key=lambda k: (k.endswith("bias"), k))
    fix = _config_fix(cfg, _fields_from_shapes(shapes))
    if wrong:
        k = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise WeightsError(f"{what} has {k} of shape {shapes[k]} but the model expects {expected[k]}{more}; "
                           f"{fix or 'the checkpoint is not a WanTransformer3DModel of this shape'}")
    if missing or unexpected:
        parts = ([f"lacks {_first(missing)}"] if missing else []) + \
                ([f"has unexpected {_first(unexpected)}"] if unexpected else [])
        if not fix:
            if any(re.match(r"(model|module|_orig_mod)\.", k) for k in unexpected):
                fix = "strip the key prefix before 'blocks.' (saved from a wrapped or compiled model)"
            elif len(missing) > len(expected) // 2:
                fix = ("convert it to diffusers' WanTransformer3DModel layout (e.g. load it with diffusers' "
                       "WanTransformer3DModel.from_single_file and save_pretrained) and load that")
            else:
                fix = "the checkpoint is incomplete or a different Wan variant; re-export it from a matching model"
        raise WeightsError(f"{what} does not match the model: {'; '.join(parts)}; {fix}")

    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    if any(targets[k].is_meta for k in expected):
        raise WeightsError("the model is on the meta device; call model.to_empty(device=...) before loading weights")
    for key in expected:
        targets[key].copy_(loaders[key]())  # copy_ casts to the parameter's dtype and device


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); give it the mode any new file gets (0644 under umask 022)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def save_diffusers_weights(model: torch.nn.Module, directory: str) -> None:
    """Write `model` as config.json + diffusion_pytorch_model.safetensors (see write_diffusers_weights)."""
    write_diffusers_weights(model.state_dict(), model.cfg, directory)


def read_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """The tensors of a diffusers model directory (single or sharded), by key, on the CPU."""
    shapes, loaders, _, _ = _resolve(os.fspath(directory))
    return {key: loaders[key]() for key in shapes}


def write_diffusers_weights(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, directory: str) -> None:
    """Write config.json + diffusion_pytorch_model.safetensors loadable by
    `WanTransformer3DModel.from_pretrained(directory)`. Each file is written to a temporary name
    and renamed, so a crash never leaves a truncated file under the final name."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    state = {}
    for k, v in state_dict.items():
        if v.is_meta:
            raise WeightsError(f"model parameter {k} is on the meta device; materialise the model before saving")
        state[k] = v.detach().to("cpu").contiguous()
    _atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    config_text = json.dumps(diffusers_config(cfg), indent=2, sort_keys=True) + "\n"
    _atomic_write(os.path.join(directory, CONFIG_NAME), lambda tmp: open(tmp, "w").write(config_text))
    # diffusers prefers a sharded index over the single file, so a stale one would shadow what we wrote.
    index = os.path.join(directory, INDEX_NAME)
    if os.path.isfile(index):
        try:
            stale = set(_shards(index))
        except WeightsError:
            stale = set()
        for shard in stale:
            if os.path.isfile(shard):
                os.remove(shard)
        os.remove(index)
