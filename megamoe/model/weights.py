"""Import/export of WanDiT weights in diffusers' `WanTransformer3DModel` layout.

WanDiT's state-dict keys equal diffusers', so import and export are 1:1 copies; what this
module adds is checking and partial reads. Loading is strict and fails with one line naming
the offending keys and the config field to change, because a silently half-loaded checkpoint
wastes a training run. Only safetensors is read (never pickle), and every file's header is
checked before any tensor is read, so a wrong, truncated or incomplete 5B checkpoint fails in
milliseconds. A rank that holds only a block of a tensor (tensor or expert parallelism) reads
only that block (safetensors slice reads), see `LocalShard`.

An MoE model is written in the same file layout (its extra keys included), but its config.json
names it `WanMoETransformer3DModel`, carries the `moe` section, and makes diffusers'
`WanTransformer3DModel.from_pretrained` refuse it (see `diffusers_config`): diffusers would
otherwise load it with random FFNs and only a warning.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megamoe.atomic_files import write_atomic, write_text_atomic
from megamoe.config import ModelConfig
from megamoe.error_messages import first_line
from megamoe.model.lora_mixer import PROJECTIONS
from megamoe.model.mixture_of_depths import ROUTER_FEATURES, mod_layer_indices

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
CONFIG_NAME = "config.json"
DENSE_CLASS_NAME = "WanTransformer3DModel"
MOE_CLASS_NAME = "WanMoETransformer3DModel"
MOE_REFUSAL = (
    "none: this is a megamoe Mixture-of-Experts WanDiT, whose routed experts replace the dense FFNs, "
    "so WanTransformer3DModel cannot hold it; load it with megamoe (train.init_from, or launcher/sample.py on "
    "the training checkpoint whose weights/ it is)"
)
STRUCTURAL_MOE_FIELDS = (
    "num_experts",
    "layers",
    "expert_ffn_dim",
    "num_shared_experts",
    "shared_ffn_dim",
    "num_null_experts",
    "router",
    "router_hidden_dim",
    "num_prototypes_per_expert",
    "merged_from",
)
"""The moe fields that change the parameter set; losses, schedules and diagnostics may differ."""


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded; the one-line message names the keys or path and the fix."""


