"""Raw video decoding: frame sampling closed forms, decord vs torchcodec vs PyAV, resize, bad data, DecodePool.

Variable frame rates and display rotation have their own files (test_video_timing.py,
test_video_rotation.py); torchcodec-only behaviour is in test_torchcodec_backend.py."""

import json
import os
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from megamoe.data import video, video_decoders
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


def cfr(n, fps):
    """Frame times of a constant-rate video: frame i at i / fps seconds."""
    return np.arange(n) / fps


def usable(decoder: str) -> bool:
    """Whether `decoder` can be imported here (torchcodec needs FFmpeg's shared libraries and a
    torch build it was compiled against; its tests skip, saying so, where it cannot load)."""
    if decoder == "pyav":
        return True
    name = {"decord": "decord", "torchcodec": "torchcodec.decoders"}[decoder]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return video_decoders._import(name) is not None


def need(decoder: str) -> None:
    if not usable(decoder):
        error = video_decoders._modules.get({"torchcodec": "torchcodec.decoders"}.get(decoder, decoder))
        pytest.skip(f"{decoder} cannot be imported here ({type(error).__name__}: {str(error)[:120]})")


DECODERS = ["decord", "torchcodec", "pyav"]


# --- frame sampling -----------------------------------------------------------------------


def test_frame_spec_needs_4k_plus_1():
    FrameSpec(1, 16, 8, 8), FrameSpec(81, 16, 8, 8)
    for bad in (0, 2, 16, 80):
        with pytest.raises(ValueError, match="4k\\+1"):
            FrameSpec(bad, 16, 8, 8)


def test_30_to_15_fps_takes_every_other_frame():
    for seed in range(20):
        idx = sample_frame_indices(cfr(100, 30.0), 17, 15.0, rng(seed))
        assert (np.diff(idx) == 2).all() and idx[0] >= 0 and idx[-1] <= 99


def test_24_to_16_fps_closed_form():
    # Clip frame k is shown at k/16 s = 1.5k source frames in: the frame on screen then is
    # floor(1.5k): 0, 1, 3, 4, 6, 7, 9, ... (frame 1 is displayed from 1/24 to 2/24 s, which holds 1/16 s).
    idx = sample_frame_indices(cfr(1000, 24.0), 9, 16.0, rng(3))
    expected = np.floor(1.5 * np.arange(9)).astype(int)
    assert (idx - idx[0] == expected).all()
    assert list(expected) == [0, 1, 3, 4, 6, 7, 9, 10, 12]


def test_window_fits_and_start_is_uniform():
    # 33 source frames at 30 fps hold exactly one 17-frame clip at 15 fps: it must start at 0.
    assert list(sample_frame_indices(cfr(33, 30.0), 17, 15.0, rng())) == list(range(0, 33, 2))
    starts = [sample_frame_indices(cfr(40, 30.0), 17, 15.0, rng(s))[0] for s in range(400)]
    assert set(starts) == set(range(8))  # every fitting start (0..7) occurs, none beyond


def test_one_frame_target_and_upsampling():
    picks = {int(sample_frame_indices(cfr(5, 30.0), 1, 16.0, rng(s))[0]) for s in range(200)}
    assert picks == set(range(5))
    # Slower than the source: 10 -> 20 fps shows each frame twice, never invents one.
    idx = sample_frame_indices(cfr(50, 10.0), 9, 20.0, rng(1))
    assert list(idx - idx[0]) == [0, 0, 1, 1, 2, 2, 3, 3, 4]


def test_too_short_raises():
    with pytest.raises(SampleError) as e:
        sample_frame_indices(cfr(32, 30.0), 17, 15.0, rng())
    assert e.value.cause == TOO_SHORT
    for bad in ([], [0.0, float("nan")]):
        with pytest.raises(SampleError) as e:
            sample_frame_indices(np.array(bad), 1, 15.0, rng())
        assert e.value.cause == CORRUPT_VIDEO


# --- decoding -----------------------------------------------------------------------------

# (codec, container, height, width): yuv420p h264 needs even sides; mpeg4 and vp9 take odd ones.
CODECS = [("libx264", "mp4", 48, 64), ("mpeg4", "mp4", 33, 47), ("libvpx-vp9", "webm", 33, 47)]


@pytest.fixture(scope="module")
def videos():
    return {codec: make_video(40, h, w, 30.0, codec, fmt) for codec, fmt, h, w in CODECS}


@pytest.mark.parametrize("codec,fmt,height,width", CODECS)
@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_decodes_the_frames_pyav_does(videos, decoder, codec, fmt, height, width):
    need(decoder)
    results = {}
    for backend in sorted({decoder, "pyav"}):
        picked = []
        r = decode_frames(
            videos[codec], lambda pts: picked.append(sample_frame_indices(pts, 9, 15.0, rng(5))) or picked[-1], backend
        )
        assert r.backend == backend and len(r.pts) == 40
        np.testing.assert_allclose(np.diff(r.pts), 1 / 30, atol=1e-3)  # read from the file (WebM: in ms)
        assert r.frames.shape == (9, height, width, 3) and r.frames.dtype == np.uint8
        # The frames decoded are the frames asked for: each frame's grey level names its index.
        assert [frame_index(f) for f in r.frames] == list(picked[-1]) == list(r.indices)
        results[backend] = r.frames.astype(int)
    assert np.abs(results[decoder] - results["pyav"]).max() <= 3  # colour conversion rounding only


