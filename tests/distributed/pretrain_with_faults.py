"""launcher/pretrain.py with faults injected at chosen moments, for the resilience tests.

Tests of preemption, killed saves and non-finite steps need a fault at a chosen step on a chosen
rank. megamoe itself has no such hooks: this script wraps the functions where a fault belongs,
from outside, and then runs the launcher unchanged. The faults are chosen by environment
variables, read here only:

    MEGAMOE_TEST_NAN_AT_STEPS="3,4"   the batches of data-parallel rank 0 at these 1-based steps are NaN
                                      (the other ranks' losses stay finite and must take the same decision)
    MEGAMOE_TEST_SLOW_SAVE="4:600"    the checkpoint of step 4 sleeps 600 s once its weights are written,
                                      still in its temporary directory (a save killed mid-write)
    MEGAMOE_TEST_FAIL_SAVE="2:1"      on global rank 1, writing the checkpoint of step 2 fails as on a
                                      full disk, after the rank's sharded state is written

Each fault prints `INJECTED <what>` when it fires, so a test can tell a fault that never fired
(a wrapped function renamed or imported differently) from megamoe failing to handle it.

Usage: as launcher/pretrain.py (under torchrun or alone); see launch_helpers.pretrain(faults=...).
"""

from __future__ import annotations

import errno
import os
import re
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NAN_AT_STEPS, SLOW_SAVE, FAIL_SAVE = "MEGAMOE_TEST_NAN_AT_STEPS", "MEGAMOE_TEST_SLOW_SAVE", "MEGAMOE_TEST_FAIL_SAVE"


def step_of(directory) -> int:
    """The step of a checkpoint directory being written: '.../.step_00000004.tmp/weights' -> 4."""
    return int(re.search(r"step_(\d{8})", str(directory)).group(1))


def injected(what: str) -> None:
    print(f"INJECTED {what}", flush=True)


def nan_batches_at(steps: set[int]) -> None:
    import torch
    from megatron.core import parallel_state

    from megamoe.train import loop

    real = loop.train_step

    def train_step(engine, cfg, step, micro_batches, *args, **kwargs):
        if step in steps and parallel_state.get_data_parallel_rank() == 0:
            injected(f"NaN batches at step {step}")
            micro_batches = ((torch.full_like(latents, float("nan")), text, g) for latents, text, g in micro_batches)
        return real(engine, cfg, step, micro_batches, *args, **kwargs)

    loop.train_step = train_step


def slow_save(at: int, seconds: float) -> None:
    from megamoe.train import loop

    real = loop.export_weights

    def export_weights(module, directory, tensors=None):
        real(module, directory, tensors)
        if Path(directory).name == "weights" and step_of(directory) == at:
            injected(f"a stall of {seconds:g} s in the save of step {at}")
            time.sleep(seconds)

    loop.export_weights = export_weights


def fail_save(at: int, rank: int) -> None:
    import torch.distributed as dist

    from megamoe.train import sharded_state

    real = sharded_state.save_state

    def save_state(engine, directory, ema=None):
        real(engine, directory, ema)
        if step_of(directory) == at and dist.get_rank() == rank:
            injected(f"a full disk in the save of step {at} on rank {rank}")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    sharded_state.save_state = save_state


def main() -> None:
    if os.environ.get(NAN_AT_STEPS):
        nan_batches_at({int(s) for s in os.environ[NAN_AT_STEPS].split(",")})
    if os.environ.get(SLOW_SAVE):
        at, seconds = os.environ[SLOW_SAVE].split(":")
        slow_save(int(at), float(seconds))
    if os.environ.get(FAIL_SAVE):
        at, rank = os.environ[FAIL_SAVE].split(":")
        fail_save(int(at), int(rank))
    script = str(REPO / "launcher" / "pretrain.py")
    sys.argv[0] = script
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
