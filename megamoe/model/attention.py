"""Wan attention: QK-RMSNorm across heads, 3D RoPE on self-attention, cross-attention to text.

Submodule names (to_q, to_k, to_v, to_out.0, norm_q, norm_k) follow diffusers' `WanAttention`
so that state-dict keys map 1:1 onto diffusers checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config import LoRAConfig
from megamoe.model.lora_mixer import attention_adapters
from megamoe.model.rope import apply_rope


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention on [B, heads, L, head_dim]; the one call a context-parallel wrapper replaces."""
    return F.scaled_dot_product_attention(q, k, v)


class WanAttention(nn.Module):
    """Multi-head attention whose q and k are RMS-normalised over the full width before the
    head split (Wan's `rms_norm_across_heads`), which keeps logits bounded in long training.

    `self.attend` is an instance attribute so that a context-parallel (Ulysses) wrapper can swap
    it per layer, e.g. only on self-attention, whose sequence is the sharded one.
    """

    def __init__(self, dim: int, num_heads: int, eps: float, lora: LoRAConfig | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        # A Sequential of one so that the key is `to_out.0.weight`, as in diffusers (whose index 1 is a dropout).
        self.to_out = nn.Sequential(nn.Linear(dim, dim))
        self.norm_q = nn.RMSNorm(dim, eps=eps, elementwise_affine=True)
        self.norm_k = nn.RMSNorm(dim, eps=eps, elementwise_affine=True)
        self.attend = attend
        # LoRA-Mixer: routed low-rank experts added to chosen projections (model/lora_mixer.py); None: none.
        self.lora = attention_adapters(dim, lora) if lora is not None else None

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [B, L, dim]; context [B, L_ctx, dim] for cross-attention, None for self-attention;
        rope (cos, sin) [L, head_dim/2] applied to q and k (self-attention only)."""
        kv = x if context is None else context
        q = self.norm_q(self._project("to_q", x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self._project("to_k", kv, context is None)).unflatten(-1, (self.num_heads, -1))
        v = self._project("to_v", kv, context is None).unflatten(-1, (self.num_heads, -1))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self._project("to_out", out.transpose(1, 2).flatten(2).type_as(q))

    def _project(self, name: str, x: torch.Tensor, sharded: bool = True) -> torch.Tensor:
        """Projection `name` of x, plus its routed LoRA update where it has one (sharded: x holds this
        rank's sequence shard, not the text every rank has whole)."""
        y = self.get_submodule(name)(x)
        return y if self.lora is None or name not in self.lora else y + self.lora[name](x, sharded)
