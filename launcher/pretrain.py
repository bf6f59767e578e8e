"""Pretrain a megamoe video DiT.

    torchrun --nproc-per-node 2 launcher/pretrain.py --config configs/tiny.yaml [key=value ...]

Everything that can be checked before start-up (config, resume checkpoint, the headers and
shapes of every file of train.init_from, data.path, and train.output_dir: writable, room for a
checkpoint) is checked before any process group exists.
Bad input, then or later (too many bad samples, a checkpoint that cannot be written, a run
directory locked by another run), stops every rank together: one line on stderr, exit code 2
on every rank. Under torchrun that line is also torchrun's "Root Cause" (its error file), and
torchrun itself exits 1, as it does for any failed worker.
SIGTERM or SIGUSR1 (preemption) makes every rank finish its step, write a checkpoint and exit 0;
`--resume auto` then continues from it.
"""

from __future__ import annotations

if __name__ == "__main__":
    # First, before seconds of imports: from here on SIGTERM and SIGUSR1 only raise the stop flag.
    # Once one rank exits (say, refusing bad input), torchrun sends SIGTERM to the others, and one
    # still importing would otherwise die of it instead of exiting with its own code.
    from megamoe.train.stop_signals import STOP_REQUEST

    STOP_REQUEST.install()

import argparse
import json
import os
import signal
import sys
import time
import warnings

from megamoe.config import ConfigError, load_config
from megamoe.config_checks import validate
from megamoe.data.loader import DataError, check_data_path
from megamoe.model.weights import WeightsError
from megamoe.train.checkpoint import CheckpointError, resolve_resume
from megamoe.train.run_dir import RunDirError, RunLock, check_output_dir, remove_unfinished_saves
from megamoe.train.stop_signals import STOP_REQUEST

EXIT_BAD_INPUT = 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument(
        "--resume",
        default=None,
        help="'auto' (newest complete checkpoint in train.output_dir if any, else a fresh start: "
        "for preemptible and self-restarting jobs), 'latest' (the newest, which must exist) "
        "or a checkpoint directory",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=4 train.steps=100")
    return parser.parse_intermixed_args(argv)  # options may follow the key=value overrides


def refuse(message: str, printed: bool) -> int:
    """Report bad input: `printed` ranks print the line; every rank hands it to torchrun; exit code 2.

    torchrun's failure summary shows a worker's error file (TORCHELASTIC_ERROR_FILE) as its
    "Root Cause", so the line is also the last thing torchrun prints, not a traceback.
    """
    if printed:
        print(message, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w") as f:
                json.dump({"message": message, "timestamp": int(time.time())}, f)
        except OSError:
            pass
    return EXIT_BAD_INPUT


def stop_before_start_up(signal_name: str, rank: int) -> None:
    """A stop signal that arrived before the process group exists ends the rank as the signal would.

    Nothing is trained yet, so there is nothing to save; and the signal may be torchrun's after
    another rank died, whom `init_distributed` would wait for until torchrun's SIGKILL, 30 s later
    by default. (Input checks came first: a rank whose peer refused bad input refuses it too.)
    """
    print(f"{signal_name} before start-up (rank {rank}): stopping, nothing to save", file=sys.stderr, flush=True)
    sig = signal.Signals[signal_name]
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)


def main(argv=None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, world_size=world_size)
        if cfg.model.block_router.enabled:  # accepted, it would change nothing: refuse instead
            raise ConfigError(
                "model.block_router.enabled=true: pretraining cannot train block routers (a skip/execute/repeat "
                "choice has no gradient), so they would stay at 'execute'; leave it off here and train them "
                "afterwards with python -m megamoe.tools.block_path_search and python -m megamoe.posttrain.block_routers"
            )
        resume_from = resolve_resume(cfg, args.resume, world_size)
        if cfg.train.init_from and resume_from is None:
            from megamoe.parallel.sharded_weights import open_init_source

            open_init_source(cfg.train.init_from, cfg.model)  # headers and shapes only; reads no tensor
        p = cfg.parallel
        check_data_path(cfg, dp_size=world_size // (p.tensor_parallel_size * p.context_parallel_size))
        check_output_dir(cfg, world_size)  # the first thing that writes: after every check of the input
    except (ConfigError, CheckpointError, DataError, RunDirError, WeightsError) as exc:
        return refuse(f"error: {exc}", printed=rank == 0)  # every rank found the same

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from megamoe.device import resolve_device
    from megamoe.parallel.topology import destroy_distributed, init_distributed
    from megamoe.train.loop import BAD_INPUT, train
    from megamoe.train.resilience import AgreedStop, stop_together

    if STOP_REQUEST.requested:  # the last moment before waiting for the other ranks
        stop_before_start_up(STOP_REQUEST.received, rank)
    STOP_REQUEST.install()  # from here a preemption signal stops the run after its first step

    topology = init_distributed(cfg.parallel, resolve_device(cfg.train.device))
    lock = RunLock(cfg.train.output_dir)
    try:
        with stop_together(topology.device, (RunDirError,)):
            if topology.is_main:
                lock.acquire()
                for path in remove_unfinished_saves(cfg.train.output_dir):
                    print(f"removed {path}, a save that never finished", flush=True)
        train(cfg, topology, resume_from)
    except AgreedStop as exc:  # every rank raised it with the same message
        return refuse(f"error: {exc}", printed=topology.is_main)
    except BAD_INPUT as exc:  # found by this rank alone, where no agreement was possible
        return refuse(f"error (rank {topology.rank}): {exc}", printed=True)
    finally:
        lock.release()
        destroy_distributed()
    return 0


if __name__ == "__main__":
    # Once one rank exits, torchrun sends SIGTERM to the others, which may still be writing the same
    # line: from the first moment (the top of this file) SIGTERM only raises the stop flag, and while
    # a refusing rank shuts down it is ignored, so every rank exits with its own code.
    code = main()
    if code == 0:  # the run closed its loader and logs: skip the interpreter's teardown
        from megamoe.process_exit import exit_now

        exit_now(code)
    if code == EXIT_BAD_INPUT:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)  # a refusal may leave files to Python's own teardown to close
