"""Video decoders behind one interface: decord, torchcodec and PyAV, frames picked by presentation time.

    decode_frames(data, pick, decoder, size) -> DecodedFrames

Every backend reads the presentation timestamp (pts, seconds) of every frame of the first video
stream, hands them to `pick` (which returns the indices of the frames a clip needs, see
video.sample_frame_indices) and returns exactly those frames, RGB uint8, in their DISPLAYED
orientation: a phone video whose container carries a display matrix (rotation by 90, 180 or 270
degrees) comes out rotated, as a player shows it. `probe_video` reports the displayed size too, so
the bucket and the size a decoder scales to are chosen for the orientation the frames arrive in.

  decord      frame times from its index (get_frame_timestamp); rotates and scales itself.
  torchcodec  PyTorch's maintained decoder (exact seek mode); rotates itself; frame times from
              the packets, as for PyAV, checked against those of the frames it returns.
  pyav        frame times from demuxing packets (no decoding); decodes sequentially from the start
              and applies the rotation itself. Every other backend falls back to it.

decord and torchcodec are imported lazily (neither is built for every platform, and the training
process itself never imports a decoder); when one cannot be imported, PyAV takes over with a
one-line warning. A failure of the file itself is SampleError(CORRUPT_VIDEO) (errors.py).
"""

from __future__ import annotations

import collections
import importlib
import io
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from megamoe.data.errors import CORRUPT_VIDEO, SampleError

DECODERS = ("decord", "torchcodec", "pyav")
# The decoders' own threads: 1, because parallelism comes from loader/pool processes and several
# processes each spawning a thread per core oversubscribe the CPU (decord's default of one thread
# per core was also slower on tiny clips: 357 vs 607 clips/s on 2 cores).
DECODER_THREADS = 1

# Which backend decoded each clip in this process (a DecodePool keeps its own, fed by its workers).
backend_counts: collections.Counter = collections.Counter()

FramePicker = Callable[[np.ndarray], np.ndarray]  # frame pts, float64 [N] seconds -> source indices [F]


class DecodedFrames(NamedTuple):
    frames: np.ndarray  # uint8 [F, H, W, 3], RGB, displayed orientation
    pts: np.ndarray  # float64 [N]: presentation time (s) of every source frame, in the backend's frame order
    indices: np.ndarray  # int64 [F]: the source frames decoded (what `pick` returned)
    backend: str  # 'decord', 'torchcodec' or 'pyav'


# --- lazy imports -------------------------------------------------------------------------

_modules: dict[str, object] = {}  # name -> module, or the exception its import raised
_warned: set[str] = set()


