"""Activation memory and step time with and without activation checkpointing (`train.activation_checkpointing`).

    python benchmarks/activation_memory.py [--config configs/tiny_moe.yaml] [key=value ...]

For each setting (none = the baseline, every_2, all), in a fresh process each:
  saved     bytes kept for backward by one forward (SavedActivationMeter: autograd's saved tensors plus
            the inputs checkpointed blocks hold, unique storages, parameters excluded)
  planned   the planner's figure for the same (megamoe/tools/layout_planner.py), to compare with `saved`
  rss       peak resident memory during one forward + backward minus the resident memory before it
and prints each as a ratio to the baseline measured in the same run. Step time is not measured: on
the shared 2-core machine of RESULTS.md, repeated runs of one setting differed by up to 4x.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

SETTINGS = ("none", "every_2", "all")


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(config: str, overrides: list[str], spec: str) -> dict:
    import torch

    from megamoe.config import load_config
    from megamoe.model.activation_checkpointing import SavedActivationMeter, apply_activation_checkpointing
    from megamoe.model.dit import build_model, count_parameters
    from megamoe.tools.layout_planner import make_plan

    cfg = load_config(config, [*overrides, f"train.activation_checkpointing={spec}"])
    plan = make_plan(cfg, world=1)
    m, b = cfg.model, cfg.data.micro_batch_size
    torch.manual_seed(0)
    model = build_model(m)
    with torch.no_grad():
        model.proj_out.weight.normal_(0, 0.02)
    apply_activation_checkpointing(model, spec)
    gen = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(b, m.in_channels, *plan.latent, generator=gen),
        torch.rand(b, generator=gen) * 1000,
        torch.randn(b, cfg.data.text_len, m.text_dim, generator=gen),
    )

    for p in model.parameters():  # gradients exist before the RSS baseline: only activations count
        p.grad = torch.zeros_like(p)
    before = current_rss()
    model(*inputs).square().mean().backward()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # peak of this process
    with SavedActivationMeter(model) as meter:
        model(*inputs)
    return {
        "saved": meter.bytes,
        "planned": plan.activations_by_checkpointing[spec][0],
        "rss": rss,
        "tokens": plan.tokens_per_sample * b,
        "params": count_parameters(model),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny_moe.yaml")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: measure one setting
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args.config, args.overrides, args.one)))
        return
    results = {}
    for spec in SETTINGS:
        out = subprocess.run(
            [sys.executable, __file__, "--config", args.config, "--one", spec, *args.overrides],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        results[spec] = json.loads([line for line in out.splitlines() if line.startswith("RESULT ")][-1][7:])
    base = results["none"]
    print(
        f"{args.config} {' '.join(args.overrides)}: {base['params'] / 1e6:.2f}M parameters, "
        f"{base['tokens']} tokens per micro-batch, fp32, {os.cpu_count()} CPU cores"
    )
    print(
        f"{'checkpointing':14s} {'saved MiB':>10s} {'ratio':>6s} {'planned/saved':>14s} {'rss MiB':>8s} {'ratio':>6s}"
    )
    for spec, r in results.items():
        print(
            f"{spec:14s} {r['saved'] / 2**20:10.1f} {r['saved'] / base['saved']:6.2f} {r['planned'] / r['saved']:14.2f} "
            f"{r['rss'] / 2**20:8.1f} {r['rss'] / base['rss']:6.2f}"
        )


if __name__ == "__main__":
    main()
