"""Raw video samples -> model pixels: frame sampling by time, decoding, resize, captions.

A raw WebDataset sample holds a video (`mp4`, `webm`, ...) and a caption (`txt` or `json`). The
path from its bytes to a clip is:

    sample_frame_indices   which source frames make a clip of `num_frames` at `target_fps`, chosen
                           by presentation time, so variable-frame-rate videos keep real time
    decode_frames          decode just those frames, displayed orientation (video_decoders.py:
                           decord, torchcodec or PyAV, with PyAV as everyone's fallback)
    resize_and_crop        cover the bucket's size, centre crop, scale to [-1, 1] as the Wan VAE expects
    decode_video_sample    all three, optionally in a `DecodePool` worker with a time limit

Every data failure is a `SampleError` with a cause (see errors.py) so the loader can skip and count it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from megamoe.data.decode_pool import DecodePool
from megamoe.data.errors import BAD_CAPTION, CORRUPT_VIDEO, MISSING_MEMBER, TOO_SHORT, SampleError, utf8_caption
from megamoe.data.video_decoders import (  # noqa: F401  (re-exported: the decode path's one import)
    DECODERS,
    DecodedFrames,
    backend_counts,
    decode_frames,
    preload,
    probe_video,
)

VIDEO_EXTS = ("mp4", "webm", "mov", "mkv", "avi")
# A sampling time that lands on a frame's pts must count as showing that frame although the pts
# was rounded when written: Matroska/WebM store milliseconds, so 30 fps frames sit at 0, 33, 67,
# 100 ms. 1 ms absorbs that and stays far below any frame interval (4 ms at 240 fps).
TIME_EPS = 1e-3


def _preload() -> None:
    """Called by DecodePool workers at start-up, so importing decoders is not charged to a job's time limit."""
    preload()


@dataclass(frozen=True)
class FrameSpec:
    """What a clip must look like: `num_frames` (4k+1, as Wan's VAE compresses 1 + 4k frames into
    1 + k latents) sampled at `fps`, resized and cropped to `height` x `width`."""

    num_frames: int
    fps: float
    height: int
    width: int

    def __post_init__(self):
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames must be 4k+1 (1, 5, 9, ..., 81), got {self.num_frames}")
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"height and width must be >= 1, got {self.height}x{self.width}")


# --- frame sampling -----------------------------------------------------------------------


def clip_fits(span_s: float, num_frames: int, target_fps: float) -> bool:
    """Whether `num_frames` at `target_fps` fit in a video whose first and last frames are `span_s` apart."""
    return (num_frames - 1) / target_fps <= span_s + TIME_EPS


