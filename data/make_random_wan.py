"""Write a random-weight Wan transformer in diffusers layout (sharded safetensors + index + config).

    python data/make_random_wan.py --config configs/wan2.2_ti2v_5b.yaml --out /tmp/wan5b_random

It has the released checkpoint's names, shapes, dtype and file layout (the 5B config in bf16: about
10 GB in 5 shards), with N(0, --std) values drawn from (--seed, tensor name), for a dense -> MoE
`train.init_from` and `launcher/rehearse.py`; see megamoe/tools/random_wan_checkpoint.py.
"""

from __future__ import annotations

import argparse
import os
import sys

from megamoe.config import ConfigError
from megamoe.model.weights import WEIGHTS_NAME
from megamoe.tools.random_wan_checkpoint import DTYPES, write_random_wan


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a dense model config, e.g. configs/wan2.2_ti2v_5b.yaml")
    parser.add_argument("--out", required=True, help="new directory to write (must not exist or be empty)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, default=0.02, help="standard deviation of the random values")
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="largest shard file, in GB (1e9 bytes)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.num_layers=2")
    args = parser.parse_args(argv)
    if WEIGHTS_NAME in os.path.basename(args.out):
        print("error: --out is a directory, not a file name; e.g. --out /tmp/wan5b_random", file=sys.stderr)
        return 2
    try:
        write_random_wan(args.config, args.out, args.dtype, args.seed, args.std, args.max_shard_gb, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