def diffusers_config(cfg: ModelConfig) -> dict:
    """The config.json that `WanTransformer3DModel.from_pretrained` reads for this model.

    For an MoE model it is deliberately one diffusers refuses: another `_class_name` alone is
    ignored by `from_pretrained`, so a `quantization_config` whose method names the reason is
    added; diffusers checks it before building anything and raises
    "ValueError: Unknown quantization type, got none: this is a megamoe Mixture-of-Experts ...".
    """
    conf = {
        "_class_name": DENSE_CLASS_NAME,
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
    if cfg.moe.num_experts > 0:
        conf.update(
            _class_name=MOE_CLASS_NAME,
            moe=dataclasses.asdict(cfg.moe),
            quantization_config={"quant_method": MOE_REFUSAL},
        )
    return conf


# ---------------------------------------------------------------------------------------------
# What a checkpoint implies about the model config, for error messages that name the fix.


def model_fields_from_diffusers_config(conf: dict, where: str) -> dict:
    """The ModelConfig fields a diffusers config.json states ({"dim": 3072, ...}); raises WeightsError
    naming `where` for a model megamoe cannot load (another class, image conditioning, another qk norm)."""
    if conf.get("_class_name", DENSE_CLASS_NAME) not in (DENSE_CLASS_NAME, MOE_CLASS_NAME):
        raise WeightsError(
            f"{where} describes a {conf['_class_name']}, not a WanTransformer3DModel; "
            f"point to the transformer/ folder of a Wan checkpoint"
        )
    for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if conf.get(key) is not None:
            raise WeightsError(
                f"{where} has {key}={conf[key]} (image-conditioned Wan); "
                f"only text-conditioned checkpoints (Wan2.x T2V / TI2V) are supported"
            )
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


def model_fields_from_shapes(shapes: Mapping[str, tuple]) -> dict:
    """The ModelConfig fields that a checkpoint's tensor shapes imply (key -> full shape)."""
    fields = {}
    if len(shapes.get("patch_embedding.weight", ())) == 5:
        dim, fields["in_channels"], *patch = shapes["patch_embedding.weight"]
        fields["dim"], fields["patch_size"] = dim, list(patch)
        if "proj_out.weight" in shapes:
            fields["out_channels"] = shapes["proj_out.weight"][0] // math.prod(patch)
    for field, key in (
        ("freq_dim", "condition_embedder.time_embedder.linear_1.weight"),
        ("text_dim", "condition_embedder.text_embedder.linear_1.weight"),
    ):
        if len(shapes.get(key, ())) == 2:
            fields[field] = shapes[key][1]
    if len(shapes.get("blocks.0.ffn.net.0.proj.weight", ())) == 2:
        fields["ffn_dim"] = shapes["blocks.0.ffn.net.0.proj.weight"][0]
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        fields["num_layers"] = max(blocks) + 1
        fields["cross_attn_norm"] = "blocks.0.norm2.weight" in shapes
    return fields


def config_fix_for(cfg: ModelConfig, fields: dict) -> str:
    """'set model.dim=3072, ... to match the checkpoint' for the `fields` where `cfg` differs; '' if none."""
    diffs = [
        f"model.{k}={v}"
        for k, v in fields.items()
        if getattr(cfg, k) != v and not (k == "patch_size" and [int(p) for p in cfg.patch_size] == v)
    ]
    return f"set {', '.join(diffs)} to match the checkpoint" if diffs else ""


def routing_fields_from_shapes(shapes: Mapping[str, tuple], dim: int) -> dict:
    """The routing settings a checkpoint's keys and shapes imply, for the routing modules it holds:
    {'lora.num_experts': 4, 'lora.rank': 8, 'lora.targets': ['q', 'k', 'v', 'o'], 'mod.layers': '0,3',
    'mod.router_features': ['position']}; a kind of module the checkpoint has none of is absent."""
    fields = {}
    letters = {key: letter for letter, key in PROJECTIONS.items()}
    adapters = {m.group(1): shape for k, shape in shapes.items() if (m := _ADAPTER_A.match(k))}  # lora_A [E, r, in]
    if adapters:
        shape = next(iter(adapters.values()))
        fields["lora.num_experts"], fields["lora.rank"] = shape[0], shape[1]
        fields["lora.targets"] = [letters[p] for p in PROJECTIONS.values() if p in adapters]
    gates = {int(m.group(1)): shape for k, shape in shapes.items() if (m := _MOD_GATE.match(k))}  # [1, dim + features]
    if gates:
        fields["mod.layers"] = ",".join(str(i) for i in sorted(gates))
        width = next(iter(gates.values()))[-1] - dim
        widths = {sum(ROUTER_FEATURES[f] for f in c): list(c) for c in _subsets(list(ROUTER_FEATURES))}
        if width in widths:
            fields["mod.router_features"] = widths[width]
    return fields


def _setting(key: str, value) -> str:
    """'model.KEY=VALUE' as an override is written (lists as [a,b])."""
    return f"model.{key}=[{','.join(value)}]" if isinstance(value, list) else f"model.{key}={value}"


def _subsets(items: list) -> list[tuple]:
    return [tuple(x for i, x in enumerate(items) if mask >> i & 1) for mask in range(1 << len(items))]


_ADAPTER_A = re.compile(r"blocks\.\d+\.attn[12]\.lora\.(\w+)\.lora_A$")
_MOD_GATE = re.compile(r"blocks\.(\d+)\.mod\.gate\.weight$")


def routing_fix_for(cfg: ModelConfig, shapes: Mapping[str, tuple]) -> str:
    """What to set for the routing modules of a checkpoint (LoRA-Mixer adapters, mixture-of-depths
    routers) that `cfg` does not describe; '' if they fit. A checkpoint with none of a kind that
    `cfg` adds is a base (train.init_from draws them from train.seed) and is named only as such."""
    found = routing_fields_from_shapes(shapes, cfg.dim)
    lora = {k: v for k, v in found.items() if k.startswith("lora.")}
    if lora and cfg.lora.num_experts == 0:
        return (
            f"the checkpoint has LoRA-Mixer adapters (model.lora.num_experts={lora['lora.num_experts']}): set it, "
            f"or export a merged dense model (python -m megamoe.posttrain.lora_export --merged) and load that"
        )
    if lora:
        current = {"lora.num_experts": cfg.lora.num_experts, "lora.rank": cfg.lora.rank, "lora.targets": None}
        current["lora.targets"] = [t for t in PROJECTIONS if t in cfg.lora.targets]
        diffs = [_setting(k, v) for k, v in lora.items() if current[k] != v]
        if diffs:
            return f"the checkpoint's LoRA-Mixer adapters have {', '.join(diffs)}: set that to load them"
    mod = {k: v for k, v in found.items() if k.startswith("mod.")}
    routed = mod_layer_indices(cfg)
    if mod and not routed:
        return (
            f"the checkpoint has mixture-of-depths routers (model.mod.layers={mod['mod.layers']}): set it "
            f"(with the run's other model.mod settings) to load them"
        )
    if mod:
        diffs = []
        if {int(i) for i in mod["mod.layers"].split(",")} != routed:
            diffs.append(f"model.mod.layers={mod['mod.layers']}")
        if "mod.router_features" in mod and sorted(mod["mod.router_features"]) != sorted(cfg.mod.router_features):
            diffs.append(_setting("mod.router_features", mod["mod.router_features"]))
        if diffs:
            return f"the checkpoint's mixture-of-depths routers have {', '.join(diffs)}: set that to load them"
    bases = (["LoRA-Mixer adapters"] if cfg.lora.num_experts > 0 and not lora else []) + (
        ["mixture-of-depths routers"] if routed and not mod else []
    )
    if bases:
        return (
            f"the checkpoint has no {' or '.join(bases)}: it is a base, which train.init_from loads with them "
            f"drawn from train.seed"
        )
    return ""


def first_keys(keys, n: int = 3) -> str:
    """The first `n` of `keys` in sorted order, and how many there are when more: for error messages."""
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


# ---------------------------------------------------------------------------------------------
# Reading checkpoints: every file's header first, tensors (or blocks of them) later.


@dataclasses.dataclass(frozen=True)
class LocalShard:
    """The block of a full tensor that one rank holds: rows [start, stop) along `dim` (whole if dim is None)."""

    shape: tuple
    """The full tensor's shape."""
    dim: int | None = None
    start: int = 0
    stop: int = 0

    @property
    def index(self) -> tuple:
        """The block as an index into the full tensor (empty: all of it)."""
        if self.dim is None:
            return ()
        return (slice(None),) * self.dim + (slice(self.start, self.stop),)


def _header(path: str) -> dict[str, tuple]:
    if not os.path.isfile(path):
        raise WeightsError(f"weights path '{path}' does not exist; check the path (train.init_from)")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt files
        reason = first_line(exc) or type(exc).__name__
        if "not fully covered" in reason:
            raise WeightsError(
                f"'{path}' is truncated: its header describes more bytes than the file holds "
                f"(an interrupted download or copy); re-download or re-export it"
            ) from None
        raise WeightsError(
            f"'{path}' is not a valid safetensors file ({reason}); re-download or re-export it"
        ) from None


def _shards(index_path: str) -> dict[str, set]:
    """{shard file: keys the index assigns to it}; every shard must exist."""
    if not os.path.isfile(index_path):
        raise WeightsError(f"index file '{index_path}' does not exist; check the path")
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files: dict[str, set] = {}
        for key, name in weight_map.items():
            files.setdefault(os.path.join(os.path.dirname(index_path), name), set()).add(key)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WeightsError(f"'{index_path}' is not a valid safetensors index ({exc!r}); re-download it") from None
    for file in files:
        if not os.path.isfile(file):
            raise WeightsError(
                f"index '{index_path}' names shard '{os.path.basename(file)}', which does not exist; "
                f"re-download or re-export the checkpoint (the index lists every shard)"
            )
    return files


def _read_config(path: str) -> dict | None:
    conf_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(conf_path):
        return None
    try:
        with open(conf_path) as f:
            conf = json.load(f)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"'{conf_path}' is not valid JSON ({exc}); re-export the checkpoint") from None
    if not isinstance(conf, dict):
        raise WeightsError(f"'{conf_path}' is not a JSON object; re-export the checkpoint")
    return conf


