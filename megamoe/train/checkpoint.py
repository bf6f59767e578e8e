"""Checkpoints that are either complete or absent, and resume that continues exactly.

Layout of one checkpoint, `<output_dir>/checkpoints/step_00000100/`:

    meta.json          format, step, layout, resolved config, engine counters and LR schedule,
                       and the size of every file below
    state/             model weights, fp32 master weights, Adam moments and the EMA by parameter
                       name, in the full tensors' coordinates (experts by global index): readable
                       at any parallel layout; see train/sharded_state.py
    rank_00000.pt      per-rank state, train/state.py's RankState: step, data-stream position, RNG
                       states, skipped-step counts (tensors and plain values only)
    weights/           the model in diffusers WanTransformer3DModel layout: config.json, an index and
                       one safetensors shard per writing rank (see parallel/sharded_weights.py)
    ema_weights/       the EMA weights in the same layout (fp32, buffers as in weights/), when EMA is on

Writing goes to a hidden `.step_00000100.tmp` directory that is renamed into place after
every rank has finished and `meta.json` is written, so a crash mid-save leaves the
previous checkpoints untouched and no half-written directory that looks complete.
Multi-node runs need `output_dir` on a filesystem every node sees.

Resuming at another layout: weights and optimizer state are resharded; the rank files are
per data-parallel rank, so a rank continues the data stream of the saved rank with its
data-parallel rank (same data-parallel size), or restarts the stream when
data.restart_stream_on_resume is set (another data-parallel size).
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

from megamoe.atomic_files import write_text_atomic
from megamoe.config import Config, ConfigError, from_yaml_text, to_yaml
from megamoe.error_messages import describe
from megamoe.train.resilience import AgreedStop, agreed_problem

CHECKPOINT_DIR = "checkpoints"
STEP_PATTERN = re.compile(r"^step_(\d{8})$")
FORMAT = "megamoe-sharded-1"
STATE_DIR = "state"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the path and what to do."""


class CheckpointSaveError(CheckpointError, AgreedStop):
    """Writing a checkpoint failed on some rank; raised on every rank with the same message."""


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


