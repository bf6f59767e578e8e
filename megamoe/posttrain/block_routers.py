"""Training Dr.LLM block routers on searched path labels, the base model frozen.

    python -m megamoe.posttrain.block_routers --labels LABELS --out ROUTERS \
        [--steps 300] [--lr 3e-3] [--eval-batches 2]

LABELS: the output of megamoe.tools.block_path_search (per held-out sample and noise level, the best
path found within model.block_router.budget). The frozen model runs each example along its labelled
path, as Dr.LLM trains each router on the hidden states of the path it labels (teacher forcing), and
every block's router inputs (windowed means, noise feature) are recorded once: with the base frozen
they never change. Router i then learns column i of the labels (skip / execute / repeat) by full-batch
Adam on the class-balanced focal loss (`focal_loss`, `class_weights`): most blocks execute for most
examples, and without the weights and the focusing term the routers would learn "always execute".

ROUTERS receives routers.safetensors (the block_paths.* tensors), config.yaml (the run's config with its
block_router settings) and report.json, complete or not at all. The report compares, on the held-out
batches after the searched ones, the plain model with the routed one (validation loss per noise level,
block runs per sample), and gives the labels' own figures on the searched batches (what a perfect router
would reach there). Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from megamoe.config import BlockRouterConfig, ModelConfig, to_yaml
from megamoe.model.block_routing import ACTIONS, BlockPaths, decide, fixed_paths, recorded_inputs
from megamoe.posttrain.evaluation import validation_loss
from megamoe.posttrain.trained_model import PostTrainError, check_output_directory, data_batches, output_directory

EXIT_BAD_INPUT = 2
ROUTERS = "routers.safetensors"


def class_weights(labels: torch.Tensor, beta: float, num_classes: int = len(ACTIONS)) -> torch.Tensor:
    """Class-balanced weights [num_classes] by effective number (Cui et al., "Class-Balanced Loss Based on
    Effective Number of Samples", CVPR 2019): w_c = (1 - beta) / (1 - beta^n_c) for the n_c examples of
    class c, scaled to sum to the number of classes present; 0 for an absent class. beta = 0: all 1."""
    counts = torch.bincount(labels.long().flatten(), minlength=num_classes).double()
    present = counts > 0
    raw = torch.ones_like(counts) if beta == 0 else (1 - beta) / (1 - beta ** counts.clamp(min=1))
    raw = torch.where(present, raw, torch.zeros_like(raw))
    return (raw * present.sum() / raw.sum()).float()


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float, weights: torch.Tensor) -> torch.Tensor:
    """Mean over examples of -w_y (1 - p_y)^gamma log p_y (Lin et al., "Focal Loss for Dense Object
    Detection", 2017), p = softmax(logits [N, C]) in fp32, y = labels [N], w = weights [C]."""
    log_p = F.log_softmax(logits.float(), dim=-1).gather(1, labels.long()[:, None])[:, 0]
    return -(weights[labels.long()] * (1 - log_p.exp()) ** gamma * log_p).mean()


@torch.no_grad()
def router_inputs(model, inputs: dict, paths: torch.Tensor, chunk: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every block's router inputs (windows [R, W, dim], noise [R, dim]) for the search's examples run
    along `paths` [E, num_layers], R = draws * E (draw-major): block_path_search.example_inputs's rows."""
    from megamoe.diffusion.flow import TIMESTEP_SCALE, interpolate

    draws, num_examples = inputs["noise"].shape[:2]
    per_block = [[] for _ in range(paths.shape[1])]
    for d in range(draws):
        for start in range(0, num_examples, chunk):
            e = slice(start, start + chunk)
            x0, noise, s = inputs["x0"][e], inputs["noise"][d, e], inputs["level"][e]
            with recorded_inputs(model) as recorded, fixed_paths(model, paths[e].long()):
                model(interpolate(x0, noise, s), s * TIMESTEP_SCALE, inputs["text"][e])
            for i, pair in enumerate(recorded):
                per_block[i].append(pair)
    return [(torch.cat([w for w, _ in b]), torch.cat([n for _, n in b])) for b in per_block]


def train_routers(
    paths: BlockPaths, features: list, labels: torch.Tensor, cfg: BlockRouterConfig, steps: int, lr: float
) -> list[float]:
    """Full-batch Adam on the routers of `paths` (nothing else): the mean over blocks of each router's
    class-balanced focal loss on `features` (router_inputs) against labels [R, num_layers]. Returns the
    loss before each step."""
    weights = [class_weights(labels[:, i], cfg.balance_beta) for i in range(labels.shape[1])]
    optimizer = torch.optim.Adam(paths.routers.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        loss = sum(
            focal_loss(router(w, n), labels[:, i], cfg.focal_gamma, weights[i])
            for i, (router, (w, n)) in enumerate(zip(paths.routers, features))
        ) / len(features)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return history


def fit_routers(model, paths: torch.Tensor, searched: list, levels, seed: int, draws: int, args) -> tuple[list, float]:
    """Train `model`'s routers (only they: the rest is frozen) on labels paths [N, levels, num_layers]
    of the batches `searched`, with the search's inputs (seed, draws) and args.steps, args.lr.
    Returns (the focal loss before each step, the fraction of labels the trained routers pick)."""
    from megamoe.tools.block_path_search import example_inputs

    inputs = example_inputs(searched, levels, seed, draws)
    paths = paths.flatten(0, 1).long()  # [E, num_layers], example = sample * levels + level
    features = router_inputs(model, inputs, paths)
    targets = paths.repeat(draws, 1)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.block_paths.routers.parameters():
        p.requires_grad_(True)
    history = train_routers(model.block_paths, features, targets, model.cfg.block_router, args.steps, args.lr)
    with torch.no_grad():
        picked = torch.stack([decide(r(w, n)) for r, (w, n) in zip(model.block_paths.routers, features)], 1)
    return history, float((picked == targets).float().mean())


def routed_figures(model, batches: list, levels) -> dict:
    """Validation loss of the plain model (every block once) and of the routed one on `batches`, and the
    routed model's block runs per sample (mean, and per level)."""
    runs = []
    hook = model.block_paths.register_forward_hook(lambda module, args, out: runs.append(module.last_counts))
    try:
        routed = validation_loss(model, batches, levels)
    finally:
        hook.remove()
    with fixed_paths(model, torch.ones(len(model.blocks), dtype=torch.long)):
        plain = validation_loss(model, batches, levels)
    per_level = torch.stack([torch.cat(runs[j :: len(levels)]).sum(1).double().mean() for j in range(len(levels))])
    return {
        "loss_plain": plain,
        "loss_routed": routed,
        "runs_per_sample": float(per_level.mean()),
        "runs_per_sample_by_level": {f"s={lv:.2f}": float(r) for lv, r in zip(levels, per_level)},
    }


def save_routers(model, out: str | Path, cfg, report: dict) -> None:
    """ROUTERS/routers.safetensors, config.yaml, report.json, complete or absent."""
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("block_paths.")}
    with output_directory(out) as tmp:
        save_file(state, str(tmp / ROUTERS))
        (tmp / "config.yaml").write_text(to_yaml(cfg))
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def load_block_routers(checkpoint: str | Path, routers: str | Path, weights: str | None = None):
    """(the base checkpoint's model with the trained routers of `routers`, its Config).

    weights: "model" or "ema"; None = the weights the routers were trained on (report.json "base").
    Raises PostTrainError (one line) unless `checkpoint` is the base the routers were trained on: the
    same model config (block_router aside; the first key that differs is named), the same training step
    and weights (base_fingerprint), and router tensors of exactly the model's names and shapes (one
    router per block)."""
    from megamoe.config import from_yaml_text
    from megamoe.tools.block_path_search import checkpoint_meta, load_routed_model

    routers = Path(routers)
    for name in (ROUTERS, "config.yaml"):
        if not (routers / name).is_file():
            raise PostTrainError(f"'{routers}' holds no {name}; train routers with megamoe.posttrain.block_routers")
    trained = from_yaml_text((routers / "config.yaml").read_text())
    report = routers / "report.json"
    base = json.loads(report.read_text()).get("base", {}) if report.is_file() else {}
    meta = checkpoint_meta(checkpoint)
    check_same_base(trained.model, from_yaml_text(meta["config"]).model, routers, checkpoint)
    if base.get("step") is not None and base["step"] != meta.get("step"):
        raise PostTrainError(
            f"routers in '{routers}' were trained on step {base['step']} ('{base['checkpoint']}'), but checkpoint "
            f"'{checkpoint}' is step {meta.get('step')}; pass the checkpoint the path labels were searched on"
        )
    weights = weights or base.get("weights", "model")
    saved = trained.model.block_router
    overrides = [f"model.block_router.{k}={v}" for k, v in vars(saved).items() if k != "enabled"]
    model, cfg = load_routed_model(checkpoint, overrides, weights)
    if base.get("fingerprint") not in (None, base_fingerprint(model)):
        raise PostTrainError(
            f"routers in '{routers}' were trained on other {weights} weights than those of checkpoint "
            f"'{checkpoint}' (same config and step: another run?); pass '{base['checkpoint']}'"
        )
    state = load_file(str(routers / ROUTERS))
    expected = {k: v.shape for k, v in model.state_dict().items() if k.startswith("block_paths.")}
    for key in sorted(expected.keys() | state.keys()):
        if key not in state or key not in expected or state[key].shape != expected[key]:
            given = tuple(state[key].shape) if key in state else "absent"
            wanted = tuple(expected[key]) if key in expected else "absent"
            raise PostTrainError(
                f"'{routers / ROUTERS}' does not fit the model of '{checkpoint}' ({cfg.model.num_layers} blocks): "
                f"{key} is {given} there, {wanted} in the model; train routers for this checkpoint"
            )
    model.block_paths.load_state_dict({k.removeprefix("block_paths."): v for k, v in state.items()}, strict=True)
    return model, cfg


def base_fingerprint(model) -> str:
    """sha256 of every 97th value of each base (non-router) tensor, with its name and shape: tells apart
    the weights of another run or step at the cost of reading 1% of them."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith("block_paths."):
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().float().flatten()[::97].contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_same_base(trained: ModelConfig, base: ModelConfig, routers: str | Path, checkpoint: str | Path) -> None:
    """PostTrainError naming the first model.* key (block_router aside) whose value differs between the
    config the routers were trained with and the checkpoint's: routers read one base model's hidden
    states, and a base with other blocks (count, MoE, mixture-of-depths, widths) would misuse them."""
    a, b = (OmegaConf.to_container(OmegaConf.structured(c)) for c in (trained, base))
    for key, value in _flat(a).items():
        other = _flat(b).get(key)
        if not key.startswith("block_router.") and value != other:
            raise PostTrainError(
                f"routers in '{routers}' were trained on a base with model.{key}={value}, but checkpoint "
                f"'{checkpoint}' has model.{key}={other}; pass the checkpoint the path labels were searched on"
            )


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", required=True, help="labels directory written by megamoe.tools.block_path_search")
    p.add_argument("--out", required=True, help="output directory for the routers (absent or empty)")
    p.add_argument("--steps", type=int, default=300, help="full-batch Adam steps")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument(
        "--eval-batches", type=int, default=2, help="held-out batches after the searched ones, for the report"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    from megamoe.tools.block_path_search import load_routed_model, read_labels

    args = parse_args(argv)
    try:
        for name in ("steps", "eval_batches"):
            if getattr(args, name) < 1:
                raise PostTrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if not args.lr > 0:
            raise PostTrainError(f"--lr must be > 0, got {args.lr}")
        check_output_directory(args.out)
        labels, meta = read_labels(args.labels)
        router_cfg = meta["config"]["model"]["block_router"]
        overrides = [f"model.block_router.{k}={v}" for k, v in router_cfg.items() if k != "enabled"]
        model, cfg = load_routed_model(meta["checkpoint"], overrides, meta["weights"])
        val_data = meta["val_data"]
        batches = data_batches(cfg, meta["batches"] + args.eval_batches, held_out=val_data is None, path=val_data)
    except PostTrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    levels = tuple(meta["levels"])
    searched, held_out = batches[: meta["batches"]], batches[meta["batches"] :]
    history, accuracy = fit_routers(model, labels["paths"], searched, levels, meta["seed"], meta["draws"], args)
    runs = labels["paths"].float().sum(-1)
    report = {
        "router_loss": {"first": history[0], "last": history[-1]},
        "label_accuracy": accuracy,
        "labels": {
            "runs_per_sample": float(runs.mean()),
            "loss_plain": float(labels["loss_plain"].mean()),
            "loss": float(labels["loss"].mean()),
        },
        "held_out": routed_figures(model, held_out, levels),
        "num_layers": cfg.model.num_layers,
        "budget": cfg.model.block_router.budget,
        # what load_block_routers compares a checkpoint against (with config.yaml's model config)
        "base": {
            "checkpoint": meta["checkpoint"],
            "step": meta.get("step"),
            "weights": meta["weights"],
            "fingerprint": base_fingerprint(model),
        },
    }
    save_routers(model, args.out, cfg, report)
    h = report["held_out"]
    print(
        f"routers: focal loss {history[0]:.4f} -> {history[-1]:.4f}, label accuracy {report['label_accuracy']:.3f}; "
        f"held out: {h['runs_per_sample']:.2f} of {cfg.model.num_layers} block runs per sample, validation loss "
        f"{h['loss_routed']['mean']:.5f} (plain {h['loss_plain']['mean']:.5f}) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
