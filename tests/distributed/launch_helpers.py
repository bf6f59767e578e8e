"""Starting real ranks for the distributed tests: the launcher under torchrun, or a worker
function under torch.multiprocessing, with failures reported from every rank."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]


def pretrain(args, nproc: int | None = 2, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """`launcher/pretrain.py ARGS` on `nproc` gloo ranks under torchrun; nproc=None runs one
    plain process (the launcher then makes a world of one)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    script = str(REPO / "launcher" / "pretrain.py")
    if nproc is None:
        env.pop("RANK", None), env.pop("WORLD_SIZE", None)
        cmd = [sys.executable, script, *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", "127.0.0.1:0", script, *map(str, args)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"pretrain failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def read_metrics(output_dir) -> dict[int, dict]:
    """metrics.jsonl of a run, by step."""
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m for m in map(json.loads, lines)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(rank, world, port, errors, worker, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK="0")
    try:
        worker(rank, world, *args)
    except Exception:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def spawn(worker, world: int, *args) -> None:
    """Run `worker(rank, world, *args)` on `world` processes (MASTER_* and RANK set); fail the
    test with every rank's traceback if any rank raises."""
    errors = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(_run_rank, args=(world, free_port(), errors, worker, args), nprocs=world, join=True)
    except Exception as exc:
        messages = []
        while not errors.empty():
            messages.append(errors.get())
        pytest.fail("\n".join(messages) or str(exc))
