"""Offline search for Dr.LLM path labels: per held-out sample and noise level, the block path (skip,
execute or repeat each block) with the lowest flow loss within a compute budget.

    python -m megamoe.tools.block_path_search --checkpoint CKPT --out LABELS \
        [--batches 4] [--draws 2] [--rounds 4] [--val-data SHARDS] [--weights model|ema] \
        [--set model.block_router.budget=0.5 ...]

CKPT: a checkpoint of launcher/pretrain.py (dense or MoE), held frozen. An example is one held-out
sample at one of the fixed noise levels of posttrain/evaluation.py; its score is the velocity MSE with
`--draws` fixed noise draws (validation_noise with seeds seed .. seed + draws - 1), so every path of an
example sees exactly the same inputs. Labels are per example, not per noise-level bucket: the router
sees the sample's own hidden states as well as the noise level, so its target should depend on both.

Search (greedy, in place of Dr.LLM's MCTS): start from every block executed; while over budget, take
the single step down (execute -> skip, repeat -> execute) with the lowest loss; then improve by local
moves within the budget (one block changed to any run count, or one block down and another up) for up
to --rounds rounds, taking the best move while it lowers the loss. Budget: at most
floor(budget * num_layers) block runs per path, a repeat counting twice (model.block_router.budget).

LABELS receives labels.safetensors (paths int8 [N, levels, num_layers]; loss, loss_plain fp32
[N, levels]) and labels.json (the run config with the block_router settings, the levels, seeds, how
the held-out batches were read), complete or not at all. Bad input: one line on stderr, exit code 2.
It prints a line per searched batch with the elapsed time, and runs torch on one thread (see main).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from megamoe.config import Config, ConfigError, from_yaml_text, merge_config
from megamoe.diffusion.flow import TIMESTEP_SCALE, interpolate, velocity_target
from megamoe.model.block_routing import fixed_paths
from megamoe.posttrain.evaluation import NOISE_LEVELS
from megamoe.posttrain.trained_model import PostTrainError, check_not_model_folder, data_batches, output_directory
from megamoe.train.validation import validation_noise

EXIT_BAD_INPUT = 2
ROUTER_PREFIX = "model.block_router."


def max_runs(budget: float, num_layers: int) -> int:
    """Block runs a path may take: floor(budget * num_layers) (a repeat counts twice)."""
    return math.floor(budget * num_layers + 1e-9)


def greedy_path_search(
    score: Callable[[list[tuple[int, tuple[int, ...]]]], list[float]],
    num_examples: int,
    num_layers: int,
    runs: int,
    rounds: int = 4,
) -> tuple[list[tuple[int, ...]], list[float]]:
    """(best path, its loss) per example, by the greedy search of the module docstring.

    score: [(example, path)] -> losses, any number of rows at once (the caller batches them).
    A path is a tuple of run counts (0, 1 or 2) per block whose sum is at most `runs`. Ties keep the
    path found first; a move must lower the loss strictly.
    """
    paths = [(1,) * num_layers] * num_examples
    losses = score([(e, p) for e, p in enumerate(paths)])

    def take_best(candidates: dict[int, list[tuple[int, ...]]], must_move: bool) -> set[int]:
        rows = [(e, p) for e, options in candidates.items() for p in options]
        scores = score(rows) if rows else []
        moved, best = set(), {}
        for (e, p), loss in zip(rows, scores):
            if e not in best or loss < best[e][1]:
                best[e] = (p, loss)
        for e, (p, loss) in best.items():
            if must_move or loss < losses[e]:
                paths[e], losses[e] = p, loss
                moved.add(e)
        return moved

    while over := [e for e in range(num_examples) if sum(paths[e]) > runs]:
        take_best({e: [_changed(paths[e], i, -1) for i in range(num_layers) if paths[e][i]] for e in over}, True)
    active = set(range(num_examples))
    for _ in range(rounds):
        candidates = {e: _neighbours(paths[e], runs) for e in sorted(active)}
        active = take_best({e: c for e, c in candidates.items() if c}, False)
        if not active:
            break
    return paths, losses


def _changed(path: tuple[int, ...], i: int, delta: int) -> tuple[int, ...]:
    return path[:i] + (path[i] + delta,) + path[i + 1 :]


def _neighbours(path: tuple[int, ...], runs: int) -> list[tuple[int, ...]]:
    """Paths within budget one local move away: one block set to another run count, or one block one
    run down and another one run up."""
    found = []
    for i in range(len(path)):
        for n in range(3):
            if n != path[i]:
                found.append(path[:i] + (n,) + path[i + 1 :])
        if path[i] > 0:
            down = _changed(path, i, -1)
            found += [_changed(down, j, +1) for j in range(len(path)) if j != i and down[j] < 2]
    return [p for p in dict.fromkeys(found) if sum(p) <= runs]


def example_inputs(batches: list, levels, seed: int, draws: int) -> dict[str, torch.Tensor]:
    """The fixed inputs of every example (sample n at level j), flattened as example = n * levels + j:
    x0 [E, C, F, H, W], text [E, L_text, text_dim], level [E], noise [draws, E, C, F, H, W]."""
    latents = torch.cat([x for x, _ in batches]).float()
    text = torch.cat([t for _, t in batches]).float()
    n, k = len(latents), len(levels)
    noise = torch.stack(
        [
            torch.stack([validation_noise(seed + d, i, j, latents.shape[1:]) for i in range(n) for j in range(k)])
            for d in range(draws)
        ]
    )
    return {
        "x0": latents.repeat_interleave(k, 0),
        "text": text.repeat_interleave(k, 0),
        "level": torch.tensor(levels, dtype=torch.float32).repeat(n),
        "noise": noise,
    }


@torch.no_grad()
def path_losses(model, inputs: dict, rows: list[tuple[int, tuple[int, ...]]], chunk: int = 64) -> list[float]:
    """Velocity MSE of each (example, path) row, averaged over the noise draws: the search's score."""
    draws = inputs["noise"].shape[0]
    ids = torch.tensor([e for e, _ in rows], dtype=torch.long).repeat(draws)
    paths = torch.tensor([p for _, p in rows], dtype=torch.long).repeat(draws, 1)
    draw = torch.arange(draws).repeat_interleave(len(rows))
    out = []
    for start in range(0, len(ids), chunk):
        e, d, p = ids[start : start + chunk], draw[start : start + chunk], paths[start : start + chunk]
        x0, noise, s = inputs["x0"][e], inputs["noise"][d, e], inputs["level"][e]
        with fixed_paths(model, p):
            pred = model(interpolate(x0, noise, s), s * TIMESTEP_SCALE, inputs["text"][e])
        out.append(((pred.float() - velocity_target(x0, noise)) ** 2).flatten(1).mean(1))
    return torch.cat(out).view(draws, len(rows)).mean(0).tolist()


