"""MoE layer speed against a dense FFN of equal activated FLOPs, and against DeepSpeed's MoE.

    python benchmarks/moe_layer.py [--tokens 8192] [--dim 512] [--repeats 5]

Forward + backward, one process. For each shape (E experts, top-k, expert width w) it times:
  dense      FFN of width k * w (the FLOPs every token activates in the MoE layer)
  megamoe    MoEFeedForward, linear top-k router, dropless grouped-GEMM experts
  deepspeed  deepspeed.moe.layer.MoE with the same experts, no token dropping
and prints each as a ratio to the dense time measured in the same run. Runs are interleaved
(dense, megamoe, deepspeed, dense, ...) and the median is taken, so machine noise hits all
three alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config import MoEConfig
from megamoe.device import resolve_device, synchronize
from megamoe.moe.layer import MoEFeedForward

SHAPES = [(8, 2, 1024, 1.10), (32, 4, 256, 1.25), (64, 8, 128, 1.40)]  # E, k, width, target ratio


class DenseFFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x, ctx=None):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def deepspeed_moe(dim, width, experts, k, device, dtype):
    import deepspeed
    from deepspeed.moe.layer import MoE

    if not torch.distributed.is_initialized():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29655")
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    layer = MoE(
        hidden_size=dim,
        expert=DenseFFN(dim, width),
        num_experts=experts,
        ep_size=1,
        k=k,
        drop_tokens=False,
        use_rts=False,
    )
    return layer.to(device, dtype)


def time_step(module, x, call):
    x = x.detach().requires_grad_()
    synchronize(x.device)
    start = time.perf_counter()
    out = call(module, x)
    out.float().square().mean().backward()
    synchronize(x.device)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--no-deepspeed", action="store_true")
    args = p.parse_args()
    device = resolve_device("auto")
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(1, args.tokens, args.dim, device=device, dtype=dtype)
    print(
        f"device {device.type}, threads {torch.get_num_threads()}, tokens {args.tokens}, dim {args.dim}, "
        f"{args.dtype}, forward+backward, median of {args.repeats}"
    )
    print(f"{'E':>3} {'k':>2} {'width':>5} | {'dense ms':>9} | {'megamoe':>8} {'target':>7} | {'deepspeed':>9}")
    for experts, k, width, target in SHAPES:
        runs = {"dense": (DenseFFN(args.dim, k * width).to(device, dtype), lambda m, t: m(t))}
        moe = MoEFeedForward(args.dim, width, MoEConfig(num_experts=experts, top_k=k)).to(device, dtype)
        runs["megamoe"] = (moe, lambda m, t: m(t))
        if not args.no_deepspeed:
            runs["deepspeed"] = (deepspeed_moe(args.dim, width, experts, k, device, dtype), lambda m, t: m(t)[0])
        times = {name: [] for name in runs}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, (module, call) in runs.items():
                times[name].append(time_step(module, x, call))
        median = {name: statistics.median(t[1:]) for name, t in times.items()}
        ratio = {name: median[name] / median["dense"] for name in median}
        ds = f"{ratio['deepspeed']:8.2f}x" if "deepspeed" in ratio else "        -"
        verdict = "met" if ratio["megamoe"] <= target else "MISSED"
        print(
            f"{experts:>3} {k:>2} {width:>5} | {median['dense'] * 1e3:9.1f} | {ratio['megamoe']:7.2f}x "
            f"{'<=' + format(target, '.2f'):>7} {verdict} | {ds}"
        )


if __name__ == "__main__":
    main()
