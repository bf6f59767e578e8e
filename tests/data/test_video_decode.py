"""Raw video decoding: frame sampling closed forms, decord vs PyAV, resize, bad data, DecodePool."""

import json
import os
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from megamoe.data import video
from megamoe.data.decode_pool import DecodePool
from megamoe.data.errors import (
    BAD_CAPTION,
    CORRUPT_VIDEO,
    DECODE_TIMEOUT,
    MISSING_MEMBER,
    TOO_SHORT,
    WORKER_DIED,
    SampleError,
)
from megamoe.data.video import (
    FrameSpec,
    decode_frames,
    decode_raw_sample,
    decode_video_sample,
    parse_caption,
    resize_and_crop,
    sample_frame_indices,
)
from megamoe.tools.numbered_videos import frame_index, frame_level, make_video


def rng(seed=0):
    return np.random.default_rng(seed)


# --- frame sampling -----------------------------------------------------------------------


def test_frame_spec_needs_4k_plus_1():
    FrameSpec(1, 16, 8, 8), FrameSpec(81, 16, 8, 8)
    for bad in (0, 2, 16, 80):
        with pytest.raises(ValueError, match="4k\\+1"):
            FrameSpec(bad, 16, 8, 8)


def test_30_to_15_fps_takes_every_other_frame():
    for seed in range(20):
        idx = sample_frame_indices(100, 30.0, 17, 15.0, rng(seed))
        assert (np.diff(idx) == 2).all() and idx[0] >= 0 and idx[-1] <= 99


def test_24_to_16_fps_closed_form():
    # Frame k is at k/16 s = source frame 1.5k, rounded half up: 0, 2, 3, 5, 6, 8, 9, ...
    idx = sample_frame_indices(1000, 24.0, 9, 16.0, rng(3))
    expected = np.floor(1.5 * np.arange(9) + 0.5).astype(int)
    assert (idx - idx[0] == expected).all()
    assert list(expected) == [0, 2, 3, 5, 6, 8, 9, 11, 12]


def test_window_fits_and_start_is_uniform():
    # 33 source frames at 30 fps hold exactly one 17-frame clip at 15 fps: it must start at 0.
    assert list(sample_frame_indices(33, 30.0, 17, 15.0, rng())) == list(range(0, 33, 2))
    starts = [sample_frame_indices(40, 30.0, 17, 15.0, rng(s))[0] for s in range(400)]
    assert set(starts) == set(range(8))  # every fitting start (0..7) occurs, none beyond


