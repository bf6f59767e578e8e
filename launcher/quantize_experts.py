"""Quantize a trained MoE model's routed experts at mixed bit-widths by importance (MC#), optionally
with top-any pruning, and report held-out loss, stored bytes and FLOPs before and after.

    python launcher/quantize_experts.py --checkpoint CKPT --out DIR --bits-budget 3.0 \
        [--group-size 128] [--calibration-batches 16] [--val-batches 8] [--data SHARDS] [--val-data SHARDS] \
        [--stats FILE] [--save-stats FILE] \
        [--top-any [--prune-weight 0.02] [--prune-steps 200] [--prune-lr 0.01]] [--weights model|ema]
    python launcher/quantize_experts.py --evaluate DIR [--val-batches 8] [--val-data SHARDS]

--bits-budget: average stored bits per routed-expert weight (w1, w2), fp16 scale and offset per
group included; from 2 + 32 / group-size (every expert at 2 bits) to 8 + 32 / group-size (every
expert at 8 bits). Each expert gets 2, 3, 4 or 8 bits, chosen jointly over all MoE layers by a MILP
(see megamoe/posttrain/quantization.py) from its error on the calibration tokens that computed it
(a merged model's experts as the layer holds them, not its router columns).
--stats FILE skips the calibration pass (no --data or --calibration-batches then, unless --top-any
trains its masks on them); --save-stats FILE is written only once DIR is complete.
DIR holds the packed experts, the other weights as they were and the run config; load it with
megamoe.posttrain.quantization.load_quantized(DIR) (an fp32 model with dequantized experts and the
top-any routers installed); launcher/sample.py --checkpoint DIR samples from it.
Bad input prints one line `error: ...` and exits with code 2, writing nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from pathlib import Path

EXIT_BAD_INPUT = 2
DEFAULT_GROUP_SIZE = 128
DEFAULT_CALIBRATION_BATCHES = 16
PRUNE_DEFAULTS = {"prune_weight": 0.02, "prune_steps": 200, "prune_lr": 0.01}
"""The top-any settings, resolved only with --top-any (given without it they are refused)."""
EVALUATE_IGNORES = (
    "checkpoint",
    "out",
    "bits_budget",
    "group_size",
    "calibration_batches",
    "data",
    "stats",
    "save_stats",
    "weights",
    "top_any",
    *PRUNE_DEFAULTS,
)
"""Flags that --evaluate DIR would not read (the directory holds its own config and widths)."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="MoE checkpoint written by launcher/pretrain.py")
    p.add_argument("--out", help="output directory (absent or empty)")
    p.add_argument("--bits-budget", type=float, help="average stored bits per expert weight, scales included")
    p.add_argument(
        "--group-size", type=int, default=None, help=f"input rows per quantization group (default {DEFAULT_GROUP_SIZE})"
    )
    p.add_argument(
        "--calibration-batches",
        type=int,
        default=None,
        help=f"training batches for the statistics and the top-any masks (default {DEFAULT_CALIBRATION_BATCHES})",
    )
    p.add_argument("--val-batches", type=int, default=8, help="held-out batches for the validation loss")
    p.add_argument("--data", default=None, help="latent shards to calibrate on instead of the run's data")
    p.add_argument(
        "--val-data", default=None, help="held-out latent shards (default: the embedded data's held-out split)"
    )
    p.add_argument("--stats", help="routing statistics gathered on this checkpoint (--save-stats of an earlier run)")
    p.add_argument(
        "--save-stats", help="write the routing statistics gathered here to this new file (once --out is complete)"
    )
    p.add_argument(
        "--weights", choices=["model", "ema"], default=None, help="which weights of the checkpoint (default model)"
    )
    p.add_argument("--top-any", action="store_true", help="also train a per-token top-any pruning mask")
    p.add_argument(
        "--prune-weight",
        type=float,
        default=None,
        help=f"with --top-any: penalty on the kept fraction of experts (default {PRUNE_DEFAULTS['prune_weight']})",
    )
    p.add_argument(
        "--prune-steps",
        type=int,
        default=None,
        help=f"with --top-any: mask training steps, the model frozen (default {PRUNE_DEFAULTS['prune_steps']})",
    )
    p.add_argument(
        "--prune-lr",
        type=float,
        default=None,
        help=f"with --top-any: Adam learning rate of the masks (default {PRUNE_DEFAULTS['prune_lr']})",
    )
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


def _flags(names) -> str:
    return ", ".join("--" + n.replace("_", "-") for n in names)


