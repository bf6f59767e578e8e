"""Frames at their real times: on variable-frame-rate files, every decoder picks clip frames by pts.

The files are built here with PyAV, each frame's pts set by hand (gaps of 1/60, 1/30 and 1/10 s
mixed) and its index written in its pixels (a flat grey level per index, numbered_videos), so the
test reads back exactly which source frames a decoder returned. The reference is a naive loop over
the pts list written into the file: clip frame k is the last frame whose pts <= t0 + k / fps.
"""

from fractions import Fraction

import numpy as np
import pytest

from megamoe.data.errors import TOO_SHORT, SampleError
from megamoe.data.video import TIME_EPS, decode_frames, probe_video, sample_frame_indices
from megamoe.tools.numbered_videos import frame_index, synthetic_frames
from tests.data.test_video_decode import DECODERS, need

CLIP_FRAMES, CLIP_FPS = 9, 16.0


def encode_vfr(ticks: list[int], time_base: Fraction, codec: str, container: str) -> bytes:
    """A video whose frame i has pts ticks[i] * time_base and the grey level of index i."""
    import io

    import av

    frames = synthetic_frames(len(ticks), 32, 32)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=30)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = time_base
        stream.options = {"crf": "0", "preset": "ultrafast"} if codec == "libx264" else {"deadline": "realtime"}
        for tick, pixels in zip(ticks, frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = tick, time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def naive_clip(pts: np.ndarray, start: int, num_frames: int, fps: float) -> list[int]:
    """The reference: for each clip time, scan for the last frame already on screen."""
    out = []
    for k in range(num_frames):
        t = pts[start] + k / fps
        out.append(max(i for i in range(len(pts)) if pts[i] <= t + TIME_EPS))
    return out


# Gaps in milliseconds: 1/60, 1/10 and 1/30 s mixed irregularly; 40 frames over about 1.9 s.
GAPS_MS = [17, 100, 17, 17, 33, 100, 17, 33, 17, 100] * 4


@pytest.fixture(scope="module")
def vfr_videos():
    ms = np.concatenate([[0], np.cumsum(GAPS_MS[:39])])
    # mp4 at a 1/600 s time base (60 fps gaps are exactly 10 ticks); WebM stores milliseconds.
    ticks600 = [round(m * 0.6) if m % 100 else m * 6 // 10 for m in ms]
    return {
        "mp4": (encode_vfr(ticks600, Fraction(1, 600), "libx264", "mp4"), np.array(ticks600) / 600),
        "webm": (encode_vfr([int(m) for m in ms], Fraction(1, 1000), "libvpx-vp9", "webm"), ms / 1000),
    }


def test_sampling_matches_the_naive_reference_on_irregular_times():
    pts = np.cumsum(np.random.default_rng(0).choice([1 / 60, 1 / 10, 1 / 30], 200)) - 1 / 60
    for seed in range(50):
        idx = sample_frame_indices(pts, CLIP_FRAMES, CLIP_FPS, np.random.default_rng(seed))
        assert list(idx) == naive_clip(pts, idx[0], CLIP_FRAMES, CLIP_FPS)
        assert pts[idx[0]] + (CLIP_FRAMES - 1) / CLIP_FPS <= pts[-1] + 1e-9  # the window fits


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_picks_frames_by_pts(vfr_videos, decoder, fmt):
    need(decoder)
    data, true_pts = vfr_videos[fmt]
    span = (CLIP_FRAMES - 1) / CLIP_FPS
    valid_starts = {i for i in range(len(true_pts)) if true_pts[i] + span <= true_pts[-1] + 1e-3}
    for seed in range(3):
        rng = np.random.default_rng(seed)
        r = decode_frames(data, lambda pts: sample_frame_indices(pts, CLIP_FRAMES, CLIP_FPS, rng), decoder)
        assert r.backend == decoder
        np.testing.assert_allclose(r.pts, true_pts, atol=1e-3)  # the decoder read the times written
        start = int(r.indices[0])
        assert start in valid_starts
        # The reference runs on the times the decoder read (equal to those written, above), so a
        # clip time that lands within TIME_EPS of a WebM millisecond is judged on the same floats.
        expected = naive_clip(r.pts, start, CLIP_FRAMES, CLIP_FPS)
        assert list(r.indices) == expected
        assert [frame_index(f) for f in r.frames] == expected  # the pixels say the same frames came back
        # The clip spans (F-1)/fps of real time: its last frame is the one on screen at t0 + span,
        # shown at or before that time and followed by a frame shown after it.
        t_last, last = r.pts[start] + span, expected[-1]
        assert r.pts[last] <= t_last + TIME_EPS and (last + 1 == len(r.pts) or r.pts[last + 1] > t_last + TIME_EPS)


def test_average_rate_indexing_would_have_been_wrong(vfr_videos):
    """Guards the test's construction: on this file, index = time x average fps picks other frames."""
    _, pts = vfr_videos["mp4"]
    average = (len(pts) - 1) / (pts[-1] - pts[0])
    by_time = naive_clip(pts, 0, CLIP_FRAMES, CLIP_FPS)
    by_average_rate = [round(k * average / CLIP_FPS) for k in range(CLIP_FRAMES)]
    assert by_time != by_average_rate


def test_probe_reports_the_span_the_sampler_uses(vfr_videos):
    data, pts = vfr_videos["mp4"]
    info = probe_video(data)
    assert info["frames"] == len(pts) and info["span"] == pytest.approx(pts[-1] - pts[0], abs=1e-3)
    with pytest.raises(SampleError) as e:  # a clip longer than the span does not fit
        sample_frame_indices(pts, 33, 16.0, np.random.default_rng(0))
    assert e.value.cause == TOO_SHORT
