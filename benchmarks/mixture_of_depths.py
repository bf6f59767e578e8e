"""What mixture-of-depths blocks save: FLOPs and CPU time against the plain model, in one run.

The model of a config file is built twice from the same seed, plain and with `model.mod.layers`
routed at `--capacity`; both see the same batches. Printed:

- FLOPs per forward of the transformer blocks, analytic (mixture_of_depths.block_flops and
  routed_block_flops, from the shapes), and of the whole model as torch's FlopCounterMode counts it
  (attention computed as explicit products so that it is counted);
- the same block FLOPs at `--big-config`'s shape for a 720p clip (27,280 tokens, text 512),
  routed at the same layers and capacity (analytic only);
- the median CPU time (this process's, all its threads) of a training step (forward + backward)
  and of an eval forward (threshold routing, after one training forward has set the thresholds),
  interleaved plain / routed over `--repeats` rounds after a warm-up round, and the routed / plain
  ratios.

    python benchmarks/mixture_of_depths.py --config configs/tiny.yaml --layers all --capacity 0.5 \
        --batch 4 --frames 5 --size 32 --repeats 10
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megamoe.config import MixtureOfDepthsConfig, load_config  # noqa: E402
from megamoe.model.dit import build_model  # noqa: E402
from megamoe.model.mixture_of_depths import block_flops, mod_layer_indices, routed_block_flops  # noqa: E402


def math_attend(q, k, v):
    return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1) @ v


def counted_flops(model, inputs) -> int:
    """FlopCounterMode's count of one no-grad forward, with attention as explicit products."""
    kernels = [(b.attn1.attend, b.attn2.attend) for b in model.blocks]
    for b in model.blocks:
        b.attn1.attend = b.attn2.attend = math_attend
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        for b, (a1, a2) in zip(model.blocks, kernels):
            b.attn1.attend, b.attn2.attend = a1, a2
    return counter.get_total_flops()


def block_flop_ratio(model_cfg, tokens: int, text_len: int) -> tuple[float, float]:
    """(plain, routed) GFLOP per sample of the transformer blocks of `model_cfg` (its model.mod routed)."""
    routed = mod_layer_indices(model_cfg)
    plain = model_cfg.num_layers * block_flops(model_cfg.dim, model_cfg.ffn_dim, tokens, text_len)
    total = sum(
        routed_block_flops(model_cfg, tokens, text_len)
        if i in routed
        else block_flops(model_cfg.dim, model_cfg.ffn_dim, tokens, text_len)
        for i in range(model_cfg.num_layers)
    )
    return plain / 1e9, total / 1e9


def step_time(model, inputs, train: bool) -> float:
    """CPU seconds this process spends on one training step (forward + backward) or eval forward:
    on a machine shared with other work the wall clock mostly measures the wait for a core."""
    model.train(train)
    start = time.process_time()
    if train:
        model(*inputs).square().mean().backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            model(*inputs)
    return time.process_time() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--layers", default="all", help="model.mod.layers of the routed model")
    p.add_argument("--capacity", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=5, help="latent frames")
    p.add_argument("--size", type=int, default=32, help="latent height and width")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--big-config", default="configs/wan2.2_ti2v_5b.yaml", help="FLOPs only, at 720p")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = load_config(args.config)
    plain_cfg = cfg.model
    routed_cfg = dataclasses.replace(plain_cfg, mod=MixtureOfDepthsConfig(layers=args.layers, capacity=args.capacity))
    plain, routed = build_model(plain_cfg, seed=0), build_model(routed_cfg, seed=0)
    routed.load_state_dict(plain.state_dict(), strict=False)  # the same trunk; routers as drawn
    g = torch.Generator().manual_seed(0)
    m = plain_cfg
    latents = torch.randn(args.batch, m.in_channels, args.frames, args.size, args.size, generator=g)
    timestep = torch.rand(args.batch, generator=g) * 1000
    text = torch.randn(args.batch, cfg.data.text_len, m.text_dim, generator=g)
    inputs = (latents, timestep, text)
    tokens = args.frames // m.patch_size[0] * (args.size // m.patch_size[1]) * (args.size // m.patch_size[2])

    routed_blocks = mod_layer_indices(routed_cfg)
    plain_flops, routed_flops = block_flop_ratio(routed_cfg, tokens, cfg.data.text_len)
    big = load_config(args.big_config).model
    big = dataclasses.replace(big, mod=dataclasses.replace(routed_cfg.mod, layers=args.layers))
    big_flops = block_flop_ratio(big, 27_280, 512)
    counted = [counted_flops(model, inputs) / args.batch for model in (plain, routed)]

    routed.train()
    routed(*inputs)  # one training forward: the eval thresholds exist
    times = {(name, train): [] for name in ("plain", "routed") for train in (True, False)}
    for train in (True, False):  # warm-up round, not counted
        for model in (plain, routed):
            step_time(model, inputs, train)
    for _ in range(args.repeats):
        for train in (True, False):
            for name, model in (("plain", plain), ("routed", routed)):
                times[(name, train)].append(step_time(model, inputs, train))
    med = {key: statistics.median(values) for key, values in times.items()}

    print(f"config {args.config}: dim {m.dim}, {m.num_layers} blocks, routed blocks {sorted(routed_blocks)}")
    print(f"batch {args.batch} x {tokens} tokens, text {cfg.data.text_len}, capacity {args.capacity}")
    print(f"threads {torch.get_num_threads()}, repeats {args.repeats}")
    print(f"{'':32s}{'plain':>14s}{'routed':>14s}{'ratio':>8s}")
    rows = [
        ("GFLOP/sample, blocks (analytic)", plain_flops, routed_flops),
        ("GFLOP/clip, 5B 720p blocks", *big_flops),
        ("GFLOP/sample, model (counted)", counted[0] / 1e9, counted[1] / 1e9),
        ("train step CPU ms (median)", med[("plain", True)] * 1e3, med[("routed", True)] * 1e3),
        ("eval forward CPU ms (median)", med[("plain", False)] * 1e3, med[("routed", False)] * 1e3),
    ]
    for label, a, b in rows:
        print(f"{label:32s}{a:14.4f}{b:14.4f}{b / a:8.3f}")


if __name__ == "__main__":
    main()
