"""All-to-all rows an expert-parallel run actually sends, before and after expert placement.

    python benchmarks/expert_placement.py CKPT [PLACED ...] [--batches 8]

Starts 2 gloo ranks (one expert-parallel group of 2, experts e on rank e // (E/2), as
parallel/expert.py places them); each loads the model of every checkpoint given, keeps its own
expert slice with the AllToAllDispatcher, and runs forward passes over its share of the run's
training batches (rank r takes batches r, r+2, ..., noised at levels spread over (0, 1) as the
routing statistics are). Per MoE layer it counts, over both ranks:

    rows      rows the dispatcher sent to the other rank (its send split for that rank): one per
              (token, expert) assignment whose expert lives there; the combine sends as many back
    dedup     (token, other rank) pairs with at least one of the token's experts there: the rows a
              dispatcher that sends a token once per destination rank would send

and prints them with the bytes of one optimizer step's all-to-all (forward and backward: the rows
out and back and their gradients, 4 x rows x dim x 4 bytes in fp32, plus the fp32 routing weight
of every remote assignment and its gradient), scaled from the measured tokens to the run's
tokens per step (2 ranks x micro-batch x grad_accum). Pass the checkpoint written by
launcher/place_experts.py --ep-size 2 as PLACED.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EP = 2


def measure(rank: int, world: int, port: int, checkpoints: list[str], batches: int, results) -> None:
    import torch.distributed as dist

    from megamoe.diffusion.flow import TIMESTEP_SCALE, interpolate
    from megamoe.moe.layer import moe_layers
    from megamoe.parallel.expert import apply_expert_parallel
    from megamoe.posttrain.trained_model import data_batches, load_trained_model

    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    out = {}
    for ckpt in checkpoints:
        model, cfg = load_trained_model(ckpt)
        apply_expert_parallel(model, dist.group.WORLD)
        layers = moe_layers(model)
        counts = torch.zeros(len(layers), 3, dtype=torch.float64)  # rows, dedup, tokens

        def wrap(i, dispatcher):
            dispatch = dispatcher.dispatch
            local = dispatcher.num_local_experts

            def counted(tokens, assignments):
                pending = dispatch(tokens, assignments)
                splits = pending.state.send_splits
                counts[i, 0] += sum(n for r, n in enumerate(splits) if r != rank)
                # the destination rank of each row (rows are expert-major over all experts)
                per_rank = assignments.tokens_per_expert.view(EP, local).sum(1)
                dest = torch.arange(EP).repeat_interleave(per_rank)
                remote = dest != rank
                pairs = torch.unique(assignments.token_index[remote] * EP + dest[remote])
                counts[i, 1] += pairs.numel()
                counts[i, 2] += tokens.shape[0]
                return pending

            dispatcher.dispatch = counted

        for i, layer in enumerate(layers):
            wrap(i, layer.dispatcher)
        data = data_batches(cfg, batches)
        with torch.no_grad():
            for b in range(rank, batches, world):
                latents, text = data[b]
                g = torch.Generator().manual_seed(b)
                s = (torch.arange(latents.shape[0]) + 0.5) / latents.shape[0]
                model(interpolate(latents, torch.randn(latents.shape, generator=g), s), s * TIMESTEP_SCALE, text)
        dist.all_reduce(counts)
        out[ckpt] = (counts, cfg)
    if rank == 0:
        results.put(
            {
                k: (v[0].tolist(), v[1].model.dim, v[1].data.micro_batch_size, v[1].train.grad_accum)
                for k, v in out.items()
            }
        )
    dist.destroy_process_group()


def main(argv=None) -> int:
    import torch.multiprocessing as mp

    from megamoe.posttrain.evaluation import video_tokens
    from megamoe.posttrain.trained_model import data_batches, load_trained_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="the original checkpoint, then placed ones")
    p.add_argument("--batches", type=int, default=8, help="training batches to run (split over the 2 ranks)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    model, cfg = load_trained_model(args.checkpoints[0])
    latents, _ = data_batches(cfg, 1)[0]
    per_sample = video_tokens(model, latents) // latents.shape[0]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        measure, args=(EP, port, args.checkpoints, args.batches, results), nprocs=EP, join=True, start_method="spawn"
    )
    measured = results.get()
    base = None
    for ckpt in args.checkpoints:
        counts, dim, micro, accum = measured[ckpt]
        step_tokens = EP * micro * accum * per_sample
        print(
            f"{ckpt}: EP {EP}, per layer (measured rows over both ranks; MB per optimizer step of {step_tokens} tokens)"
        )
        totals = [0.0, 0.0]
        for i, (rows, dedup, tokens) in enumerate(counts):
            scale = step_tokens / tokens
            assign_bytes = scale * (4 * rows * dim * 4 + 2 * 4 * rows)
            dedup_bytes = scale * (4 * dedup * dim * 4 + 2 * 4 * rows)
            totals[0] += assign_bytes
            totals[1] += dedup_bytes
            print(
                f"  layer {i}: tokens {int(tokens)}  rows to the other rank {int(rows)} ({rows / tokens:.4f}/token)  "
                f"once-per-rank rows {int(dedup)} ({dedup / tokens:.4f}/token)  "
                f"per-assignment {assign_bytes / 1e6:.3f} MB  per-rank dedup {dedup_bytes / 1e6:.3f} MB"
            )
        print(f"  total: per-assignment {totals[0] / 1e6:.3f} MB, per-rank dedup {totals[1] / 1e6:.3f} MB")
        if base is None:
            base = totals
        else:
            print(
                f"  vs {args.checkpoints[0]}: per-assignment {(base[0] - totals[0]) / base[0]:+.2%} reduction, "
                f"per-rank dedup {(base[1] - totals[1]) / base[1]:+.2%} reduction"
            )
    print(f"wall time {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
