"""Exports of a LoRA-Mixer fine-tune (megamoe/model/lora_mixer.py): the adapters on their own, and a
dense model with them merged in.

Adapters: one safetensors file holding every router and expert tensor under its model key
(`blocks.3.attn1.lora.to_q.lora_A` [E, r, in], `...lora_B` [E, out, r], `...router.weight` [E, in])
and, in its metadata, the `model.lora` settings they were trained with. `load_adapters` refuses a
file whose settings or keys differ from the model's.

Merged (dense): a per-token top-k mixture cannot be folded into one weight exactly: the update of
a token x is (alpha / r) sum_e g_e(x) B_e A_e x, and g depends on x. The merged export replaces g(x)
by its mean over calibration data, gbar_e = E_x[g_e(x)] (each adapter's own tokens: the video
tokens, or the text for a cross-attention's k and v):

    W_merged = W + (alpha / r) * sum_e gbar_e B_e A_e

so it is exact when every token's gates equal the mean (top_k = E with a router that does not
depend on x), and otherwise the routing-weighted average expert. `prediction_error` measures what
that costs; benchmarks/lora_mixer.py reports it.

    gates = calibrate(model, batches, cfg.diffusion, generator)     # {adapter name: gbar [E]}
    save_adapters(model, "run/lora_mixer.safetensors")
    save_merged(model, gates, "run/merged")                         # diffusers-layout dense model

From the command line, after a launcher/pretrain.py run with adapters (one process, CPU or one GPU):

    python -m megamoe.posttrain.lora_export --checkpoint outputs/run/checkpoints/step_00005000 \
        --adapters lora_mixer.safetensors --merged merged/ --calibration-batches 8

calibrates on the run's own data (or latent shards given with --data); outputs that exist are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megamoe.atomic_files import write_atomic
from megamoe.config import DiffusionConfig, LoRAConfig
from megamoe.diffusion.flow import flow_matching_loss
from megamoe.model.lora_mixer import adapters, is_adapter_key
from megamoe.model.weights import WeightsError, write_diffusers_weights

METADATA_KEY = "megamoe_lora_mixer"
"""safetensors metadata entry holding the JSON of model.lora."""


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors (routers and experts) by model key, detached, on the CPU."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if is_adapter_key(k)}


def save_adapters(model: torch.nn.Module, path: str) -> None:
    """Write the adapters alone to the safetensors file `path` (atomically), with model.lora as metadata."""
    tensors = adapter_state_dict(model)
    if not tensors:
        raise WeightsError("the model has no LoRA-Mixer adapters to export; set model.lora.num_experts > 0")
    meta = {"format": "pt", METADATA_KEY: json.dumps(dataclasses.asdict(model.cfg.lora), sort_keys=True)}
    write_atomic(os.fspath(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


@torch.no_grad()
def load_adapters(model: torch.nn.Module, path: str) -> None:
    """Copy the adapters of `path` (written by save_adapters) into `model`; WeightsError (one line) when
    the file was trained with other model.lora settings or does not hold exactly the model's adapters."""
    targets = {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}
    if not targets:
        raise WeightsError("the model has no LoRA-Mixer adapters to load into; build it with model.lora as trained")
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such adapters file; pass the file save_adapters wrote")
    with safe_open(os.fspath(path), framework="pt") as f:
        saved = json.loads((f.metadata() or {}).get(METADATA_KEY, "null"))
        if saved is None:
            raise WeightsError(
                f"{path} holds no LoRA-Mixer adapters (no {METADATA_KEY} metadata); pass a file save_adapters wrote"
            )
        mine = dataclasses.asdict(model.cfg.lora)
        if saved != mine:
            diffs = [f"model.lora.{k}={v}" for k, v in (saved or {}).items() if mine.get(k) != v]
            raise WeightsError(
                f"{path} holds LoRA-Mixer adapters of other settings; set {', '.join(diffs) or 'model.lora as trained'}"
            )
        if set(f.keys()) != set(targets):
            missing, extra = sorted(set(targets) - set(f.keys())), sorted(set(f.keys()) - set(targets))
            what = f"lacks e.g. {missing[:2]}" if missing else f"has adapters the model lacks, e.g. {extra[:2]}"
            raise WeightsError(
                f"{path} does not hold this model's adapters ({what}); build the model with the settings it was "
                f"trained with (model.num_layers and the rest of its model config)"
            )
        for key, target in targets.items():
            target.copy_(f.get_tensor(key))


