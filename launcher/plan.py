"""Plan a parallel layout: parameters, memory per GPU and expert all-to-all traffic (see megamoe/tools/layout_planner.py).

    python launcher/plan.py --config configs/X.yaml --nodes N --gpus-per-node G [key=value ...]

Prints the plan of the config's layout (parallel.*, optim.zero_stage, train.activation_checkpointing).
Exit code 0 when it fits in --gpu-memory-gb; 1 when it does not, with one line on stderr saying why
and a layout that fits (as key=value overrides); 2 for a bad config.
"""

from __future__ import annotations

import argparse
import sys

from megamoe.config import ConfigError, load_config

EXIT_BAD_INPUT = 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU in GB (default 80: H100)")
    p.add_argument(
        "--reserve-gb",
        type=float,
        default=6.0,
        help="per-GPU allowance for CUDA context, NCCL, reduce buckets and fragmentation (default 6)",
    )
    p.add_argument(
        "--latent",
        default=None,
        help="latent video size F,H,W to plan for (default: the largest data.buckets entry, else the synthetic clip)",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.expert_parallel_size=8")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megamoe.config_checks import validate
    from megamoe.tools.layout_planner import parse_latent, run

    try:
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise ConfigError("--nodes and --gpus-per-node must be >= 1")
        cfg = load_config(args.config, args.overrides)
        # model.patch_size first: --latent is read in its units
        validate(cfg, world_size=args.nodes * args.gpus_per_node)
        latent = parse_latent(args.latent, cfg.model) if args.latent is not None else None
        code, report, verdict = run(cfg, args.nodes, args.gpus_per_node, args.gpu_memory_gb, args.reserve_gb, latent)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(report)
    if verdict:
        print(verdict, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
