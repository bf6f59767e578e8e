"""Sequence sharding of the DiT's tokens and Ulysses context-parallel (CP) self-attention.

The sequence of L video tokens is split over the CP ranks (outer) and, with sequence
parallelism, over the TP ranks (inner): rank (cp, tp) holds chunk cp * TP + tp of
L / (CP * TP) consecutive tokens, which is megatron-core's tensor-and-context group order
(TP fastest). Without SP the TP ranks of one CP rank hold the same chunk.

Self-attention needs every token, so Ulysses re-shards q, k, v with one all-to-all over CP:

    [B, heads, L / CP, d]  (this CP rank's tokens, all local heads)
      -> all-to-all ->  [B, heads / CP, L, d]  (all tokens, this CP rank's heads)
      -> attention  ->  all-to-all back  ->  [B, heads, L / CP, d]

Cross-attention needs no exchange: each token attends to the whole text, which every rank has.

Gradient convention: at the end of the model the prediction is gathered so every rank
computes the same full loss; the gather's backward keeps the rank's own chunk, so each rank's
parameter gradients are its partial contribution, completed by the sum over the CP ranks
(DeepSpeed's sequence-data-parallel reduction) and over the TP ranks (the SP gradient hooks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.model.attention import attend
from megamoe.parallel.collectives import all_to_all, gather_output


class SequenceSharding:
    """The `WanDiT.sequence_sharding` hook for a parallel layout.

    `group` holds the ranks among which the sequence is split, ordered by chunk; `cp_group` the
    context-parallel ranks (q and k hold the CP chunk, so RoPE is sliced by CP rank).
    """

    def __init__(self, group, cp_group):
        self.group, self.cp_group = group, cp_group
        self.num_shards = dist.get_world_size(group)
        """How many disjoint pieces the sequence is cut into (CP * TP with SP, CP without)."""
        self.index = dist.get_rank(group)
        self.cp_size, self.cp_rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's chunk of a full-sequence tensor. The plain slice's backward (zeros outside
        the chunk) is the partial-gradient convention: no communication."""
        n = self._chunk(x.shape[dim])
        return x.narrow(dim, self.index * n, n)

    def shard_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables [L, d/2] -> the CP chunk's rows: q and k hold the CP chunk when rotated
        (with SP the attention's input hook gathered the TP chunks before the q/k projections)."""
        n = cos.shape[0] // self.cp_size
        return cos.narrow(0, self.cp_rank * n, n), sin.narrow(0, self.cp_rank * n, n)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """All chunks in sequence order on every rank; backward keeps this rank's chunk."""
        return gather_output(x, dim, self.group) if self.num_shards > 1 else x

    def _chunk(self, length: int) -> int:
        if length % self.num_shards:
            raise ValueError(
                f"sequence of {length} tokens is not divisible into {self.num_shards} shards "
                f"(parallel.context_parallel_size, times tensor_parallel_size with sequence_parallel); "
                f"choose latent sizes whose token count is a multiple of {self.num_shards}"
            )
        return length // self.num_shards


class UlyssesAttend:
    """Replaces a self-attention's `attend`: all-to-all over CP around the local attention."""

    def __init__(self, cp_group, inner=attend):
        self.group, self.inner = cp_group, inner
        self.size = dist.get_world_size(cp_group)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[1] % self.size:
            raise ValueError(
                f"{q.shape[1]} local attention heads are not divisible by parallel.context_parallel_size={self.size}"
            )
        out = self.inner(self._to_heads(q), self._to_heads(k), self._to_heads(v))
        return self._to_sequence(out)

    def _to_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, h, Lc, d] -> [CP (head group, destination), B, h/CP, Lc, d] -> exchange ->
        # [CP (sequence chunk, source), B, h/CP, Lc, d] -> [B, h/CP, CP * Lc, d]
        b, h, lc, d = x.shape
        x = x.reshape(b, self.size, h // self.size, lc, d).permute(1, 0, 2, 3, 4)
        x = self._exchange(x)
        return x.permute(1, 2, 0, 3, 4).reshape(b, h // self.size, self.size * lc, d)

    def _to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        # [B, h/CP, L, d] -> [CP (sequence chunk, destination), B, h/CP, Lc, d] -> exchange ->
        # [CP (head group, source), B, h/CP, Lc, d] -> [B, h, Lc, d]
        b, hl, length, d = x.shape
        x = x.reshape(b, hl, self.size, length // self.size, d).permute(2, 0, 1, 3, 4)
        x = self._exchange(x)
        return x.permute(1, 0, 2, 3, 4).reshape(b, self.size * hl, length // self.size, d)

    def _exchange(self, x: torch.Tensor) -> torch.Tensor:
        splits = [1] * self.size
        return all_to_all(x.contiguous(), splits, splits, self.group)
