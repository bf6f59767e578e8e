"""Evidence that training works, which the loop computes every N steps: a validation loss and sample clips.

    held_out = read_held_out(cfg, to_latents)                      # a fixed list of batches, read once
    validation_loss(module, held_out, VAL_NOISE_LEVELS, dp_rank, dp_size, group)
        -> {"loss": mean over levels, "loss_s0.1": ..., ..., "loss_s0.9": ...}     (collective)
    sample_grid(module, cfg, text, shape, to_latents) -> uint8 image [rows, columns, 3]   (collective)

The validation loss is the flow-matching velocity loss of train/objective.py without its randomness:
at fixed noise levels s, with noise that is a pure function of (seed, sample index, level index), and
with the text never dropped. Batch i of the held-out list goes to data-parallel rank i mod D; each
rank fills in the per-level loss sums of its batches, and one all-reduce over the data-parallel ranks
adds them. Every entry is the sum of one rank's value and zeros, which is exact, and the mean is then
taken in a fixed order: the figure is bit for bit the same on every layout whose forward gives the
same predictions (data parallelism: always; tensor, context and expert parallelism: up to their sums'
rounding). Ranks of one tensor or context parallel group take the same batches and run the forward
together; a rank with fewer batches than the others runs its first again, uncounted, so that collective
forwards (expert parallelism's all-to-all spans data-parallel ranks) stay in step.

The model runs in eval mode, which matters for routers only (the model has no dropout):
  - Expert Race routes each token by its learned threshold, DiffMoE (with its capacity predictor,
    model.moe.capacity_loss > 0) by its per-expert predictor threshold: per token, so a batch's
    composition does not change a token's experts. Both thresholds are set by the first applied
    step; before it, and for DiffMoE without a predictor, they route by the batch rule over the
    micro-batch, which is the same on every layout because the batches are.
  - Selective Sinkhorn routes by plain top-k (its Sinkhorn coin is a training-only choice).
  - Expert choice picks each expert's tokens per sample or micro-batch, as in training.
  - Aux-free biases, global balance counts, and the thresholds' statistics are not updated.
The training step's state is untouched: the noise comes from generators of its own, not the global
RNG, so a run's training losses are the same with and without validation.

Samples: every rank runs the Euler sampler (diffusion/sampler.py, its default steps and guidance) on
the same noise, since tensor, context and expert parallel ranks must run each forward together; the
loop's rank 0 writes the grid. Embedded data's latents are RGB-like (tools/synthetic_data.py,
`unproject_channels`); raw-video runs decode them with their VAE.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.distributed as dist

from megamoe.config import Config
from megamoe.diffusion.flow import TIMESTEP_SCALE, interpolate, velocity_target

VAL_NOISE_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""Noise levels s (0 = data, 1 = noise) of the validation loss, one bucket each, spread over what the sampler walks."""
VAL_SEED = 0
"""Seed of the validation noise: fixed, so runs with different train.seed are compared on the same inputs."""
SAMPLE_SEED = 0
"""Seed of the sample grid's starting noise: the same clips' noise at every step, so they show progress."""
MIN_FRAME_PIXELS = 64
"""Sample frames are scaled up by a whole factor to at least this many pixels high."""
GAP = 2
"""Pixels of dark grey between the frames of the sample grid."""


def validation_noise(seed: int, sample: int, level: int, shape) -> torch.Tensor:
    """Standard normal noise [*shape] (CPU, fp32) of one held-out sample at one level: a pure function of
    (seed, the sample's index in the held-out list, the level's index), so no rank or layout changes it."""
    state = np.random.SeedSequence([seed, sample, level]).generate_state(2, dtype=np.uint32)
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))


def loss_key(level: float) -> str:
    """The scalar name of one noise level's loss: 0.1 -> 'loss_s0.1'."""
    return f"loss_s{level:g}"


