"""Euler integration of the learned velocity field, with classifier-free guidance."""

from __future__ import annotations

import torch

from megamoe.diffusion.flow import TIMESTEP_SCALE, sampling_schedule


@torch.no_grad()
def euler_sample(
    model,
    shape: tuple,
    text: torch.Tensor,
    num_steps: int = 30,
    guidance_scale: float = 4.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Integrate dx/ds = v(x, s, text) from pure noise (s=1) to data (s=0).

    With guidance_scale w != 1 the velocity is v_null + w * (v_text - v_null), where v_null
    uses the all-zero null text the model was trained with under text dropout.
    """
    param = next(model.parameters())
    x = torch.randn(shape, generator=generator).to(param.device, torch.float32)
    text = text.to(param.device, param.dtype)
    null = torch.zeros_like(text)
    levels = sampling_schedule(num_steps, shift)
    for s, s_next in zip(levels[:-1], levels[1:]):
        t = torch.full((shape[0],), s * TIMESTEP_SCALE, device=param.device)  # fp32, see flow.py
        if guidance_scale == 1.0:
            v = model(x.to(param.dtype), t, text).float()
        else:
            both = model(torch.cat([x, x]).to(param.dtype), torch.cat([t, t]), torch.cat([text, null])).float()
            v_text, v_null = both.chunk(2)
            v = v_null + guidance_scale * (v_text - v_null)
        x = x + (s_next - s) * v
    return x
