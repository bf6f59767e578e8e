"""What every post-training tool starts from and ends with: a trained MoE model in one process,
its data, and an output directory that is either complete or absent.

    model, cfg = load_trained_model("outputs/tiny_moe/checkpoints/step_00000300")
    calibration = data_batches(cfg, 8)                      # the training data, as the run read it
    held_out = data_batches(cfg, 4, held_out=True)          # the embedded data's held-out split
    with output_directory("merged/") as tmp: ...write into tmp...   # renamed to merged/ at the end

The tools (launcher/merge_experts.py, quantize_experts.py, place_experts.py) run in one process on
the CPU or one GPU; the model is in fp32 and in eval mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from megamoe.config import Config, ConfigError, from_yaml_text


class PostTrainError(ValueError):
    """Bad input to a post-training tool; the one-line message names the problem and the fix."""


def check_not_model_folder(path: str | os.PathLike) -> None:
    """PostTrainError when `path` is a model folder (config.json + safetensors, as merge_experts.py,
    upcycle.py and convert_checkpoint.py write) rather than a training checkpoint (meta.json): the
    message says what it is and gives the overrides to train from it (a merged folder's too)."""
    path = Path(path)
    if not (path / "config.json").is_file() or (path / "meta.json").exists():
        return
    overrides = f"train.init_from={path}"
    try:
        moe = json.loads((path / "config.json").read_text()).get("moe") or {}
    except (json.JSONDecodeError, AttributeError):
        moe = {}
    if moe.get("merged_from"):  # the config must describe the merged layers to load them
        overrides += f" model.moe.num_experts={moe.get('num_experts')} model.moe.merged_from={moe['merged_from']}"
    raise PostTrainError(
        f"'{path}' is a model folder (config.json + safetensors), not a training checkpoint; train from it "
        f"({overrides}) and pass a checkpoint of that run (<output_dir>/checkpoints/step_*)"
    )


def checkpoint_config(checkpoint: str | os.PathLike) -> tuple[Path, Config]:
    """(its path, the run's resolved Config) of a launcher/pretrain.py checkpoint, read before any
    weight; PostTrainError for a model folder given instead, or a missing or incomplete checkpoint."""
    from megamoe.train.checkpoint import CheckpointError, inspect_checkpoint

    path = Path(checkpoint)
    check_not_model_folder(path)
    try:
        meta = inspect_checkpoint(path)
    except CheckpointError as exc:
        raise PostTrainError(str(exc)) from None
    return path, from_yaml_text(meta["config"])


def load_trained_model(
    checkpoint: str | os.PathLike,
    weights: str = "model",
    refuse_merged: str | None = None,
    refuse_routers: dict[str, str] | None = None,
) -> tuple[torch.nn.Module, Config]:
    """(fp32 model in eval mode, the run's resolved Config) of a checkpoint written by
    launcher/pretrain.py (`<output_dir>/checkpoints/step_*`), at any parallel layout.

    weights: 'model' (the module's weights, weights/) or 'ema' (ema_weights/, when the run kept an EMA).
    Raises PostTrainError for a missing or incomplete checkpoint and for a dense model, and, before any
    weight is read, for a merged model (model.moe.merged_from) when `refuse_merged` gives the reason
    and for a model.moe.router in `refuse_routers` (router -> the reason the tool cannot take it).
    """
    from megamoe.model.dit import build_model
    from megamoe.model.weights import load_diffusers_weights

    path, cfg = checkpoint_config(checkpoint)
    if cfg.model.moe.num_experts == 0:
        raise PostTrainError(
            f"checkpoint '{path}' holds a dense model (model.moe.num_experts=0); the post-training tools work on "
            f"MoE models: upcycle it first (launcher/upcycle.py) and train the MoE model"
        )
    if refuse_merged and cfg.model.moe.merged_from:
        raise PostTrainError(
            f"checkpoint '{path}' holds a merged model (model.moe.merged_from={cfg.model.moe.merged_from}); "
            f"{refuse_merged}"
        )
    router = cfg.model.moe.router
    if refuse_routers and router in refuse_routers:
        raise PostTrainError(f"checkpoint '{path}' has model.moe.router={router}: {refuse_routers[router]}")
    folder = path / ("ema_weights" if weights == "ema" else "weights")
    if not folder.is_dir():
        raise PostTrainError(f"checkpoint '{path}' has no {folder.name}/ folder; use --weights model")
    model = build_model(cfg.model, initialize=False)  # every weight is loaded next
    load_diffusers_weights(model, folder)
    return model.float().eval(), cfg


def data_batches(
    cfg: Config, num_batches: int, held_out: bool = False, path: str | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `num_batches` (latents [B, C, F, H, W], text [B, L, text_dim]) batches of a data stream,
    read in one process with the run's data settings and shuffle seed: the same batches every call.

    path: latent shards to read instead of the run's data. held_out (with path None): the embedded
    synthetic data's held-out split (other clips of the same kind, never trained on); a run on
    shards of its own must pass its held-out shards as `path`. Raw video shards are not read here:
    encode them to latent shards first (data/encode_latents.py).
    """
    from megamoe.data.loader import build_loader
    from megamoe.data.worker import DataError
    from megamoe.tools.synthetic_data import HELD_OUT_SEED, ensure_synthetic_dataset

    data = dataclasses.replace(cfg.data, num_workers=0)
    if path is not None:
        data = dataclasses.replace(data, path=path, format="latent")
    elif held_out:
        if cfg.data.path is not None:
            raise PostTrainError(
                f"the run trained on '{cfg.data.path}', which has no built-in held-out split; "
                f"pass held-out latent shards with --val-data"
            )
        data = dataclasses.replace(data, path=ensure_synthetic_dataset(cfg.data, cfg.model, HELD_OUT_SEED))
    elif data.path is not None and data.format != "latent":
        raise PostTrainError(
            f"the run read raw video shards ('{data.path}'); encode them to latent shards "
            f"(data/encode_latents.py) and pass those with --data"
        )
    batches = []
    try:
        with build_loader(dataclasses.replace(cfg, data=data), dp_rank=0, dp_size=1) as loader:
            for _ in range(num_batches):
                batch = next(loader)
                batches.append((batch["latents"].float(), batch["text"].float()))
    except (DataError, ConfigError) as exc:  # a missing, empty or unreadable shard set: one line
        message = str(exc)
        if path is not None:  # the shards a flag named, not the run's data.path
            message = message.removeprefix("data.path: ")
        raise PostTrainError(message) from None
    return batches


@contextlib.contextmanager
def output_directory(out: str | os.PathLike):
    """Yield a temporary directory beside `out` that is renamed to `out` when the block succeeds, and
    removed when it fails: a tool's output is complete or absent, and nothing that exists is touched.

    Raises PostTrainError, before any work, when `out` exists (an empty directory is accepted).
    """
    out = Path(out)
    check_output_directory(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        # mkdtemp and atomic writes make private files; an output is meant to be shared like any other.
        umask = os.umask(0)
        os.umask(umask)
        for path in (tmp, *tmp.rglob("*")):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if out.is_dir():
            out.rmdir()  # empty, as checked: rename needs the name free
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_directory(out: str | os.PathLike) -> None:
    """PostTrainError unless `out` is free: absent, or an empty directory."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise PostTrainError(f"--out '{out}' already exists; choose a new directory (nothing is overwritten)")


def check_new_file(path: str | os.PathLike | None, flag: str) -> None:
    """PostTrainError unless `path` (a file a tool will write at its end, e.g. --save-stats) is new and its
    directory exists: checked before any work, so a run never fails after it."""
    if path is None:
        return
    path = Path(path)
    if path.exists():
        raise PostTrainError(f"{flag} '{path}' already exists; choose a new file (nothing is overwritten)")
    if not path.parent.is_dir():
        raise PostTrainError(f"{flag} '{path}': directory '{path.parent}' does not exist; create it first")


def refuse_unread(args, read_with_stats: bool = False, **defaults) -> None:
    """PostTrainError for calibration options that `--stats` makes unread: with statistics given, the
    tool gathers none, so --data / --calibration-batches / --seed would have no effect (unless the tool
    still reads calibration batches for something else: read_with_stats). `defaults`: option -> the
    value that means "not given"."""
    if not getattr(args, "stats", None) or read_with_stats:
        return
    for name, default in defaults.items():
        if getattr(args, name) != default:
            flag = "--" + name.replace("_", "-")
            raise PostTrainError(f"{flag} has no effect with --stats (no statistics are gathered); drop one of them")
