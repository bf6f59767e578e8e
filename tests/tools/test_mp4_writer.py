"""write_video: mp4s that decode back with the right frame count and an enlarged size."""

import av
import numpy as np
import pytest

from megamoe.tools.mp4_writer import clip_to_uint8, write_video


@pytest.mark.parametrize("height,width", [(16, 16), (9, 13)])
def test_write_video_decodes(tmp_path, height, width):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(5, height, width, 3), dtype=np.uint8)
    path = str(tmp_path / "clip.mp4")
    write_video(path, frames, fps=4)
    with av.open(path) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 5
    h, w, _ = decoded[0].shape
    assert min(h, w) >= 128 and h % 2 == 0 and w % 2 == 0


def test_flat_colours_survive_encoding(tmp_path):
    clip = np.full((3, 4, 16, 16), -1.0, dtype=np.float32)
    clip[0, :, 4:12, 4:12] = 1.0  # a red square on black
    path = str(tmp_path / "square.mp4")
    write_video(path, clip_to_uint8(clip), fps=4)
    with av.open(path) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert frame.shape == (128, 128, 3)
    assert abs(int(frame[64, 64, 0]) - 255) < 12 and frame[64, 64, 1:].max() < 12 and frame[4, 4].max() < 12
