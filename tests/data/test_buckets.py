"""Bucketing: the assignment rule, batch sizes from the token budget (closed form), one bucket per batch."""

import json

import numpy as np
import pytest

from megamoe.data.buckets import (
    NO_BUCKET,
    TOO_SHORT,
    Bucketer,
    assign_bucket,
    batch_size_for,
    crop_latents,
    latent_shape,
    tokens_per_sample,
)
from megamoe.data.loader import ShardLoader, StreamSpec
from megamoe.data.shards import resolve_shards
from megamoe.tools.latent_shards import encode_sample, write_shard

PATCH = (1, 2, 2)
BUCKETS = ((2, 8, 8), (2, 8, 16), (4, 16, 8))  # latent units; 32, 64 and 128 tokens with patch 1x2x2
BUDGET = 200


def test_batch_sizes_from_the_token_budget():
    assert [tokens_per_sample(b, PATCH) for b in BUCKETS] == [32, 64, 128]
    assert [batch_size_for(tokens_per_sample(b, PATCH), BUDGET, 4) for b in BUCKETS] == [6, 3, 1]
    assert [batch_size_for(tokens_per_sample(b, PATCH), 0, 4) for b in BUCKETS] == [4, 4, 4]  # 0: micro batch
    assert batch_size_for(10_000, BUDGET, 4) == 1  # a sample above the budget is batched alone
    # Video buckets are counted in latent tokens: Wan2.2's VAE compresses 4x in time, 16x in space.
    assert latent_shape((17, 256, 448), True, (4, 16)) == (5, 16, 28)
    assert tokens_per_sample(latent_shape((17, 256, 448), True, (4, 16)), PATCH) == 5 * 8 * 14


def test_assignment_rule():
    square, wide, tall = (5, 32, 32), (5, 32, 64), (5, 64, 32)
    long_square = (9, 32, 32)
    buckets = (square, wide, tall, long_square)
    assert assign_bucket((9, 100, 210), buckets, crop_only=False) == (wide, None)  # nearest aspect ratio
    assert assign_bucket((9, 300, 290), buckets, crop_only=False) == (long_square, None)  # then the longest
    assert assign_bucket((6, 300, 290), buckets, crop_only=False) == (square, None)  # too short for 9 frames
    assert assign_bucket((4, 300, 290), buckets, crop_only=False) == (None, TOO_SHORT)
    # Same aspect, several areas: the largest not above the sample's, else the smallest above it.
    sizes = ((5, 16, 16), (5, 32, 32), (5, 64, 64))
    assert assign_bucket((5, 40, 40), sizes, crop_only=False) == ((5, 32, 32), None)
    assert assign_bucket((5, 8, 8), sizes, crop_only=False) == ((5, 16, 16), None)
    # Latents are cropped, never resized: the bucket must fit inside the sample.
    assert assign_bucket((5, 40, 40), sizes, crop_only=True) == ((5, 32, 32), None)
    assert assign_bucket((5, 40, 20), (wide, square), crop_only=True) == (None, NO_BUCKET)
    assert assign_bucket((3, 6, 10), (), crop_only=True) == ((3, 6, 10), None)  # no buckets: exact shape


def test_crop_takes_the_first_frames_and_the_centre():
    x = np.arange(2 * 4 * 6 * 8).reshape(2, 4, 6, 8)
    out = crop_latents(x, (2, 2, 4))
    assert out.shape == (2, 2, 2, 4) and (out == x[:, :2, 2:4, 2:6]).all()


def test_bucketer_emits_full_buckets_in_arrival_order():
    bucketer = Bucketer(lambda b: {(1, 1, 1): 2, (2, 2, 2): 3}[b])
    a, b = (1, 1, 1), (2, 2, 2)
    assert bucketer.add(a, [0, 0, 0], "a0") is None
    assert bucketer.add(b, [0, 0, 1], "b0") is None
    assert bucketer.add(b, [0, 0, 2], "b1") is None
    assert bucketer.state() == [[[1, 1, 1], [[0, 0, 0]]], [[2, 2, 2], [[0, 0, 1], [0, 0, 2]]]]
    assert bucketer.add(a, [0, 1, 0], "a1") == ["a0", "a1"]
    assert bucketer.add(b, [0, 1, 1], "b2") == ["b0", "b1", "b2"]
    assert bucketer.state() == [] and bucketer.num_pending() == 0