def inspect_checkpoint(path: str | Path, or_else: str = "") -> dict:
    """Read meta.json and check every recorded file is present at its recorded size.

    Runs before any process group exists, so a bad path costs no start-up time and a
    truncated file is caught here rather than as a hang inside a collective load.
    `or_else`: the caller's alternative to a missing or incomplete checkpoint, for the message
    (pretrain: "or --resume latest"); the newest complete checkpoint near `path` is named too.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint '{path}' does not exist; pass an existing checkpoint directory"
            f"{_nearby(path)}{' ' + or_else if or_else else ''}"
        )
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(
            f"checkpoint '{path}' is incomplete (no meta.json); pass a complete checkpoint"
            f"{_nearby(path)}{' ' + or_else if or_else else ''}"
        )
    try:
        meta = json.loads(meta_file.read_text())
        files = meta["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint '{path}' has a corrupt meta.json ({type(exc).__name__}); pass another checkpoint"
        ) from None
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint '{path}' is missing '{rel}'; it is corrupt, pass another checkpoint")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint '{path}' has '{rel}' of {f.stat().st_size} bytes, expected {size} "
                f"(truncated or modified); pass another checkpoint"
            )
    return meta


def _nearby(path: Path) -> str:
    """' (e.g. <the newest complete checkpoint in path, path/checkpoints or beside path>)', or ''."""
    for root in (path, path / "checkpoints", path.parent):
        found = complete_checkpoints(root)
        if found and found[-1] != path:
            return f" (e.g. '{found[-1]}', the newest there)"
    return ""


def resolve_resume(cfg: Config, resume: str | None, world_size: int | None = None) -> Path | None:
    """Turn `--resume` (None, 'auto', 'latest' or a path) into a checked checkpoint directory.

    'auto' is for jobs that restart themselves (preemption, torchrun --max-restarts): the newest
    usable checkpoint, else a fresh start. 'latest' requires a checkpoint. Without --resume, a
    fresh run refuses an output directory that already holds checkpoints, which would
    otherwise be overwritten and pruned.
    """
    root = checkpoint_root(cfg)
    if resume == "auto":
        return _newest_usable(cfg, root, world_size)
    if resume is None:
        existing = complete_checkpoints(root)
        if existing:
            raise CheckpointError(
                f"train.output_dir '{cfg.train.output_dir}' already holds checkpoints "
                f"(newest {existing[-1].name}); pass --resume latest to continue it, "
                f"or set train.output_dir to a new directory"
            )
        return None
    if resume == "latest":
        existing = complete_checkpoints(root)
        if not existing:
            raise CheckpointError(
                f"--resume latest found no complete checkpoint in '{root}'; "
                f"drop --resume to start a fresh run, or pass a checkpoint path"
            )
        path = existing[-1]
    else:
        path = Path(resume)
    meta = inspect_checkpoint(path, "or --resume latest, which takes the newest complete one")
    check_compatible(cfg, meta, path)
    check_resumable(cfg, meta, path, world_size)
    return path


def _newest_usable(cfg: Config, root: Path, world_size: int | None) -> Path | None:
    """--resume auto: the newest complete checkpoint whose files are intact, or None (fresh start).

    A checkpoint with a missing or truncated file (a disk that filled up, a copy cut short) is
    passed over for the one before it, so a self-restarting job does not fail forever on it; a
    checkpoint of another model or layout is still an error, since an older one would not fit either.
    """
    rank0 = os.environ.get("RANK", "0") == "0"
    for path in reversed(complete_checkpoints(root)):
        try:
            meta = inspect_checkpoint(path)
        except CheckpointError as exc:
            if rank0:
                print(f"warning: --resume auto skips {exc}", flush=True)
            continue
        check_compatible(cfg, meta, path)
        check_resumable(cfg, meta, path, world_size)
        return path
    if rank0:
        print(f"--resume auto: no complete checkpoint in '{root}'; starting a fresh run", flush=True)
    return None


def check_resumable(cfg: Config, meta: dict, path: Path, world_size: int | None) -> None:
    """The checkpoint's format is this code's, and its data stream can continue at this run's size.

    Any parallel layout resumes (the state is stored by parameter name and global expert index),
    but the data stream's position is kept per data-parallel rank and does not carry over to
    another data-parallel size unless the stream restarts.
    """
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint '{path}' is in DeepSpeed's own format (written before megamoe's "
            f"layout-independent checkpoints); resume it with the megamoe version that wrote it, "
            f"or start from its weights with train.init_from={path / 'weights'}"
        )
    if world_size is None:
        return
    p = cfg.parallel
    dp_size = world_size // max(1, p.tensor_parallel_size * p.context_parallel_size)
    saved = meta.get("dp_size", dp_size)
    if saved != dp_size and not cfg.data.restart_stream_on_resume:
        raise CheckpointError(
            f"checkpoint '{path}' was written at data-parallel size {saved}, this run has {dp_size}; "
            f"the data stream's position does not carry over to another data-parallel size: "
            f"set data.restart_stream_on_resume=true to restart it at epoch 0 (samples may repeat), "
            f"or launch with data-parallel size {saved}"
        )


# `model` keys that only decide what a run observes (routing diagnostics and traces): they change
# neither the model, its routing and losses, nor any state a checkpoint holds (the trace sample
# has its own generator), so a resume may change them.
OBSERVATION_KEYS = frozenset({"model.moe.diagnostics_every", "model.moe.trace_every", "model.moe.trace_tokens"})


def check_compatible(cfg: Config, meta: dict, path: Path) -> None:
    """The checkpoint's model must be this run's: every `model` key, nested ones field by field,
    except OBSERVATION_KEYS. Raises CheckpointError with one line naming each differing key and
    both values (`model.moe.top_k: checkpoint 2, config 4`).

    The parallel layout may differ: checkpoints are resharded on load (see train/sharded_state.py)."""
    try:
        saved = from_yaml_text(meta["config"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(
            f"checkpoint '{path}' has an unreadable config ({exc}); pass another checkpoint"
        ) from None
    diff = _differences(asdict(saved.model), asdict(cfg.model), "model")
    if diff:
        raise CheckpointError(
            f"checkpoint '{path}' does not match the config: {'; '.join(diff)}; set each to the checkpoint's value"
        )


def _differences(theirs: dict, ours: dict, prefix: str) -> list[str]:
    """'key: checkpoint A, config B' for every leaf that differs, descending into nested sections."""
    found = []
    for name, value in ours.items():
        key, saved = f"{prefix}.{name}", theirs.get(name)
        if isinstance(value, dict) and isinstance(saved, dict):
            found += _differences(saved, value, key)
        elif saved != value and key not in OBSERVATION_KEYS:
            found.append(f"{key}: checkpoint {_as_yaml(saved)}, config {_as_yaml(value)}")
    return found


def _as_yaml(value) -> str:
    """A value as one writes it in a config (null, true, false), for the message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def save_checkpoint(engine, cfg: Config, state, topology, export_weights) -> Path:
    """Collective: every rank calls it. Saves the engine and `state` (a train/state.py TrainState: its
    rank file, and its EMA with the engine's sharded state) at step `state.step`. Returns the final
    checkpoint directory.

    `export_weights(module, directory, tensors=None)` writes the module's weights (or `tensors`,
    sharded like its parameters) in the diffusers layout; collective (see parallel/sharded_weights.py).
    A write that fails on any rank (a full disk, lost permissions) is agreed by every rank where
    the ranks meet anyway: the unfinished save is removed, the previous checkpoints stay, and
    every rank raises CheckpointSaveError with the same message (the run stops: see the README).
    """
    from megamoe.train.sharded_state import save_state

    step, ema = state.step, state.ema
    rank_state = state.state_dict()
    root = checkpoint_root(cfg)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp"
    problem = None

    def attempt(write) -> None:
        """Run this rank's write unless an earlier one failed; keep its error for the agreement."""
        nonlocal problem
        if problem is None:
            try:
                write()
            except Exception as exc:  # OSError, and torch's and safetensors' own types for a failed write
                problem = describe(exc)

    def settle() -> None:
        """Where the ranks meet (it replaces a barrier): on any rank's failure, clean up and stop all."""
        message = agreed_problem(problem, topology.device)
        if message is None:
            return
        if topology.is_main:
            _remove(tmp)
        dist.barrier()  # no rank leaves (and is reported) before the unfinished save is gone
        kept = complete_checkpoints(root)
        raise CheckpointSaveError(
            f"could not write checkpoint '{final}' ({message}); the unfinished save was removed and "
            f"{f'{kept[-1].name} is the newest checkpoint' if kept else 'there is no earlier checkpoint'}: "
            f"free space or fix the permissions of train.output_dir, then continue with --resume auto"
        )

    if topology.is_main:

        def fresh():
            root.mkdir(parents=True, exist_ok=True)
            _remove(tmp)  # left by a save that was killed
            tmp.mkdir()

        attempt(fresh)
    settle()

    attempt(lambda: save_state(engine, tmp / STATE_DIR, ema))  # collective: DCP raises a failed write on every rank
    attempt(lambda: torch.save(rank_state, tmp / f"rank_{topology.rank:05d}.pt"))
    dp_ranks = [None] * topology.world_size  # which saved rank file continues which data-parallel rank
    dist.all_gather_object(dp_ranks, topology.dp_rank)
    train_state = engine_state(engine)
    settle()  # the export below is collective: every rank must take part in it
    # Without a full gather: each tensor is written by one rank that holds it. A failed write is
    # raised after the export's own collectives, so no rank is left waiting.
    attempt(lambda: export_weights(engine.module, tmp / "weights"))
    if ema is not None:
        settle()
        # The model's state dict with each parameter replaced by its EMA (sharded like the parameter).
        attempt(
            lambda: export_weights(
                engine.module, tmp / "ema_weights", {**engine.module.state_dict(), **ema.state_dict()}
            )
        )
    settle()

    if topology.is_main:

        def publish():
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            p = cfg.parallel
            meta = {
                "format": FORMAT,
                "step": step,
                "world_size": topology.world_size,
                "dp_size": topology.dp_size,
                "dp_ranks": dp_ranks,
                "expert_parallel_size": p.expert_parallel_size,
                "tensor_parallel_size": p.tensor_parallel_size,
                "context_parallel_size": p.context_parallel_size,
                "train_state": train_state,
                "config": to_yaml(cfg),
                "files": files,
            }
            write_text_atomic(tmp / "meta.json", json.dumps(meta, indent=1))
            if final.exists():  # re-saving a step after a resume: replace the old copy only now
                shutil.rmtree(final)
            os.replace(tmp, final)

        attempt(publish)
        if problem is None:
            prune_checkpoints(root, cfg.checkpoint.keep_last)
    settle()
    return final


