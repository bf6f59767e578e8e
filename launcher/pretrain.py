"""Pretrain a megamoe video DiT.

    torchrun --nproc-per-node 2 launcher/pretrain.py --config configs/tiny.yaml [key=value ...]

Everything that can be checked before start-up (config, resume checkpoint, the headers and
shapes of every file of train.init_from) is checked before any process group exists; a problem
prints one line and exits with code 2.
SIGTERM or SIGUSR1 (preemption) makes every rank finish its step, write a checkpoint and exit 0;
`--resume auto` then continues from it.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from megamoe.config import ConfigError, load_config, validate
from megamoe.model.weights import WeightsError
from megamoe.train.checkpoint import CheckpointError, resolve_resume

EXIT_BAD_INPUT = 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("--resume", default=None,
                        help="'auto' (newest complete checkpoint in train.output_dir if any, else a fresh start: "
                             "for preemptible and self-restarting jobs), 'latest' (the newest, which must exist) "
                             "or a checkpoint directory")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=4 train.steps=100")
    return parser.parse_intermixed_args(argv)  # options may follow the key=value overrides


def main(argv=None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        resume_from = resolve_resume(cfg, args.resume, int(os.environ.get("WORLD_SIZE", "1")))
        if cfg.train.init_from and resume_from is None:
            from megamoe.parallel.sharded_weights import open_init_source

            open_init_source(cfg.train.init_from, cfg.model)  # headers and shapes only; reads no tensor
    except (ConfigError, CheckpointError, WeightsError) as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from megamoe.data.loader import DataError, StreamStateError
    from megamoe.device import resolve_device
    from megamoe.parallel.topology import destroy_distributed, init_distributed
    from megamoe.train.loop import train
    from megamoe.train.resilience import STOP_REQUEST, NonFiniteError

    STOP_REQUEST.install()  # a preemption signal during start-up stops the run after its first step

    topology = init_distributed(cfg.parallel, resolve_device(cfg.train.device))
    try:
        train(cfg, topology, resume_from)
    except (CheckpointError, DataError, StreamStateError, NonFiniteError) as exc:
        print(f"error (rank {topology.rank}): {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
