"""Bytes each rank sends, writes and holds while writing the sharded weights export.

    python benchmarks/export_traffic.py [--ranks 4] [--tp 2] [--ep 2] [--dim 256] [--layers 4]

Spawns gloo ranks on the CPU, builds an MoE WanDiT (E8 fine-grained experts, one shared expert)
at the given TP x EP layout, and runs `write_sharded_weights` (what every checkpoint's weights/
export runs). Prints per rank: its own shard, bytes sent, bytes written, the largest full tensor
it held at once, next to the closed form of the total traffic,
sum over split tensors T of |T| (G_T - 1) / G_T, and the model's size.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout: tests.distributed


def model_config(dim: int, layers: int):
    from megamoe.config import ModelConfig, MoEConfig

    return ModelConfig(
        dim=dim,
        num_layers=layers,
        num_heads=8,
        ffn_dim=4 * dim,
        in_channels=16,
        out_channels=16,
        text_dim=dim,
        freq_dim=64,
        rope_max_seq_len=64,
        moe=MoEConfig(num_experts=8, expert_ffn_dim=dim, top_k=2, num_shared_experts=1, diagnostics_every=0),
    )


def _worker(rank, world, args, out_dir):
    import torch.distributed as dist

    from megamoe.config import ParallelConfig
    from megamoe.model.dit import build_model
    from megamoe.parallel.parallelize import parallelize, split_of
    from megamoe.parallel.sharded_weights import export_weights
    from megamoe.parallel.topology import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    parallel = ParallelConfig(tensor_parallel_size=args.tp, expert_parallel_size=args.ep, sequence_parallel=args.tp > 1)
    init_distributed(parallel, torch.device("cpu"))
    model = parallelize(build_model(model_config(args.dim, args.layers)), parallel)
    stats = export_weights(model, out_dir)
    shard = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    formula = 0
    for tensor in model.state_dict(keep_vars=True).values():
        split = split_of(tensor)
        if split is not None:  # T's W/G ranks' blocks, each |T|/G: summed over all ranks gives |T| (G-1)/G
            g = dist.get_world_size(split[0])
            formula += tensor.numel() * tensor.element_size() * (g - 1) / world
    rows = [None] * world
    dist.all_gather_object(rows, {"rank": rank, "shard": shard, **stats})
    totals = [None] * world
    dist.all_gather_object(totals, formula)
    if rank == 0:
        model_bytes = sum(r["written_bytes"] for r in rows)
        print(f"{world} ranks, TP {args.tp} x EP {args.ep}; model {model_bytes / 2**20:.2f} MiB (fp32)")
        print(f"{'rank':>4} {'own shard MiB':>14} {'sent MiB':>9} {'written MiB':>12} {'largest held MiB':>17}")
        for r in rows:
            print(
                f"{r['rank']:>4} {r['shard'] / 2**20:>14.3f} {r['sent_bytes'] / 2**20:>9.3f} "
                f"{r['written_bytes'] / 2**20:>12.3f} {r['largest_held_bytes'] / 2**20:>17.3f}"
            )
        sent = sum(r["sent_bytes"] for r in rows)
        print(
            f"sent by all ranks: {sent / 2**20:.3f} MiB; closed form sum_T |T| (G_T-1)/G_T: "
            f"{sum(totals) / 2**20:.3f} MiB"
        )
    destroy_distributed()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from tests.distributed.launch_helpers import spawn

    with tempfile.TemporaryDirectory() as out:
        spawn(_worker, args.ranks, args, out)


if __name__ == "__main__":
    main()
