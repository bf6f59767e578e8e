"""The training state as tensors named by parameter, in a form no parallel layout is baked into.

A checkpoint's `state/` directory holds, for every parameter `<name>` of the diffusers-layout
model (and every persistent buffer):

    model/<name>        the weight as the module holds it (bf16 or fp32), and buffers
    master/<name>       DeepSpeed's fp32 master weight
    exp_avg/<name>      Adam's first moment
    exp_avg_sq/<name>   Adam's second moment
    ema/<name>          the fp32 EMA of the weight (train/engine.py EMA), when EMA is on

each with the FULL tensor's shape. A tensor that a rank holds only a slice of is written as
that slice at its global offset: expert weights (tagged `allreduce=False`) are rows
[ep_rank * E/EP, (ep_rank+1) * E/EP) of the stacked [E, ...] tensor, so an expert is addressed
by its global index; tensor-parallel weights (`tensor_model_parallel=True`, `partition_dim=d`)
are the TP rank's block along d. Reading declares the slice the reading rank needs, and
torch.distributed.checkpoint (DCP) assembles it from whichever files hold it, so the state
written at one layout (data, expert, tensor, context parallel sizes) is read at any other.

Storage is DCP's Hugging Face safetensors backend: one `shard-*.safetensors` file per writing
rank, slice offsets in the safetensors header. Its reader rebuilds DCP's metadata from those
headers, so loading never unpickles anything (DCP's default `.metadata` file is a pickle).

DeepSpeed's optimizer state is read and written only through its public fragment API
(`deepspeed.utils.safe_get_full_*` / `safe_set_full_*`). Under ZeRO-1/2 the getters are
collective (an all-reduce over the parameter's ZeRO group: the data-parallel group, or the
expert-data-parallel group for experts); the setters are local (each rank copies its own
fragment out of the full value). The `safe_*_local_*` variants exist for ZeRO-3 only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from megamoe.deepspeed_adapter import has_fp32_fragments, relink_optimizer_state, torch_optimizer
from megamoe.parallel.parallelize import split_of

OPTIMIZER_KINDS = ("master", "exp_avg", "exp_avg_sq")
KINDS = ("model", *OPTIMIZER_KINDS)
LOAD_BUCKET_BYTES = 1 << 30
"""Tensors read per DCP load call: bounds the full-size copies a rank holds while restoring."""


# ---------------------------------------------------------------------------------------------
# Where a rank's tensor sits in the full tensor.


def global_shape(local: torch.Tensor, split) -> torch.Size:
    if split is None:
        return local.shape
    group, dim = split
    shape = list(local.shape)
    shape[dim] *= dist.get_world_size(group)
    return torch.Size(shape)


def _contiguous_stride(shape) -> tuple:
    stride, running = [], 1
    for size in reversed(shape):
        stride.append(running)
        running *= size
    return tuple(reversed(stride))


_MESHES: dict = {}


def as_dcp_value(local: torch.Tensor, split):
    """What DCP is given for `local`: itself if replicated, else a DTensor that declares its block.

    The DTensor lives on a one-dimensional mesh over the splitting group (megatron-core's own
    group, no new one is created); replicas of the same block in other groups declare the same
    offsets, and DCP writes one of them.
    """
    if split is None:
        return local
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    group, dim = split
    key = (tuple(dist.get_process_group_ranks(group)), local.device.type)  # survives re-initialised groups
    if key not in _MESHES:
        _MESHES[key] = DeviceMesh.from_group(group, local.device.type)
    shape = global_shape(local, split)
    return DTensor.from_local(
        local, _MESHES[key], [Shard(dim)], run_check=False, shape=shape, stride=_contiguous_stride(shape)
    )


# ---------------------------------------------------------------------------------------------
# DeepSpeed's optimizer, through its public API (and megamoe/deepspeed_adapter.py where it has none).


def ensure_optimizer_state(engine) -> None:
    """Create Adam's state (zero moments, step 0) where torch has not yet, and link DeepSpeed's fragments.

    torch creates Adam's state lazily at the first step and DeepSpeed links its per-parameter
    fragments to it only then, so an engine that has not stepped (a run about to resume) has no
    state to write into. The state is created exactly as torch's first step would, and DeepSpeed's
    own linking routine is run again (`deepspeed_adapter.relink_optimizer_state`, which says why
    that is needed after steps too).
    """
    base = torch_optimizer(engine)
    for group in base.param_groups:
        on_device = group.get("capturable", False) or group.get("fused", False)
        for p in group["params"]:
            if not base.state[p]:
                base.state[p].update(
                    step=torch.tensor(0.0, dtype=torch.float32, device=p.device if on_device else None),
                    exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                    exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format),
                )
    relink_optimizer_state(engine)


def optimizer_step(engine) -> float:
    """Adam's step count; every flat partition (and so every parameter) has the same one."""
    steps = {float(s["step"]) for s in torch_optimizer(engine).state.values() if "step" in s}
    if len(steps) != 1:
        raise RuntimeError(f"optimizer partitions disagree on the step count ({sorted(steps)})")
    return steps.pop()


