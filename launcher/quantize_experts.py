"""Quantize a trained MoE model's routed experts at mixed bit-widths by importance (MC#), optionally
with top-any pruning, and report held-out loss, stored bytes and FLOPs before and after.

    python launcher/quantize_experts.py --checkpoint CKPT --out DIR --bits-budget 3.0 \
        [--group-size 128] [--calibration-batches 16] [--val-batches 8] [--data SHARDS] [--val-data SHARDS] \
        [--stats FILE] [--save-stats FILE] \
        [--top-any --prune-weight 0.02 --prune-steps 200] [--weights model|ema]
    python launcher/quantize_experts.py --evaluate DIR [--val-batches 8]

--bits-budget: average stored bits per routed-expert weight (w1, w2), fp16 scale and offset per
group included; the minimum is 2 + 32 / group-size (every expert at 2 bits). Each expert gets 2, 3,
4 or 8 bits, chosen jointly over all MoE layers by a MILP (see megamoe/posttrain/quantization.py).
DIR holds the packed experts, the other weights as they were and the run config; load it with
megamoe.posttrain.quantization.load_quantized(DIR) (an fp32 model with dequantized experts and the
top-any routers installed); launcher/sample.py --checkpoint DIR samples from it.
Bad input prints one line `error: ...` and exits with code 2, writing nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

EXIT_BAD_INPUT = 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="MoE checkpoint written by launcher/pretrain.py")
    p.add_argument("--out", help="output directory (must not exist)")
    p.add_argument("--bits-budget", type=float, help="average stored bits per expert weight, scales included")
    p.add_argument("--group-size", type=int, default=128, help="input rows per quantization group")
    p.add_argument("--calibration-batches", type=int, default=16, help="training batches for the statistics")
    p.add_argument("--val-batches", type=int, default=8, help="held-out batches for the validation loss")
    p.add_argument("--data", default=None, help="latent shards to calibrate on instead of the run's data")
    p.add_argument(
        "--val-data", default=None, help="held-out latent shards (default: the embedded data's held-out split)"
    )
    p.add_argument("--stats", help="routing statistics gathered on this checkpoint (--save-stats of an earlier run)")
    p.add_argument("--save-stats", help="write the routing statistics gathered here to this file")
    p.add_argument("--weights", choices=["model", "ema"], default="model", help="which weights of the checkpoint")
    p.add_argument("--top-any", action="store_true", help="also train a per-token top-any pruning mask")
    p.add_argument("--prune-weight", type=float, default=0.02, help="penalty on the kept fraction of experts")
    p.add_argument("--prune-steps", type=int, default=200, help="mask training steps (the model stays frozen)")
    p.add_argument("--prune-lr", type=float, default=0.01, help="Adam learning rate of the masks")
    p.add_argument("--evaluate", metavar="DIR", help="only evaluate a directory this tool wrote")
    return p.parse_args(argv)


def _losses(loss: dict) -> str:
    return f"mean {loss['mean']:.5f} (" + ", ".join(f"{k} {v:.5f}" for k, v in loss.items() if k != "mean") + ")"


def report(label: str, model, held_out, stored: dict | None = None) -> dict:
    from megamoe.posttrain.evaluation import flops_per_token, parameter_bytes, validation_loss
    from megamoe.posttrain.top_any import dropped_fraction, reset_counts

    reset_counts(model)
    loss = validation_loss(model, held_out)
    dropped = dropped_fraction(model)
    size = stored or parameter_bytes(model)
    flops = flops_per_token(model, held_out)
    print(f"{label}: validation loss {_losses(loss)}")
    print(
        f"{label}: parameter bytes total {size['total']:,} (experts {size['experts']:,}), "
        f"FLOPs per token {flops:,.0f}"
        + (f", dropped {dropped:.1%} of selected experts" if dropped is not None else "")
    )
    return {"loss": loss, "bytes": size, "flops": flops, "dropped": dropped}


def evaluate(directory: str, val_batches: int, val_data: str | None = None) -> int:
    from megamoe.posttrain.quantization import load_quantized, read_run_config, stored_parameter_bytes
    from megamoe.posttrain.trained_model import data_batches

    model = load_quantized(directory)
    held_out = data_batches(read_run_config(directory), val_batches, held_out=True, path=val_data)
    report("quantized", model, held_out, stored_parameter_bytes(model, directory))
    return 0


def run(args) -> int:
    from megamoe.posttrain.quantization import (
        BIT_WIDTHS,
        GROUP_OVERHEAD_BITS,
        apply_plan,
        expert_weight_count,
        load_quantized,
        plan_bit_widths,
        stored_parameter_bytes,
        write_quantized,
    )
    from megamoe.posttrain.routing_stats import collect_routing_stats, load_routing_stats, save_routing_stats
    from megamoe.posttrain.trained_model import (
        PostTrainError,
        check_output_directory,
        data_batches,
        load_trained_model,
        output_directory,
    )
    from megamoe.train.checkpoint import inspect_checkpoint

    if args.evaluate:
        return evaluate(args.evaluate, args.val_batches, args.val_data)
    for flag in ("checkpoint", "out", "bits_budget"):
        if getattr(args, flag) is None:
            raise PostTrainError(f"--{flag.replace('_', '-')} is required (or pass --evaluate DIR)")
    check_output_directory(args.out)
    if args.group_size < 1:
        raise PostTrainError(f"--group-size must be >= 1, got {args.group_size}")
    floor = min(BIT_WIDTHS) + GROUP_OVERHEAD_BITS / args.group_size
    if args.bits_budget < floor:
        raise PostTrainError(
            f"--bits-budget {args.bits_budget} is below the minimum {floor:g} (every expert at {min(BIT_WIDTHS)} bits "
            f"plus a {GROUP_OVERHEAD_BITS}-bit fp16 scale and offset per group of {args.group_size}); raise it"
        )
    if min(args.calibration_batches, args.val_batches) < 1:
        raise PostTrainError("--calibration-batches and --val-batches must be >= 1")
    if args.top_any and (args.prune_steps < 1 or args.prune_weight < 0):
        raise PostTrainError("--prune-steps must be >= 1 and --prune-weight >= 0 with --top-any")
    start = time.time()
    model, cfg = load_trained_model(args.checkpoint, args.weights)
    config_text = inspect_checkpoint(args.checkpoint)["config"]
    if args.stats:
        stats = load_routing_stats(args.stats, model)
        calibration = data_batches(cfg, args.calibration_batches, path=args.data) if args.top_any else None
    else:
        calibration = data_batches(cfg, args.calibration_batches, path=args.data)
        stats = collect_routing_stats(model, calibration, cfg)
    held_out = data_batches(cfg, args.val_batches, held_out=True, path=args.val_data)
    plan = plan_bit_widths(model, stats, args.bits_budget, args.group_size, cfg.model.moe.top_k)
    before = report("before (fp32)", model, held_out)
    with output_directory(args.out) as tmp:
        if args.save_stats:
            save_routing_stats(stats, args.save_stats)
        apply_plan(model, plan)
        write_quantized(
            model,
            config_text,
            plan,
            tmp,
            {"checkpoint": str(args.checkpoint), "weights": args.weights, "bits_budget": args.bits_budget},
        )
        if args.top_any:
            from megamoe.posttrain.top_any import install_top_any, save_top_any, train_top_any

            install_top_any(model)
            print(f"training top-any masks: {args.prune_steps} steps, prune weight {args.prune_weight}")
            train_top_any(model, cfg, calibration, args.prune_weight, args.prune_steps, lr=args.prune_lr, log=print)
            save_top_any(model, tmp / "top_any.safetensors")
        loaded = load_quantized(tmp)
    total = expert_weight_count(model)
    print(
        f"bit-widths (group size {args.group_size}, budget {args.bits_budget} -> {plan.budget_bits:,} bits, "
        f"used {plan.used_bits:,} = {plan.used_bits / total:.4f} bits per expert weight):"
    )
    for block, bits in plan.bits.items():
        print(f"  block {block}: " + " ".join(str(b) for b in bits))
    histogram = Counter(b for bits in plan.bits.values() for b in bits)
    print("  histogram: " + ", ".join(f"{b}-bit x{histogram[b]}" for b in BIT_WIDTHS))
    if args.top_any:
        from megamoe.posttrain.top_any import enable_top_any

        enable_top_any(loaded, False)
        report("quantized", loaded, held_out, stored_parameter_bytes(loaded, args.out))
        enable_top_any(loaded, True)
        after = report("quantized + top-any", loaded, held_out, stored_parameter_bytes(loaded, args.out))
    else:
        after = report("quantized", loaded, held_out, stored_parameter_bytes(loaded, args.out))
    change = after["loss"]["mean"] - before["loss"]["mean"]
    print(
        f"held-out loss change {change:+.5f} ({change / before['loss']['mean']:+.2%}); expert bytes "
        f"{before['bytes']['experts']:,} -> {after['bytes']['experts']:,}; wrote {args.out} "
        f"in {time.time() - start:.0f}s"
    )
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from megamoe.posttrain.trained_model import PostTrainError

    try:
        return run(args)
    except PostTrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
