"""Bucketing: samples of similar shape share a batch, and every batch holds exactly one bucket.

Units. A bucket is (frames, height, width) in the units of the shards (`data.buckets`): PIXELS
for video shards (the clip is decoded straight to the bucket's size), LATENT units for latent
shards (the precomputed latent is cropped to it). With no buckets configured, every distinct
sample shape is its own bucket (video: the source size rounded down to a multiple the VAE and
patch size can take), so uniform data needs no configuration.

Assignment rule (`assign_bucket`), for a sample of shape (f, h, w):
  1. candidates are the buckets the sample is long enough for (F <= f); none -> 'too_short';
     latent shards are only cropped, never resized, so they also need H <= h and W <= w;
     none -> 'no_bucket';
  2. the nearest aspect ratio wins: smallest |log((h / w) / (H / W))|;
  3. then the longest clip (largest F);
  4. then the largest area not above the sample's (least resizing, no upscaling), else the
     smallest area above it; then the first listed. Steps 2-4 make the choice deterministic.

Batch size (`batch_size_for`): `tokens_per_batch` = 0 gives `micro_batch_size` for every bucket;
otherwise max(1, tokens_per_batch // tokens_per_sample), where tokens_per_sample counts patches
of the latent (F' / pf) * (H' / ph) * (W' / pw). A batch therefore never exceeds the budget,
except a single sample larger than the budget, which is batched alone.

Fit (`shape_problem`): a bucket, or with no buckets a sample's own shape, must fit the model and
the parallel layout, or the model fails on it at every attempt (a resumed run too): the VAE must
take it (video), its latent must split into whole patches, its patch grid must stay within the
rotary tables (model.rope_max_seq_len per axis), and its token count must split evenly into the
sequence shards (CP, times TP under sequence parallelism). Config validation applies this rule to
every configured bucket before start-up; the loader workers apply it to every sample and skip
the ones that fail as 'bad_shape'.

Resume (`Bucketer`): pending samples (in buckets not yet full) are part of the resume state as
the stream cursors they were read at, not as data; a resumed worker re-reads those few samples.
That is exact (a sample is a pure function of its cursor) and keeps checkpoints tiny, unlike
storing the pending tensors, and cheaper than replaying the stream from the oldest pending one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Shape = tuple[int, int, int]  # (frames, height, width)

TOO_SHORT = "too_short"  # same string as megamoe.data.errors.TOO_SHORT
NO_BUCKET = "no_bucket"  # no bucket fits (latent smaller than every bucket)
BAD_SHAPE = "bad_shape"  # same string as megamoe.data.errors.BAD_SHAPE


def latent_shape(shape: Shape, video: bool, compression: tuple[int, int]) -> Shape:
    """Latent (F', H', W') of a bucket; video buckets go through the VAE's (temporal, spatial) compression."""
    if not video:
        return tuple(shape)
    t, s = compression
    f, h, w = shape
    return ((f - 1) // t + 1, h // s, w // s)


def vae_compression(vae_config) -> tuple[int, int]:
    """(temporal, spatial) downsampling of a Wan VAE from its config (a mapping: the loaded model's
    `.config` or its config.json), with AutoencoderKLWan's defaults (4, 8) for absent keys."""
    return int(vae_config.get("scale_factor_temporal") or 4), int(vae_config.get("scale_factor_spatial") or 8)


def shape_problem(
    shape: Shape,
    video: bool,
    compression: Sequence[int],
    patch_size: Sequence[int],
    sequence_shards: int,
    rope_max_seq_len: int,
    shards_name: str = "the sequence shards",
) -> str | None:
    """Why a clip of `shape` (frames, height, width) cannot be trained, or None when it can.

    `shape` is in the units of the shards (pixels when `video`, else latent units); `compression`
    is the VAE's (temporal, spatial) downsampling; `sequence_shards` the number of pieces the token
    sequence is cut into (parallel.context_parallel_size, times tensor_parallel_size under sequence
    parallelism), `shards_name` what to call them. The answer continues a sentence whose subject
    names the shape ("data.buckets entry [..] <answer>"), for a one-line error.
    """
    f, h, w = shape
    if video:
        t, s = compression
        if (f - 1) % t or h % s or w % s:
            return f"is not {t}k+1 frames with sides that are multiples of {s} pixels, as the VAE needs"
    latent = latent_shape(shape, video, compression)
    if any(x % p for x, p in zip(latent, patch_size)):
        unit = f" (in pixels: multiples of {compression[1]}x{patch_size[1]}x{patch_size[2]})" if video else ""
        return f"gives the latent {tuple(latent)}, not divisible by model.patch_size={list(patch_size)}{unit}"
    grid = tuple(x // p for x, p in zip(latent, patch_size))
    if max(grid) > rope_max_seq_len:
        return f"gives the patch grid {grid}, beyond model.rope_max_seq_len={rope_max_seq_len} on one axis"
    tokens = math.prod(grid)
    if tokens % sequence_shards:
        return f"gives {tokens} tokens per sample, not divisible by {shards_name} = {sequence_shards}"
    return None


def tokens_per_sample(latent: Shape, patch_size: Sequence[int]) -> int:
    return math.prod(x // p for x, p in zip(latent, patch_size))


def batch_size_for(tokens: int, tokens_per_batch: int, micro_batch_size: int) -> int:
    if tokens_per_batch <= 0:
        return micro_batch_size
    return max(1, tokens_per_batch // max(1, tokens))


def assign_bucket(shape: Shape, buckets: Sequence[Shape], crop_only: bool) -> tuple[Shape | None, str | None]:
    """(bucket, None), or (None, cause) when no bucket takes the sample; see the rule above."""
    f, h, w = shape
    if not buckets:
        return tuple(shape), None
    candidates = [(i, b) for i, b in enumerate(buckets) if b[0] <= f]
    if not candidates:
        return None, TOO_SHORT
    if crop_only:
        candidates = [(i, b) for i, b in candidates if b[1] <= h and b[2] <= w]
        if not candidates:
            return None, NO_BUCKET

    def preference(item):
        i, (bf, bh, bw) = item
        aspect = abs(math.log((h / w) / (bh / bw)))
        fits = bh * bw <= h * w
        return round(aspect, 9), -bf, not fits, -(bh * bw) if fits else bh * bw, i

    return tuple(min(candidates, key=preference)[1]), None


def crop_latents(latents: np.ndarray, bucket: Shape) -> np.ndarray:
    """[C, f, h, w] -> [C, F, H, W]: the first F latent frames, centre crop in space.

    The first F latents of a causal video VAE are exactly the latents of the first 4(F-1)+1
    frames, and latents are local, so this is the crop one would have encoded.
    """
    bf, bh, bw = bucket
    _, f, h, w = latents.shape
    top, left = (h - bh) // 2, (w - bw) // 2
    return latents[:, :bf, top : top + bh, left : left + bw]


class Bucketer:
    """Collects samples per bucket; `add` returns the bucket's batch the moment it is full.

    Deterministic: batches depend only on the order samples arrive. Pending samples keep their
    arrival order, and the state lists them by cursor (see the module docstring).
    """

    def __init__(self, batch_size_of: Callable[[Shape], int]):
        self.batch_size_of = batch_size_of
        self._pending: dict[Shape, list[tuple[list, Any]]] = {}

    def add(self, bucket: Shape, cursor: list, sample: Any) -> list | None:
        waiting = self._pending.setdefault(tuple(bucket), [])
        waiting.append((list(cursor), sample))
        if len(waiting) < self.batch_size_of(tuple(bucket)):
            return None
        del self._pending[tuple(bucket)]
        return [s for _, s in waiting]

    def restore(self, bucket: Shape, cursor: list, sample: Any) -> None:
        """Put back a pending sample of a saved state (never completes a batch)."""
        self._pending.setdefault(tuple(bucket), []).append((list(cursor), sample))

    def state(self) -> list:
        """[[bucket as list, [cursor, ...]], ...] in the order buckets were first filled."""
        return [[list(b), [list(c) for c, _ in waiting]] for b, waiting in self._pending.items()]

    def num_pending(self) -> int:
        return sum(len(w) for w in self._pending.values())
