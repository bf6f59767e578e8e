"""Writing clips to mp4 with PyAV, for dataset previews and generated samples."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

MIN_SIDE = 128  # players show a 16 px video as a dot; enlarge tiny clips to at least this


def clip_to_uint8(clip) -> np.ndarray:
    """[3, F, H, W] RGB in [-1, 1] (numpy or torch) -> uint8 [F, H, W, 3]."""
    clip = np.asarray(clip.detach().cpu().float() if hasattr(clip, "detach") else clip, dtype=np.float32)
    if clip.ndim != 4 or clip.shape[0] != 3:
        raise ValueError(f"expected an RGB clip [3, F, H, W], got shape {tuple(clip.shape)}")
    return np.round((np.clip(clip, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8).transpose(1, 2, 3, 0)


def _pick_codec() -> str:
    import av

    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # PyAV raises codec-specific errors for missing encoders
            continue
    raise RuntimeError("PyAV has neither the libx264 nor the mpeg4 encoder; install a PyAV wheel with FFmpeg codecs")


def write_video(path: str, frames: np.ndarray, fps: float) -> None:
    """Write uint8 frames [T, H, W, 3] to an mp4, enlarged by nearest neighbour to >= MIN_SIDE px."""
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if len(frames) == 0:
        raise ValueError("cannot write a video with no frames")
    scale = -(-MIN_SIDE // min(frames.shape[1:3]))
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    # yuv420p halves the chroma resolution, so both sides must be even.
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with av.open(path, mode="w") as container:
        stream = container.add_stream(_pick_codec(), rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if stream.codec_context.name == "libx264":
            stream.options = {"crf": "16"}  # flat colours and hard edges: keep them clean
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
