"""Raw video samples -> model pixels: frame sampling, decoding (decord, PyAV fallback), resize, captions.

A raw WebDataset sample holds a video (`mp4`, `webm`, ...) and a caption (`txt` or `json`). The
path from its bytes to a clip is:

    sample_frame_indices   which source frames make a clip of `num_frames` at `target_fps`
    decode_frames          decode just those frames: decord first (scaling while it decodes), PyAV when decord fails
    resize_and_crop        cover the bucket's size, centre crop, scale to [-1, 1] as the Wan VAE expects
    decode_video_sample    all three, optionally in a `DecodePool` worker with a time limit

Every data failure is a `SampleError` with a cause (see errors.py) so the loader can skip and count it.

decord is unmaintained and has known leaks and GIL-holding hangs; it is imported lazily (it is not
built for every platform) and PyAV takes over, with one warning, when it cannot be imported.
"""

from __future__ import annotations

import collections
import io
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from megamoe.data.decode_pool import DecodePool
from megamoe.data.errors import BAD_CAPTION, CORRUPT_VIDEO, MISSING_MEMBER, TOO_SHORT, SampleError, utf8_caption

VIDEO_EXTS = ("mp4", "webm", "mov", "mkv", "avi")
BACKENDS = ("auto", "decord", "pyav")
# The decoders' own threads: 1, because parallelism comes from loader/pool processes and several
# processes each spawning a thread per core oversubscribe the CPU (decord's default of one thread
# per core was also slower on tiny clips: 357 vs 607 clips/s on 2 cores).
DECORD_THREADS = 1
PYAV_THREADS = 1

# Which backend decoded each clip in this process (a DecodePool keeps its own, fed by its workers).
backend_counts: collections.Counter = collections.Counter()

_decord_module = None
_decord_tried = False