class WeightSource:
    """A checkpoint opened for reading: each tensor's full shape now, its values (or a block) on demand.

    source: a state dict, a .safetensors file, a .safetensors.index.json, a diffusers model
    directory (config.json + one or sharded safetensors, as diffusers reads it: the index first),
    or a megamoe checkpoint directory (its weights/ export is read). Opening reads headers only
    and checks every file (a missing shard, a truncated or corrupt file): WeightsError.
    """

    def __init__(self, source):
        self.config: dict | None = None
        """config.json of a model directory, else None."""
        self._tensors: Mapping | None = None
        self._file_of: dict[str, str] = {}
        if isinstance(source, Mapping):
            self._tensors, self.what = source, "state dict"
            self.shapes = {k: tuple(v.shape) for k, v in source.items()}
            return
        path = os.fspath(source)
        if os.path.isfile(os.path.join(path, "meta.json")) and os.path.isdir(os.path.join(path, "weights")):
            path = os.path.join(path, "weights")  # a megamoe checkpoint: its diffusers-layout export
        self.what = f"checkpoint '{path}'"
        if os.path.isdir(path):
            self.config = _read_config(path)
            if os.path.isfile(os.path.join(path, INDEX_NAME)):  # as diffusers' from_pretrained: index first
                files = _shards(os.path.join(path, INDEX_NAME))
            elif os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
                files = {os.path.join(path, WEIGHTS_NAME): None}
            else:
                inside = [
                    os.path.join(path, d)
                    for d in ("weights", "ema_weights", "transformer")
                    if any(os.path.isfile(os.path.join(path, d, n)) for n in (WEIGHTS_NAME, INDEX_NAME))
                ]
                fix = (
                    f"it is a checkpoint or pipeline directory: pass '{inside[0]}'"
                    if inside
                    else "point to a diffusers transformer folder or a .safetensors file"
                )
                raise WeightsError(f"directory '{path}' has neither {WEIGHTS_NAME} nor {INDEX_NAME}; {fix}")
        elif path.endswith(".index.json"):
            files = _shards(path)
        else:
            files = {path: None}
        self.shapes = {}
        for file, keys in files.items():
            header = _header(file)
            if keys is not None and not keys <= header.keys():
                raise WeightsError(
                    f"shard '{file}' lacks {first_keys(keys - header.keys())} that its index lists; "
                    f"re-download the shard"
                )
            for k in header if keys is None else keys:
                self.shapes[k], self._file_of[k] = header[k], file

    def read(self, key: str, index: tuple = ()) -> torch.Tensor:
        """Tensor `key`, or only `full[index]` (a tuple of slices): a slice read touches only its bytes."""
        if self._tensors is not None:
            return self._tensors[key][index] if index else self._tensors[key]
        with safe_open(self._file_of[key], framework="pt") as f:
            return f.get_slice(key)[index] if index else f.get_tensor(key)


