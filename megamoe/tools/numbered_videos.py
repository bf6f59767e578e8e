"""Tiny synthetic video files made with PyAV, for tests and benchmarks of the decode path.

Frame i is a flat grey of level `frame_level(i)`, so a decoded frame tells which source frame it
was (`frame_index`) despite lossy coding: flat grey survives the RGB -> YUV -> RGB round trip to
within a few levels, and levels are `LEVEL_STEP` apart. A small bright square moves across the
frame so encoders see motion, not a still image.
"""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np

LEVEL_BASE, LEVEL_STEP, LEVEL_CYCLE = 16, 5, 44  # levels 16 ... 231, repeating every 44 frames
CONTAINERS = {"libx264": "mp4", "mpeg4": "mp4", "libvpx-vp9": "webm", "libvpx": "webm"}


def frame_level(i: int) -> int:
    return LEVEL_BASE + LEVEL_STEP * (i % LEVEL_CYCLE)


def frame_index(frame: np.ndarray) -> int:
    """The source frame number (mod LEVEL_CYCLE) of a decoded frame, from its median grey level."""
    level = float(np.median(frame))
    return int(round((level - LEVEL_BASE) / LEVEL_STEP)) % LEVEL_CYCLE


def synthetic_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """uint8 [F, H, W, 3]: flat grey levels by frame, plus a moving white square."""
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    side = max(1, min(height, width) // 6)
    for i in range(num_frames):
        frames[i] = frame_level(i)
        x = (i * 2) % max(1, width - side)
        frames[i, :side, x : x + side] = 255
    return frames


def encode_frames(
    frames: np.ndarray,
    fps: float = 30.0,
    codec: str = "libx264",
    container: str | None = None,
    pix_fmt: str = "yuv420p",
) -> bytes:
    """uint8 [F, H, W, 3] -> the bytes of a video file. yuv420p with libx264 needs even sides."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container or CONTAINERS.get(codec, "mp4")) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "ultrafast"}
        elif codec.startswith("libvpx"):
            stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}
        elif codec == "mpeg4":
            stream.options = {"qmin": "1", "qmax": "4"}  # its default bit rate smears the grey levels
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def make_video(
    num_frames: int, height: int, width: int, fps: float = 30.0, codec: str = "libx264", container: str | None = None
) -> bytes:
    return encode_frames(synthetic_frames(num_frames, height, width), fps, codec, container)