@torch.no_grad()
def calibrate(
    model: torch.nn.Module, batches, diffusion: DiffusionConfig, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """{adapter name: mean gate weights [E] over the tokens of `batches`} (iterable of (latents, text)),
    each batch run at noise levels, noise and text dropout drawn from `generator` as training draws them."""
    found = adapters(model)
    if not found:
        raise ValueError("the model has no LoRA-Mixer adapters to calibrate; build it with model.lora.num_experts > 0")
    sums = {name: 0.0 for name in found}
    tokens = dict.fromkeys(found, 0)
    for latents, text in batches:
        flow_matching_loss(model, latents, text, diffusion, generator)
        for name, adapter in found.items():
            sums[name] = sums[name] + adapter.stats.gate_sum
            tokens[name] += adapter.stats.tokens
    if not any(tokens.values()):
        raise ValueError("calibrate needs at least one batch of (latents, text); it got none")
    return {name: sums[name] / tokens[name] for name in found}


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module, gates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base's state dict (no adapter keys) with each adapted projection's weight replaced by
    W + (alpha / r) sum_e gates[name]_e B_e A_e, in W's dtype. ValueError when the model has no adapters
    (there is nothing to merge) or `gates` does not give every adapter its [E] weights."""
    found = adapters(model)
    if not found:
        raise ValueError("the model has no LoRA-Mixer adapters to merge; it is a dense model already")
    missing = [name for name in found if name not in gates]
    if missing:
        raise ValueError(
            f"gates lack {len(missing)} of the model's {len(found)} adapters (e.g. {missing[0]}); "
            f"pass what calibrate(model, ...) returns"
        )
    bad = [name for name, a in found.items() if tuple(gates[name].shape) != (a.num_experts,)]
    if bad:
        raise ValueError(f"gates[{bad[0]!r}] has shape {tuple(gates[bad[0]].shape)}, not [{found[bad[0]].num_experts}]")
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not is_adapter_key(k)}
    for name, adapter in found.items():
        attention, _, projection = name.rpartition(".lora.")
        key = f"{attention}.{projection}{'.0' if projection == 'to_out' else ''}.weight"
        state[key] = (state[key].float() + adapter.delta_weight(gates[name]).to(state[key].device)).to(state[key].dtype)
    return state


def save_merged(model: torch.nn.Module, gates: dict[str, torch.Tensor], directory: str) -> None:
    """Write the merged dense model as a diffusers-layout directory (config.json + safetensors)."""
    dense = dataclasses.replace(model.cfg, lora=LoRAConfig())
    write_diffusers_weights(merged_state_dict(model, gates), dense, directory)


@torch.no_grad()
def prediction_error(reference, other, batches, diffusion: DiffusionConfig, seed: int) -> float:
    """RMS of other's velocity prediction minus reference's, over `batches`, at the same noise levels,
    noise and text dropout (both runs draw from a generator seeded `seed`)."""
    squares, count = 0.0, 0
    ga, gb = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for latents, text in batches:
        outputs = []
        for model, generator in ((reference, ga), (other, gb)):
            captured = {}
            handle = model.register_forward_hook(lambda _m, _a, out, c=captured: c.setdefault("out", out))
            try:
                flow_matching_loss(model, latents, text, diffusion, generator)
            finally:
                handle.remove()
            outputs.append(captured["out"].float())
        squares += (outputs[1] - outputs[0]).square().sum().item()
        count += outputs[0].numel()
    return (squares / count) ** 0.5


# ---------------------------------------------------------------------------------------------
# Command line.

EXIT_BAD_INPUT = 2
DEFAULT_CALIBRATION_BATCHES = 8


def load_adapted_model(checkpoint, weights: str = "model"):
    """(fp32 model in eval mode, the run's Config) of a launcher/pretrain.py checkpoint trained with
    LoRA-Mixer adapters; PostTrainError (one line) for a missing checkpoint or one without adapters."""
    from megamoe.model.dit import build_model
    from megamoe.model.weights import load_diffusers_weights
    from megamoe.posttrain.trained_model import PostTrainError, checkpoint_config

    path, cfg = checkpoint_config(checkpoint)
    if cfg.model.lora.num_experts == 0:
        raise PostTrainError(
            f"checkpoint '{path}' has no LoRA-Mixer adapters (model.lora.num_experts=0); pass a checkpoint of a "
            f"run trained with model.lora.num_experts > 0"
        )
    folder = path / ("ema_weights" if weights == "ema" else "weights")
    if not folder.is_dir():
        raise PostTrainError(f"checkpoint '{path}' has no {folder.name}/ folder; use --weights model")
    model = build_model(cfg.model, initialize=False)  # every weight is loaded next
    load_diffusers_weights(model, folder)
    return model.float().eval(), cfg


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m megamoe.posttrain.lora_export",
        description="Export the LoRA-Mixer adapters of a training checkpoint, alone and/or merged into a dense model.",
    )
    p.add_argument("--checkpoint", required=True, help="<output_dir>/checkpoints/step_* of a run with adapters")
    p.add_argument("--weights", choices=("model", "ema"), default="model", help="weights/ or ema_weights/")
    p.add_argument("--adapters", help="new safetensors file for the routers and experts alone")
    p.add_argument("--merged", help="new directory for the dense model with the adapters merged in (diffusers layout)")
    p.add_argument(
        "--calibration-batches",
        type=int,
        default=None,
        help=f"batches the merge's mean gates are measured on (with --merged; default {DEFAULT_CALIBRATION_BATCHES})",
    )
    p.add_argument("--data", help="latent shards to calibrate on instead of the run's data (with --merged)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration's noise levels, noise and dropout")
    return p.parse_args(argv)


def check_args(args) -> None:
    """PostTrainError, before any work, for no output, an output that exists, or a flag left unread."""
    from megamoe.posttrain.trained_model import PostTrainError, check_new_file

    if not args.adapters and not args.merged:
        raise PostTrainError("nothing to export; give --adapters FILE and/or --merged DIR")
    if not args.merged:
        for flag, value in (("--calibration-batches", args.calibration_batches), ("--data", args.data)):
            if value is not None:
                raise PostTrainError(f"{flag} is read only with --merged (the adapters alone need no calibration)")
    if args.calibration_batches is not None and args.calibration_batches < 1:
        raise PostTrainError(f"--calibration-batches must be >= 1, got {args.calibration_batches}")
    check_new_file(args.adapters, "--adapters")
    if args.merged:  # absent or an empty directory, as output_directory takes it
        merged = Path(args.merged)
        if merged.exists() and not (merged.is_dir() and not any(merged.iterdir())):
            raise PostTrainError(
                f"--merged '{args.merged}' already exists; choose a new directory (nothing is overwritten)"
            )


def main(argv=None) -> int:
    from megamoe.posttrain.trained_model import PostTrainError, data_batches, output_directory

    args = parse_args(argv)
    try:
        check_args(args)
        print(f"loading {args.checkpoint} ({args.weights} weights)", flush=True)
        model, cfg = load_adapted_model(args.checkpoint, args.weights)
        print(f"{len(adapters(model))} adapters of {cfg.model.lora.num_experts} experts, rank {cfg.model.lora.rank}")
        batches = []
        if args.merged:
            n = args.calibration_batches or DEFAULT_CALIBRATION_BATCHES
            print(
                f"reading {n} calibration batches from {args.data or cfg.data.path or 'the synthetic data'}", flush=True
            )
            batches = data_batches(cfg, n, path=args.data)
    except (PostTrainError, WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.adapters:
        save_adapters(model, args.adapters)
        print(f"wrote the adapters to {args.adapters}", flush=True)
    if args.merged:
        generator = torch.Generator().manual_seed(args.seed)
        gates = calibrate(model, _progress(batches), cfg.diffusion, generator)
        with output_directory(args.merged) as tmp:
            save_merged(model, gates, tmp)
        error = prediction_error(model, _merged_model(model, gates), batches, cfg.diffusion, args.seed)
        print(
            f"wrote the merged dense model to {args.merged} (on the calibration batches its prediction differs "
            f"from the adapted model's by {error:.4g} RMS)"
        )
    return 0


def _progress(batches):
    for i, batch in enumerate(batches, 1):
        yield batch
        print(f"calibrated on batch {i}/{len(batches)}", flush=True)


def _merged_model(model: torch.nn.Module, gates: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The merged dense model in memory, for the report of what merging changed."""
    from megamoe.model.dit import build_model

    dense = build_model(dataclasses.replace(model.cfg, lora=LoRAConfig()), initialize=False)
    dense.load_state_dict(merged_state_dict(model, gates))
    return dense.float().eval()


if __name__ == "__main__":
    sys.exit(main())