def _import(name: str):
    """The module, or None (with a one-time warning) where it cannot be imported."""
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(name)
        except Exception as e:  # ImportError, or an OSError from a shared library (FFmpeg, libtorch)
            _modules[name] = e
    module = _modules[name]
    if isinstance(module, Exception):
        if name not in _warned:
            _warned.add(name)
            package = name.split(".")[0]
            root = module
            while root.__cause__ is not None:  # torchcodec wraps the loader's error: name the missing library
                root = root.__cause__
            reason = f"{type(module).__name__}: {_short(module)}"
            if root is not module:
                reason += f", because {type(root).__name__}: {_short(root)}"
            if isinstance(module, ModuleNotFoundError):
                fix = f"`pip install {package}`" + (" and FFmpeg's shared libraries" if package == "torchcodec" else "")
            elif package == "torchcodec":
                fix = (
                    "It is installed but cannot load: it needs FFmpeg's shared libraries and a build for this "
                    "torch (PyPI's wheels link CUDA torch; with a CPU torch take it from torch's own index)"
                )
            else:
                fix = f"It is installed but cannot load; reinstall {package}"
            warnings.warn(
                f"{package} cannot be imported ({reason}); decoding videos with PyAV, its fallback. {fix} "
                f"(README, Decoders)",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    return module


def preload() -> None:
    """Import decord now (DecodePool workers do, so no job pays for the import); a decoder that
    cannot be imported warns when first asked for, not here. torchcodec is left to its first job
    (within data.decode_timeout_s): loading it costs every worker seconds, and most runs use decord."""
    for name in ("decord",):
        if name not in _modules:
            try:
                _modules[name] = importlib.import_module(name)
            except Exception as e:
                _modules[name] = e


# --- rotation -----------------------------------------------------------------------------


def quarter_turns(rotation: float | None) -> int:
    """Counter-clockwise quarter turns (0-3) of a display rotation in degrees (counter-clockwise,
    as FFmpeg's av_display_rotation_get and PyAV's VideoFrame.rotation give it; -90 = 270)."""
    if rotation is None or not np.isfinite(rotation):
        return 0
    return int(round(rotation / 90.0)) % 4


def rotate(frames: np.ndarray, turns: int) -> np.ndarray:
    """uint8 [F, H, W, 3] turned `turns` quarter turns counter-clockwise (a view where possible)."""
    return np.rot90(frames, turns, axes=(1, 2)) if turns % 4 else frames


def displayed_size(height: int, width: int, turns: int) -> tuple[int, int]:
    """(height, width) of a coded frame as displayed after `turns` quarter turns."""
    return (width, height) if turns % 2 else (height, width)


# --- backends -----------------------------------------------------------------------------


def _pick(pick: FramePicker, pts: np.ndarray) -> np.ndarray:
    indices = np.asarray(pick(pts), dtype=np.int64)
    if indices.size == 0 or indices.min() < 0 or indices.max() >= len(pts):
        raise ValueError(f"frame picker returned indices outside 0..{len(pts) - 1}: {indices}")
    return indices


def _decode_decord(decord, data: bytes, pick: FramePicker, size: tuple[int, int] | None) -> DecodedFrames:
    height, width = size or (-1, -1)  # decord's -1: the source size; it takes the DISPLAYED size
    reader = decord.VideoReader(
        io.BytesIO(data), ctx=decord.cpu(0), num_threads=DECODER_THREADS, width=width, height=height
    )
    try:
        n = len(reader)
        if n < 1:
            raise SampleError(CORRUPT_VIDEO, detail="the video has no frames")
        pts = np.asarray(reader.get_frame_timestamp(range(n)), dtype=np.float64)[:, 0]  # [N, (start, end)]
        indices = _pick(pick, pts)
        frames = reader.get_batch(indices.tolist()).asnumpy()  # decord applies the display rotation
    finally:
        del reader  # drop decord's native reader now, not at some later garbage collection
    if size is not None and frames.shape[1:] != (*size, 3):
        # decord 0.6 fails a size check for some output widths, or returns garbage channels (8, 12,
        # 16, 24, 48, 72 px here): the caller retries at the source size and resizes itself.
        raise RuntimeError(f"decord returned {frames.shape[1:]} for the size {size}")
    return DecodedFrames(frames, pts, indices, "decord")


def _decode_torchcodec(decoders, data: bytes, pick: FramePicker) -> DecodedFrames:
    # seek_mode='exact' scans the file once (demuxing, not decoding) and indexes every frame in
    # presentation order; 'approximate' would place frames by the average rate, the bug we avoid.
    # No Resize transform: torchcodec 0.17's took 45-70 ms for 17 frames 480 -> 256 px where
    # decoding at the source size and resizing in torch took 16-28 + 9 ms (2 cores, shared).
    decoder = decoders.VideoDecoder(data, dimension_order="NHWC", num_ffmpeg_threads=DECODER_THREADS, seek_mode="exact")
    n = int(decoder.metadata.num_frames or 0)
    if n < 1:
        raise SampleError(CORRUPT_VIDEO, detail="the video has no frames")
    # torchcodec has no public list of every frame's pts: the packets' (PyAV, demux only) give
    # it, and the pts of the frames torchcodec returns must match them (else PyAV takes over).
    pts = _pyav_pts_of(data)
    if len(pts) != n:
        raise RuntimeError(f"torchcodec indexes {n} frames, the container's packets {len(pts)}")
    indices = _pick(pick, pts)
    unique, inverse = np.unique(indices, return_inverse=True)  # a slow clip repeats frames: decode each once
    batch = decoder.get_frames_at(unique.tolist())
    got = batch.pts_seconds.numpy()
    if np.abs(got - pts[unique]).max() > 1e-3:
        raise RuntimeError(f"torchcodec returned frames at {got} s for frames at {pts[unique]} s")
    # torchcodec applies the display rotation itself (its metadata reports the displayed size).
    frames = batch.data.numpy()[inverse]
    return DecodedFrames(np.ascontiguousarray(frames), pts, indices, "torchcodec")


def _pyav_pts_of(data: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.video:
            raise SampleError(CORRUPT_VIDEO, detail="the file has no video stream")
        return pyav_frame_pts(container, container.streams.video[0])


def pyav_frame_pts(container, stream) -> np.ndarray:
    """Sorted pts (s) of every frame of `stream`, from its packets: demuxing without decoding is
    cheap. Packets arrive in decode order (B-frames come before the frames they reference), so
    the sort gives presentation order, the order decoded frames come out in."""
    ticks, fallback = [], False
    for packet in container.demux(stream):
        if packet.size == 0:  # the flush packet at the end
            continue
        t = packet.pts if packet.pts is not None else packet.dts
        fallback |= t is None
        ticks.append(t)
    container.seek(0)
    if fallback or not ticks:  # no timestamps (some AVIs): the average rate is all there is
        rate = stream.average_rate or stream.guessed_rate
        if not ticks or not rate:
            return np.zeros(len(ticks))
        return np.arange(len(ticks), dtype=np.float64) / float(rate)
    return np.sort(np.asarray(ticks, dtype=np.float64)) * float(stream.time_base)


def _decode_pyav(data: bytes, pick: FramePicker) -> DecodedFrames:
    import av
    from av.video.reformatter import VideoReformatter

    # One reformatter for the whole clip: `frame.to_ndarray(format=...)` builds a new swscale
    # context per frame, which made it 3-4x slower than this on 64x64 clips (same pixels).
    to_rgb = VideoReformatter()

    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.video:
            raise SampleError(CORRUPT_VIDEO, detail="the file has no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = DECODER_THREADS
        pts = pyav_frame_pts(container, stream)
        if len(pts) < 1:
            raise SampleError(CORRUPT_VIDEO, detail="the video has no frames")
        indices = _pick(pick, pts)
        wanted = collections.defaultdict(list)  # source index -> positions in the clip
        for position, index in enumerate(indices.tolist()):
            wanted[index].append(position)
        out: list[np.ndarray | None] = [None] * len(indices)
        last = int(indices.max())
        # Decoding sequentially from the start: exact frame numbers without trusting seek
        # accuracy; PyAV is the fallback path, correctness over speed.
        for number, frame in enumerate(container.decode(stream)):
            if number in wanted:
                rgb = rotate(to_rgb.reformat(frame, format="rgb24").to_ndarray()[None], quarter_turns(frame.rotation))
                for position in wanted[number]:
                    out[position] = rgb[0]
            if number >= last:
                break
    if any(f is None for f in out):
        decoded = sum(f is not None for f in out)
        raise SampleError(
            CORRUPT_VIDEO,
            detail=f"the container lists {len(pts)} frames but only {decoded} of the "
            f"{len(out)} requested could be decoded (truncated?)",
        )
    return DecodedFrames(np.ascontiguousarray(np.stack(out)), pts, indices, "pyav")


def _once(pick: FramePicker) -> FramePicker:
    """`pick` evaluated once per list of frame times: it may draw from an RNG, and a retry or the
    fallback must decode the frames the first try picked (when both read the same times)."""
    cache = {}

    def picked(pts: np.ndarray) -> np.ndarray:
        key = np.asarray(pts, dtype=np.float64).round(4).tobytes()
        if key not in cache:
            cache[key] = pick(pts)
        return cache[key]

    return picked


def _short(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[-1][:200] if text else type(e).__name__


def decode_frames(
    data: bytes, pick: FramePicker, decoder: str = "decord", size: tuple[int, int] | None = None
) -> DecodedFrames:
    """Decode the frames `pick(pts)` chooses from a video's bytes, in displayed orientation.

    `pick` gets every source frame's presentation time (float64 [N], seconds, ascending) and
    returns the source indices to decode (int [F], repeats allowed). `decoder` is tried first
    ('decord', 'torchcodec' or 'pyav'); PyAV takes over when it cannot be imported (one warning)
    or raises. A SampleError raised by `pick` (e.g. TOO_SHORT) is the video's verdict and is not
    retried. `size` (height, width), DISPLAYED, asks decord to scale while decoding (FFmpeg's
    scaler, in its colour conversion); torchcodec and PyAV return the displayed source size, so
    callers must accept either. Returns DecodedFrames(frames uint8 [F, H, W, 3], pts, indices, backend),
    `backend` naming the decoder that succeeded (also tallied in `backend_counts`). Raises
    SampleError(CORRUPT_VIDEO) when no backend can decode the requested frames.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if not data:
        raise SampleError(CORRUPT_VIDEO, detail="the video has zero bytes")
    errors, result = [], None
    pick = _once(pick)
    try:
        if decoder == "decord" and (decord := _import("decord")) is not None:
            try:
                result = _decode_decord(decord, data, pick, size)
            except SampleError:
                raise
            except Exception:
                if size is None:
                    raise
                result = _decode_decord(decord, data, pick, None)  # see the size check in _decode_decord
        elif decoder == "torchcodec" and (decoders := _import("torchcodec.decoders")) is not None:
            result = _decode_torchcodec(decoders, data, pick)
    except SampleError:
        raise
    except Exception as e:  # DECORDError (a RuntimeError), torchcodec's RuntimeError/ValueError, ...
        errors.append(f"{decoder}: {_short(e)}")
    if result is None:
        try:
            result = _decode_pyav(data, pick)
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


# --- probe --------------------------------------------------------------------------------


def probe_video(data: bytes) -> dict:
    """{frames, height, width, rotation, fps, span, duration, codec} of a video's bytes, read with PyAV.

    height and width are the DISPLAYED size (swapped from the coded size by a 90 or 270 degree
    display rotation; `rotation` is in degrees counter-clockwise, 0-270). span is the time from
    the first frame's pts to the last's, what a clip's window must fit in; fps the average rate;
    duration frames / fps. The first frame is decoded, because the display rotation reaches PyAV
    only on decoded frames, and because a header can be intact while the stream is not: a video
    that cannot give one frame is of no use. Raises SampleError(CORRUPT_VIDEO).
    """
    import av

    if not data:
        raise SampleError(CORRUPT_VIDEO, detail="the video has zero bytes")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise SampleError(CORRUPT_VIDEO, detail="the file has no video stream")
            stream = container.streams.video[0]
            stream.codec_context.thread_count = DECODER_THREADS
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            codec = stream.codec_context.name
            height, width = stream.codec_context.height, stream.codec_context.width
            pts = pyav_frame_pts(container, stream)
            first = next(container.decode(stream), None)
    except SampleError:
        raise
    except Exception as e:  # av.error.FFmpegError, and what a broken container makes PyAV raise
        raise SampleError(CORRUPT_VIDEO, detail=f"{type(e).__name__}: {str(e)[:200]}") from None
    frames = len(pts)
    if first is None or frames < 1 or fps <= 0 or min(height, width) < 1:
        raise SampleError(CORRUPT_VIDEO, detail=f"no decodable frame (frames={frames}, fps={fps}, {width}x{height})")
    turns = quarter_turns(first.rotation)
    height, width = displayed_size(height, width, turns)
    return {
        "frames": frames,
        "height": height,
        "width": width,
        "rotation": 90 * turns,
        "fps": fps,
        "span": round(float(pts[-1] - pts[0]), 6),
        "duration": round(frames / fps, 6),
        "codec": codec,
    }
