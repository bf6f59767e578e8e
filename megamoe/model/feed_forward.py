"""The dense feed-forward network of a Wan block, in its own module so that the MoE layer that
replaces it (megamoe/moe/layer.py) and the block that holds either (model/dit.py) both import it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GeluProj(nn.Module):
    """linear -> GELU (tanh approximation), diffusers' `GELU` module with its `proj` key."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """[B, L, dim] -> [B, L, dim]: linear -> GELU-tanh -> linear, diffusers' `FeedForward` keys."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        # Index 1 is diffusers' dropout slot; the Identity keeps keys at net.0.proj / net.2.
        self.net = nn.Sequential(GeluProj(dim, hidden), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        """`ctx` (the routing context an MoE FFN needs) is ignored, so blocks call any FFN alike."""
        return self.net(x)