@pytest.mark.parametrize("decoder", DECODERS)
def test_one_frame_clip(decoder):
    need(decoder)
    data = make_video(1, 32, 32, 25.0)
    for backend in (decoder,):
        r = decode_frames(data, lambda pts: sample_frame_indices(pts, 1, 16.0, rng()), backend)
        assert r.backend == backend and len(r.pts) == 1 and r.frames.shape == (1, 32, 32, 3)
        assert abs(float(np.median(r.frames)) - frame_level(0)) <= 2


@pytest.mark.parametrize("decoder,function", [("decord", "_decode_decord"), ("torchcodec", "_decode_torchcodec")])
def test_falls_back_to_pyav_when_the_decoder_fails(videos, monkeypatch, decoder, function):
    def broken(*args):
        raise RuntimeError(f"{decoder} error: simulated")

    monkeypatch.setattr(video_decoders, function, broken)
    monkeypatch.setitem(video_decoders._modules, {"decord": "decord"}.get(decoder, "torchcodec.decoders"), sys)
    before = video.backend_counts["pyav"]
    r = decode_frames(videos["libx264"], lambda pts: np.arange(5), decoder)
    assert r.backend == "pyav" and video.backend_counts["pyav"] == before + 1


@pytest.mark.parametrize("decoder,module", [("decord", "decord"), ("torchcodec", "torchcodec.decoders")])
def test_missing_decoder_warns_once_and_uses_pyav(videos, monkeypatch, decoder, module):
    monkeypatch.setattr(video_decoders, "_modules", {})
    monkeypatch.setattr(video_decoders, "_warned", set())
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.warns(RuntimeWarning, match=f"{decoder} cannot be imported"):
        assert decode_frames(videos["libx264"], lambda pts: np.arange(3), decoder).backend == "pyav"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would fail here
        assert decode_frames(videos["libx264"], lambda pts: np.arange(3), decoder).backend == "pyav"


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
@pytest.mark.parametrize("decoder", ["decord", "torchcodec"])
def test_decoder_scaling_matches_a_torch_resize(videos, decoder, codec, fmt, height, width, target, monkeypatch):
    """decord scales inside its decoder (FFmpeg's scaler); torchcodec and the PyAV fallback decode
    full frames that torch resizes. All must give the same clip: same frames, same size, and pixels
    within a few levels (different filters: FFmpeg's bicubic vs torch's antialiased bilinear)."""
    need(decoder)
    spec = FrameSpec(9, 15.0, *target)
    decoded_sizes = []
    function = {"decord": "_decode_decord", "torchcodec": "_decode_torchcodec"}[decoder]
    real_decode = getattr(video_decoders, function)

    def recording_decode(*args, **kwargs):
        result = real_decode(*args, **kwargs)
        decoded_sizes.append(result.frames.shape[1:3])
        return result

    monkeypatch.setattr(video_decoders, function, recording_decode)
    scaled, used = video.decode_clip_uint8(videos[codec], spec, seed=3, decoder=decoder)
    reference, ref_used = video.decode_clip_uint8(videos[codec], spec, seed=3, decoder="pyav")
    assert (used, ref_used) == (decoder, "pyav")
    # decord itself delivered the frames at the size that covers the bucket (not the source size),
    # except at the output widths decord 0.6 rejects, which retry at the source size; torchcodec
    # delivers the source size.
    cover = video.cover_size(height, width, *target)
    at_source = decoder == "torchcodec" or cover[1] in (8, 12, 16, 24, 48, 72)
    assert decoded_sizes[-1] == ((height, width) if at_source else cover)
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
@pytest.mark.parametrize("backend", DECODERS)
def test_broken_video_is_corrupt(videos, kind, backend):
    good = videos["libx264"]
    data = {
        "zero": b"",
        "truncated": good[: len(good) // 2],
        "random": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    }[kind]
    with pytest.raises(SampleError) as e:
        decode_frames(data, lambda pts: np.arange(1), backend)
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


def test_a_decoder_that_is_installed_but_cannot_load_names_the_missing_library(monkeypatch):
    """torchcodec wraps the dynamic loader's error ('Could not load this library ...'); the warning
    names the library that is really missing and says reinstalling the same wheel will not help."""
    try:
        try:
            raise OSError("libnvrtc.so.13: cannot open shared object file")
        except OSError as missing:
            raise OSError("Could not load this library: libtorchcodec_image.so") from missing
    except OSError as wrapped:
        failure = wrapped
    monkeypatch.setattr(video_decoders, "_modules", {"torchcodec.decoders": failure})
    monkeypatch.setattr(video_decoders, "_warned", set())
    with pytest.warns(RuntimeWarning) as record:
        assert video_decoders._import("torchcodec.decoders") is None
    message = str(record[0].message)
    assert "because OSError: libnvrtc.so.13" in message and "installed but cannot load" in message
    assert "pip install" not in message
