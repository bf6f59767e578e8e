"""Flow matching against closed forms."""

import math

import torch

from megamoe.config import DiffusionConfig
from megamoe.diffusion.flow import (
    drop_text,
    interpolate,
    sample_noise_levels,
    sampling_schedule,
    shift_noise_level,
    velocity_target,
)
from megamoe.diffusion.sampler import euler_sample


def test_interpolation_endpoints_and_velocity():
    x0, noise = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    assert torch.equal(interpolate(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(interpolate(x0, noise, torch.ones(3)), noise)
    s = torch.tensor([0.1, 0.5, 0.9])
    h = 1e-3
    finite_difference = (interpolate(x0, noise, s + h) - interpolate(x0, noise, s - h)) / (2 * h)
    torch.testing.assert_close(finite_difference, velocity_target(x0, noise), rtol=1e-3, atol=1e-3)


def test_shift_formula():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(shift_noise_level(s, 3.0), 3 * s / (1 + 2 * s))
    assert torch.equal(shift_noise_level(s, 1.0), s)
    assert shift_noise_level(torch.tensor(0.5), 5.0) > 0.5  # shift > 1 favours noise


def test_timestep_distributions():
    g = torch.Generator().manual_seed(0)
    u = sample_noise_levels(200_000, DiffusionConfig(timestep_sampling="uniform"), g)
    assert abs(u.mean().item() - 0.5) < 5e-3 and abs(u.var().item() - 1 / 12) < 2e-3
    ln = sample_noise_levels(
        200_000, DiffusionConfig(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8), g
    )
    logits = torch.log(ln / (1 - ln))
    assert abs(logits.mean().item() - 0.5) < 1e-2 and abs(logits.std().item() - 0.8) < 1e-2


def test_text_dropout_rate_and_null_is_zero():
    g = torch.Generator().manual_seed(0)
    text = torch.ones(20_000, 2, 3)
    dropped = drop_text(text, 0.1, g)
    rows = dropped.flatten(1)
    is_null = (rows == 0).all(1)
    assert ((rows == 1).all(1) | is_null).all()
    assert abs(is_null.float().mean().item() - 0.1) < 0.01


class _OracleVelocity(torch.nn.Module):
    """The exact velocity field when the data is a single point x0: v(x, s) = (x - x0) / s."""

    def __init__(self, x0_text, x0_null):
        super().__init__()
        self.x0_text, self.x0_null = x0_text, x0_null
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, text):
        s = (t / 1000.0).view(-1, 1, 1, 1, 1)
        is_null = (text == 0).flatten(1).all(1).view(-1, 1, 1, 1, 1)
        x0 = torch.where(is_null, self.x0_null, self.x0_text)
        return (x - x0) / s


def test_euler_sampler_reaches_the_data_point_exactly():
    x0 = torch.randn(1, 3, 2, 4, 4)
    model = _OracleVelocity(x0, x0)
    out = euler_sample(
        model,
        (2, 3, 2, 4, 4),
        torch.ones(2, 5, 7),
        num_steps=7,
        guidance_scale=1.0,
        shift=3.0,
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(out, x0.expand(2, -1, -1, -1, -1), rtol=0, atol=1e-5)


def test_classifier_free_guidance_extrapolates_linearly():
    # With conditional point a and unconditional point b, guided Euler lands on b + w (a - b).
    a, b = torch.randn(1, 3, 1, 2, 2), torch.randn(1, 3, 1, 2, 2)
    w = 3.0
    out = euler_sample(
        _OracleVelocity(a, b),
        (1, 3, 1, 2, 2),
        torch.ones(1, 4, 5),
        num_steps=5,
        guidance_scale=w,
        generator=torch.Generator().manual_seed(2),
    )
    torch.testing.assert_close(out, b + w * (a - b), rtol=0, atol=1e-4)


def test_sampling_schedule_runs_from_noise_to_data():
    levels = sampling_schedule(10, 5.0)
    assert levels[0] == 1.0 and levels[-1] == 0.0 and all(x > y for x, y in zip(levels, levels[1:]))
    assert math.isclose(levels[5], 5 * 0.5 / (1 + 4 * 0.5), rel_tol=1e-6)