def check_matches(source: WeightSource, cfg: ModelConfig, expected: Mapping[str, tuple]) -> None:
    """Raise WeightsError unless `source` holds exactly the keys and full shapes in `expected`
    (those of the model `cfg` describes), and its config.json, if any, describes that model."""
    what, shapes = source.what, source.shapes
    if source.config is not None:
        fix = config_fix_for(cfg, model_fields_from_diffusers_config(source.config, f"config.json of {what}"))
        if fix:
            raise WeightsError(f"config.json of {what} describes a different model; {fix}")
        saved = source.config.get("moe")
        if isinstance(saved, dict) and cfg.moe.num_experts > 0:
            current = dataclasses.asdict(cfg.moe)
            diffs = [
                f"model.moe.{k}={saved[k]}" for k in STRUCTURAL_MOE_FIELDS if k in saved and saved[k] != current[k]
            ]
            if diffs:
                raise WeightsError(f"MoE weights in {what} were saved with {', '.join(diffs)}; set that to load them")
    missing, unexpected = expected.keys() - shapes.keys(), shapes.keys() - expected.keys()
    # Weights before biases: a weight's shape shows which config field differs.
    wrong = sorted(
        (k for k in expected.keys() & shapes.keys() if tuple(expected[k]) != tuple(shapes[k])),
        key=lambda k: (k.endswith("bias"), k),
    )
    fix = config_fix_for(cfg, model_fields_from_shapes(shapes)) or routing_fix_for(cfg, shapes)
    if wrong:
        k = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise WeightsError(
            f"{what} has {k} of shape {tuple(shapes[k])} but the model expects {tuple(expected[k])}"
            f"{more}; {fix or 'the checkpoint is not a WanTransformer3DModel of this shape'}"
        )
    if missing or unexpected:
        parts = ([f"lacks {first_keys(missing)}"] if missing else []) + (
            [f"has unexpected {first_keys(unexpected)}"] if unexpected else []
        )
        if not fix:
            if any(re.match(r"(model|module|_orig_mod)\.", k) for k in unexpected):
                fix = "strip the key prefix before 'blocks.' (saved from a wrapped or compiled model)"
            elif len(missing) > len(expected) // 2:
                fix = (
                    "convert it to diffusers' WanTransformer3DModel layout (e.g. load it with diffusers' "
                    "WanTransformer3DModel.from_single_file and save_pretrained) and load that"
                )
            else:
                fix = "the checkpoint is incomplete or a different Wan variant; re-export it from a matching model"
        raise WeightsError(f"{what} does not match the model: {'; '.join(parts)}; {fix}")


