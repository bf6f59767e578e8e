"""Run a benchmark script as a user would: a fresh single process, outside any torchrun world."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(*args: str, timeout: int) -> subprocess.CompletedProcess:
    """`python benchmarks/<args>` from the repository root, one thread, unbuffered output, with the
    launcher's rank variables removed so the script starts its own world of one."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
