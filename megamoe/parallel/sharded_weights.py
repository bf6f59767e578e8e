"""Diffusers-layout weights read and written by ranks that each hold only their shard of the model.

Reading (`init_from`, the training loop's `train.init_from`): after `parallelize()` every rank
reads from the checkpoint only the blocks it holds (its tensor-parallel blocks, its experts,
everything replicated), with safetensors slice reads; it never materialises a tensor it does
not own. A dense checkpoint loaded into an MoE config is upcycled on the way in (see
megamoe/moe/upcycle.py), so a dense Wan checkpoint starts MoE training in one command.

Writing (`write_sharded_weights`, every checkpoint's weights/ export): each tensor is written by
one rank, chosen so that every rank writes about the same number of bytes. A replicated tensor
is written by its writer from its own copy; a tensor split over a group (experts over EP, a
tensor-parallel weight over TP) is gathered, alone, to its writer from the writer's own group,
then written. diffusers' index maps each tensor to one file, so a split tensor must be whole in
one file; gathering one tensor at a time keeps what a rank holds to its own shard plus one
tensor. Each writer streams its tensors into one safetensors file whose header it writes first,
and rank 0 writes the index `diffusion_pytorch_model.safetensors.index.json` and config.json.

Bytes a rank sends per save: its block of every split tensor whose writer is another rank of
its group. Over all ranks that is sum over split tensors T of |T| (G_T - 1) / G_T (G_T the
size of T's group: EP or TP), i.e. on average (1/W) of that per rank: a rank moves at most its
own share of the state, never the model.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from megamoe.atomic_files import AtomicFile, write_text_atomic
from megamoe.config import ModelConfig
from megamoe.model.dit import build_model
from megamoe.model.init import draw_, inits_of
from megamoe.model.lora_mixer import is_adapter_key
from megamoe.model.mixture_of_depths import is_mod_key, mod_layer_indices
from megamoe.model.weights import (
    INDEX_NAME,
    LocalShard,
    WeightsError,
    WeightSource,
    check_matches,
    load_diffusers_weights,
    remove_stale_weights,
    write_config,
)
from megamoe.moe.upcycle import check_dense, is_dense, mode_of, upcycle_into
from megamoe.parallel.parallelize import split_of

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def local_shards(model: torch.nn.Module) -> dict[str, LocalShard]:
    """{state-dict key: the block of the full tensor this rank holds} (local: no communication)."""
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        split = split_of(tensor)
        if split is None:
            out[name] = LocalShard(tuple(tensor.shape))
            continue
        group, dim = split
        size, rank, n = dist.get_world_size(group), dist.get_rank(group), tensor.shape[dim]
        shape = list(tensor.shape)
        shape[dim] *= size
        out[name] = LocalShard(tuple(shape), dim, rank * n, (rank + 1) * n)
    return out


# ---------------------------------------------------------------------------------------------
# Reading.


ADDED_ROUTING = (
    ("LoRA-Mixer adapters", is_adapter_key, lambda cfg: cfg.lora.num_experts > 0),
    ("mixture-of-depths routers", is_mod_key, lambda cfg: bool(mod_layer_indices(cfg))),
)
"""Routing modules a config adds to a base model: (name, is one of its state-dict keys, does `cfg` add them)."""


def drawn_fresh(cfg: ModelConfig, keys) -> tuple[list[str], Callable[[str], bool]]:
    """The parameters and buffers a base checkpoint with state-dict `keys` may lack: those of each
    kind of routing module that `cfg` adds and the checkpoint holds none of (a dense Wan release
    under LoRA-Mixer adapters, a pretrained model converted to mixture-of-depths blocks). Returns
    (the kinds' names, a predicate on state-dict keys). A checkpoint that holds some modules of a
    kind must hold all of them: it was trained with them, and `check_matches` names the setting."""
    kinds = [(name, is_key) for name, is_key, adds in ADDED_ROUTING if adds(cfg) and not any(map(is_key, keys))]
    return [name for name, _ in kinds], lambda key: any(is_key(key) for _, is_key in kinds)


@torch.no_grad()
def draw_fresh(model: torch.nn.Module, fresh: Callable[[str], bool], seed: int) -> None:
    """Give the modules whose keys `fresh` accepts the values `build_model(cfg, seed=seed)` gives them:
    parameters drawn as a pure function of (seed, name, position) (megamoe/model/init.py), buffers
    reset. Routing modules are replicated, so every rank draws the whole tensor."""
    for prefix, module in model.named_modules():
        if not prefix or not fresh(prefix + ".") or fresh(prefix.rpartition(".")[0] + "."):
            continue  # not a fresh module, or inside one already drawn
        for name, init in inits_of(module).items():
            param = module.get_parameter(name)
            if split_of(param) is not None:
                raise WeightsError(f"{prefix}.{name} is sharded; routing modules are replicated on every rank")
            draw_(param.data, init, seed, f"{prefix}.{name}", None)
        for sub in module.modules():
            if hasattr(sub, "reset_buffers"):
                sub.reset_buffers()


def open_init_source(path, cfg: ModelConfig) -> tuple[WeightSource, bool]:
    """Open `train.init_from` and check it against the model `cfg` describes: headers only, no
    tensor read and no communication, so it runs before any process group exists.

    Returns (source, upcycle): upcycle is true when `cfg` is MoE and the source dense. Raises
    WeightsError (one line: the path or key, and the fix) on a missing shard, a truncated or
    corrupt file, or shapes that do not fit the config.
    """
    source = WeightSource(path)
    upcycle = cfg.moe.num_experts > 0 and is_dense(source)
    if upcycle:
        check_dense(source, cfg)
    else:
        _, fresh = drawn_fresh(cfg, source.shapes)  # a base: the routing modules it lacks are drawn
        expected = {k: tuple(v.shape) for k, v in build_model(cfg, "meta").state_dict().items() if not fresh(k)}
        check_matches(source, cfg, expected)
    return source, upcycle


def init_from(model: torch.nn.Module, path, seed: int) -> str:
    """Load `path` into `model` (after parallelize(), or unsharded), each rank only its blocks.

    A dense checkpoint into an MoE model is upcycled in the mode model.moe.shared_init asks for,
    its random parts seeded by `seed` (train.seed): the result equals `launcher/upcycle.py
    --seed SEED` output loaded normally, at any layout. Returns a line for the log.
    """
    source, upcycle = open_init_source(path, model.cfg)
    if any(t.is_meta for t in model.state_dict().values()):  # copy_ into a meta tensor would do nothing
        raise WeightsError("the model is on the meta device; materialise it before loading train.init_from")
    shards = local_shards(model)
    if upcycle:
        mode = mode_of(model.cfg)
        upcycle_into(model, source, mode, seed, shards)
        return f"upcycled the dense {source.what} into {model.cfg.moe.num_experts} experts ({mode} mode, seed {seed})"
    kinds, fresh = drawn_fresh(model.cfg, source.shapes)
    if kinds:
        load_diffusers_weights(model, source, {k: s for k, s in shards.items() if not fresh(k)})
        draw_fresh(model, fresh, seed)
        return f"loaded the base weights from {source.what}; {' and '.join(kinds)} drawn from seed {seed}"
    load_diffusers_weights(model, source, shards)
    return f"loaded weights from {source.what}"


# ---------------------------------------------------------------------------------------------
# Writing.


class _SafetensorsStream:
    """A safetensors file written tensor by tensor: the header (every name, dtype, shape and
    offset) first, then each tensor's bytes in header order, so only one tensor is in memory."""

    def __init__(self, path: str, entries: list[tuple[str, torch.dtype, tuple]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in entries:
            size = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {
                "dtype": _SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.order = [name for name, _, _ in entries]
        self.out = AtomicFile(path)
        self.out.file.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name != self.order.pop(0):
            raise RuntimeError(f"{name} written out of header order")
        self.out.file.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())

    def close(self) -> None:
        if self.order:
            raise RuntimeError(f"{len(self.order)} tensors were never written, e.g. {self.order[0]}")
        self.out.commit()

    def abort(self) -> None:
        self.out.abort()


def assign_writers(sizes: list[int], world: int) -> list[int]:
    """The writing rank of each tensor (bytes `sizes`): largest first, each to the rank with the
    fewest bytes so far (lowest rank on ties). Every rank computes the same answer."""
    load = [0] * world
    writer = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        writer[i] = min(range(world), key=lambda r: (load[r], r))
        load[writer[i]] += sizes[i]
    return writer


def shard_file_name(i: int, count: int) -> str:
    return f"diffusion_pytorch_model-{i + 1:05d}-of-{count:05d}.safetensors"


def export_weights(model: torch.nn.Module, directory, tensors: Mapping[str, torch.Tensor] | None = None) -> dict:
    """Collective: write `model`'s weights (or `tensors`, keyed by parameter name and sharded like
    the parameters, e.g. EMA weights) as a sharded diffusers model folder. See write_sharded_weights."""
    state = model.state_dict() if tensors is None else tensors
    layout = {name: split_of(t) for name, t in model.state_dict(keep_vars=True).items()}
    return write_sharded_weights(state, {name: layout.get(name) for name in state}, model.cfg, directory)


@torch.no_grad()
def write_sharded_weights(
    tensors: Mapping[str, torch.Tensor], splits: Mapping[str, tuple | None], cfg: ModelConfig, directory
) -> dict:
    """Collective over the world: write full tensors assembled from every rank's shards.

    tensors: this rank's local shard of every tensor, by diffusers key, in the same order on
    every rank. splits: for each key, `parallelize.split_of` of the parameter (group, dim), or
    None when every rank holds it whole. Writes one safetensors file per writing rank, the
    index (rank 0) and config.json (rank 0), and returns this rank's traffic:
    {'sent_bytes', 'written_bytes', 'largest_held_bytes'} (the largest full tensor it held at once).
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; writing them from a big-endian host is not supported")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    me, world = dist.get_rank(), dist.get_world_size()
    entries = []  # (key, full shape, dtype, split)
    for key, tensor in tensors.items():
        if tensor.is_meta:
            raise ValueError(f"{key} is on the meta device; materialise the model before saving")
        split = splits.get(key)
        shape = list(tensor.shape)
        if split is not None:
            shape[split[1]] *= dist.get_world_size(split[0])
        entries.append((key, tuple(shape), tensor.dtype, split))
    writer = assign_writers([torch.Size(s).numel() * d.itemsize for _, s, d, _ in entries], world)
    writers = sorted(set(writer))
    files = {r: shard_file_name(i, len(writers)) for i, r in enumerate(writers)}

    stats = {"sent_bytes": 0, "written_bytes": 0, "largest_held_bytes": 0}
    mine = [(key, dtype, shape) for (key, shape, dtype, _), w in zip(entries, writer) if w == me]
    # A failed file operation (a full disk, lost permissions) must not stop this rank halfway through
    # the gathers, or the other ranks would wait for it forever: the first failure is kept, later file
    # operations are skipped, every collective still runs, and the failure is raised at the end.
    opened: list = [None]  # this rank's shard file, once open
    failure: list[BaseException] = []

    def on_file(operation) -> None:
        if not failure:
            try:
                operation()
            except Exception as exc:
                failure.append(exc)

    def open_stream():
        opened[0] = _SafetensorsStream(os.path.join(directory, files[me]), mine) if mine else None

    on_file(open_stream)
    for (key, _, _, split), w in zip(entries, writer):
        local = tensors[key].detach()
        if split is None:
            full = local if w == me else None
        else:
            group, dim = split
            if w not in dist.get_process_group_ranks(group):
                continue  # another replica of this tensor's group writes it
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))] if w == me else None
            dist.gather(local.contiguous(), parts, dst=w, group=group)
            if w != me:
                stats["sent_bytes"] += local.numel() * local.element_size()
            full = torch.cat(parts, dim) if w == me else None
        if full is not None:
            size = full.numel() * full.element_size()
            stats["largest_held_bytes"] = max(stats["largest_held_bytes"], size)
            stats["written_bytes"] += size
            on_file(lambda: opened[0].write(key, full))
            del full
    stream = opened[0]
    if stream is not None:
        on_file(stream.close)
        if failure:
            stream.abort()
    if me == 0:
        index = {
            "metadata": {"total_size": sum(torch.Size(s).numel() * d.itemsize for _, s, d, _ in entries)},
            "weight_map": {key: files[w] for (key, _, _, _), w in zip(entries, writer)},
        }
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        on_file(lambda: write_text_atomic(os.path.join(directory, INDEX_NAME), text))
        on_file(lambda: write_config(cfg, directory))
        on_file(lambda: remove_stale_weights(directory, keep=set(files.values()) | {INDEX_NAME}))
    dist.barrier()
    if failure:
        raise failure[0]
    return stats