def load_checkpoint(engine, path: Path, topology, state) -> None:
    """Collective: restore the engine (weights, optimizer, LR schedule, counters) and `state` (a
    train/state.py TrainState: step, data position, RNG, skipped-step counts, EMA).

    The checkpoint may come from another parallel layout; see `rank_file_for` for the per-rank state.
    The LR is then set from the schedule at the restored step (engine.resync_lr), so a run that
    changed train.steps continues on the new schedule. Raises CheckpointError on every rank when a
    rank cannot use its part, and the loader's StreamStateError when the data position cannot be
    continued (on that rank: the caller agrees on it, see loop.py).
    """
    from megamoe.train.engine import resync_lr
    from megamoe.train.sharded_state import has_ema, load_state, mismatch, stored_shapes

    path, ema = Path(path), state.ema
    meta = inspect_checkpoint(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint '{path}' is not in megamoe's format '{FORMAT}'; "
            f"start from its weights with train.init_from={path / 'weights'}"
        )
    # Everything a rank can check alone comes first, and all ranks agree before the collective
    # load: a rank that fails alone must not leave the others waiting in a collective.
    rank_state, problem = None, None
    try:
        source = rank_file_for(meta, topology)
        rank_state = torch.load(path / f"rank_{source:05d}.pt", weights_only=True)
        stored = stored_shapes(path / STATE_DIR)
        why = mismatch(engine.module, stored, ema if ema is not None and has_ema(stored) else None)
        if why:
            problem = f"its state does not fit the model: {why}"
        elif ema is not None and not has_ema(stored):
            problem = (
                "it has no EMA but train.ema_decay > 0; set train.ema_decay=0 or pass a checkpoint written with EMA"
            )
    except Exception as exc:  # torch and safetensors raise many types for a bad file; the user needs one line
        problem = describe(exc)
    failed = torch.tensor([0.0 if problem is None else 1.0], device=topology.device)
    dist.all_reduce(failed)
    if failed.item() > 0:
        detail = problem or "another rank could not read its part"
        raise CheckpointError(f"checkpoint '{path}' could not be loaded ({detail}); pass another checkpoint")
    try:
        load_state(engine, path / STATE_DIR, ema)
        restore_engine_state(engine, meta["train_state"])
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint '{path}' could not be loaded ({describe(exc)}); pass another checkpoint"
        ) from None
    resync_lr(engine)
    state.load_state_dict(rank_state)


