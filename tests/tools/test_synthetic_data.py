"""The embedded synthetic dataset: deterministic, cached atomically, and faithful to its captions."""

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest

from megamoe.config import DataConfig, ModelConfig
from megamoe.tools import synthetic_data
from megamoe.tools.latent_shards import decode_sample, read_shard
from megamoe.tools.synthetic_data import (
    BACKGROUND,
    COLOURS,
    DIRECTIONS,
    clip_spec,
    dataset_params,
    embed_caption,
    ensure_synthetic_dataset,
    write_synthetic_dataset,
)


def small_configs(cache_dir, num_clips=24, channels=3):
    data = DataConfig(
        cache_dir=str(cache_dir), synthetic_num_clips=num_clips, synthetic_frames=3, synthetic_size=8, text_len=6
    )
    return data, ModelConfig(in_channels=channels, text_dim=8)


def tree_bytes(directory):
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


def tree_mtimes(directory):
    return {name: os.stat(os.path.join(directory, name)).st_mtime_ns for name in os.listdir(directory)}


def test_generation_is_byte_identical(tmp_path):
    params = dataset_params(num_clips=20, frames=3, size=8, channels=3, text_len=6, text_dim=8)
    write_synthetic_dataset(str(tmp_path / "a"), params)
    write_synthetic_dataset(str(tmp_path / "b"), params)
    a, b = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert a == b and len(a) == 8 + 1  # eight shards and the manifest
    manifest = json.loads(a["manifest.json"])
    assert manifest["num_clips"] == 20 and sum(s["num_samples"] for s in manifest["shards"]) == 20
    for shard in manifest["shards"]:
        assert hashlib.sha256(a[shard["name"]]).hexdigest() == shard["sha256"]


def test_default_size_gives_at_least_eight_shards():
    assert [len(r) for r in synthetic_data.shard_ranges(512)] == [64] * 8
    assert len(synthetic_data.shard_ranges(3)) == 3 and len(synthetic_data.shard_ranges(1000)) == 16


def test_ensure_is_cached(tmp_path):
    data, model = small_configs(tmp_path)
    first = ensure_synthetic_dataset(data, model)
    mtimes = tree_mtimes(first)
    assert ensure_synthetic_dataset(data, model) == first
    assert tree_mtimes(first) == mtimes
    assert synthetic_data.dataset_is_complete(first, synthetic_data.synthetic_params(data, model), check_hashes=True)
    # A different dataset lands in a different directory.
    data.synthetic_num_clips = 16
    assert ensure_synthetic_dataset(data, model) != first


def test_ensure_survives_losing_the_rename_race(tmp_path, monkeypatch):
    data, model = small_configs(tmp_path)
    winner = ensure_synthetic_dataset(data, model)
    mtimes = tree_mtimes(winner)
    calls = []
    real = synthetic_data.dataset_is_complete

    def not_there_at_first(*args, **kwargs):  # another process finishes while this one generates
        calls.append(1)
        return False if len(calls) == 1 else real(*args, **kwargs)

    monkeypatch.setattr(synthetic_data, "dataset_is_complete", not_there_at_first)
    assert ensure_synthetic_dataset(data, model) == winner
    assert len(calls) == 2  # it did generate, and found the winner's copy when its rename failed
    assert tree_mtimes(winner) == mtimes
    assert os.listdir(tmp_path) == [os.path.basename(winner)]  # the loser's temporary copy is gone


def test_ensure_refuses_debris(tmp_path):
    data, model = small_configs(tmp_path)
    target = tmp_path / f"synthetic-{synthetic_data.params_hash(synthetic_data.synthetic_params(data, model))}"
    target.mkdir()
    (target / "shard-000000.tar").write_bytes(b"half a shard")
    with pytest.raises(RuntimeError, match="not a complete synthetic dataset"):
        ensure_synthetic_dataset(data, model)
    assert os.listdir(tmp_path) == [target.name]


def _ensure_after_barrier(barrier, cache_dir):
    barrier.wait()
    return ensure_synthetic_dataset(*small_configs(cache_dir, num_clips=64))