def whole_shards(model: torch.nn.Module) -> dict[str, LocalShard]:
    """Every tensor of an unsharded model as its own full block."""
    return {k: LocalShard(tuple(t.shape)) for k, t in model.state_dict().items()}


@torch.no_grad()
def load_diffusers_weights(model: torch.nn.Module, source, shards: Mapping[str, LocalShard] | None = None) -> None:
    """Copy a diffusers-layout checkpoint of this very model into `model` (cast to each tensor's dtype and device).

    source: anything `WeightSource` opens (or an open WeightSource). shards: which block of each
    full tensor `model` holds (default: all of it, an unsharded model); only those blocks are
    read. Raises WeightsError on any mismatch, before anything is read.
    """
    source = source if isinstance(source, WeightSource) else WeightSource(source)
    shards = whole_shards(model) if shards is None else shards
    check_matches(source, model.cfg, {k: s.shape for k, s in shards.items()})
    targets = model.state_dict(keep_vars=True)
    if any(t.is_meta for t in targets.values()):
        raise WeightsError("the model is on the meta device; call model.to_empty(device=...) before loading weights")
    for key, shard in shards.items():  # every key, or those `shards` names (a base under LoRA adapters)
        targets[key].copy_(source.read(key, shard.index))  # copy_ casts to the tensor's dtype and device


def read_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """The tensors of a diffusers model directory (single or sharded), by key, on the CPU."""
    source = WeightSource(os.fspath(directory))
    return {key: source.read(key) for key in source.shapes}


# ---------------------------------------------------------------------------------------------
# Writing, in one process (the sharded writer of a parallel run is megamoe/parallel/sharded_weights.py).


def write_config(cfg: ModelConfig, directory: str) -> None:
    text = json.dumps(diffusers_config(cfg), indent=2, sort_keys=True) + "\n"
    write_text_atomic(os.path.join(os.fspath(directory), CONFIG_NAME), text)


def remove_stale_weights(directory: str, keep: set[str]) -> None:
    """Delete weight files (single, shards, index) of an earlier export that `keep` does not name:
    diffusers reads an index before a single file, so a stale one would shadow what was just written."""
    directory = os.fspath(directory)
    for name in os.listdir(directory):
        if (
            name.startswith("diffusion_pytorch_model")
            and name.endswith((".safetensors", ".index.json"))
            and name not in keep
        ):
            os.remove(os.path.join(directory, name))


def save_diffusers_weights(model: torch.nn.Module, directory: str) -> None:
    """Write `model` as config.json + diffusion_pytorch_model.safetensors (see write_diffusers_weights)."""
    write_diffusers_weights(model.state_dict(), model.cfg, directory)


def write_diffusers_weights(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, directory: str) -> None:
    """Write config.json + diffusion_pytorch_model.safetensors, which
    `WanTransformer3DModel.from_pretrained(directory)` loads for a dense model (and refuses for an
    MoE one). Each file is written to a temporary name and renamed, so a crash never leaves a
    truncated file under the final name."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    state = {}
    for k, v in state_dict.items():
        if v.is_meta:
            raise WeightsError(f"model parameter {k} is on the meta device; materialise the model before saving")
        state[k] = v.detach().to("cpu").contiguous()
    write_atomic(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_config(cfg, directory)
    remove_stale_weights(directory, keep={WEIGHTS_NAME})
