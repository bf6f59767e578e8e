"""Convert between a megamoe checkpoint and diffusers-layout safetensors weights.

    python launcher/convert_checkpoint.py to-safetensors CHECKPOINT OUT [--master]
    python launcher/convert_checkpoint.py from-safetensors WEIGHTS OUT --config configs/X.yaml [key=value ...]

to-safetensors: the full model of CHECKPOINT (a `checkpoints/step_*` directory, written at any
parallel layout) with every expert and every tensor-parallel block in place, keys as diffusers'
WanTransformer3DModel. OUT ending in .safetensors gets one file; any other OUT becomes a diffusers
model folder (config.json + diffusion_pytorch_model.safetensors) that `train.init_from` and the
sampler read, and diffusers' `from_pretrained` too for a dense model (it refuses an MoE one). The
checkpoint's own weights/ folder holds the same model, sharded with an index. --master takes the
fp32 master weights instead of the module's (they differ in bf16 runs). One process, no process
group, no GPU.

from-safetensors: WEIGHTS (a .safetensors file, an index, or a diffusers folder, e.g. edited or
merged outside megamoe) is checked against the model that --config describes, every key and
shape, and written (in fp32, as the model holds it) as a diffusers model folder OUT: start a
run from it with train.init_from=OUT (a fresh optimizer; resuming optimizer state needs the
checkpoint itself).

Bad input prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

EXIT_BAD_INPUT = 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["to-safetensors", "from-safetensors"])
    p.add_argument(
        "source",
        help="to-safetensors: a checkpoint directory (checkpoints/step_*); "
        "from-safetensors: a .safetensors file, an index or a diffusers folder",
    )
    p.add_argument("out", help="OUT.safetensors (one file) or a directory (diffusers model folder)")
    p.add_argument(
        "--master", action="store_true", help="to-safetensors: the fp32 master weights instead of the module's"
    )
    p.add_argument("--config", help="from-safetensors: YAML config of the model the weights are for")
    p.add_argument(
        "overrides", nargs="*", help="from-safetensors: dotted config overrides, e.g. model.moe.num_experts=8"
    )
    args = p.parse_intermixed_args(argv)  # overrides may follow the options
    if args.command == "from-safetensors" and args.config is None:
        p.error("from-safetensors needs --config")
    return args


def checkpoint_weights(checkpoint, master: bool = False) -> tuple[dict, object]:
    """(full state dict in diffusers keys, ModelConfig) of a megamoe checkpoint, in one process."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    from megamoe.config import ConfigError, from_yaml_text
    from megamoe.error_messages import describe
    from megamoe.train.checkpoint import (
        FORMAT,
        STATE_DIR,
        CheckpointError,
        inspect_checkpoint,
    )
    from megamoe.train.sharded_state import stored_shapes

    path = Path(checkpoint)
    meta = inspect_checkpoint(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint '{path}' is not in megamoe's format '{FORMAT}'; its weights/ folder "
            f"already holds the full model in diffusers layout"
        )
    try:
        cfg = from_yaml_text(meta["config"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(
            f"checkpoint '{path}' has an unreadable config ({exc}); pass another checkpoint"
        ) from None
    try:
        stored = stored_shapes(path / STATE_DIR)
        names = {k.split("/", 1)[1] for k in stored if k.startswith("model/")}
        # Buffers have no master copy: they come from the module's state either way.
        keys = {n: f"master/{n}" if master and f"master/{n}" in stored else f"model/{n}" for n in names}
        state = {key: torch.empty(stored[key][0], dtype=stored[key][1]) for key in keys.values()}
        with warnings.catch_warnings():  # DCP warns that it runs in one process, which is the point here
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load(state, storage_reader=HuggingFaceStorageReader(str(path / STATE_DIR)), no_dist=True)
    except Exception as exc:  # safetensors and DCP raise many types for a bad file; the user needs one line
        raise CheckpointError(
            f"checkpoint '{path}' could not be read ({describe(exc)}); pass another checkpoint"
        ) from None
    return {n: state[key] for n, key in sorted(keys.items())}, cfg.model


def to_safetensors(checkpoint, out, master: bool = False) -> None:
    from safetensors.torch import save_file

    from megamoe.model.weights import write_diffusers_weights

    state, model_cfg = checkpoint_weights(checkpoint, master)
    out = Path(out)
    if out.suffix == ".safetensors":
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata={"format": "pt"})
    else:
        write_diffusers_weights(state, model_cfg, out)


def from_safetensors(weights, out, config, overrides=()) -> None:
    from megamoe.config import load_config
    from megamoe.model.dit import build_model
    from megamoe.model.weights import WeightSource, load_diffusers_weights, write_diffusers_weights

    cfg = load_config(config, list(overrides))
    model = build_model(cfg.model, initialize=False)  # every weight is loaded next
    source = WeightSource(weights)
    check_router_keys(source, model.state_dict().keys(), cfg.model.moe.router)
    load_diffusers_weights(model, source)  # strict: names the first wrong key or shape and the fix
    write_diffusers_weights(model.state_dict(), cfg.model, out)


def check_router_keys(source, expected, router: str) -> None:
    """WeightsError when the weights and the model differ only in router tensors: they were saved with
    another model.moe.router (or other router keys), which a bare .safetensors file does not record
    (a folder's config.json does, and load_diffusers_weights names the setting from it)."""
    from megamoe.model.weights import WeightsError, first_keys

    saved_moe = source.config.get("moe") if isinstance(source.config, dict) else None
    missing, unexpected = expected - source.shapes.keys(), source.shapes.keys() - expected
    if isinstance(saved_moe, dict) or not (missing or unexpected):
        return
    if all(".ffn.router." in k for k in missing | unexpected):
        parts = ([f"has unexpected {first_keys(unexpected)}"] if unexpected else []) + (
            [f"lacks {first_keys(missing)}"] if missing else []
        )
        raise WeightsError(
            f"{source.what} has router tensors that model.moe.router={router} does not build ({'; '.join(parts)}): "
            f"it was saved with another router or router keys; set model.moe.router and its keys as in the run that "
            f"saved it"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    from megamoe.config import ConfigError
    from megamoe.train.checkpoint import CheckpointError

    try:
        if args.command == "to-safetensors":
            to_safetensors(args.source, args.out, args.master)
        else:
            from_safetensors(args.source, args.out, args.config, args.overrides)
    except (ConfigError, CheckpointError, ValueError) as exc:  # WeightsError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