@torch.no_grad()
def batch_level_losses(
    model: torch.nn.Module, latents: torch.Tensor, text: torch.Tensor, levels, first_sample: int, seed: int
) -> torch.Tensor:
    """Sum over the batch's samples of each sample's velocity MSE (fp32, mean over its elements), per level:
    float64 [len(levels)]. latents [B, C, F, H, W], text [B, L, text_dim]; the samples are numbers
    first_sample .. first_sample + B - 1 of the held-out list."""
    param = next(model.parameters())
    x0 = latents.to(param.device).float()
    text = text.to(param.device, param.dtype)
    b = x0.shape[0]
    sums = torch.zeros(len(levels), dtype=torch.float64)
    for j, level in enumerate(levels):
        noise = torch.stack([validation_noise(seed, first_sample + i, j, x0.shape[1:]) for i in range(b)])
        noise = noise.to(param.device)
        s = torch.full((b,), float(level), device=param.device)
        # The timestep stays fp32, as in training (diffusion/flow.py).
        pred = model(interpolate(x0, noise, s).to(param.dtype), s * TIMESTEP_SCALE, text)
        per_sample = ((pred.float() - velocity_target(x0, noise)) ** 2).flatten(1).mean(1)
        sums[j] = per_sample.double().sum().cpu()
    return sums


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    levels=VAL_NOISE_LEVELS,
    dp_rank: int = 0,
    dp_size: int = 1,
    group=None,
    seed: int = VAL_SEED,
) -> dict[str, float]:
    """The held-out flow loss: {"loss_s<level>": mean over samples at that level, ..., "loss": their mean}.

    batches: the held-out list [(latents [B, C, F, H, W], text [B, L, text_dim])], the same on every
    rank. Batch i is evaluated by data-parallel rank i mod dp_size; `group` is the data-parallel
    process group (None: the default group, used only when dp_size > 1). Collective when dp_size > 1.
    The model is put in eval mode and back in the mode it was in.
    """
    if not batches:
        raise ValueError("validation_loss needs at least one held-out batch")
    was_training = model.training
    model.eval()
    firsts = np.cumsum([0] + [len(latents) for latents, _ in batches])
    sums = torch.zeros(len(batches), len(levels), dtype=torch.float64)
    mine = list(range(dp_rank, len(batches), dp_size))
    try:
        for i in mine:
            latents, text = batches[i]
            sums[i] = batch_level_losses(model, latents, text, levels, int(firsts[i]), seed)
        for _ in range(math.ceil(len(batches) / dp_size) - len(mine)):  # keep collective forwards in step
            latents, text = batches[mine[0] if mine else 0]
            batch_level_losses(model, latents, text, levels, 0, seed)
    finally:
        model.train(was_training)
    if dp_size > 1:
        device = next(model.parameters()).device
        reduced = sums.to(device)
        dist.all_reduce(reduced, group=group)  # each entry: one rank's value plus zeros, exact
        sums = reduced.cpu()
    per_level = sums.sum(0) / int(firsts[-1])  # summed over batches in list order: the same on every layout
    result = {loss_key(level): float(v) for level, v in zip(levels, per_level)}
    result["loss"] = float(per_level.mean())
    return result


def held_out_source(cfg: Config) -> tuple[str, str]:
    """(path, format) of the held-out shards: data.val_path in data.format, or the embedded data's held-out split."""
    if cfg.data.val_path is not None:
        return cfg.data.val_path, cfg.data.format
    if cfg.data.path is not None:
        raise ValueError("no held-out data: data.path has no built-in held-out split; set data.val_path")
    from megamoe.tools.synthetic_data import HELD_OUT_SEED, ensure_synthetic_dataset

    return ensure_synthetic_dataset(cfg.data, cfg.model, HELD_OUT_SEED), "latent"


