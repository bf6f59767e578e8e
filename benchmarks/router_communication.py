"""Communication that sharded router losses and selections add, measured on gloo ranks.

Under context parallelism (or TP with sequence parallelism) every router reduces its statistics
over the sequence shards (megamoe/moe/token_shards.py). This script runs each router family's
forward and the backward of its losses on `--shards` CPU ranks, one MoE layer, with the experts,
top-k and width of a config file and one micro-batch of `--tokens` tokens per sample split over the
shards, and counts the collectives the routers issue and their payload: all-reduce = the
tensor's bytes, all-gather and reduce-scatter = the bytes each rank contributes. Per step = per layer x MoE layers
x micro-batches (x 2 with activation checkpointing, whose recomputation repeats the forward).

    python benchmarks/router_communication.py --config configs/wan2.2_ti2v_5b_moe.yaml --shards 2
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = {  # name: MoEConfig fields over the config's own
    "linear, balance (micro_batch) + z": dict(router="linear", balance_loss=1.0, z_loss=1e-3),
    "linear, balance (sequence) + z": dict(router="linear", balance_loss=1.0, z_loss=1e-3, balance_scope="sequence"),
    "linear, balance (global) + z": dict(router="linear", balance_loss=1.0, z_loss=1e-3, balance_scope="global"),
    "expert_race + similarity": dict(router="expert_race", similarity_loss=1.0),
    "expert_choice (sample)": dict(router="expert_choice"),
    "expert_choice (batch)": dict(router="expert_choice", expert_choice_scope="batch"),
    "sinkhorn": dict(router="sinkhorn"),
    "promoe + contrastive": dict(router="promoe", contrastive_loss=1.0),
    "selective_sinkhorn (Sinkhorn step)": dict(router="selective_sinkhorn", ssr_probability=1.0),
    "dynmole + tsallis + balance": dict(router="dynmole", tsallis_loss=1.0, balance_loss=1.0),
    "diffmoe + capacity": dict(router="diffmoe", capacity_loss=1.0),
    "timestep_band (linear) + balance + z": dict(
        router="timestep_band", timestep_band_router="linear", balance_loss=1.0, z_loss=1e-3
    ),
}


def count_collectives():
    """Wrap the collectives token_shards uses; returns the running {kind: [calls, bytes]} table."""
    import torch.distributed as dist

    import megamoe.parallel.collectives as collectives

    table = {"all_reduce": [0, 0], "all_gather": [0, 0], "reduce_scatter": [0, 0]}
    all_reduce, all_gather = dist.all_reduce, collectives._all_gather_single
    reduce_scatter = collectives._reduce_scatter_single

    def counted_all_reduce(tensor, *args, **kwargs):
        table["all_reduce"][0] += 1
        table["all_reduce"][1] += tensor.numel() * tensor.element_size()
        return all_reduce(tensor, *args, **kwargs)

    def counted_all_gather(out, tensor, *args, **kwargs):
        table["all_gather"][0] += 1
        table["all_gather"][1] += tensor.numel() * tensor.element_size()
        return all_gather(out, tensor, *args, **kwargs)

    def counted_reduce_scatter(out, tensor, *args, **kwargs):
        table["reduce_scatter"][0] += 1
        table["reduce_scatter"][1] += tensor.numel() * tensor.element_size()
        return reduce_scatter(out, tensor, *args, **kwargs)

    dist.all_reduce, collectives._all_gather_single = counted_all_reduce, counted_all_gather
    collectives._reduce_scatter_single = counted_reduce_scatter
    return table


def worker(rank, world, moe, dim, tokens, batch, results):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megamoe.config import MoEConfig
    from megamoe.moe.losses import LOSS_NAMES
    from megamoe.moe.routers import RoutingContext, build_router
    from megamoe.moe.token_shards import TokenShards

    dist.init_process_group("gloo", rank=rank, world_size=world)
    table = count_collectives()
    local = tokens // world
    for name, fields in CASES.items():
        torch.manual_seed(0)
        router = build_router(dim, MoEConfig(num_experts=moe.num_experts, top_k=moe.top_k, **fields))
        router.token_shards = TokenShards(dist.group.WORLD, dist.group.WORLD)
        x = torch.randn(batch * local, dim, requires_grad=True)
        # Timesteps on both sides of Wan2.2's band boundary (875), for timestep_band.
        timestep = torch.linspace(100.0, 950.0, batch) if batch > 1 else torch.tensor([950.0])
        ctx = RoutingContext(batch, local, is_null=torch.zeros(batch, dtype=torch.bool), timestep=timestep)
        for kind in table.values():
            kind[:] = [0, 0]
        out = router(x, ctx)
        forward = {k: tuple(v) for k, v in table.items()}
        losses = [v for k, v in out.aux.items() if k in LOSS_NAMES]
        (out.probs.sum() + sum(losses)).backward()
        backward = {k: (table[k][0] - forward[k][0], table[k][1] - forward[k][1]) for k in table}
        if rank == 0:
            results.put((name, forward, backward))
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/wan2.2_ti2v_5b_moe.yaml")
    parser.add_argument("--shards", type=int, default=2, help="CP (x TP with sequence parallelism) ranks")
    parser.add_argument("--tokens", type=int, default=27280, help="tokens per sample (27,280: 121 frames of 720p)")
    args = parser.parse_args()

    import torch.multiprocessing as mp

    from megamoe.config import load_config
    from megamoe.moe.layer import moe_layer_indices

    cfg = load_config(args.config)
    moe, batch = cfg.model.moe, cfg.data.micro_batch_size
    layers = len(moe_layer_indices(cfg.model))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(args.shards, moe, cfg.model.dim, args.tokens, batch, results), nprocs=args.shards)
    print(
        f"{args.config}: E={moe.num_experts}, top_k={moe.top_k}, dim={cfg.model.dim}, {layers} MoE layers, "
        f"micro-batch {batch} x {args.tokens} tokens over {args.shards} shards, grad_accum {cfg.train.grad_accum}"
    )
    print(f"{'router':36s} {'fwd calls':>9s} {'fwd bytes/layer':>15s} {'bwd bytes':>9s} {'MiB/step':>9s}")
    for _ in CASES:
        name, forward, backward = results.get()
        calls = sum(c for c, _ in forward.values())
        size = sum(b for _, b in forward.values())
        per_step = size * layers * cfg.train.grad_accum / 2**20
        print(f"{name:36s} {calls:9d} {size:15,d} {sum(b for _, b in backward.values()):9,d} {per_step:9.2f}")


if __name__ == "__main__":
    main()
