"""The run directory (train.output_dir): checked before start-up, and written by one run at a time.

Before any process group exists, every rank checks that the directory can be created and
written, and that its filesystem has room for one checkpoint (`megamoe.tools.parameter_counts.checkpoint_bytes`;
a new checkpoint is written in full before older ones are pruned). Saves killed mid-write
(`checkpoints/.step_*.tmp`) count as room: the run removes them once it holds the lock.

The lock: global rank 0 holds an exclusive `flock` on `<output_dir>/run.lock` for the whole run
and writes its host and pid into it; a second run on the directory is refused with a message
naming them. This catches, for example, the ranks of a job whose torchrun agent was killed and
which train on as orphans while the job is restarted. The kernel drops the lock when the process
ends, however it ends, so a crashed run never leaves a stale lock (the file stays, naming the last
holder; it is not removed, since removing a lock file races with a run that is opening it).
Across nodes the lock holds where the filesystem propagates flock (NFSv4, Lustre mounted with
-o flock, GPFS); on one that does not support locks the run warns and goes on.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import time
from pathlib import Path

from megamoe.config import Config

LOCK_NAME = "run.lock"
GB = 1e9


class RunDirError(RuntimeError):
    """train.output_dir cannot take this run; the message names the problem and the fix."""


def free_bytes(path: Path) -> int:
    """Bytes free for this user on the filesystem of `path` (a function of its own, so tests can replace it)."""
    return shutil.disk_usage(path).free


def unfinished_saves(output_dir: str | Path) -> list[Path]:
    """Temporary directories of saves that never finished (`.step_*.tmp`; see train/checkpoint.py)."""
    root = Path(output_dir) / "checkpoints"
    return sorted(p for p in root.glob(".step_*.tmp")) if root.is_dir() else []


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_output_dir(cfg: Config, world_size: int) -> None:
    """Check train.output_dir has room for a checkpoint, create it and check it is writable; raises RunDirError.

    Local and cheap: every rank runs it before start-up (each writes and removes its own probe
    file). Room is checked first, on the nearest existing parent, so a refusal creates nothing.
    """
    from megamoe.tools.parameter_counts import checkpoint_bytes

    out = Path(cfg.train.output_dir)
    fix = "set train.output_dir to a directory this user can write"
    existing = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise RunDirError(f"train.output_dir '{out}' cannot be created: '{existing}' is a file; {fix}")
    need = checkpoint_bytes(cfg, world_size)
    reclaimable = sum(_size(p) for p in unfinished_saves(out))
    have = free_bytes(existing) + reclaimable
    if have < need:
        raise RunDirError(
            f"train.output_dir '{out}' has {have / GB:.2f} GB free"
            f"{f' (with {reclaimable / GB:.2f} GB of unfinished saves)' if reclaimable else ''}, "
            f"one checkpoint needs {need / GB:.2f} GB; free space there or set train.output_dir "
            f"to a filesystem with room"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"train.output_dir '{out}' cannot be created ({_reason(exc)}); {fix}") from None
    for directory in (out, out / "checkpoints"):
        if directory.exists() and not directory.is_dir():
            raise RunDirError(f"'{directory}' is a file, where the run keeps its checkpoints; move it away, or {fix}")
        if not directory.is_dir():
            continue
        probe = directory / f".write_probe.{socket.gethostname()}.{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"megamoe")
            probe.unlink()
        except OSError as exc:
            raise RunDirError(f"'{directory}' cannot be written ({_reason(exc)}); {fix}") from None


def remove_unfinished_saves(output_dir: str | Path) -> list[Path]:
    """Delete saves that never finished; only while holding the lock (no save of another run is writing them)."""
    removed = unfinished_saves(output_dir)
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


class RunLock:
    """Exclusive lock on a run directory, held by one process (global rank 0) from start-up to exit."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise RunDirError naming the holder's host and pid."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                print(
                    f"warning: the filesystem of '{self.path.parent}' does not support locks; make sure "
                    f"no other run writes to it",
                    flush=True,
                )
                return
            raise RunDirError(
                f"train.output_dir '{self.path.parent}' is in use by another run "
                f"({holder or 'which has not written its host and pid yet'}; see {self.path}): "
                f"stop that run first (its ranks can outlive a killed torchrun: kill that pid on "
                f"that host), or set train.output_dir to another directory"
            ) from None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {started}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__
