"""Place a trained MoE model's experts on expert-parallel ranks by co-activation (Speculative MoE's
expert grouping), and write the training checkpoint with its experts in that order.

    python launcher/place_experts.py --checkpoint CKPT --out DIR --ep-size N \
        [--calibration-batches N] [--data SHARDS] [--stats FILE] [--save-stats FILE] [--max-load-ratio R]

CKPT: a `checkpoints/step_*` directory written by launcher/pretrain.py (any parallel layout).
For each MoE layer the experts that calibration tokens select together are grouped onto the same
rank of an expert-parallel group of N ranks (E/N experts each; per-rank token load at most R x the
mean, or the current placement's imbalance if that is worse), see megamoe/posttrain/placement.py.
Statistics come from --calibration-batches batches of the run's training data, or from --stats
(gathered on this very checkpoint, e.g. an earlier --save-stats).

DIR is a complete checkpoint (same format): every tensor indexed by expert is permuted (module
weights, fp32 master weights, both Adam moments, the EMA, the routers' gate rows, aux-free bias,
prototypes, DiffMoE's capacity-predictor rows and threshold) in state/, weights/ and ema_weights/;
meta.json records the permutation. Timestep-band experts are refused: an expert's index is its noise band. The model
computes the same function, and training continues from it as from CKPT:

    torchrun --nproc-per-node N launcher/pretrain.py --config ... parallel.expert_parallel_size=N --resume DIR

(a run resumed from DIR writes its own checkpoints to train.output_dir, as any --resume does).
Printed per layer: the expected distinct ranks a token's experts span, remote assignments per
token, the load per rank, and the all-to-all bytes per step, before -> after, for the current
dispatcher (one row per (token, expert) assignment, which the placement does not change) and for
a dispatcher that sends a token once per destination rank.

Bad input prints one line `error: ...` on stderr, exits with code 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a training checkpoint directory (checkpoints/step_*)")
    p.add_argument("--out", required=True, help="new checkpoint directory (absent or empty)")
    p.add_argument("--ep-size", type=int, required=True, help="expert-parallel ranks to place the experts on")
    p.add_argument(
        "--calibration-batches", type=int, default=None, help="training batches to gather statistics on (default 8)"
    )
    p.add_argument("--data", default=None, help="latent shards to calibrate on instead of the run's data")
    p.add_argument("--stats", help="routing statistics of this checkpoint (from --save-stats) instead of gathering")
    p.add_argument("--save-stats", help="write the gathered routing statistics to this file")
    p.add_argument(
        "--max-load-ratio",
        type=float,
        default=None,
        help="bound on max rank load / mean rank load (default 1.10; the current placement's, if worse)",
    )
    return p.parse_args(argv)


def row_bytes(cfg) -> int:
    """Bytes of one token row in the all-to-all: model dim x the training dtype."""
    return cfg.model.dim * (2 if cfg.train.precision == "bf16" else 4)


def step_bytes(remote_rows: float, remote_assignments: float, tokens: int, cfg) -> float:
    """All-to-all bytes one EP group moves per optimizer step (forward and backward, all ranks):
    token rows out and back (dispatch, combine) and their gradients (4 row transfers per remote
    row), plus the fp32 routing weight of every remote assignment and its gradient."""
    return tokens * (4 * remote_rows * row_bytes(cfg) + 2 * 4 * remote_assignments)


def tokens_per_step(model, cfg, ep_size: int, data: str | None = None) -> int:
    """Video tokens one EP group processes per optimizer step: EP ranks x micro-batch x grad_accum."""
    from megamoe.posttrain.evaluation import video_tokens
    from megamoe.posttrain.trained_model import data_batches

    latents, _ = data_batches(cfg, 1, path=data)[0]
    per_sample = video_tokens(model, latents) // latents.shape[0]
    return ep_size * cfg.data.micro_batch_size * cfg.train.grad_accum * per_sample


def write_placed_checkpoint(checkpoint: Path, out: Path, perms: dict, num_experts: int, record: dict) -> None:
    """Write CKPT with the experts of each layer in the order perms[block] into the (empty) directory `out`."""
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter

    from megamoe.model.weights import INDEX_NAME, read_state_dict
    from megamoe.parallel.sharded_weights import shard_file_name
    from megamoe.posttrain.placement import permute_state
    from megamoe.train.checkpoint import STATE_DIR, inspect_checkpoint
    from megamoe.train.sharded_state import stored_shapes

    meta = inspect_checkpoint(checkpoint)
    perms = {b: torch.as_tensor(p) for b, p in perms.items()}
    done = set()
    # state/: every tensor in full, permuted, written as one DCP safetensors file (readable at any layout)
    stored = stored_shapes(checkpoint / STATE_DIR)
    state = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in stored.items()}
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(checkpoint / STATE_DIR)), no_dist=True)
    state = {k: v.contiguous() for k, v in permute_state(state, perms, num_experts).items()}
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(out / STATE_DIR), save_distributed=True), no_dist=True)
    done.add(STATE_DIR)
    del state
    # weights/ and ema_weights/: diffusers layout, one shard and its index, config.json as it was
    for folder in ("weights", "ema_weights"):
        source = checkpoint / folder
        if not source.is_dir():
            continue
        tensors = {k: v.contiguous() for k, v in permute_state(read_state_dict(source), perms, num_experts).items()}
        (out / folder).mkdir()
        name = shard_file_name(0, 1)
        save_file(tensors, str(out / folder / name), metadata={"format": "pt"})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict.fromkeys(sorted(tensors), name)}
        (out / folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        shutil.copy2(source / "config.json", out / folder / "config.json")
        done.add(folder)
    # everything else (rank files: step, data position, RNG) is copied as it is
    for rel in meta["files"]:
        if rel.split("/", 1)[0] not in done:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(checkpoint / rel, out / rel)
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    history = list(meta.get("expert_placement", []))
    meta.update(files=files, expert_placement=[*history, record])
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def _fmt_load(load) -> str:
    return "[" + " ".join(f"{x:.3f}" for x in load) + "]"


def main(argv=None) -> int:
    args = parse_args(argv)
    from megamoe.posttrain import placement
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

    checkpoint, out = Path(args.checkpoint), Path(args.out)
    try:
        check_output_directory(out)
        check_new_file(args.save_stats, "--save-stats")
        refuse_unread(args, calibration_batches=None, data=None)
        if args.calibration_batches is not None and args.calibration_batches < 1:
            raise PostTrainError(f"--calibration-batches must be >= 1, got {args.calibration_batches}")
        ratio = placement.DEFAULT_MAX_LOAD_RATIO if args.max_load_ratio is None else args.max_load_ratio
        if ratio < 1:
            raise PostTrainError(f"--max-load-ratio must be >= 1 (max rank load / mean), got {ratio}")
        why = "its router columns are not its experts; place the experts before merging"
        model, cfg = load_trained_model(checkpoint, refuse_merged=why, refuse_routers=placement.UNPLACEABLE_ROUTERS)
        num_experts = cfg.model.moe.num_experts
        if args.ep_size < 1 or num_experts % args.ep_size:
            raise PostTrainError(
                f"--ep-size {args.ep_size} does not divide model.moe.num_experts={num_experts}; "
                f"choose a divisor of {num_experts}"
            )
        if args.stats:
            stats = load_routing_stats(args.stats, model)
        else:
            calibration = data_batches(cfg, args.calibration_batches or 8, path=args.data)
            stats = collect_routing_stats(model, calibration, cfg)
        tokens = tokens_per_step(model, cfg, args.ep_size, args.data)
    except PostTrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    ep = args.ep_size
    pinned = placement.pinned_experts(cfg.model.moe.router, num_experts)
    identity = list(range(num_experts))
    perms, totals = {}, {"assign": [0.0, 0.0], "dedup": [0.0, 0.0]}
    print(
        f"placing {num_experts} experts per layer on {ep} ranks ({num_experts // ep} each) from "
        f"{stats.num_tokens} calibration tokens; bytes: one EP group's all-to-all per optimizer step "
        f"({tokens} tokens, forward + backward)"
    )
    for block, s in stats.layers.items():
        perm = placement.place_layer(s.coactivation, ep, ratio, pinned=pinned)
        perms[block] = perm.tolist()
        before = placement.placement_figures(s.coactivation, s.num_tokens, identity, ep)
        after = placement.placement_figures(s.coactivation, s.num_tokens, perm, ep)
        assign = [step_bytes(f.remote_assignments, f.remote_assignments, tokens, cfg) for f in (before, after)]
        dedup = [step_bytes(f.remote_rank_sends, f.remote_assignments, tokens, cfg) for f in (before, after)]
        for i in range(2):
            totals["assign"][i] += assign[i]
            totals["dedup"][i] += dedup[i]
        print(f"layer {block}: permutation {perms[block]}")
        print(f"  distinct ranks per token   {before.distinct_ranks:.4f} -> {after.distinct_ranks:.4f}")
        print(f"  remote assignments / token {before.remote_assignments:.4f} -> {after.remote_assignments:.4f}")
        print(f"  remote rank sends / token  {before.remote_rank_sends:.4f} -> {after.remote_rank_sends:.4f}")
        print(
            f"  load per rank              {_fmt_load(before.rank_load)} -> {_fmt_load(after.rank_load)} "
            f"(max/mean {before.imbalance:.3f} -> {after.imbalance:.3f})"
        )
        print(f"  bytes/step, per-assignment {assign[0] / 1e6:.3f} MB -> {assign[1] / 1e6:.3f} MB")
        print(f"  bytes/step, per-rank dedup {dedup[0] / 1e6:.3f} MB -> {dedup[1] / 1e6:.3f} MB")
    for name, label in (("assign", "per-assignment (current dispatcher)"), ("dedup", "per-rank dedup dispatcher")):
        b, a = totals[name]
        print(f"total bytes/step, {label}: {b / 1e6:.3f} MB -> {a / 1e6:.3f} MB ({(b - a) / max(b, 1e-300):.1%} less)")

    record = {"ep_size": ep, "max_load_ratio": ratio, "source": str(checkpoint), "permutation": perms}
    try:
        with output_directory(out) as tmp:
            write_placed_checkpoint(checkpoint, tmp, perms, num_experts, record)
        if args.save_stats:
            save_routing_stats(stats, args.save_stats)
    except PostTrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {out}; continue training with --resume {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