def sample_frame_indices(pts, num_frames: int, target_fps: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of `num_frames` source frames forming a clip at `target_fps`, at a random start.

    `pts` (float [N], seconds) is every source frame's presentation time, in the decoder's frame
    order. Clip frame k is the source frame ON SCREEN at t_k = t0 + k / target_fps: the last one
    whose pts <= t_k. So the clip spans (num_frames - 1) / target_fps seconds of real time whatever
    the source's frame rate, constant or variable. The start t0 is a frame's pts, drawn uniformly
    among those whose window ends by the last frame's pts (every clip starts on a real frame).
    When target_fps is above the source's rate, frames repeat (duplicated, never invented).
    Raises SampleError(TOO_SHORT) when no window fits, SampleError(CORRUPT_VIDEO) for no frames
    or non-finite times.
    """
    pts = np.asarray(pts, dtype=np.float64)
    if pts.ndim != 1 or pts.size < 1:
        raise SampleError(CORRUPT_VIDEO, detail="the video has no frames")
    if not np.isfinite(pts).all():
        raise SampleError(CORRUPT_VIDEO, detail="the video has frames without a valid timestamp")
    if not target_fps > 0:
        raise ValueError(f"target_fps must be > 0, got {target_fps}")
    order = np.argsort(pts, kind="stable")  # decoders list frames in presentation order; be sure
    times = pts[order]
    span = (num_frames - 1) / target_fps
    starts = np.flatnonzero(times + span <= times[-1] + TIME_EPS)
    if starts.size == 0:
        raise SampleError(
            TOO_SHORT,
            detail=f"{num_frames} frames at {target_fps:g} fps span {span:.3f} s; the video's "
            f"{pts.size} frames span {times[-1] - times[0]:.3f} s",
        )
    t0 = times[starts[int(rng.integers(0, starts.size))]]
    wanted = t0 + np.arange(num_frames, dtype=np.float64) / target_fps
    on_screen = np.searchsorted(times, wanted + TIME_EPS, side="right") - 1
    return order[on_screen].astype(np.int64)


# --- decoding -----------------------------------------------------------------------------


# --- resize, crop, normalise --------------------------------------------------------------


def cover_size(src_h: int, src_w: int, height: int, width: int) -> tuple[int, int]:
    """The smallest (h, w) of the source's aspect that covers height x width (then centre-cropped)."""
    scale = max(height / src_h, width / src_w)
    # max(): a float rounding must never leave the resized frame a pixel short of the crop.
    return max(height, round(src_h * scale)), max(width, round(src_w * scale))


def _resize_crop_uint8(frames, height: int, width: int) -> np.ndarray:
    """uint8 [F, H, W, 3] -> uint8 [F, height, width, 3]: scale to cover, crop the centre.

    The resize runs on uint8 in channels-last layout, torch's vectorised antialias kernel: 12x
    faster than on float32 here (0.7 vs 9 ms for 17 frames 256 -> 128 px), within one level of
    rounding the float result. Everything else is numpy on purpose: torch parallelises even small
    copies over its intra-op threads, and on a busy machine each such region waits for a
    descheduled thread (it made the inline path 10x slower than bare decord in the benchmark).
    """
    frames = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    src_h, src_w = frames.shape[1:3]
    new_h, new_w = cover_size(src_h, src_w, height, width)
    if (new_h, new_w) != (src_h, src_w):
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # [F, 3, H, W], channels-last
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        frames = x.permute(0, 2, 3, 1).numpy()
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return np.ascontiguousarray(frames[:, top : top + height, left : left + width])


def uint8_to_model_range(clip: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float32 [3, F, H, W] in [-1, 1] (contiguous; numpy, for the reason above)."""
    x = np.ascontiguousarray(clip.transpose(3, 0, 1, 2), dtype=np.float32)
    np.divide(x, 127.5, out=x)
    np.subtract(x, 1.0, out=x)
    return torch.from_numpy(x)


def resize_and_crop(frames, height: int, width: int) -> torch.Tensor:
    """uint8 [F, H, W, 3] (numpy or torch) -> float32 [3, F, height, width] in [-1, 1].

    Scales so the frame covers height x width (the side that is short relative to the target's
    aspect fits exactly), then crops the centre. Bilinear with antialias=True: a plain bilinear
    downscale aliases fine texture into moire, which the VAE would faithfully encode. Resized
    values are rounded to 8 bits, as image libraries do.
    """
    return uint8_to_model_range(_resize_crop_uint8(frames, height, width))


def decode_clip_uint8(
    data: bytes,
    spec: FrameSpec,
    seed: int,
    decoder: str = "decord",
    source_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, str]:
    """(uint8 [F, spec.height, spec.width, 3], backend): the clip of `seed`, resized and cropped.

    The worker-side half of decode_video_sample: uint8 is a quarter of float32's bytes to send
    between processes. Inline and pooled decoding both go through it, so they give identical clips.
    decord scales while decoding to the size that covers the clip (FFmpeg's scaler, whose filter
    widens with the downscale ratio so it does not alias, run inside its colour conversion): that
    costs nothing over decoding at the source size, where decoding full frames and resizing them
    in torch ran at 0.75x bare decord (benchmarks/RESULTS.md). torchcodec and PyAV frames arrive
    at the source size and are resized in torch.
    `source_size` is the DISPLAYED (height, width), from the caller's probe or probed here.
    """
    if source_size is None:
        try:
            info = probe_video(data)
            source_size = (info["height"], info["width"])
        except SampleError:
            pass  # decode_frames reports what is wrong with the file, with every decoder's messages
    size = cover_size(*source_size, spec.height, spec.width) if source_size else None
    rng = np.random.default_rng(seed)
    decoded = decode_frames(data, lambda pts: sample_frame_indices(pts, spec.num_frames, spec.fps, rng), decoder, size)
    return _resize_crop_uint8(decoded.frames, spec.height, spec.width), decoded.backend


_default_pool: DecodePool | None = None


def default_pool(timeout_s: float) -> DecodePool:
    """A process-wide one-worker pool for callers that give a timeout but no pool."""
    global _default_pool
    if _default_pool is None or _default_pool._closed:
        _default_pool = DecodePool(num_workers=1, timeout_s=timeout_s)
    return _default_pool


def decode_video_sample(
    data: bytes,
    spec: FrameSpec,
    rng: np.random.Generator,
    timeout_s: float | None = None,
    pool: DecodePool | None = None,
    decoder: str = "decord",
) -> torch.Tensor:
    """A video's bytes -> float32 [3, spec.num_frames, spec.height, spec.width] in [-1, 1].

    timeout_s None and no pool: decode in this process (no protection against a hung decoder).
    Otherwise the job runs in `pool` (or a shared one-worker pool) and a decode past the limit
    raises SampleError(DECODE_TIMEOUT). One seed is drawn from `rng` either way, so the same rng
    state gives the same clip inline and in a pool. `decoder` is data.decoder (decode_frames).
    """
    seed = int(rng.integers(2**63))
    if pool is None and timeout_s is None:
        clip, used = decode_clip_uint8(data, spec, seed, decoder)
    else:
        pool = pool or default_pool(timeout_s)
        clip, used = pool.run(decode_clip_uint8, data, spec, seed, decoder, timeout_s=timeout_s)
        backend_counts[used] += 1  # the worker counted it in its own process
    return uint8_to_model_range(clip)


# --- raw samples: video member and caption ------------------------------------------------


def video_member(members: dict[str, bytes], key: str | None = None, shard: str | None = None) -> tuple[str, bytes]:
    """(extension, bytes) of a sample's video; SampleError(MISSING_MEMBER) when it has none."""
    for ext in VIDEO_EXTS:
        if ext in members:
            return ext, members[ext]
    raise SampleError(
        MISSING_MEMBER,
        key,
        shard,
        f"no video member (one of {', '.join(VIDEO_EXTS)}); members: {', '.join(sorted(members)) or 'none'}",
    )


def parse_caption(members: dict[str, bytes], key: str | None = None, shard: str | None = None) -> str:
    """The caption of a raw sample from its `txt` member, or `json` ({"caption": ...} or {"text": ...}).

    Whitespace is collapsed (as Wan's prompt_clean does). Missing both members ->
    SampleError(MISSING_MEMBER); empty, non-utf-8, malformed json or no caption field -> BAD_CAPTION.
    """
    if "txt" in members:
        raw, ext = members["txt"], "txt"
    elif "json" in members:
        raw, ext = members["json"], "json"
    else:
        raise SampleError(MISSING_MEMBER, key, shard, "no caption member ('txt' or 'json')")
    text = utf8_caption(raw, key, shard, f"{ext} caption")
    if ext == "json":
        try:
            record = json.loads(text)
        except ValueError as e:
            raise SampleError(BAD_CAPTION, key, shard, f"malformed json caption: {e}") from None
        field = next((f for f in ("caption", "text") if isinstance(record, dict) and f in record), None)
        if field is None or not isinstance(record[field], str):
            raise SampleError(BAD_CAPTION, key, shard, "the json caption has no string 'caption' or 'text' field")
        text = record[field]
    text = " ".join(text.split())
    if not text:
        raise SampleError(BAD_CAPTION, key, shard, f"the {ext} caption is empty")
    return text


def decode_raw_sample(
    key: str,
    members: dict[str, bytes],
    shard: str,
    spec: FrameSpec,
    rng: np.random.Generator,
    timeout_s: float | None = None,
    pool: DecodePool | None = None,
    decoder: str = "decord",
) -> dict:
    """{'pixels' [3, F, H, W] in [-1, 1], 'caption', 'key'} of one raw sample; SampleError names key and shard."""
    try:
        caption = parse_caption(members, key, shard)  # first: a cheap check that can spare a decode
        _, data = video_member(members, key, shard)
        pixels = decode_video_sample(data, spec, rng, timeout_s=timeout_s, pool=pool, decoder=decoder)
    except SampleError as e:
        raise e.with_location(key, shard) from None
    return {"pixels": pixels, "caption": caption, "key": key}
