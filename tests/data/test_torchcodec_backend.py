"""data.decoder: the key reaches the decode worker; torchcodec's own checks hand over to PyAV.

The generic decoder tests (same frames as PyAV, bad data, variable frame rate, rotation, fallback
when it cannot be imported) run over all three decoders in test_video_decode.py,
test_video_timing.py and test_video_rotation.py; this file holds what is particular to the key
and to torchcodec.
"""

import numpy as np
import pytest

from megamoe.config import ConfigError, merge_config
from megamoe.config_checks import validate
from megamoe.data import video_decoders
from megamoe.data.video_buckets import decode_to_bucket
from megamoe.data.worker import StreamSpec
from megamoe.tools.numbered_videos import frame_index, make_video
from tests.data.test_video_decode import need


def test_bad_decoder_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="data.decoder must be 'decord', 'torchcodec' or 'pyav', got 'opencv'"):
        validate(merge_config(overrides=["data.decoder=opencv"]))


@pytest.mark.parametrize("decoder", ["decord", "torchcodec", "pyav"])
def test_the_configured_decoder_is_the_one_asked(monkeypatch, decoder):
    asked = []
    real = video_decoders.decode_frames

    def recording(data, pick, name="decord", size=None):
        asked.append(name)
        return real(data, pick, "pyav", size)

    monkeypatch.setattr("megamoe.data.video.decode_frames", recording)
    spec = StreamSpec(
        shards=(), format="video", seed=0, dp_rank=0, dp_size=1, num_workers=1, micro_batch_size=1, decoder=decoder
    )
    out = decode_to_bucket(make_video(40, 64, 64), spec, seed=1)
    assert asked == [decoder] and out["bucket"] == [17, 64, 64]


def test_torchcodec_hands_over_to_pyav_when_frame_times_disagree(monkeypatch):
    """torchcodec's frames are matched to the packets' times; a mismatch means its frame index
    and the sampler's disagree, so PyAV decodes the clip instead (and names why on failure)."""
    need("torchcodec")
    real = video_decoders._pyav_pts_of
    monkeypatch.setattr(video_decoders, "_pyav_pts_of", lambda data: real(data) + 0.5)
    r = video_decoders.decode_frames(make_video(40, 32, 32), lambda pts: np.array([3, 4]), "torchcodec")
    assert r.backend == "pyav" and [frame_index(f) for f in r.frames] == [3, 4]
