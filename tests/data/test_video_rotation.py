"""Display rotation: the probe, the bucket and every decoder see a phone video as it is displayed.

Files are written with PyAV's set_display_rotation (the display matrix a phone stores); the coded
frame is 128x64 with a 32x32 white square near its top-left corner. The reference is the coded
frame turned with np.rot90 (counter-clockwise, as the display matrix says), then resize_and_crop.
"""

import io

import numpy as np
import pytest

from megamoe.data.video import FrameSpec, decode_clip_uint8, probe_video
from megamoe.data.video_buckets import decode_to_bucket
from megamoe.data.worker import StreamSpec
from tests.data.test_video_decode import DECODERS, need

CODED_H, CODED_W = 64, 128


def coded_frame() -> np.ndarray:
    frame = np.full((CODED_H, CODED_W, 3), 40, np.uint8)
    frame[8:40, 8:40] = 230  # a 32x32 square, off-centre so a wrong turn moves it
    return frame


def rotated_video(degrees: int) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = CODED_W, CODED_H, "yuv420p"
        stream.options = {"crf": "0", "preset": "ultrafast"}
        stream.set_display_rotation(degrees)  # counter-clockwise, as a phone's display matrix
        for _ in range(10):
            for packet in stream.encode(av.VideoFrame.from_ndarray(coded_frame(), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def videos():
    return {degrees: rotated_video(degrees) for degrees in (0, 90, 180, 270)}


def square_box(frame: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the bright square."""
    rows, cols = np.nonzero(frame[..., 0] > 135)
    return rows.min(), cols.min(), rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


@pytest.mark.parametrize("degrees", [0, 90, 180, 270])
def test_probe_reports_the_displayed_size(videos, degrees):
    info = probe_video(videos[degrees])
    assert info["rotation"] == degrees
    assert (info["height"], info["width"]) == ((CODED_W, CODED_H) if degrees % 180 else (CODED_H, CODED_W))


@pytest.mark.parametrize("degrees", [90, 180, 270])
@pytest.mark.parametrize("decoder", DECODERS)
def test_square_stays_square_and_decoders_agree(videos, decoder, degrees):
    """Decode into a bucket of half the displayed size: the 32 px square must come out 16x16, where
    np.rot90 of the coded frame puts it. Tolerance: crf 0 keeps flat areas exact; edges differ by
    the scaler (decord scales with FFmpeg's bicubic while decoding, the others resize in torch),
    so the box may move by a pixel and the mean difference stays within a couple of levels."""
    need(decoder)
    from megamoe.data.video import _resize_crop_uint8

    displayed = np.rot90(coded_frame(), degrees // 90)
    height, width = displayed.shape[0] // 2, displayed.shape[1] // 2
    reference = _resize_crop_uint8(displayed[None], height, width)[0]
    clip, used = decode_clip_uint8(videos[degrees], FrameSpec(5, 15.0, height, width), seed=0, decoder=decoder)
    assert used == decoder and clip.shape == (5, height, width, 3)
    top, left, h, w = square_box(clip[0])
    assert abs(h - 16) <= 1 and abs(w - 16) <= 1  # square: no squash into the coded orientation
    ref_top, ref_left, _, _ = square_box(reference)
    assert abs(top - ref_top) <= 1 and abs(left - ref_left) <= 1
    assert np.abs(clip[0].astype(int) - reference.astype(int)).mean() <= 2.0


@pytest.mark.parametrize("degrees", [90, 270])
def test_bucket_is_chosen_for_the_displayed_orientation(videos, degrees):
    spec = StreamSpec(
        shards=(),
        format="video",
        seed=0,
        dp_rank=0,
        dp_size=1,
        num_workers=1,
        micro_batch_size=1,
        buckets=((5, 64, 32), (5, 32, 64)),  # portrait and landscape, pixels
        video_frames=5,
        video_fps=15.0,
    )
    out = decode_to_bucket(videos[degrees], spec, seed=0)
    assert out["bucket"] == [5, 64, 32]  # portrait as displayed, though coded landscape
    _, _, h, w = square_box(out["clip"][0])
    assert abs(h - w) <= 1