def set_optimizer_step(engine, step: float) -> None:
    for state in torch_optimizer(engine).state.values():
        state["step"].fill_(step)


def read_full(engine, param, kind: str) -> torch.Tensor:
    """This rank's whole tensor (its expert / TP slice, not ZeRO-partitioned) of one kind.

    Collective over the parameter's ZeRO group under ZeRO-1/2: every rank calls it in the same order.
    """
    if kind == "model":
        return param.detach()
    if has_fp32_fragments(param):
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_full_optimizer_state,
        )

        return safe_get_full_fp32_param(param) if kind == "master" else safe_get_full_optimizer_state(param, kind)
    return param.detach().float() if kind == "master" else torch_optimizer(engine).state[param][kind]


@torch.no_grad()
def write_full(engine, param, kind: str, value: torch.Tensor) -> None:
    """Local: set this rank's part of one kind from the rank's whole tensor."""
    if kind == "model":
        param.copy_(value)
        return
    if has_fp32_fragments(param):
        from deepspeed.utils import (
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
        )

        value = value.to(param.device, torch.float32)
        if kind == "master":
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, kind)
        return
    if kind == "master":
        param.copy_(value)
    else:
        torch_optimizer(engine).state[param][kind].copy_(value)


# ---------------------------------------------------------------------------------------------
# Saving and loading.


def _entries(module, ema=None) -> Iterator[tuple[str, str, torch.Tensor, bool]]:
    """(key, kind, tensor, is_parameter) in the same order on every rank.

    With `ema`, each parameter also yields `ema/<name>`, whose tensor is the parameter itself:
    the EMA is sharded like it (same split, same shape); `_ema_tensor` finds the EMA's tensor.
    """
    params = dict(module.named_parameters())
    for name, tensor in module.state_dict(keep_vars=True).items():
        is_param = name in params and params[name].requires_grad
        for kind in KINDS if is_param else ("model",):
            yield f"{kind}/{name}", kind, tensor, is_param
        if ema is not None and name in ema.shadow:
            yield f"ema/{name}", "ema", tensor, is_param


def _ema_tensor(ema, key: str) -> torch.Tensor:
    return ema.shadow[key.partition("/")[2]]


