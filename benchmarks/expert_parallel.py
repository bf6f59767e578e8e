"""Share of an expert-parallel MoE layer's step spent in all-to-all, with and without overlap.

    torchrun --nproc-per-node 2 benchmarks/expert_parallel.py [--tokens 8192] [--dim 512]

Each rank runs the MoE layer (top-k linear router, one shared expert of the routed experts'
width) forward + backward with its experts split over the ranks (EP = world size), twice
interleaved: `sync`, the dispatcher waiting for each exchange at once, and `overlap`, the
dispatch all-to-all in flight while the shared expert computes (forward, and its reverse in
backward). The same run then replays only the layer's four all-to-alls (tokens out and back,
forward and backward) with the split sizes the router produced. Rank 0 prints:

    share    all-to-all time / sync step time (the exchanges' share before overlap)
    exposed  (all-to-all time - (sync - overlap)) / overlap step time: the share left in the
             critical path once overlap hides part of it
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.distributed as dist

from megamoe.config import MoEConfig
from megamoe.device import backend_for, resolve_device, synchronize
from megamoe.moe.dispatch import expert_assignments
from megamoe.moe.layer import MoEFeedForward
from megamoe.parallel.collectives import all_to_all
from megamoe.parallel.expert import apply_expert_parallel

SHAPES = [(8, 2, 1024), (32, 4, 256), (64, 8, 128)]


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per rank")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = resolve_device("auto")
    dist.init_process_group(backend_for(device))
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    if rank == 0:
        print(f"device {device.type}, {world} ranks (EP={world}), {args.tokens} tokens/rank, dim {args.dim}, fp32")
        print(
            f"{'E':>3} {'k':>2} {'width':>5} | {'sync ms':>8} {'overlap ms':>10} | {'all-to-all ms':>13} | "
            f"{'share':>6} {'exposed':>7}"
        )
    for experts, k, width in SHAPES:
        torch.manual_seed(0)
        cfg = MoEConfig(num_experts=experts, top_k=k, num_shared_experts=1)
        layer = MoEFeedForward(args.dim, width, cfg).to(device)
        layer = apply_expert_parallel(copy.deepcopy(layer), group)
        x = torch.randn(1, args.tokens, args.dim, device=device)

        def step(overlap):
            layer.dispatcher.overlap = overlap
            xx = x.detach().requires_grad_()
            layer(xx).square().mean().backward()

        times = {True: [], False: []}
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            for overlap in (False, True):
                times[overlap].append(timed(lambda: step(overlap), device, 1))
        sync_time, overlap_time = (statistics.median(times[o]) for o in (False, True))
        # The split sizes this router produced, for the replay.
        tokens = x.view(-1, args.dim)
        routed = layer.router(tokens, _ctx(x))
        assignments = expert_assignments(routed.probs, routed.routing_map, experts, routed.topk_indices)
        state = layer.dispatcher.dispatch(tokens, assignments).wait().state
        rows_out = torch.randn(sum(state.send_splits), args.dim, device=device)
        rows_in = torch.randn(sum(state.recv_splits), args.dim, device=device)

        def exchanges():  # forward: out and back; backward: the same two, reversed
            all_to_all(rows_out, state.recv_splits, state.send_splits, group)
            all_to_all(rows_in, state.send_splits, state.recv_splits, group)
            all_to_all(rows_out, state.recv_splits, state.send_splits, group)
            all_to_all(rows_in, state.send_splits, state.recv_splits, group)

        comm_time = timed(exchanges, device, args.repeats)
        if rank == 0:
            exposed = max(comm_time - (sync_time - overlap_time), 0.0) / overlap_time
            print(
                f"{experts:>3} {k:>2} {width:>5} | {sync_time * 1e3:8.1f} {overlap_time * 1e3:10.1f} | "
                f"{comm_time * 1e3:13.1f} | {comm_time / sync_time:6.1%} {exposed:7.1%}"
            )
    dist.destroy_process_group()


def _ctx(x):
    from megamoe.moe.routers.base import RoutingContext

    return RoutingContext(batch_size=x.shape[0], seq_len=x.shape[1])


if __name__ == "__main__":
    main()