def test_concurrent_ensure(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(2)
    with ctx.Pool(2) as pool:
        dirs = pool.starmap(_ensure_after_barrier, [(barrier, str(tmp_path))] * 2)
    assert dirs[0] == dirs[1]
    data, model = small_configs(tmp_path, num_clips=64)
    assert synthetic_data.dataset_is_complete(dirs[0], synthetic_data.synthetic_params(data, model), check_hashes=True)
    assert os.listdir(tmp_path) == [os.path.basename(dirs[0])]


def test_clips_move_as_captioned(tmp_path):
    params = dataset_params(num_clips=40, frames=5, size=16, channels=3, text_len=8, text_dim=8)
    write_synthetic_dataset(str(tmp_path), params)
    background = np.asarray(BACKGROUND) * 2 - 1
    ys, xs = np.mgrid[0:16, 0:16] + 0.5
    seen = set()
    for shard in sorted(p for p in os.listdir(tmp_path) if p.endswith(".tar")):
        for key, members in read_shard(str(tmp_path / shard)):
            sample = decode_sample(key, members, shard)
            latents, caption = sample["latents"], sample["caption"]
            assert latents.shape == (3, 5, 16, 16) and latents.min() >= -1 and latents.max() <= 1
            _, colour, _, _, direction = caption.split()
            seen.add(direction)
            # Coverage is linear in the distance from the background colour, so this weights by shape.
            weight = np.abs(latents - background[:, None, None, None]).sum(axis=0)
            cx = (weight * xs).sum(axis=(1, 2)) / weight.sum(axis=(1, 2))
            cy = (weight * ys).sum(axis=(1, 2)) / weight.sum(axis=(1, 2))
            step = np.stack([np.diff(cx), np.diff(cy)], axis=1)  # [F-1, 2] pixels per frame
            dx, dy = DIRECTIONS[direction]
            along = step @ np.array([dx, dy])
            across = step @ np.array([-dy, dx])
            assert (along > 0.5).all() and (np.abs(across) < 0.2).all(), (caption, step)
            spec = clip_spec(0, int(key), 5, 16)
            np.testing.assert_allclose(along, np.hypot(*spec.velocity), atol=0.2)
            # The most-covered pixel has the captioned colour.
            f, y, x = np.unravel_index(weight.argmax(), weight.shape)
            np.testing.assert_allclose((latents[:, f, y, x] + 1) / 2, COLOURS[colour], atol=0.02)
    assert seen == set(DIRECTIONS)


def test_other_channel_counts_stay_structured():
    latents, _ = synthetic_data.make_clip(0, 3, frames=3, size=8, channels=16)
    assert latents.shape == (16, 3, 8, 8) and np.abs(latents).max() <= 1
    rgb = synthetic_data.render_clip_rgb(clip_spec(0, 3, 3, 8), 3, 8)
    np.testing.assert_allclose(synthetic_data.unproject_channels(latents), rgb, atol=1e-5)


EMBED_SNIPPET = (
    "import hashlib; from megamoe.tools.synthetic_data import embed_caption; "
    "print(hashlib.sha256(embed_caption('a red circle moving left', 8, 32).tobytes()).hexdigest())"
)


def test_caption_embedding_is_stable_across_processes():
    here = hashlib.sha256(embed_caption("a red circle moving left", 8, 32).tobytes()).hexdigest()
    for hash_seed in ("1", "2"):  # Python's str hash differs with this; the embedding must not
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run([sys.executable, "-c", EMBED_SNIPPET], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == here


def test_caption_embedding_rows_and_padding():
    a = embed_caption("a red circle moving left", 8, 32)
    b = embed_caption("a blue circle moving left", 8, 32)
    assert a.dtype == np.float32 and a.shape == (8, 32)
    assert (a[5:] == 0).all() and (np.abs(a[:5]).sum(axis=1) > 0).all()
    assert not np.array_equal(a[1], b[1]) and np.array_equal(np.delete(a, 1, 0), np.delete(b, 1, 0))
    assert np.array_equal(a[2], embed_caption("circle", 8, 32)[0])  # one vector per word, wherever it is
    assert np.array_equal(embed_caption("a red circle moving left", 3, 32), a[:3])  # truncated
    assert (synthetic_data.null_text_embedding(8, 32) == 0).all()