class _Owners:
    """Picks, for each tensor, the one replica that writes it, round robin over the replicas.

    Every rank holding a copy of the same block computes the same answer, so each block is
    written once and the writing is spread over the ranks (as DCP's own de-duplication would,
    but without every rank first keeping a full copy of everything).
    """

    def __init__(self):
        self._replica: dict = {}
        self._counter: dict = {}

    def _replica_of(self, split) -> tuple[int, int]:
        """(index of my copy among the copies of my block, number of copies)."""
        if split is None:
            return dist.get_rank(), dist.get_world_size()
        group = split[0]
        if group.group_name not in self._replica:
            mine = dist.get_process_group_ranks(group)
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
            groups = sorted({tuple(g) for g in everyone})
            self._replica[group.group_name] = (groups.index(tuple(mine)), len(groups))
        return self._replica[group.group_name]

    def writes(self, split) -> bool:
        index, count = self._replica_of(split)
        name = None if split is None else split[0].group_name
        turn = self._counter.get(name, 0)
        self._counter[name] = turn + 1
        return turn % count == index


def save_state(engine, directory: Path, ema=None) -> None:
    """Collective: write the module and optimizer state of `engine` (and `ema`'s shadow) to `directory` (DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    ensure_optimizer_state(engine)
    owners, state = _Owners(), {}
    for key, kind, tensor, _ in _entries(engine.module, ema):
        split = split_of(tensor)
        # read_full is collective: every rank, same order
        value = _ema_tensor(ema, key) if kind == "ema" else read_full(engine, tensor, kind)
        if owners.writes(split):
            state[key] = as_dcp_value(value.detach().to("cpu", copy=True).contiguous(), split)
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(directory), save_distributed=True))


def stored_shapes(directory: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """{key: (full shape, dtype)} from the safetensors headers; reads no tensor data."""
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    metadata = HuggingFaceStorageReader(str(directory)).read_metadata()
    return {k: (md.size, md.properties.dtype) for k, md in metadata.state_dict_metadata.items()}


def expected_shapes(module, ema=None) -> dict[str, torch.Size]:
    """{key: full shape} this rank's module (and `ema`) needs (local only: no communication)."""
    return {key: global_shape(tensor, split_of(tensor)) for key, _, tensor, _ in _entries(module, ema)}


def has_ema(stored: dict) -> bool:
    """Whether a checkpoint's stored keys (see `stored_shapes`) include an EMA."""
    return any(key.startswith("ema/") for key in stored)


def mismatch(module, stored: dict, ema=None) -> str | None:
    """Why the stored tensors cannot fill `module` (and `ema`), in a few words, or None."""
    expected = expected_shapes(module, ema)
    missing = sorted(expected.keys() - stored.keys())
    if missing:
        return f"it lacks {missing[0]}" + (f" and {len(missing) - 1} more tensors" if len(missing) > 1 else "")
    wrong = [k for k in expected if tuple(stored[k][0]) != tuple(expected[k])]
    if wrong:
        k = wrong[0]
        return f"{k} has shape {tuple(stored[k][0])}, the model needs {tuple(expected[k])}"
    return None


def load_state(engine, directory: Path, ema=None) -> None:
    """Collective: restore module and optimizer state (and `ema`) from `directory`, whatever layout wrote it.

    Call `mismatch` first on every rank and agree on the answer: DCP's load is collective.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    ensure_optimizer_state(engine)
    entries = list(_entries(engine.module, ema))
    start = 0
    while start < len(entries):  # a bucket of tensors per DCP call bounds the memory
        stop, size = start, 0
        while stop < len(entries) and (stop == start or size < LOAD_BUCKET_BYTES):
            size += entries[stop][2].numel() * 4
            stop += 1
        bucket = entries[start:stop]
        buffers, state = [], {}
        for key, kind, tensor, _ in bucket:
            dtype = tensor.dtype if kind == "model" else torch.float32
            buffer = torch.empty(tensor.shape, dtype=dtype)
            buffers.append(buffer)
            state[key] = as_dcp_value(buffer, split_of(tensor))
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(directory)))
        for (key, kind, tensor, is_param), buffer in zip(bucket, buffers):
            if kind == "ema":
                _ema_tensor(ema, key).copy_(buffer)
            elif is_param:
                write_full(engine, tensor, kind, buffer)
            else:
                with torch.no_grad():
                    tensor.copy_(buffer)
        start = stop
