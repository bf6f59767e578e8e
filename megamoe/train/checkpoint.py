"""Checkpoints that are either complete or absent, and resume that continues exactly.

Layout of one checkpoint, `<output_dir>/checkpoints/step_00000100/`:

    meta.json          step, layout, resolved config, and the size of every file below
    deepspeed/         DeepSpeed's files: module weights, ZeRO-partitioned optimizer, LR schedule
    rank_00000.pt      per-rank state: data-stream position, RNG states (tensors and ints only)
    weights/           the model in diffusers WanTransformer3DModel layout (safetensors)
    ema_weights/       the EMA weights in the same layout, when EMA is on

Writing goes to a hidden `.step_00000100.tmp` directory that is renamed into place after
every rank has finished and `meta.json` is written, so a crash mid-save leaves the
previous checkpoints untouched and no half-written directory that looks complete.
Multi-node runs need `output_dir` on a filesystem every node sees (as DeepSpeed does).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from megamoe.config import Config, ConfigError, from_yaml_text, to_yaml

CHECKPOINT_DIR = "checkpoints"
STEP_PATTERN = re.compile(r"^step_(\d{8})$")
DEEPSPEED_TAG = "deepspeed"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the path and what to do."""


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) / CHECKPOINT_DIR


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temp directories are never listed)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_PATTERN.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_PATTERN.match(p.name).group(1)))


def inspect_checkpoint(path: str | Path) -> dict:
    """Read meta.json and check every recorded file is present at its recorded size.

    Runs before any process group exists, so a bad path costs no start-up time and a
    truncated file is caught here rather than as a hang inside a collective load.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass an existing checkpoint directory or --resume latest")
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"checkpoint '{path}' is incomplete (no meta.json); pass a complete checkpoint "
                              f"or --resume latest, which skips incomplete ones")
    try:
        meta = json.loads(meta_file.read_text())
        files = meta["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint '{path}' has a corrupt meta.json ({type(exc).__name__}); "
                              f"pass another checkpoint") from None
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint '{path}' is missing '{rel}'; it is corrupt, pass another checkpoint")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint '{path}' has '{rel}' of {f.stat().st_size} bytes, expected {size} "
                                  f"(truncated or modified); pass another checkpoint")
    return meta


def resolve_resume(cfg: Config, resume: str | None, world_size: int | None = None) -> Path | None:
    """Turn `--resume` (None, 'latest' or a path) into a checked checkpoint directory.

    Also refuses to start a fresh run over an output directory that already holds
    checkpoints, which would otherwise be overwritten and pruned.
    """
    root = checkpoint_root(cfg)
    if resume is None:
        existing = complete_checkpoints(root)
        if existing:
            raise CheckpointError(f"train.output_dir '{cfg.train.output_dir}' already holds checkpoints "
                                  f"(newest {existing[-1].name}); pass --resume latest to continue it, "
                                  f"or set train.output_dir to a new directory")
        return None
    if resume == "latest":
        existing = complete_checkpoints(root)
        if not existing:
            raise CheckpointError(f"--resume latest found no complete checkpoint in '{root}'; "
                                  f"drop --resume to start a fresh run, or pass a checkpoint path")
        path = existing[-1]
    else:
        path = Path(resume)
    meta = inspect_checkpoint(path)
    check_compatible(cfg, meta, path)
    if world_size is not None and meta.get("world_size", world_size) != world_size:
        raise CheckpointError(f"checkpoint '{path}' was written by {meta['world_size']} ranks, this run has {world_size}; "
                              f"launch {meta['world_size']} ranks (resuming at another layout is not supported yet)")
    return path


def check_compatible(cfg: Config, meta: dict, path: Path) -> None:
    """The checkpoint's model and parallel layout must be this run's; name every key that differs.

    (Resuming at another layout needs resharding, which megamoe does not do yet.)"""
    try:
        saved = from_yaml_text(meta["config"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"checkpoint '{path}' has an unreadable config ({exc}); pass another checkpoint") from None
    diff = []
    for section in ("model", "parallel"):
        theirs, ours = asdict(getattr(saved, section)), asdict(getattr(cfg, section))
        diff += [f"{section}.{k} (checkpoint {theirs[k]}, config {ours[k]})" for k in ours if theirs.get(k) != ours[k]]
    if diff:
        raise CheckpointError(f"checkpoint '{path}' does not match the config: {', '.join(diff)}; "
                              f"set these keys to the checkpoint's values")


def save_checkpoint(engine, cfg: Config, step: int, rank_state: dict, topology, export_weights, ema=None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    `export_weights(state_dict, directory)` writes weights in the diffusers layout (rank 0 only).
    """
    root = checkpoint_root(cfg)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp"
    if topology.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a save that was killed
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()

    engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, save_latest=False)
    # DeepSpeed writes the module once, from one rank; each rank's own experts go in its file.
    torch.save({**rank_state, "experts": local_expert_state(engine.module)}, tmp / f"rank_{topology.rank:05d}.pt")
    full_state = engine.module.state_dict()
    if topology.expert_parallel_size > 1:  # collective: every rank contributes its experts
        from megamoe.parallel.expert import gather_expert_state
        from megamoe.parallel.topology import expert_groups

        full_state = gather_expert_state(engine.module, expert_groups()[0])
    if topology.is_main:
        export_weights(full_state, tmp / "weights")
        if ema is not None:
            export_weights(ema.state_dict(), tmp / "ema_weights")
    dist.barrier()

    if topology.is_main:
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        meta = {"step": step, "world_size": topology.world_size, "dp_size": topology.dp_size,
                "expert_parallel_size": cfg.parallel.expert_parallel_size,
                "config": to_yaml(cfg), "files": files}
        _write_atomic(tmp / "meta.json", json.dumps(meta, indent=1))
        if final.exists():  # re-saving a step after a resume: replace the old copy only now
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(root, cfg.checkpoint.keep_last)
    dist.barrier()
    return final