def rank_file_for(meta: dict, topology) -> int:
    """The saved rank whose file (data-stream position, RNG) this rank continues.

    At the same data-parallel size: a saved rank with this rank's data-parallel rank (this rank's
    own number when it is one, so an unchanged layout continues exactly). At another size the
    stream restarts (the loader refuses otherwise) and only the RNG state is taken over.
    """
    dp_ranks = meta.get("dp_ranks") or list(range(meta["world_size"]))
    if meta["dp_size"] == topology.dp_size:
        same = [r for r, d in enumerate(dp_ranks) if d == topology.dp_rank]
        if same:
            return topology.rank if topology.rank in same else same[0]
    return topology.rank % meta["world_size"]


def engine_state(engine) -> dict:
    """The engine's counters and LR schedule: small, identical on every rank, kept in meta.json."""
    from megamoe.deepspeed_adapter import engine_counters
    from megamoe.train.sharded_state import optimizer_step

    scheduler = engine.lr_scheduler
    schedule = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"} if scheduler else None
    return {"optimizer_step": optimizer_step(engine), **engine_counters(engine), "lr_scheduler": schedule}


def restore_engine_state(engine, state: dict) -> None:
    from megamoe.deepspeed_adapter import restore_engine_counters
    from megamoe.train.sharded_state import set_optimizer_step

    set_optimizer_step(engine, state["optimizer_step"])
    restore_engine_counters(engine, state)
    scheduler, saved = engine.lr_scheduler, state["lr_scheduler"]
    if scheduler is None or saved is None:
        return
    # Another expert-parallel size has another number of optimizer param groups (experts get
    # their own under EP > 1); their schedules are the same, so one saved value serves all.
    groups = len(scheduler.base_lrs)
    fitted = dict(saved)
    for key in ("base_lrs", "_last_lr"):
        values = saved.get(key)
        if values is not None and len(values) != groups:
            if len(set(values)) != 1:
                raise CheckpointError(
                    f"the checkpoint's LR schedule has {len(values)} different param-group "
                    f"values ({values}), this run has {groups} groups; resume at the saved "
                    f"parallel.expert_parallel_size"
                )
            fitted[key] = values[:1] * groups
    scheduler.load_state_dict({**fitted, "lr_lambdas": [None] * groups})
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and stale temp dirs."""
    complete = complete_checkpoints(root)
    for old in complete[: max(0, len(complete) - max(1, keep_last))]:
        shutil.rmtree(old, ignore_errors=True)
    # A temp dir older than the newest complete checkpoint is a save that was killed; saves are
    # collective and one at a time, so no save of this run is writing to it.
    newest = int(STEP_PATTERN.match(complete[-1].name).group(1)) if complete else None
    for tmp in root.glob(".step_*.tmp"):
        match = re.match(r"^\.step_(\d{8})\.tmp$", tmp.name)
        if match and newest is not None and int(match.group(1)) < newest:
            shutil.rmtree(tmp, ignore_errors=True)


def _remove(path: Path) -> None:
    """Remove an unfinished save, whatever is at its name."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