def search_labels(
    model,
    batches: list,
    levels=NOISE_LEVELS,
    seed: int = 0,
    draws: int = 2,
    rounds: int = 4,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Labels of every (held-out sample, level) under model.cfg.block_router.budget:
    {"paths": int8 [N, levels, num_layers], "loss": [N, levels], "loss_plain": [N, levels]}.

    The examples of one batch are searched together, batch after batch (each example's search is its
    own, so this is the search of all at once), and `progress` gets a line per batch with the elapsed time."""
    cfg = model.cfg
    start = time.perf_counter()
    inputs = example_inputs(batches, levels, seed, draws)  # every batch's, so each sample keeps its noise
    runs = max_runs(cfg.block_router.budget, cfg.num_layers)
    paths, losses, plain = [], [], []
    first = 0
    for b, (latents, _) in enumerate(batches):
        ids = range(first, first + len(latents) * len(levels))
        first = ids.stop

        def score(rows, ids=ids):
            return path_losses(model, inputs, [(ids[e], p) for e, p in rows])

        found, found_losses = greedy_path_search(score, len(ids), cfg.num_layers, runs, rounds)
        batch_plain = score([(e, (1,) * cfg.num_layers) for e in range(len(ids))])
        paths, losses, plain = paths + found, losses + found_losses, plain + batch_plain
        if progress:
            n = len(ids)
            progress(
                f"batch {b + 1}/{len(batches)}: {n} examples ({len(latents)} samples x {len(levels)} levels), "
                f"{sum(map(sum, found)) / n:.2f} of {cfg.num_layers} block runs per path, flow loss "
                f"{sum(found_losses) / n:.5f} (all blocks once {sum(batch_plain) / n:.5f}); "
                f"{time.perf_counter() - start:.0f} s elapsed"
            )
    shape = (len(paths) // len(levels), len(levels))
    return {
        "paths": torch.tensor(paths, dtype=torch.int8).view(*shape, cfg.num_layers),
        "loss": torch.tensor(losses, dtype=torch.float32).view(shape),
        "loss_plain": torch.tensor(plain, dtype=torch.float32).view(shape),
    }


def checkpoint_meta(checkpoint: str | Path) -> dict:
    """The meta.json of a pretrain checkpoint (its "config" YAML text, "step", ...); PostTrainError
    (one line) for a model folder or anything that is not a complete checkpoint."""
    from megamoe.train.checkpoint import CheckpointError, inspect_checkpoint

    check_not_model_folder(checkpoint)
    try:
        return inspect_checkpoint(Path(checkpoint))
    except CheckpointError as exc:
        raise PostTrainError(str(exc)) from None


def load_routed_model(checkpoint: str | Path, overrides=(), weights: str = "model") -> tuple[torch.nn.Module, Config]:
    """(fp32 eval-mode WanDiT with block routers, its Config) from a pretrain checkpoint whose base weights
    it loads; the routers start at "always execute" (BlockPaths.parameter_inits). overrides: dotted
    `model.block_router.*` settings. Raises PostTrainError (bad checkpoint or override, one line)."""
    from megamoe.config_checks import validate
    from megamoe.model.dit import build_model
    from megamoe.model.weights import WeightsError, load_diffusers_weights

    path = Path(checkpoint)
    run = from_yaml_text(checkpoint_meta(path)["config"])
    for item in overrides:
        if not item.startswith(ROUTER_PREFIX) or item.startswith(ROUTER_PREFIX + "enabled"):
            raise PostTrainError(
                f"--set '{item}': only {ROUTER_PREFIX}* settings other than enabled may change; the base model is fixed"
            )
    if run.model.block_router.enabled:
        raise PostTrainError(f"checkpoint '{path}' already has block routers; pass the base model's checkpoint")
    tree = OmegaConf.to_container(OmegaConf.structured(run))
    tree["model"]["block_router"]["enabled"] = True
    tree["parallel"] = {}  # the tools run in one process, whatever layout trained the base
    try:
        cfg = merge_config(tree, list(overrides))
        validate(cfg)
    except ConfigError as exc:
        raise PostTrainError(str(exc)) from None
    folder = path / ("ema_weights" if weights == "ema" else "weights")
    if not folder.is_dir():
        raise PostTrainError(f"checkpoint '{path}' has no {folder.name}/ folder; use --weights model")
    base = build_model(run.model, initialize=False)
    try:
        load_diffusers_weights(base, folder)
    except WeightsError as exc:
        raise PostTrainError(str(exc)) from None
    model = build_model(cfg.model, seed=cfg.train.seed)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("block_paths.") for k in missing), (missing, unexpected)
    return model.float().eval(), cfg


LABELS = "labels.safetensors"
META = "labels.json"


def write_labels(out: str | Path, labels: dict, meta: dict) -> None:
    """LABELS/labels.safetensors + labels.json, complete or absent (output_directory)."""
    with output_directory(out) as tmp:
        save_file({k: v.contiguous() for k, v in labels.items()}, str(tmp / LABELS))
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")


def read_labels(directory: str | Path) -> tuple[dict, dict]:
    """(labels tensors, meta) written by `write_labels`; PostTrainError if absent or incomplete."""
    directory = Path(directory)
    if not (directory / LABELS).is_file() or not (directory / META).is_file():
        raise PostTrainError(
            f"'{directory}' holds no path labels ({LABELS}, {META}); run megamoe.tools.block_path_search"
        )
    return load_file(str(directory / LABELS)), json.loads((directory / META).read_text())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory written by launcher/pretrain.py")
    p.add_argument("--out", required=True, help="output directory for the labels (absent or empty)")
    p.add_argument("--batches", type=int, default=4, help="held-out batches searched (data.micro_batch_size each)")
    p.add_argument("--draws", type=int, default=2, help="fixed noise draws each example's loss averages")
    p.add_argument("--rounds", type=int, default=4, help="local-improvement rounds after the budget is met")
    p.add_argument("--seed", type=int, default=0, help="seed of the first noise draw")
    p.add_argument("--val-data", default=None, help="held-out latent shards (default: the embedded held-out split)")
    p.add_argument("--weights", choices=["model", "ema"], default="model", help="which weights of the checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a model.block_router.* setting")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        for name in ("batches", "draws"):
            if getattr(args, name) < 1:
                raise PostTrainError(f"--{name} must be >= 1, got {getattr(args, name)}")
        if args.rounds < 0:
            raise PostTrainError(f"--rounds must be >= 0, got {args.rounds}")
        from megamoe.posttrain.trained_model import check_output_directory

        check_output_directory(args.out)
        model, cfg = load_routed_model(args.checkpoint, args.set, args.weights)
        batches = data_batches(cfg, args.batches, held_out=args.val_data is None, path=args.val_data)
        print(
            f"searching {args.batches} batches x {len(NOISE_LEVELS)} noise levels, {args.draws} noise draws, "
            f"at most {max_runs(cfg.model.block_router.budget, cfg.model.num_layers)} of {cfg.model.num_layers} "
            "block runs per path",
            flush=True,
        )
        # One thread: the search runs a small model on many small batches, where torch's intra-op threads
        # cost more than they give. Measured on 2 CPU cores (shared with other work) for the 4-block tiny
        # model, the same 240 forwards took 4.1 s of CPU time with 1 thread and 14-16 s with 2 (wall 20-22 s
        # against 52-130 s): the threads, not the search, made it about 4x slower.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            labels = search_labels(
                model, batches, NOISE_LEVELS, args.seed, args.draws, args.rounds, lambda line: print(line, flush=True)
            )
        finally:
            torch.set_num_threads(threads)  # main() may run inside a bigger program (the tests)
        meta = {
            "checkpoint": str(Path(args.checkpoint).resolve()),
            "step": checkpoint_meta(args.checkpoint).get("step"),
            "weights": args.weights,
            "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
            "levels": list(NOISE_LEVELS),
            "seed": args.seed,
            "draws": args.draws,
            "rounds": args.rounds,
            "batches": args.batches,
            "val_data": args.val_data,
            "search": "greedy",
        }
        write_labels(args.out, labels, meta)
    except PostTrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    runs = labels["paths"].float().sum(-1)
    print(
        f"labels for {runs.numel()} examples: {runs.mean():.2f} of {cfg.model.num_layers} block runs per path "
        f"(budget {max_runs(cfg.model.block_router.budget, cfg.model.num_layers)}); flow loss {labels['loss'].mean():.5f} "
        f"(all blocks once: {labels['loss_plain'].mean():.5f}) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