def load_checkpoint(engine, path: Path, topology, ema=None) -> dict:
    """Collective: restore engine (weights, optimizer, LR schedule) and return this rank's state."""
    meta = inspect_checkpoint(path)
    saved_ep = meta.get("expert_parallel_size", 1)
    if saved_ep != topology.expert_parallel_size:
        raise CheckpointError(f"checkpoint '{path}' was written with parallel.expert_parallel_size={saved_ep}, this run "
                              f"has {topology.expert_parallel_size}; resume with the same layout (resharding is not "
                              f"supported yet)")
    if meta["dp_size"] != topology.dp_size:
        raise CheckpointError(f"checkpoint '{path}' was written with data-parallel size {meta['dp_size']}, this run "
                              f"has {topology.dp_size}; resume with the same number of ranks (resharding is not "
                              f"supported yet)")
    # This rank's own file first, and all ranks agree before DeepSpeed's collective load:
    # a rank that fails alone must not leave the others waiting in a collective.
    rank_state, problem = None, None
    try:
        rank_state = torch.load(path / f"rank_{topology.rank:05d}.pt", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; the user needs one line
        problem = _describe(exc)
    failed = torch.tensor([0.0 if problem is None else 1.0], device=topology.device)
    dist.all_reduce(failed)
    if failed.item() > 0:
        detail = problem or "another rank could not read its state"
        raise CheckpointError(f"checkpoint '{path}' could not be loaded ({detail}); pass another checkpoint")
    try:
        loaded, _ = engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint '{path}' could not be loaded ({_describe(exc)}); "
                              f"pass another checkpoint") from None
    if loaded is None:
        raise CheckpointError(f"checkpoint '{path}' has no DeepSpeed state; pass another checkpoint")
    restore_local_experts(engine.module, rank_state.pop("experts", {}))
    if ema is not None:
        ema_dir = path / "ema_weights"
        if not ema_dir.is_dir():
            raise CheckpointError(f"checkpoint '{path}' has no EMA weights but train.ema_decay > 0; "
                                  f"set train.ema_decay=0 or pass a checkpoint written with EMA")
        from megamoe.model.weights import read_state_dict

        ema.load_state_dict(read_state_dict(ema_dir))
    return rank_state


def local_expert_state(module) -> dict:
    """This rank's slice of the expert weights (the parameters expert parallelism shards)."""
    return {name: p.detach().cpu().clone() for name, p in module.named_parameters()
            if getattr(p, "allreduce", True) is False}


@torch.no_grad()
def restore_local_experts(module, tensors: dict) -> None:
    params = dict(module.named_parameters())
    expected = {name for name, p in params.items() if getattr(p, "allreduce", True) is False}
    if set(tensors) != expected:
        raise CheckpointError(f"checkpoint expert weights do not match the model's expert-parallel slice "
                              f"(have {len(tensors)} tensors, need {len(expected)}); resume with the same layout")
    for name, tensor in tensors.items():
        params[name].copy_(tensor)


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and stale temp dirs."""
    complete = complete_checkpoints(root)
    for old in complete[: max(0, len(complete) - max(1, keep_last))]:
        shutil.rmtree(old, ignore_errors=True)


def _describe(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