# --- through the loader: mixed shapes ---------------------------------------------------------

SHAPES = [(2, 8, 8), (2, 8, 16), (4, 16, 8), (2, 10, 10), (1, 8, 8), (2, 6, 6)]  # the last two fit no bucket


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    index = 0
    for shard in range(4):
        samples = []
        for _ in range(15):
            shape = SHAPES[index % len(SHAPES)]
            latents = rng.standard_normal((3, *shape)).astype(np.float32)
            text = rng.standard_normal((4, 4)).astype(np.float32)
            samples.append((f"{index:08d}", encode_sample(latents, text, f"clip {index}")))
            index += 1
        write_shard(str(out / f"shard-{shard:06d}.tar"), samples)
    return str(out)


def mixed_spec(shards, workers=1):
    return StreamSpec(
        shards=tuple(shards),
        format="latent",
        seed=5,
        dp_rank=0,
        dp_size=1,
        num_workers=workers,
        micro_batch_size=4,
        tokens_per_batch=BUDGET,
        buckets=BUCKETS,
        patch_size=PATCH,
        in_channels=3,
        text_dim=4,
        text_len=4,
    )


def test_every_batch_holds_one_bucket_within_the_budget(mixed_dir):
    loader = ShardLoader(mixed_spec(resolve_shards(mixed_dir)), 0, max_failure_fraction=1.0)
    seen_buckets = set()
    for _ in range(40):
        batch = next(loader)
        bucket = tuple(batch["bucket"])
        assert bucket in BUCKETS and tuple(batch["latents"].shape[2:]) == bucket
        tokens = tokens_per_sample(bucket, PATCH)
        assert len(batch["key"]) == batch_size_for(tokens, BUDGET, 4)  # the closed form, exactly
        assert len(batch["key"]) * tokens <= BUDGET
        seen_buckets.add(bucket)
    assert seen_buckets == set(BUCKETS)
    counts = loader.bad_data_counts()
    assert counts[TOO_SHORT] > 0 and counts[NO_BUCKET] > 0 and set(counts) == {TOO_SHORT, NO_BUCKET}


def test_resume_restores_pending_buckets_exactly(mixed_dir):
    shards = resolve_shards(mixed_dir)
    reference = ShardLoader(mixed_spec(shards), 0, 1.0)
    expected = [next(reference)["key"] for _ in range(25)]
    first = ShardLoader(mixed_spec(shards), 0, 1.0)
    for _ in range(11):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["workers"][0]["pending"], "the test needs samples waiting in a bucket at the save point"
    resumed = ShardLoader(mixed_spec(shards), 0, 1.0)
    resumed.load_state_dict(state)
    assert [next(resumed)["key"] for _ in range(14)] == expected[11:]
    assert resumed.state_dict() == reference.state_dict()  # pending buckets and counts included


def test_raw_video_that_does_not_fit_is_skipped_as_bad_shape_before_decoding():
    """Without buckets a video's bucket is its own size (rounded to VAE compression x patch); the
    decode worker applies the layout rule to it and skips a misfit undecoded. Closed form: 1 latent
    frame, 16x spatial compression, 2x2 patches: H x 32 pixels give H / 32 tokens."""
    from megamoe.data.video_buckets import decode_to_bucket
    from megamoe.tools.numbered_videos import make_video

    spec = StreamSpec(
        shards=(),
        format="video",
        seed=0,
        dp_rank=0,
        dp_size=1,
        num_workers=1,
        micro_batch_size=1,
        patch_size=PATCH,
        compression=(4, 16),
        video_frames=1,
        video_fps=16.0,
        sequence_shards=2,
        rope_max_seq_len=2,
    )
    fits = decode_to_bucket(make_video(4, 64, 32, 16.0), spec, seed=0)  # 2 tokens
    assert fits["bucket"] == [1, 64, 32] and fits["clip"].shape == (1, 64, 32, 3)
    assert decode_to_bucket(make_video(4, 96, 32, 16.0), spec, seed=0) == {"skip": "bad_shape"}  # 3 tokens
    assert decode_to_bucket(make_video(4, 128, 32, 16.0), spec, seed=0) == {"skip": "bad_shape"}  # grid 4 > 2
