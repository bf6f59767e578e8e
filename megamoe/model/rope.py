"""Wan's 3D rotary position embedding, in real-valued cos/sin form.

Each attention head's channels are split into three groups that rotate with the token's
frame, row and column index on the patch grid. Channels (2i, 2i+1) form one rotating pair,
so the tables hold one angle per pair: [L, head_dim // 2].

The tables are computed on the fly for the grid of each call rather than stored as
buffers: they cost nothing next to attention, and a model built on the meta device and
materialised with `to_empty` (how the 5B model is built) would otherwise hold garbage in
non-persistent buffers.
"""

from __future__ import annotations

import torch


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (frames, height, width); the frame axis takes the remainder, as in Wan."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(length: int, dim: int, theta: float) -> torch.Tensor:
    # float64 as in the reference: positions up to ~1000 times the fastest frequency would
    # lose several digits of the angle in float32 before cos/sin.
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)  # [length, dim/2]


class WanRotaryEmbedding(torch.nn.Module):
    """Returns (cos, sin), each [F'*H'*W', head_dim // 2] float32, for a patch grid (F', H', W')."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.axis_dims = rope_axis_dims(head_dim)

    def forward(self, grid: tuple[int, int, int], device: torch.device | str = "cpu"):
        if max(grid) > self.max_seq_len:
            raise ValueError(
                f"patch grid {tuple(grid)} exceeds model.rope_max_seq_len={self.max_seq_len} on one axis; "
                f"raise model.rope_max_seq_len to at least {max(grid)} (diffusers' tables stop there too)"
            )
        f, h, w = grid
        # Per-axis tables are tiny ([n, d/2]); only they cross to the device, the grid is built there.
        tables = [_axis_angles(n, d, self.theta) for n, d in zip(grid, self.axis_dims)]
        cos, sin = ([fn(a).float().to(device) for a in tables] for fn in (torch.cos, torch.sin))
        return self._per_token(cos, grid), self._per_token(sin, grid)

    @staticmethod
    def _per_token(axes: list[torch.Tensor], grid: tuple[int, int, int]) -> torch.Tensor:
        # Broadcast each axis over the grid and concatenate per token: [frame | height | width] pairs.
        f, h, w = grid
        return torch.cat(
            [
                axes[0][:, None, None].expand(f, h, w, -1),
                axes[1][None, :, None].expand(f, h, w, -1),
                axes[2][None, None, :].expand(f, h, w, -1),
            ],
            dim=-1,
        ).reshape(f * h * w, -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x [B, L, heads, head_dim] by per-token angles cos/sin [L, head_dim/2]
    (or [B, L, head_dim/2]: each sample's own positions, as mixture-of-depths blocks pass).

    Computed in float32 (the tables' dtype) and cast back, as diffusers does.
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)
