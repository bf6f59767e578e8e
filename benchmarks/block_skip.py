"""What Dr.LLM block routers save on a trained model, and what it costs in validation loss.

For each budget: search path labels on `--search-batches` held-out batches (megamoe.tools.block_path_search),
train the routers on them (megamoe.posttrain.block_routers, base frozen), then on the next `--eval-batches`
held-out batches compare the routed model with the plain one: block runs per sample, validation loss
(fixed noise levels and noise), forward FLOPs per sample (closed form: block_flops per block run plus the
routers' MLPs, and the stem and head counted once by FlopCounterMode) and the CPU time of one forward of a
held-out batch at s=0.5 (median of --repeats, the two models interleaved, in this one process).

    python benchmarks/block_skip.py --checkpoint outputs/tiny/checkpoints/step_00001800 --budgets 1.0 0.75 0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megamoe.config import BlockRouterConfig  # noqa: E402
from megamoe.diffusion.flow import TIMESTEP_SCALE, interpolate  # noqa: E402
from megamoe.model.block_routing import block_flops, fixed_paths, router_flops  # noqa: E402
from megamoe.model.dit import build_model  # noqa: E402
from megamoe.posttrain.block_routers import fit_routers, routed_figures  # noqa: E402
from megamoe.posttrain.evaluation import NOISE_LEVELS, video_tokens  # noqa: E402
from megamoe.posttrain.trained_model import data_batches  # noqa: E402
from megamoe.tools.block_path_search import load_routed_model, search_labels  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a dense base checkpoint of launcher/pretrain.py")
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.75, 0.5])
    p.add_argument("--search-batches", type=int, default=1)
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--draws", type=int, default=1, help="noise draws per search example")
    p.add_argument("--rounds", type=int, default=4, help="local-improvement rounds of the search")
    p.add_argument("--steps", type=int, default=300, help="router training steps")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--repeats", type=int, default=9, help="timed forwards of each model")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed by other work)")
    return p.parse_args(argv)


@torch.no_grad()
def stem_and_head_flops(model, latents, text) -> float:
    """FLOPs per sample outside the blocks: the forward with every block skipped (math attention backend,
    whose products FlopCounterMode counts; it does not count the CPU flash kernel)."""
    counter = FlopCounterMode(display=False)
    s = torch.full((len(latents),), 0.5)
    with counter, sdpa_kernel(SDPBackend.MATH), fixed_paths(model, torch.zeros(len(model.blocks), dtype=torch.long)):
        model(latents, s * TIMESTEP_SCALE, text)
    return counter.get_total_flops() / len(latents)


@torch.no_grad()
def forward_seconds(plain, routed, latents, text, repeats: int) -> tuple[float, float]:
    """Median seconds of one forward of each model on the batch at s=0.5, interleaved."""
    s = torch.full((len(latents),), 0.5)
    x = interpolate(latents, torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)), s)
    times = {"plain": [], "routed": []}
    for _ in range(repeats + 1):  # the first round warms up
        for name, model in (("plain", plain), ("routed", routed)):
            start = time.perf_counter()
            model(x, s * TIMESTEP_SCALE, text)
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["plain"][1:]), statistics.median(times["routed"][1:])


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for budget in args.budgets:
        model, cfg = load_routed_model(args.checkpoint, [f"model.block_router.budget={budget}"])
        m = cfg.model
        batches = data_batches(cfg, args.search_batches + args.eval_batches, held_out=True)
        searched, held_out = batches[: args.search_batches], batches[args.search_batches :]
        started = time.perf_counter()
        labels = search_labels(model, searched, NOISE_LEVELS, seed=0, draws=args.draws, rounds=args.rounds)
        search_s = time.perf_counter() - started
        history, _ = fit_routers(model, labels["paths"], searched, NOISE_LEVELS, 0, args.draws, args)
        figures = routed_figures(model, held_out, NOISE_LEVELS)

        plain = build_model(dataclasses.replace(m, block_router=BlockRouterConfig()), initialize=False)
        plain.load_state_dict(model.state_dict(), strict=False)
        plain.eval()
        latents, text = held_out[0]
        tokens = video_tokens(model, latents[:1])
        per_block = block_flops(m, tokens, text.shape[1])
        outside = stem_and_head_flops(model, latents, text)
        runs = figures["runs_per_sample"]
        flops_plain = outside + m.num_layers * per_block
        flops_routed = outside + runs * per_block + m.num_layers * router_flops(m)
        t_plain, t_routed = forward_seconds(plain, model, latents, text, args.repeats)
        row = {
            "budget": budget,
            "label_runs": float(labels["paths"].float().sum(-1).mean()),
            "label_dloss": float((labels["loss"] - labels["loss_plain"]).mean()),
            "runs": runs,
            "loss_plain": figures["loss_plain"]["mean"],
            "loss_routed": figures["loss_routed"]["mean"],
            "flops_ratio": flops_routed / flops_plain,
            "time_ratio": t_routed / t_plain,
            "t_plain_ms": 1e3 * t_plain,
            "t_routed_ms": 1e3 * t_routed,
            "router_loss": (history[0], history[-1]),
            "search_s": search_s,
            "by_level": figures["runs_per_sample_by_level"],
        }
        rows.append(row)
        print(row, flush=True)
    n = cfg.model.num_layers
    print(f"\n{n} blocks; held-out batches of {len(held_out[0][0])} samples; {tokens} tokens per sample\n")
    print(
        "| budget | label runs (searched) | label dloss | routed runs (held out) | layers saved | "
        "val loss plain | val loss routed | dloss | FLOPs routed/plain | CPU time routed/plain |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['budget']:g} | {r['label_runs']:.2f} | {r['label_dloss']:+.4f} | {r['runs']:.2f} | "
            f"{n - r['runs']:.2f} | {r['loss_plain']:.4f} | {r['loss_routed']:.4f} | "
            f"{r['loss_routed'] - r['loss_plain']:+.4f} | {r['flops_ratio']:.3f} | {r['time_ratio']:.3f} "
            f"({r['t_routed_ms']:.1f} / {r['t_plain_ms']:.1f} ms) |"
        )
    for r in rows:
        print(f"budget {r['budget']:g}: routed runs per sample by level {r['by_level']}")


if __name__ == "__main__":
    main()
