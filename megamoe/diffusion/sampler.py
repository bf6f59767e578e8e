"""Euler integration of the learned velocity field, with classifier-free guidance."""

from __future__ import annotations

import torch

from megamoe.config import MoEConfig
from megamoe.diffusion.flow import TIMESTEP_SCALE, sampling_schedule
from megamoe.moe.routers.timestep_band import band_index

DEFAULT_STEPS = 30
"""Euler steps of launcher/sample.py and benchmarks/sample_quality.py unless told otherwise."""
DEFAULT_GUIDANCE = 4.0
"""Classifier-free guidance scale of launcher/sample.py and benchmarks/sample_quality.py unless told otherwise."""


def check_guidance_per_band(moe: MoEConfig, scales: list[float] | None) -> None:
    """ValueError unless `scales` (one CFG scale per timestep band, or None) fits the model: only
    timestep-band experts (model.moe.router=timestep_band) have bands, one more than boundaries."""
    if scales is None:
        return
    if moe.num_experts == 0 or moe.router != "timestep_band":
        raise ValueError(
            "a CFG scale per band needs timestep-band experts (model.moe.router=timestep_band); "
            "use one guidance scale for this model"
        )
    bands = len(moe.timestep_band_boundaries) + 1
    if len(scales) != bands:
        raise ValueError(
            f"got {len(scales)} CFG scales for {bands} bands (boundaries {list(moe.timestep_band_boundaries)}); "
            f"give one per band, lowest noise first"
        )


@torch.no_grad()
def euler_sample(
    model,
    shape: tuple,
    text: torch.Tensor,
    num_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    guidance_per_band: list[float] | None = None,
    band_boundaries: list[float] | None = None,
) -> torch.Tensor:
    """Integrate dx/ds = v(x, s, text) from pure noise (s=1) to data (s=0).

    With guidance_scale w != 1 the velocity is v_null + w * (v_text - v_null), where v_null
    uses the all-zero null text the model was trained with under text dropout.

    Timestep-band experts (megamoe/moe/routers/timestep_band.py) switch experts with the step's
    timestep by themselves; `guidance_per_band` [w_0, ..., w_B] with their `band_boundaries`
    also gives each band its own scale (Wan2.2-A14B text-to-video: 3.0 below its boundary 875,
    4.0 at and above it): a step at timestep t uses w_band(t), band(t) = #{boundaries <= t}, in
    place of guidance_scale.
    """
    if (guidance_per_band is None) != (band_boundaries is None) or (
        guidance_per_band is not None and len(guidance_per_band) != len(band_boundaries) + 1
    ):
        raise ValueError("guidance_per_band needs band_boundaries, one scale per band (len(boundaries) + 1)")
    param = next(model.parameters())
    x = torch.randn(shape, generator=generator).to(param.device, torch.float32)
    text = text.to(param.device, param.dtype)
    null = torch.zeros_like(text)
    levels = sampling_schedule(num_steps, shift)
    for s, s_next in zip(levels[:-1], levels[1:]):
        t = torch.full((shape[0],), s * TIMESTEP_SCALE, device=param.device)  # fp32, see flow.py
        w = guidance_scale
        if guidance_per_band is not None:
            w = guidance_per_band[int(band_index(t[:1], band_boundaries))]
        if w == 1.0:
            v = model(x.to(param.dtype), t, text).float()
        else:
            both = model(torch.cat([x, x]).to(param.dtype), torch.cat([t, t]), torch.cat([text, null])).float()
            v_text, v_null = both.chunk(2)
            v = v_null + w * (v_text - v_null)
        x = x + (s_next - s) * v
    return x
