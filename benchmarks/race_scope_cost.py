"""What Expert Race's `race_scope=global` costs over the micro-batch race, on gloo CPU ranks.

One Expert Race router (the experts, top-k and width of a config file) routes `--tokens` tokens
per rank on `--ranks` data-parallel ranks, once racing its own micro-batch and once racing the
global batch (TokenShards.kth_largest_over_batch). Printed per layer and forward: the bytes each
rank contributes to the all-gathers, and the median forward time of both scopes.

    python benchmarks/race_scope_cost.py --config configs/wan2.2_ti2v_5b_moe.yaml --ranks 2 --tokens 4096
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def worker(rank, world, moe, dim, tokens, repeats, results):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megamoe.config import MoEConfig
    from megamoe.moe.routers import RoutingContext, build_router
    from megamoe.moe.token_shards import TokenShards

    dist.init_process_group("gloo", rank=rank, world_size=world)
    sent = [0, 0]  # calls, bytes this rank contributed
    all_gather = dist.all_gather

    def counted(out, tensor, *args, **kwargs):
        sent[0] += 1
        sent[1] += tensor.numel() * tensor.element_size()
        return all_gather(out, tensor, *args, **kwargs)

    dist.all_gather = counted
    x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(rank))
    ctx = RoutingContext(1, tokens)
    for scope in ("micro_batch", "global"):
        torch.manual_seed(0)
        router = build_router(
            dim, MoEConfig(num_experts=moe.num_experts, top_k=moe.top_k, router="expert_race", race_scope=scope)
        ).train()
        router.token_shards = TokenShards(None, dist.group.WORLD)
        times = []
        with torch.no_grad():
            for _ in range(repeats):
                sent[:] = [0, 0]
                dist.barrier()
                start = time.perf_counter()
                router(x, ctx)
                times.append(time.perf_counter() - start)
        if rank == 0:
            results.put((scope, tuple(sent), statistics.median(times)))
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/wan2.2_ti2v_5b_moe.yaml")
    parser.add_argument("--ranks", type=int, default=2, help="data-parallel ranks")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank (one micro-batch)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    import torch.multiprocessing as mp

    from megamoe.config import load_config

    cfg = load_config(args.config)
    moe = cfg.model.moe
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(args.ranks, moe, cfg.model.dim, args.tokens, args.repeats, results), nprocs=args.ranks)
    print(
        f"{args.config}: E={moe.num_experts}, top_k={moe.top_k}, dim={cfg.model.dim}, "
        f"{args.tokens} tokens per rank on {args.ranks} gloo CPU ranks, one layer, forward only"
    )
    rows = {scope: (sent, seconds) for scope, sent, seconds in (results.get() for _ in range(2))}
    for scope, ((calls, sent), seconds) in sorted(rows.items(), key=lambda r: r[0] != "micro_batch"):
        print(f"{scope:12s} all-gathers {calls}, bytes sent per rank {sent:>10,d}, forward {seconds * 1e3:8.2f} ms")
    extra = rows["global"][1] - rows["micro_batch"][1]
    print(f"global race costs +{extra * 1e3:.2f} ms per layer and forward on this machine")


if __name__ == "__main__":
    main()
