"""The three figures every post-training tool reports, before and after: held-out loss at fixed
noise levels, parameter bytes, and activated FLOPs per token.

    validation_loss(model, held_out)   {"s=0.10": ..., ..., "mean": ...}  velocity MSE at fixed noise
                                       levels with fixed noise: deterministic, comparable across models
                                       (the training run's validation loss, train/validation.py)
    parameter_bytes(model)             {"total": ..., "experts": ...}  bytes of the parameters as held
    flops_per_token(model, held_out)   forward FLOPs per video token, counted by torch's FlopCounterMode
                                       on the matrix products actually run (a token's experts only)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megamoe.diffusion.flow import TIMESTEP_SCALE, interpolate
from megamoe.train.validation import loss_key
from megamoe.train.validation import validation_loss as held_out_loss

NOISE_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)
"""Noise levels s of the validation loss (0 = data, 1 = noise), spread over the range the sampler walks."""


def _noise(seed: int, batch: int, level: int, shape) -> torch.Tensor:
    state = np.random.SeedSequence([seed, batch, level]).generate_state(2, dtype=np.uint32)
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))


def validation_loss(
    model: torch.nn.Module, batches: list, levels: tuple[float, ...] = NOISE_LEVELS, seed: int = 0
) -> dict[str, float]:
    """Mean velocity MSE (fp32) over the samples of `batches` at each noise level, keyed "s=0.10", and their
    mean "mean": the training run's validation loss (train/validation.py) in one process.

    The noise of each sample and level is a pure function of (seed, the sample's index, the level's index),
    and text is never dropped: two models evaluated on the same batches see exactly the same inputs.
    """
    losses = held_out_loss(model, batches, levels, seed=seed)
    result = {f"s={level:.2f}": losses[loss_key(level)] for level in levels}
    result["mean"] = losses["loss"]
    return result


def parameter_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the model's parameters as held: all of them, and the routed experts' share."""
    total = experts = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        total += size
        experts += size if ".experts." in name else 0
    return {"total": total, "experts": experts}


def video_tokens(model: torch.nn.Module, latents: torch.Tensor) -> int:
    """Patch tokens of a latent batch [B, C, F, H, W] under the model's patch size."""
    pt, ph, pw = (int(p) for p in model.cfg.patch_size)
    b, _, f, h, w = latents.shape
    return b * math.prod((f // pt, h // ph, w // pw))


@torch.no_grad()
def flops_per_token(model: torch.nn.Module, batches: list, level: float = 0.5, seed: int = 0) -> float:
    """Forward FLOPs per video token (matrix products and attention, as FlopCounterMode counts them)
    over `batches` at noise level `level`. Routed experts count only for the tokens they receive, so
    merging (a token's two experts folded into one), pruning and null experts show up here.

    Attention runs on SDPA's math backend while counting: FlopCounterMode knows the CUDA flash and
    memory-efficient kernels but not CPU's fused one, whose FLOPs it would silently count as zero."""
    model.eval()
    dtype = next(model.parameters()).dtype
    counter = FlopCounterMode(display=False)
    tokens = 0
    with counter, sdpa_kernel(SDPBackend.MATH):
        for i, (latents, text) in enumerate(batches):
            x0 = latents.float()
            s = torch.full((x0.shape[0],), float(level))
            model(interpolate(x0, _noise(seed, i, 0, x0.shape), s).to(dtype), s * TIMESTEP_SCALE, text.to(dtype))
            tokens += video_tokens(model, latents)
    return counter.get_total_flops() / tokens