def check_arguments(args) -> None:
    """Refuse bad or ignored flags before any work (PostTrainError); resolve the defaults that depend
    on other flags. What needs the model (the group size against its dimensions, the budget's range)
    is checked in `run` once it is loaded."""
    from megamoe.posttrain.trained_model import PostTrainError, check_output_directory

    if args.evaluate:
        ignored = [n for n in EVALUATE_IGNORES if getattr(args, n) not in (None, False)]
        if ignored:
            raise PostTrainError(
                f"--evaluate DIR reads the directory's own model and settings: {_flags(ignored)} would be ignored; "
                f"drop {'it' if len(ignored) == 1 else 'them'}"
            )
        if args.val_batches < 1:
            raise PostTrainError(f"--val-batches must be >= 1, got {args.val_batches}")
        return
    for flag in ("checkpoint", "out", "bits_budget"):
        if getattr(args, flag) is None:
            raise PostTrainError(f"--{flag.replace('_', '-')} is required (or pass --evaluate DIR)")
    if not math.isfinite(args.bits_budget):
        raise PostTrainError(f"--bits-budget must be a finite number of bits, got {args.bits_budget}")
    prune = [n for n in PRUNE_DEFAULTS if getattr(args, n) is not None]
    if prune and not args.top_any:
        raise PostTrainError(f"{_flags(prune)} only apply with --top-any; add --top-any or drop them")
    if args.stats and not args.top_any:
        unread = [n for n in ("data", "calibration_batches") if getattr(args, n) is not None]
        if unread:
            raise PostTrainError(
                f"{_flags(unread)} would not be read: --stats replaces the calibration pass (only --top-any "
                f"trains on calibration data); drop {'it' if len(unread) == 1 else 'them'}"
            )
    args.group_size = DEFAULT_GROUP_SIZE if args.group_size is None else args.group_size
    args.weights = args.weights or "model"
    if args.calibration_batches is None:
        args.calibration_batches = DEFAULT_CALIBRATION_BATCHES
    if args.top_any:
        for name, default in PRUNE_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
    if args.group_size < 1:
        raise PostTrainError(f"--group-size must be >= 1, got {args.group_size}")
    if min(args.calibration_batches, args.val_batches) < 1:
        raise PostTrainError("--calibration-batches and --val-batches must be >= 1")
    if args.top_any and (args.prune_steps < 1 or args.prune_weight < 0):
        raise PostTrainError("--prune-steps must be >= 1 and --prune-weight >= 0 with --top-any")
    if args.save_stats:
        path = Path(args.save_stats)
        if path.exists():
            raise PostTrainError(f"--save-stats '{path}' already exists; choose a new file (nothing is overwritten)")
        if not path.parent.is_dir():
            raise PostTrainError(
                f"--save-stats '{path}': the directory '{path.parent}' does not exist; create it or choose another path"
            )
        if path.resolve().is_relative_to(Path(args.out).resolve()):
            raise PostTrainError(f"--save-stats '{path}' lies inside --out '{args.out}'; choose a path outside it")
    check_output_directory(args.out)


def check_budget(model, args) -> None:
    """The group size divides every expert matrix's rows (checked first: the budget's range depends
    on it), and the budget lies between every expert at 2 bits and every expert at 8 bits."""
    from megamoe.posttrain.quantization import (
        BIT_WIDTHS,
        GROUP_OVERHEAD_BITS,
        check_model_group_size,
        maximum_average_bits,
        minimum_average_bits,
    )
    from megamoe.posttrain.trained_model import PostTrainError

    check_model_group_size(model, args.group_size)
    scales = f"plus a {GROUP_OVERHEAD_BITS}-bit fp16 scale and offset per group of {args.group_size}"
    floor = minimum_average_bits(model, args.group_size)
    if args.bits_budget < floor:
        raise PostTrainError(
            f"--bits-budget {args.bits_budget} is below the minimum {floor:g} (every expert at {min(BIT_WIDTHS)} "
            f"bits {scales}); raise it"
        )
    ceiling = maximum_average_bits(model, args.group_size)
    if args.bits_budget > ceiling:
        raise PostTrainError(
            f"--bits-budget {args.bits_budget} is above the maximum {ceiling:g} (every expert at {max(BIT_WIDTHS)} "
            f"bits {scales}); lower it"
        )


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
        apply_plan,
        expert_weight_count,
        load_quantized,
        plan_bit_widths,
        stored_parameter_bytes,
        write_quantized,
    )
    from megamoe.posttrain.routing_stats import collect_routing_stats, load_routing_stats, save_routing_stats
    from megamoe.posttrain.trained_model import data_batches, load_trained_model, output_directory
    from megamoe.train.checkpoint import inspect_checkpoint

    check_arguments(args)
    if args.evaluate:
        return evaluate(args.evaluate, args.val_batches, args.val_data)
    start = time.time()
    model, cfg = load_trained_model(args.checkpoint, args.weights)
    check_budget(model, args)
    config_text = inspect_checkpoint(args.checkpoint)["config"]
    if args.stats:
        stats = load_routing_stats(args.stats, model)
        calibration = data_batches(cfg, args.calibration_batches, path=args.data) if args.top_any else None
    else:
        calibration = data_batches(cfg, args.calibration_batches, path=args.data)
        stats = collect_routing_stats(model, calibration, cfg)
    held_out = data_batches(cfg, args.val_batches, held_out=True, path=args.val_data)
    plan = plan_bit_widths(model, stats, args.bits_budget, args.group_size)
    before = report("before (fp32)", model, held_out)
    with output_directory(args.out) as tmp:
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
    if args.save_stats:  # only once the output directory is complete
        save_routing_stats(stats, args.save_stats)
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