def read_held_out(cfg: Config, to_latents=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first logging.val_batches (latents, text) batches (CPU, fp32) of the held-out shards, read in
    this process with the run's data settings and shuffle seed: the same list on every rank and call.
    Raw video shards are encoded by `to_latents` (the run's VideoToLatents). Corrupt samples are skipped
    and counted by the loader.

    Each held-out sample is used at most once: a set with fewer usable samples than the batches need
    (the loader would start it over) is refused, as are missing or unreadable shards. Samples are told
    apart by their WebDataset key, which must be unique across the held-out shards (data/make_shards.py
    writes them so). Raises DataError, its message starting `data.val_path=<path>:` (or naming the
    embedded data's held-out split)."""
    from megamoe.data.loader import DataError, build_loader

    path, fmt = held_out_source(cfg)
    source = f"data.val_path={cfg.data.val_path}" if cfg.data.val_path is not None else "the embedded held-out split"
    data = dataclasses.replace(cfg.data, path=path, format=fmt, num_workers=0)
    compression = to_latents.compression if to_latents is not None else (4, 16)
    batches, seen = [], set()
    try:
        with build_loader(dataclasses.replace(cfg, data=data), 0, 1, compression) as loader:
            for _ in range(cfg.logging.val_batches):
                batch = next(loader)
                if seen.intersection(batch["key"]) or len(set(batch["key"])) < len(batch["key"]):
                    lg, d = cfg.logging, cfg.data
                    raise DataError(
                        f"it starts over after {len(seen.union(batch['key']))} usable sample(s), fewer than "
                        f"logging.val_batches={lg.val_batches} x data.micro_batch_size={d.micro_batch_size} "
                        f"= {lg.val_batches * d.micro_batch_size}; lower logging.val_batches or add held-out clips"
                    )
                seen.update(batch["key"])
                if fmt == "video":
                    batch = to_latents(batch)
                batches.append((batch["latents"].float().cpu(), batch["text"].float().cpu()))
    except DataError as exc:
        message = str(exc).removeprefix("data.path: ")  # the loader knows the held-out set as its data.path
        raise DataError(f"{source}: {message}") from None
    return batches


def caption_embeddings(cfg: Config, to_latents=None) -> torch.Tensor:
    """logging.sample_captions embedded: float32 [N, data.text_len, model.text_dim], by the embedded
    data's fixed word vectors, or by the raw-video run's text encoder."""
    captions = list(cfg.logging.sample_captions)
    if to_latents is not None:
        from megamoe.data.wan_encoders import encode_text

        return encode_text(to_latents.encoder, to_latents.tokenizer, captions, cfg.data.text_len).float().cpu()
    from megamoe.tools.synthetic_data import embed_caption

    return torch.stack(
        [torch.from_numpy(embed_caption(c, cfg.data.text_len, cfg.model.text_dim)) for c in captions]
    ).float()


@torch.no_grad()
def sample_clips(model: torch.nn.Module, cfg: Config, text: torch.Tensor, shape, to_latents=None) -> torch.Tensor:
    """Clips for the prompts `text` [N, L, text_dim], one each, as RGB in [-1, 1]: float32 [N, 3, F, H, W].

    shape: one latent sample's (C, F, H, W). The Euler sampler at its default steps and guidance, from
    noise of SAMPLE_SEED, in eval mode (restored after). Collective under model parallelism: every rank
    calls it with the same arguments. Latents are decoded by the raw-video run's VAE, or, for the
    embedded data's RGB-like latents, mapped back to RGB by least squares.
    """
    from megamoe.diffusion.sampler import euler_sample

    was_training = model.training
    model.eval()
    try:
        generator = torch.Generator().manual_seed(SAMPLE_SEED)
        latents = euler_sample(model, (len(text), *shape), text, shift=cfg.diffusion.shift, generator=generator)
    finally:
        model.train(was_training)
    if to_latents is not None:
        from megamoe.data.wan_encoders import decode_latents

        return decode_latents(to_latents.vae, latents).float().cpu()
    from megamoe.tools.synthetic_data import unproject_channels

    return torch.stack([torch.from_numpy(unproject_channels(clip.float().cpu().numpy())) for clip in latents])


def clip_grid(clips: torch.Tensor) -> np.ndarray:
    """clips [N, 3, F, H, W] in [-1, 1] -> uint8 image [N*(k*H + GAP) - GAP, F*(k*W + GAP) - GAP, 3]:
    one row per clip, its frames left to right, each scaled up k = ceil(MIN_FRAME_PIXELS / H) times
    (nearest neighbour), with GAP pixels of dark grey between frames and rows."""
    n, _, f, h, w = clips.shape
    k = max(1, math.ceil(MIN_FRAME_PIXELS / h))
    pixels = ((clips.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()
    pixels = pixels.repeat(k, axis=2).repeat(k, axis=3)  # [N, F, kH, kW, 3]
    cell_h, cell_w = k * h + GAP, k * w + GAP
    grid = np.full((n * cell_h - GAP, f * cell_w - GAP, 3), 48, dtype=np.uint8)
    for row in range(n):
        for frame in range(f):
            grid[row * cell_h : row * cell_h + k * h, frame * cell_w : frame * cell_w + k * w] = pixels[row, frame]
    return grid