def _decord():
    """decord, or None (with a one-time warning) where it cannot be imported."""
    global _decord_module, _decord_tried
    if not _decord_tried:
        _decord_tried = True
        try:
            import decord

            _decord_module = decord
        except Exception as e:  # ImportError, or an OSError from its shared library
            warnings.warn(
                f"decord cannot be imported ({type(e).__name__}: {e}); decoding videos with PyAV, "
                f"its fallback. `pip install decord` where wheels exist.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _decord_module


def _preload() -> None:
    """Called by DecodePool workers at start-up, so decord's import is not charged to a job's time limit."""
    _decord()


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


def frame_offsets(num_frames: int, source_fps: float, target_fps: float) -> np.ndarray:
    """Source-frame offsets of a clip's frames from its first: offset k = round(k * source/target).

    Rounding is half-up (floor(x + 0.5)), not numpy's half-to-even, so 24 -> 16 fps gives the
    regular pattern 0, 2, 3, 5, 6, 8, ...; a tiny epsilon keeps 30 -> 15 at exact multiples of 2.
    """
    step = source_fps / target_fps
    return np.floor(np.arange(num_frames, dtype=np.float64) * step + 0.5 + 1e-9).astype(np.int64)


def sample_frame_indices(
    num_source_frames: int, source_fps: float, num_frames: int, target_fps: float, rng: np.random.Generator
) -> np.ndarray:
    """Indices of `num_frames` source frames forming a clip at `target_fps`, at a random start.

    The clip spans (num_frames - 1) / target_fps seconds. Frame k is shown at t0 + k / target_fps
    and taken from source frame round(t * source_fps). The start t0 is a source frame time drawn
    uniformly among those whose window fits, so every clip starts on a real frame and the index
    pattern does not depend on where it starts. When target_fps >= source_fps the clip is slower
    than the source and consecutive indices may repeat (frames are duplicated, never invented).
    Raises SampleError(TOO_SHORT) when no window fits.
    """
    if num_source_frames < 1:
        raise SampleError(CORRUPT_VIDEO, detail="the video has no frames")
    if not (math.isfinite(source_fps) and source_fps > 0):
        raise SampleError(CORRUPT_VIDEO, detail=f"the video reports an invalid frame rate {source_fps}")
    if not target_fps > 0:
        raise ValueError(f"target_fps must be > 0, got {target_fps}")
    offsets = frame_offsets(num_frames, source_fps, target_fps)
    last_start = num_source_frames - 1 - int(offsets[-1])
    if last_start < 0:
        need = (num_frames - 1) / target_fps
        have = (num_source_frames - 1) / source_fps
        raise SampleError(
            TOO_SHORT,
            detail=f"{num_frames} frames at {target_fps:g} fps span {need:.3f} s; the video "
            f"has {num_source_frames} frames at {source_fps:g} fps ({have:.3f} s)",
        )
    start = int(rng.integers(0, last_start + 1))
    return start + offsets


# --- decoding -----------------------------------------------------------------------------


class DecodedFrames(NamedTuple):
    frames: np.ndarray  # uint8 [F, H, W, 3], RGB
    source_fps: float
    num_source_frames: int
    backend: str  # 'decord' or 'pyav'


IndicesFn = Callable[[int, float], np.ndarray]  # (num_source_frames, source_fps) -> indices


def _decode_decord(decord, data: bytes, indices_fn: IndicesFn, size: tuple[int, int] | None = None) -> DecodedFrames:
    height, width = size or (-1, -1)  # decord's -1: the source size
    reader = decord.VideoReader(
        io.BytesIO(data), ctx=decord.cpu(0), num_threads=DECORD_THREADS, width=width, height=height
    )
    try:
        n, fps = len(reader), float(reader.get_avg_fps())
        indices = np.asarray(indices_fn(n, fps), dtype=np.int64)
        frames = reader.get_batch(indices.tolist()).asnumpy()
    finally:
        del reader  # drop decord's native reader now, not at some later garbage collection
    return DecodedFrames(frames, fps, n, "decord")


def _pyav_frame_count(container, stream) -> int:
    if stream.frames > 0:  # mp4 and mov store it; webm and mkv do not
        return int(stream.frames)
    # Demux without decoding: one packet per frame for the codecs we meet; cheap on in-memory bytes.
    count = sum(1 for packet in container.demux(stream) if packet.size > 0)
    container.seek(0)
    return count


def _decode_pyav(data: bytes, indices_fn: IndicesFn) -> DecodedFrames:
    import av
    from av.video.reformatter import VideoReformatter

    # One reformatter for the whole clip: `frame.to_ndarray(format=...)` builds a new swscale
    # context per frame, which made it 3-4x slower than this on 64x64 clips (same pixels).
    to_rgb = VideoReformatter()

    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.video:
            raise SampleError(CORRUPT_VIDEO, detail="the file has no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = PYAV_THREADS
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else float("nan")
        n = _pyav_frame_count(container, stream)
        indices = np.asarray(indices_fn(n, fps), dtype=np.int64)
        wanted = collections.defaultdict(list)  # source index -> positions in the clip
        for position, index in enumerate(indices.tolist()):
            wanted[index].append(position)
        out: list[np.ndarray | None] = [None] * len(indices)
        last = int(indices.max())
        # Decoding sequentially from the start: exact frame numbers without trusting seek
        # accuracy or timestamps; PyAV is the fallback path, correctness over speed.
        for number, frame in enumerate(container.decode(stream)):
            if number in wanted:
                rgb = to_rgb.reformat(frame, format="rgb24").to_ndarray()
                for position in wanted[number]:
                    out[position] = rgb
            if number >= last:
                break
    if any(f is None for f in out):
        decoded = sum(f is not None for f in out)
        raise SampleError(
            CORRUPT_VIDEO,
            detail=f"the container lists {n} frames but only {decoded} of the "
            f"{len(out)} requested could be decoded (truncated?)",
        )
    return DecodedFrames(np.stack(out), fps, n, "pyav")


def _once(indices_fn: IndicesFn) -> IndicesFn:
    """`indices_fn` evaluated once per (num_source_frames, source_fps): it may draw from an RNG."""
    cache = {}

    def indices(n: int, fps: float) -> np.ndarray:
        if (n, fps) not in cache:
            cache[(n, fps)] = indices_fn(n, fps)
        return cache[(n, fps)]

    return indices


def decode_frames(
    data: bytes, indices_fn: IndicesFn, backend: str = "auto", size: tuple[int, int] | None = None
) -> DecodedFrames:
    """Decode the frames `indices_fn(num_source_frames, source_fps)` picks from a video's bytes.

    Returns DecodedFrames(frames uint8 [F, H, W, 3], source_fps, num_source_frames, backend), a
    named tuple whose `backend` says which decoder succeeded (also tallied in `backend_counts`).
    `size` (height, width) asks decord to scale while decoding (FFmpeg's scaler, in the decoder's
    own colour conversion); PyAV returns the source size, so callers must accept either.
    'auto' tries decord and falls back to PyAV when decord raises; a SampleError raised by
    `indices_fn` (e.g. TOO_SHORT) is the video's verdict and is not retried. Raises
    SampleError(CORRUPT_VIDEO) when no backend can decode the requested frames.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not data:
        raise SampleError(CORRUPT_VIDEO, detail="the video has zero bytes")
    errors = []
    indices_fn = _once(indices_fn)  # a retry or the fallback decodes the frames the first try picked
    decord = _decord() if backend in ("auto", "decord") else None
    if backend == "decord" and decord is None:
        raise RuntimeError("backend='decord' was asked for but decord cannot be imported; use 'auto' or 'pyav'")
    result = None
    if decord is not None:
        try:
            try:
                result = _decode_decord(decord, data, indices_fn, size)
            except SampleError:
                raise
            except Exception:
                if size is None:
                    raise
                # decord 0.6 fails a size check for a few output widths (8, 12, 16, 24, 48, 72 px
                # here): decode at the source size and let the caller resize.
                result = _decode_decord(decord, data, indices_fn)
        except SampleError:
            raise
        except Exception as e:  # decord raises DECORDError (a RuntimeError) for anything it dislikes
            errors.append(f"decord: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__}")
    if result is None and backend in ("auto", "pyav"):
        try:
            result = _decode_pyav(data, indices_fn)
        except SampleError as e:
            if e.cause != CORRUPT_VIDEO or not errors:
                raise
            errors.append(f"pyav: {e.detail}")
        except Exception as e:  # av.error.FFmpegError and friends
            errors.append(f"pyav: {type(e).__name__}: {str(e)[:200]}")
    if result is None:
        raise SampleError(CORRUPT_VIDEO, detail="; ".join(errors) or "no backend could decode the video")
    frames = result.frames
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or min(frames.shape[1:3]) < 1:
        raise SampleError(CORRUPT_VIDEO, detail=f"{result.backend} returned frames {frames.dtype} {frames.shape}")
    backend_counts[result.backend] += 1
    return result


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
    data: bytes, spec: FrameSpec, seed: int, backend: str = "auto", source_size: tuple[int, int] | None = None
) -> tuple[np.ndarray, str]:
    """(uint8 [F, spec.height, spec.width, 3], backend): the clip of `seed`, resized and cropped.

    The worker-side half of decode_video_sample: uint8 is a quarter of float32's bytes to send
    between processes. Inline and pooled decoding both go through it, so they give identical clips.
    decord scales while decoding to the size that covers the clip (FFmpeg's scaler, whose filter
    widens with the downscale ratio so it does not alias, run inside its colour conversion): that
    costs nothing over decoding at the source size, where decoding full frames and resizing them
    in torch ran at 0.75x bare decord (benchmarks/RESULTS.md).
    The source size comes from `source_size` (height, width) or a header probe (0.3 ms); frames
    from the PyAV fallback arrive at the source size and are resized in torch.
    """
    if source_size is None:
        try:
            info = probe_video(data, decode_first_frame=False)
            source_size = (info["height"], info["width"])
        except SampleError:
            pass  # decode_frames reports what is wrong with the file, with both decoders' messages
    size = cover_size(*source_size, spec.height, spec.width) if source_size else None
    rng = np.random.default_rng(seed)
    decoded = decode_frames(
        data, lambda n, fps: sample_frame_indices(n, fps, spec.num_frames, spec.fps, rng), backend, size
    )
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
    backend: str = "auto",
) -> torch.Tensor:
    """A video's bytes -> float32 [3, spec.num_frames, spec.height, spec.width] in [-1, 1].

    timeout_s None and no pool: decode in this process (no protection against a hung decoder).
    Otherwise the job runs in `pool` (or a shared one-worker pool) and a decode past the limit
    raises SampleError(DECODE_TIMEOUT). One seed is drawn from `rng` either way, so the same rng
    state gives the same clip inline and in a pool.
    """
    seed = int(rng.integers(2**63))
    if pool is None and timeout_s is None:
        clip, used = decode_clip_uint8(data, spec, seed, backend)
    else:
        pool = pool or default_pool(timeout_s)
        clip, used = pool.run(decode_clip_uint8, data, spec, seed, backend, timeout_s=timeout_s)
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
) -> dict:
    """{'pixels' [3, F, H, W] in [-1, 1], 'caption', 'key'} of one raw sample; SampleError names key and shard."""
    try:
        caption = parse_caption(members, key, shard)  # first: a cheap check that can spare a decode
        _, data = video_member(members, key, shard)
        pixels = decode_video_sample(data, spec, rng, timeout_s=timeout_s, pool=pool)
    except SampleError as e:
        raise e.with_location(key, shard) from None
    return {"pixels": pixels, "caption": caption, "key": key}


def probe_video(data: bytes, decode_first_frame: bool = True) -> dict:
    """{frames, height, width, fps, duration, codec} of a video's bytes, read with PyAV.

    With `decode_first_frame` the first frame is decoded too: a header can be intact while the
    stream is not, and a video that cannot give one frame is of no use (the shard writer checks
    this once; the loader, which decodes anyway, skips it). Raises SampleError(CORRUPT_VIDEO).
    """
    import av

    if not data:
        raise SampleError(CORRUPT_VIDEO, detail="the video has zero bytes")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise SampleError(CORRUPT_VIDEO, detail="the file has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            codec = stream.codec_context.name
            height, width = stream.codec_context.height, stream.codec_context.width
            frames = _pyav_frame_count(container, stream)
            first = next(container.decode(stream), None) if decode_first_frame else True
    except SampleError:
        raise
    except Exception as e:  # av.error.FFmpegError, and what a broken container makes PyAV raise
        raise SampleError(CORRUPT_VIDEO, detail=f"{type(e).__name__}: {str(e)[:200]}") from None
    if first is None or frames < 1 or fps <= 0 or min(height, width) < 1:
        raise SampleError(CORRUPT_VIDEO, detail=f"no decodable frame (frames={frames}, fps={fps}, {width}x{height})")
    return {
        "frames": frames,
        "height": height,
        "width": width,
        "fps": fps,
        "duration": round(frames / fps, 6),
        "codec": codec,
    }
