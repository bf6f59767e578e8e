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


def launcher_script(faults: dict | None) -> str:
    """launcher/pretrain.py, or with `faults` (MEGAMOE_TEST_* variables) the wrapper that injects them."""
    return str(
        REPO / "tests" / "distributed" / "pretrain_with_faults.py" if faults else REPO / "launcher" / "pretrain.py"
    )


def pretrain_command(args, nproc: int | None, faults: dict | None = None, torchrun_args=()) -> list[str]:
    """The command line of `launcher/pretrain.py ARGS` (or its fault-injecting wrapper) under torchrun
    on `nproc` ranks, or as one plain process for nproc=None (the launcher then makes a world of one)."""
    script = [launcher_script(faults), *map(str, args)]
    if nproc is None:
        return [sys.executable, *script]
    rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        *rendezvous,
        *torchrun_args,
        *script,
    ]


def pretrain(
    args,
    nproc: int | None = 2,
    check: bool = True,
    timeout: int = 900,
    env: dict | None = None,
    faults: dict | None = None,
) -> subprocess.CompletedProcess:
    """`launcher/pretrain.py ARGS` on `nproc` gloo ranks under torchrun; nproc=None runs one
    plain process (the launcher then makes a world of one). `env`: extra environment variables;
    `faults`: faults to inject (see pretrain_with_faults.py), e.g. {"MEGAMOE_TEST_NAN_AT_STEPS": "3"}."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}), **(faults or {}))
    if nproc is None:
        env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    cmd = pretrain_command(args, nproc, faults)
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"pretrain failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    if faults:  # a fault that never fired would make the test pass or fail for another reason
        assert "INJECTED" in result.stdout, f"no fault of {faults} fired:\n{result.stdout[-3000:]}"
    return result


def pretrain_in_process(args) -> None:
    """`launcher/pretrain.py ARGS` as a world of one inside the test process: the code path of
    `pretrain(ARGS, nproc=None)` without the seconds a new process spends importing torch, DeepSpeed
    and megatron-core. The stop-signal handlers the launcher installs are put back afterwards."""
    import signal

    from launcher.pretrain import main
    from megamoe.train.stop_signals import STOP_REQUEST, STOP_SIGNALS

    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    environ = dict(os.environ)  # the launcher sets RANK, WORLD_SIZE, MASTER_* for its world of one
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    try:
        code = main(list(map(str, args)))
    finally:
        os.environ.clear()
        os.environ.update(environ)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        STOP_REQUEST._installed, STOP_REQUEST.received = False, None
    assert code == 0, f"pretrain exited {code}"


def read_metrics(output_dir) -> dict[int, dict]:
    """metrics.jsonl of a run, by step."""
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m for m in map(json.loads, lines)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(rank, world, port, errors, worker, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0"
    )
    try:
        worker(rank, world, *args)
    except Exception:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise
    from megamoe.process_exit import exit_now

    exit_now(0)  # skips about a second of interpreter teardown per rank (megamoe/process_exit.py)


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


def start_pretrain(args, nproc: int = 2, faults: dict | None = None, torchrun_args=()) -> subprocess.Popen:
    """Like `pretrain`, but returns the running torchrun process (stdout and stderr piped), for
    tests that signal or kill it, or one of its workers, while it trains."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(faults or {}))
    cmd = pretrain_command(args, nproc, faults, torchrun_args)
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def worker_pids(torchrun: subprocess.Popen) -> dict[int, int]:
    """{global rank: pid} of the training processes torchrun started (they run in their own sessions)."""
    import psutil

    found = {}
    for child in psutil.Process(torchrun.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None and any(p.endswith(("pretrain.py", "pretrain_with_faults.py")) for p in child.cmdline()):
            found[int(rank)] = child.pid
    return found


def wait_until(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = 600) -> None:
    """Poll `condition()` until true; fail (with the run's output) if `proc` ends first or after
    `timeout` seconds (a guard against a hang, not a timing assertion)."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"run ended ({proc.returncode}) before {what}:\n{out[-3000:]}\n{err[-6000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def steps_logged(output_dir) -> int:
    path = Path(output_dir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def torchrun_failures(stderr: str) -> tuple[dict[int, tuple[int, str]], int]:
    """torchrun's failure summary: ({global rank: (exit code, traceback line)}, the root cause's rank)."""
    import re

    entries = re.findall(
        r"rank\s+: (\d+) \(local_rank: \d+\)\n\s+exitcode\s+: (-?\d+) .*\n.*\n\s+traceback : (.*)", stderr
    )
    root = re.search(r"Root Cause \(first observed failure\):\n\[\d+\]:\n.*\n.*\n\s+rank\s+: (\d+)", stderr)
    assert entries and root, f"no torchrun failure summary in:\n{stderr[-4000:]}"
    return {int(rank): (int(code), line) for rank, code, line in entries}, int(root.group(1))


def assert_stopped_together(result, *needles) -> str:
    """Every rank exited 2 with the same line, printed once; no worker traceback. Returns the line."""
    assert result.returncode == 1, result.stderr[-4000:]  # torchrun's own code for a failed worker
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, result.stderr[-4000:]
    failures, root = torchrun_failures(result.stderr)
    assert sorted(failures) == [0, 1] and all(code == 2 for code, _ in failures.values()), failures
    assert failures[root][1] == errors[0]  # the root cause torchrun names is the line itself
    assert "gloo" not in result.stderr.lower()  # no rank died in a collective
    assert result.stderr.count("Traceback (most recent call last)") == 1  # torchrun's own, none from a rank
    for needle in needles:
        assert needle in errors[0]
    return errors[0]