def test_one_frame_target_and_upsampling():
    picks = {int(sample_frame_indices(5, 30.0, 1, 16.0, rng(s))[0]) for s in range(200)}
    assert picks == set(range(5))
    # Slower than the source: 10 -> 20 fps repeats frames, never invents them.
    idx = sample_frame_indices(50, 10.0, 9, 20.0, rng(1))
    assert list(idx - idx[0]) == [0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_too_short_raises():
    with pytest.raises(SampleError) as e:
        sample_frame_indices(32, 30.0, 17, 15.0, rng())
    assert e.value.cause == TOO_SHORT
    with pytest.raises(SampleError) as e:
        sample_frame_indices(10, float("nan"), 1, 15.0, rng())
    assert e.value.cause == CORRUPT_VIDEO


# --- decoding -----------------------------------------------------------------------------

# (codec, container, height, width): yuv420p h264 needs even sides; mpeg4 and vp9 take odd ones.
CODECS = [("libx264", "mp4", 48, 64), ("mpeg4", "mp4", 33, 47), ("libvpx-vp9", "webm", 33, 47)]


@pytest.fixture(scope="module")
def videos():
    return {codec: make_video(40, h, w, 30.0, codec, fmt) for codec, fmt, h, w in CODECS}


@pytest.mark.parametrize("codec,fmt,height,width", CODECS)
def test_decord_and_pyav_decode_the_same_frames(videos, codec, fmt, height, width):
    results = {}
    for backend in ("decord", "pyav"):
        picked = []
        r = decode_frames(
            videos[codec],
            lambda n, fps: picked.append(sample_frame_indices(n, fps, 9, 15.0, rng(5))) or picked[-1],
            backend,
        )
        assert r.backend == backend and r.num_source_frames == 40 and r.source_fps == pytest.approx(30.0)
        assert r.frames.shape == (9, height, width, 3) and r.frames.dtype == np.uint8
        # The frames decoded are the frames asked for: each frame's grey level names its index.
        assert [frame_index(f) for f in r.frames] == list(picked[-1])
        results[backend] = r.frames.astype(int)
    assert np.abs(results["decord"] - results["pyav"]).max() <= 3  # colour conversion rounding only


def test_one_frame_clip():
    data = make_video(1, 32, 32, 25.0)
    for backend in ("decord", "pyav"):
        r = decode_frames(data, lambda n, fps: sample_frame_indices(n, fps, 1, 16.0, rng()), backend)
        assert r.num_source_frames == 1 and r.frames.shape == (1, 32, 32, 3)
        assert abs(float(np.median(r.frames)) - frame_level(0)) <= 2


def test_auto_falls_back_to_pyav_when_decord_fails(videos, monkeypatch):
    def broken(*args):
        raise RuntimeError("DECORDError: simulated")

    monkeypatch.setattr(video, "_decode_decord", broken)
    before = video.backend_counts["pyav"]
    r = decode_frames(videos["libx264"], lambda n, fps: np.arange(5))
    assert r.backend == "pyav" and video.backend_counts["pyav"] == before + 1


def test_missing_decord_warns_once_and_uses_pyav(videos, monkeypatch):
    monkeypatch.setattr(video, "_decord_tried", False)
    monkeypatch.setattr(video, "_decord_module", None)
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` raise ImportError
    with pytest.warns(RuntimeWarning, match="decord cannot be imported"):
        assert decode_frames(videos["libx264"], lambda n, fps: np.arange(3)).backend == "pyav"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would fail here
        assert decode_frames(videos["libx264"], lambda n, fps: np.arange(3)).backend == "pyav"


# --- resize and crop ----------------------------------------------------------------------


def test_resize_and_crop_shape_range_and_centre():
    frames = np.zeros((2, 33, 47, 3), dtype=np.uint8)
    frames[:, :, 24:] = 255  # right of the centre column white; column 23 (the centre) black
    out = resize_and_crop(frames, 16, 16)
    assert out.shape == (3, 2, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    # 33x47 -> 16x23 covers 16x16; the centre crop keeps the black/white edge at the middle.
    assert torch.allclose(out[..., :7], torch.tensor(-1.0)) and torch.allclose(out[..., 9:], torch.tensor(1.0))
    # A flat frame stays exactly flat at v / 127.5 - 1 whatever the scale.
    flat = resize_and_crop(np.full((1, 30, 20, 3), 200, np.uint8), 48, 64)
    assert flat.shape == (3, 1, 48, 64) and torch.allclose(flat, torch.tensor(200 / 127.5 - 1), atol=1e-5)


def test_resize_matches_float_reference_within_one_level():
    frames = np.random.default_rng(0).integers(0, 256, (3, 33, 47, 3), dtype=np.uint8)
    out = resize_and_crop(frames, 16, 16)
    # Reference: float bilinear antialias to 16x23 (covers 16x16), centre columns 3..18, [-1, 1].
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(frames).permute(0, 3, 1, 2).float(),
        size=(16, 23),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )[..., 3:19]
    ref = (ref / 127.5 - 1).permute(1, 0, 2, 3)
    assert (out - ref).abs().max() <= 1 / 127.5 + 1e-6  # 8-bit rounding only


@pytest.mark.parametrize("codec,fmt,height,width", CODECS)
@pytest.mark.parametrize("target", [(16, 16), (17, 23), (64, 96)])  # down, odd down, up
def test_decord_scaling_while_decoding_matches_a_torch_resize(videos, codec, fmt, height, width, target, monkeypatch):
    """decord scales inside its decoder (FFmpeg's scaler); the PyAV fallback decodes full frames
    that torch resizes. Both must give the same clip: same frames, same size, and pixels within a
    few levels (different filters: FFmpeg's bicubic vs torch's antialiased bilinear)."""
    spec = FrameSpec(9, 15.0, *target)
    decoded_sizes = []
    real_decode = video._decode_decord

    def recording_decode(*args, **kwargs):
        result = real_decode(*args, **kwargs)
        decoded_sizes.append(result.frames.shape[1:3])
        return result

    monkeypatch.setattr(video, "_decode_decord", recording_decode)
    scaled, used = video.decode_clip_uint8(videos[codec], spec, seed=3)
    reference, ref_used = video.decode_clip_uint8(videos[codec], spec, seed=3, backend="pyav")
    assert (used, ref_used) == ("decord", "pyav")
    # decord itself delivered the frames at the size that covers the bucket (not the source size),
    # except at the output widths decord 0.6 rejects, which retry at the source size.
    cover = video.cover_size(height, width, *target)
    assert decoded_sizes[-1] == (cover if cover[1] not in (8, 12, 16, 24, 48, 72) else (height, width))
    assert scaled.shape == reference.shape == (9, *target, 3)
    assert [frame_index(f) for f in scaled] == [frame_index(f) for f in reference]
    diff = np.abs(scaled.astype(int) - reference.astype(int))
    # Flat grey frames with one sharp-edged square: the filters differ only at its edges.
    assert diff.mean() <= 2.0 and np.median(diff) <= 3


def test_decode_video_sample_inline(videos):
    spec = FrameSpec(5, 15.0, 16, 24)
    x = decode_video_sample(videos["libvpx-vp9"], spec, rng(2))
    assert x.shape == (3, 5, 16, 24) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1


# --- bad data -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["zero", "truncated", "random"])
@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_broken_video_is_corrupt(videos, kind, backend):
    good = videos["libx264"]
    data = {
        "zero": b"",
        "truncated": good[: len(good) // 2],
        "random": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    }[kind]
    with pytest.raises(SampleError) as e:
        decode_frames(data, lambda n, fps: np.arange(1), backend)
    assert e.value.cause == CORRUPT_VIDEO


def test_short_video_is_too_short(videos):
    with pytest.raises(SampleError) as e:  # 40 frames at 30 fps = 1.3 s; 33 frames at 15 fps = 2.1 s
        decode_video_sample(videos["libx264"], FrameSpec(33, 15.0, 16, 16), rng())
    assert e.value.cause == TOO_SHORT


def test_captions():
    assert parse_caption({"txt": b"  a  cat\n"}) == "a cat"
    assert parse_caption({"json": json.dumps({"caption": "a dog"}).encode()}) == "a dog"
    assert parse_caption({"json": json.dumps({"text": "a bird"}).encode()}) == "a bird"
    cases = [
        ({"mp4": b"x"}, MISSING_MEMBER),
        ({"txt": b"   "}, BAD_CAPTION),
        ({"txt": b"\xff\xfe"}, BAD_CAPTION),
        ({"json": b"{not json"}, BAD_CAPTION),
        ({"json": b'{"title": "x"}'}, BAD_CAPTION),
        ({"json": b'["a cat"]'}, BAD_CAPTION),
        ({"json": b'{"caption": 3}'}, BAD_CAPTION),
    ]
    for members, cause in cases:
        with pytest.raises(SampleError) as e:
            parse_caption(members, "k1", "s.tar")
        assert e.value.cause == cause and "'k1'" in str(e.value) and "'s.tar'" in str(e.value), members


def test_raw_sample_errors_name_key_and_shard(videos):
    spec = FrameSpec(5, 15.0, 8, 8)
    sample = decode_raw_sample("00000007", {"mp4": videos["libx264"], "txt": b"a cat"}, "raw-0.tar", spec, rng())
    assert sample["pixels"].shape == (3, 5, 8, 8) and sample["caption"] == "a cat"
    for members, cause in [
        ({"txt": b"a cat"}, MISSING_MEMBER),
        ({"mp4": videos["libx264"]}, MISSING_MEMBER),
        ({"mp4": b"", "txt": b"a cat"}, CORRUPT_VIDEO),
    ]:
        with pytest.raises(SampleError) as e:
            decode_raw_sample("00000007", members, "raw-0.tar", spec, rng())
        assert e.value.cause == cause and "'00000007'" in str(e.value) and "'raw-0.tar'" in str(e.value)


# --- DecodePool ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool():
    with DecodePool(num_workers=1, timeout_s=20.0) as p:
        yield p


def test_pool_decodes_like_inline(pool, videos):
    spec = FrameSpec(5, 15.0, 16, 16)
    inline = decode_video_sample(videos["mpeg4"], spec, rng(9))
    pooled = decode_video_sample(videos["mpeg4"], spec, rng(9), pool=pool)
    assert torch.equal(inline, pooled)
    with pytest.raises(SampleError) as e:  # a SampleError raised in the worker arrives intact
        decode_video_sample(b"", spec, rng(), pool=pool)
    assert e.value.cause == CORRUPT_VIDEO


def test_pool_timeout_kills_and_replaces_the_worker(pool, videos):
    pool.run(os.getpid)  # make sure a worker is up
    (pid,) = pool.worker_pids()
    start = time.monotonic()
    with pytest.raises(SampleError) as e:
        pool.run(time.sleep, 30, timeout_s=0.5)  # stands in for decord hung holding the GIL
    assert e.value.cause == DECODE_TIMEOUT and time.monotonic() - start < 10
    assert pool.worker_pids() == []  # killed, not left running
    new_pid = pool.run(os.getpid)
    assert new_pid != pid and pool.stats["timeouts"] >= 1
    x = decode_video_sample(videos["libx264"], FrameSpec(5, 15.0, 8, 8), rng(), pool=pool)
    assert x.shape == (3, 5, 8, 8)


def test_pool_replaces_a_dead_worker(pool):
    pid = pool.run(os.getpid)
    with pytest.raises(SampleError) as e:
        pool.run(os._exit, 3)  # stands in for a decoder segfault
    assert e.value.cause == WORKER_DIED and pool.stats["worker_deaths"] >= 1
    assert pool.run(os.getpid) != pid


def test_pool_reraises_bugs_and_cleans_up():
    p = DecodePool(num_workers=2, timeout_s=20.0)
    assert sorted(p.map(abs, [(-1,), (-2,), (3,)])) == [1, 2, 3]
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        p.run(divmod, 1, 0)
    pids = p.worker_pids()
    assert pids
    p.close()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
