"""Rectified flow (flow matching) as Wan trains it.

A clean latent x0 and Gaussian noise are joined by a straight line,
    x_s = (1 - s) * x0 + s * noise,   s in [0, 1] (0 = data, 1 = noise),
and the network learns the constant velocity along it, v = noise - x0, under a mean
squared error. The network sees the noise level as Wan's timestep t = 1000 * s.
"""

from __future__ import annotations

import torch

from megamoe.config import DiffusionConfig

TIMESTEP_SCALE = 1000.0
"""Wan's timestep embedding expects t in [0, 1000]."""


def shift_noise_level(s: torch.Tensor, shift: float) -> torch.Tensor:
    """s' = shift*s / (1 + (shift-1)*s): shift > 1 moves mass toward noise, as large videos need."""
    if shift == 1.0:
        return s
    return shift * s / (1.0 + (shift - 1.0) * s)


def sample_noise_levels(n: int, cfg: DiffusionConfig, generator: torch.Generator) -> torch.Tensor:
    """Draw n noise levels in (0, 1): uniform or logit-normal (SD3), then shifted."""
    if cfg.timestep_sampling == "uniform":
        s = torch.rand(n, generator=generator)
    elif cfg.timestep_sampling == "logit_normal":
        s = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator))
    else:
        raise ValueError(f"unknown diffusion.timestep_sampling '{cfg.timestep_sampling}'")
    return shift_noise_level(s, cfg.shift)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) x0 + s noise, with s broadcast over all but the batch dimension."""
    s = s.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def drop_text(text: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each sample's text by the null (all-zero) embedding with probability `prob`.

    Training on both lets the sampler combine conditional and unconditional predictions
    (classifier-free guidance). Zero is the null embedding because Wan pads text with zeros.
    """
    if prob <= 0:
        return text
    keep = (torch.rand(text.shape[0], generator=generator) >= prob).to(text.dtype)
    return text * keep.view(-1, 1, 1).to(text.device)


def flow_matching_loss(
    model, x0: torch.Tensor, text: torch.Tensor, cfg: DiffusionConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Monte-Carlo estimate of the velocity loss for a batch, in fp32; also returns the
    velocity target (for losses that predict it from inside the network).

    All randomness (noise levels, noise, text dropout) comes from `generator`, which the
    training loop seeds from (seed, rank, step): a resumed run draws exactly what the
    uninterrupted run would have drawn.
    """
    b = x0.shape[0]
    s = sample_noise_levels(b, cfg, generator)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    text = drop_text(text, cfg.text_dropout, generator)
    x0f = x0.float()
    xs = interpolate(x0f, noise, s.to(x0.device))
    dtype = next(model.parameters()).dtype
    # The timestep stays fp32: bf16 would round t in [512, 1000] to multiples of 4.
    pred = model(xs.to(dtype), (s * TIMESTEP_SCALE).to(x0.device), text.to(dtype))
    target = velocity_target(x0f, noise)
    return torch.mean((pred.float() - target) ** 2), target


def sampling_schedule(num_steps: int, shift: float) -> list[float]:
    """Noise levels from 1 down to 0 for the Euler sampler, shifted like training."""
    s = torch.linspace(1.0, 0.0, num_steps + 1)
    return shift_noise_level(s, shift).tolist()
