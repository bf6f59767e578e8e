"""Merge a trained MoE checkpoint's experts, MC-SMoE style (see megamoe/posttrain/merging.py).

    python launcher/merge_experts.py --checkpoint CKPT --out DIR --experts-per-layer K \
        [--calibration-batches N] [--val-batches N] [--data SHARDS] [--val-data SHARDS] \
        [--stats FILE] [--save-stats FILE] [--weights model|ema] [--seed N]

CKPT: a checkpoint directory written by launcher/pretrain.py (`<output_dir>/checkpoints/step_*`).
Each MoE layer keeps its K most frequently routed experts (on N calibration batches of the run's
data) as the dominant ones; every other expert joins the dominant expert its router-logit column
is most similar to, is aligned to it (hidden units permuted) and averaged in, weighted by routing
frequency. The router is kept: the merged model's config says model.moe.merged_from=E, and each
layer's expert_map sends a token that chose any member of a group to the group's expert.
Timestep-band experts are refused: the groups would mix experts of different noise bands.

DIR receives config.json (with the moe section) + diffusion_pytorch_model.safetensors, complete or
not at all. The tool prints the held-out validation loss (mean and per noise level), parameter
bytes, FLOPs and experts per token before and after, and the overrides to train from DIR.
--stats reuses routing statistics saved with --save-stats (refused unless gathered on this
very model). Bad input prints one line on stderr and exits with code 2, writing nothing.
"""

from __future__ import annotations

import argparse
import sys
import time

EXIT_BAD_INPUT = 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory written by launcher/pretrain.py")
    p.add_argument("--out", required=True, help="output directory for the merged model (absent or empty)")
    p.add_argument("--experts-per-layer", type=int, required=True, help="K: experts each MoE layer keeps")
    p.add_argument(
        "--calibration-batches", type=int, default=None, help="batches of the run's data for the stats (default 16)"
    )
    p.add_argument("--val-batches", type=int, default=8, help="held-out batches for the validation loss")
    p.add_argument("--data", default=None, help="latent shards to calibrate on instead of the run's data")
    p.add_argument(
        "--val-data", default=None, help="held-out latent shards (default: the embedded data's held-out split)"
    )
    p.add_argument("--stats", default=None, help="routing statistics saved by --save-stats (instead of gathering)")
    p.add_argument("--save-stats", default=None, help="write the gathered routing statistics to this file")
    p.add_argument("--weights", choices=["model", "ema"], default="model", help="which weights of the checkpoint")
    p.add_argument("--seed", type=int, default=None, help="seed of the calibration noise (default 0)")
    return p.parse_args(argv)


def _figures(model, held_out, cfg) -> dict:
    from megamoe.posttrain.evaluation import flops_per_token, parameter_bytes, validation_loss

    return {
        "loss": validation_loss(model, held_out),
        "bytes": parameter_bytes(model),
        "flops": flops_per_token(model, held_out),
        "experts": experts_per_token(model, held_out, cfg),
    }


def experts_per_token(model, batches, cfg) -> float:
    """Real experts computed per token (a merged layer counts a group once), mean over the MoE layers."""
    from megamoe.posttrain.routing_stats import collect_routing_stats

    stats = collect_routing_stats(model, batches, cfg, sample_tokens=1)
    return sum(s.experts_per_token for s in stats.layers.values()) / len(stats.layers)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megamoe.model.weights import write_diffusers_weights
    from megamoe.posttrain.merging import UNMERGEABLE_ROUTERS, check_budget, merge_model, plan_merge
    from megamoe.posttrain.routing_stats import collect_routing_stats, load_routing_stats, save_routing_stats
    from megamoe.posttrain.trained_model import (
        PostTrainError,
        check_new_file,
        check_output_directory,
        data_batches,
        load_trained_model,
        output_directory,
        refuse_unread,
    )

    start = time.monotonic()
    try:
        check_output_directory(args.out)
        check_new_file(args.save_stats, "--save-stats")
        refuse_unread(args, calibration_batches=None, seed=None, data=None)
        for name in ("calibration_batches", "val_batches"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise PostTrainError(f"{flag} must be >= 1, got {getattr(args, name)}")
        model, cfg = load_trained_model(args.checkpoint, args.weights, refuse_routers=UNMERGEABLE_ROUTERS)
        moe = cfg.model.moe
        if moe.merged_from:
            raise PostTrainError(
                f"checkpoint '{args.checkpoint}' is already merged (model.moe.merged_from={moe.merged_from}); "
                f"merge the checkpoint it was trained from"
            )
        check_budget(moe.num_experts, moe.top_k, args.experts_per_layer, cfg.parallel.expert_parallel_size)
        if args.stats:
            stats = load_routing_stats(args.stats, model)
        else:
            calibration = data_batches(cfg, args.calibration_batches or 16, path=args.data)
            stats = collect_routing_stats(model, calibration, cfg, seed=args.seed or 0)
        held_out = data_batches(cfg, args.val_batches, held_out=True, path=args.val_data)
    except PostTrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    plan = plan_merge(stats, args.experts_per_layer)
    merged = merge_model(model, plan)
    before, after = _figures(model, held_out, cfg), _figures(merged, held_out, cfg)
    with output_directory(args.out) as tmp:
        write_diffusers_weights(merged.state_dict(), merged.cfg, tmp)
    if args.save_stats:  # last: a run that fails writes nothing
        save_routing_stats(stats, args.save_stats)

    k, e = args.experts_per_layer, moe.num_experts
    print(f"merged {e} -> {k} experts per layer (MC-SMoE) from {args.checkpoint} -> {args.out}")
    for block, p in plan.items():
        print(f"  block {block}: groups {p.groups()}")
    print(f"{'':24}{'before':>14}{'after':>14}")
    for key in before["loss"]:
        print(f"{'validation_loss ' + key:24}{before['loss'][key]:>14.5f}{after['loss'][key]:>14.5f}")
    for key in ("total", "experts"):
        print(f"{'parameter_bytes ' + key:24}{before['bytes'][key]:>14,}{after['bytes'][key]:>14,}")
    print(f"{'flops_per_token':24}{before['flops']:>14,.0f}{after['flops']:>14,.0f}")
    print(f"{'experts_per_token':24}{before['experts']:>14.3f}{after['experts']:>14.3f}")
    print(f"wall time {time.monotonic() - start:.1f} s")
    print(f"train from it with: train.init_from={args.out} model.moe.num_experts={k} model.moe.merged_from={e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
