"""data/make_shards.py and data/encode_latents.py end to end, with tiny random Wan VAE and umT5 models."""

import csv
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from megamoe.data.errors import BAD_TAR, CORRUPT_VIDEO, MISSING_MEMBER, SampleError
from megamoe.data.shards import resolve_shards
from megamoe.data.video import FrameSpec, decode_video_sample
from megamoe.data.wan_encoders import decode_latents, encode_text, encode_video, load_text_encoder, load_vae
from megamoe.tools.latent_encoding import sample_rng
from megamoe.tools.latent_shards import read_shard
from megamoe.tools.numbered_videos import make_video
from megamoe.tools.random_encoders import write_random_encoders
from tests.data.latent_stream_oracle import LatentShardStream

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
Z_DIM, TEXT_DIM, TEXT_LEN = 4, 32, 8
WORDS = "a red blue green circle square cat dog moving left right up down".split()


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "data", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    """Three good videos with sidecar captions, one without a caption, one corrupt file."""
    folder = tmp_path_factory.mktemp("videos")
    clips = {
        "cat.mp4": (40, 48, 64, 30.0, "libx264"),
        "dog.webm": (30, 33, 47, 24.0, "libvpx-vp9"),
        "sub/red.mp4": (25, 40, 40, 25.0, "mpeg4"),
        "nocaption.mp4": (20, 32, 32, 30.0, "libx264"),
    }
    for name, (frames, h, w, fps, codec) in clips.items():
        path = folder / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(make_video(frames, h, w, fps, codec))
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(200))
    for name, caption in [
        ("cat", "a cat moving left"),
        ("dog", "a dog moving up"),
        ("sub/red", "a red square"),
        ("broken", "a broken file"),
    ]:
        (folder / f"{name}.txt").write_text(caption)
    return folder


def read_index(out):
    with open(os.path.join(out, "index.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_make_shards_from_folder(video_folder, tmp_path):
    tool = load_tool("make_shards")
    out = tmp_path / "raw"
    report = tool.main(["--videos", str(video_folder), "--out", str(out), "--shard-size", "0.005", "--quiet"])
    assert report["samples"] == 3 and report["skipped"] == {CORRUPT_VIDEO: 1, MISSING_MEMBER: 1}
    index = read_index(out)
    by_source = {os.path.relpath(r["source"], video_folder): r for r in index}
    assert set(by_source) == {"cat.mp4", "dog.webm", "sub/red.mp4"}
    cat, dog = by_source["cat.mp4"], by_source["dog.webm"]
    assert (cat["frames"], cat["height"], cat["width"], cat["fps"], cat["codec"]) == (40, 48, 64, 30.0, "h264")
    assert cat["duration"] == pytest.approx(40 / 30, abs=1e-6)
    assert (dog["frames"], dog["height"], dog["width"], dog["fps"], dog["codec"]) == (30, 33, 47, 24.0, "vp9")
    # ~5 KB shards: the samples spread over several shards, each listed in the index.
    assert len(report["shards"]) >= 2 and {r["shard"] for r in index} == set(report["shards"])
    for shard in report["shards"]:
        for key, members in read_shard(str(out / shard)):
            row = next(r for r in index if r["key"] == key)
            assert row["shard"] == shard and set(members) == {os.path.splitext(row["source"])[1][1:], "txt"}
    with open(out / "skipped.jsonl") as f:
        assert sorted(json.loads(line)["cause"] for line in f) == [CORRUPT_VIDEO, MISSING_MEMBER]
    # Fixed tar headers: the same inputs give the same bytes.
    again = tmp_path / "again"
    tool.main(["--videos", str(video_folder), "--out", str(again), "--shard-size", "0.005", "--quiet"])
    for shard in report["shards"]:
        assert (out / shard).read_bytes() == (again / shard).read_bytes()


def test_make_shards_from_csv_and_jsonl(video_folder, tmp_path):
    tool = load_tool("make_shards")
    with open(tmp_path / "index.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        writer.writerow([str(video_folder / "cat.mp4"), "a cat, quoted, with commas"])
        writer.writerow([str(video_folder / "dog.webm"), ""])  # empty caption: skipped
    report = tool.main(["--index", str(tmp_path / "index.csv"), "--out", str(tmp_path / "a"), "--quiet"])
    assert report["samples"] == 1 and report["skipped"] == {"bad_caption": 1}
    ((key, members),) = read_shard(str(tmp_path / "a" / report["shards"][0]))
    assert members["txt"] == b"a cat, quoted, with commas"

    rel = os.path.relpath(video_folder / "dog.webm", tmp_path)  # relative to the index file
    (tmp_path / "index.jsonl").write_text(json.dumps({"path": rel, "caption": "a dog"}) + "\n")
    report = tool.main(
        ["--index", str(tmp_path / "index.jsonl"), "--out", str(tmp_path / "b"), "--caption-format", "json", "--quiet"]
    )
    ((key, members),) = read_shard(str(tmp_path / "b" / report["shards"][0]))
    assert json.loads(members["json"]) == {"caption": "a dog"} and "webm" in members


def test_make_shards_skips_a_caption_that_is_not_utf8_as_the_loader_would(tmp_path):
    """The rule (errors.utf8_caption): such a caption is bad_caption for make_shards (skipped, listed) and
    for the raw-video loader alike, instead of being stored with replacement characters."""
    from megamoe.data.video import parse_caption

    folder = tmp_path / "videos"
    folder.mkdir()
    video = make_video(5, 16, 16, 16.0, "libx264")
    for name, encoding in [("good", "utf-8"), ("latin1", "latin-1")]:
        caption = "a caf\u00e9 scene".encode(encoding)
        (folder / f"{name}.mp4").write_bytes(video)
        (folder / f"{name}.txt").write_bytes(caption)
    report = load_tool("make_shards").main(["--videos", str(folder), "--out", str(tmp_path / "raw"), "--quiet"])
    assert report["samples"] == 1 and report["skipped"] == {"bad_caption": 1}
    skipped = [json.loads(line) for line in (tmp_path / "raw" / "skipped.jsonl").read_text().splitlines()]
    assert [(os.path.basename(s["source"]), s["cause"]) for s in skipped] == [("latin1.mp4", "bad_caption")]
    assert "not utf-8" in skipped[0]["detail"]
    ((key, members),) = read_shard(str(tmp_path / "raw" / report["shards"][0]))
    assert parse_caption(members) == "a caf\u00e9 scene"
    with pytest.raises(SampleError) as info:  # what the loader does with the caption make_shards skipped
        parse_caption({"txt": (folder / "latin1.txt").read_bytes()})
    assert info.value.cause == "bad_caption"


def test_make_shards_names_an_index_that_is_not_utf8(tmp_path, capsys):
    index = tmp_path / "index.csv"
    index.write_bytes("path,caption\nclip.mp4,a caf\u00e9 scene\n".encode("latin-1"))
    with pytest.raises(SystemExit) as exit_info:
        load_tool("make_shards").main(["--index", str(index), "--out", str(tmp_path / "raw"), "--quiet"])
    assert exit_info.value.code == 2
    (message,) = capsys.readouterr().err.strip().splitlines()
    assert message.startswith(f"error: {index}: not UTF-8 (byte ")
    assert not (tmp_path / "raw").exists()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Tiny random Wan VAE and umT5 (megamoe/tools/random_encoders.py): (vae path, text encoder path)."""
    # Non-trivial latents_mean/std, so a wrong normalisation convention cannot pass the checks below.
    paths = write_random_encoders(
        str(tmp_path_factory.mktemp("models") / "wan"),
        z_dim=Z_DIM,
        text_dim=TEXT_DIM,
        words=WORDS,
        latents_mean=[0.1 * i for i in range(Z_DIM)],
        latents_std=[1.0 + 0.5 * i for i in range(Z_DIM)],
    )
    return paths["vae"], paths["text_encoder"]


def test_encode_text_zero_pads_like_wan(tiny_models):
    encoder, tokenizer = load_text_encoder(tiny_models[1])
    emb = encode_text(encoder, tokenizer, ["a  red circle", "dog"], TEXT_LEN)
    assert emb.shape == (2, TEXT_LEN, TEXT_DIM) and emb.dtype == torch.float32
    # 3 words + EOS and 1 word + EOS are real tokens; the rows after them are exactly zero.
    assert emb[0, :4].abs().sum(-1).gt(0).all() and emb[0, 4:].eq(0).all()
    assert emb[1, :2].abs().sum(-1).gt(0).all() and emb[1, 2:].eq(0).all()
    ids = tokenizer(["a red circle"], return_tensors="pt").input_ids
    assert torch.allclose(emb[0, :4], encoder(ids).last_hidden_state[0], atol=1e-6)


def test_encode_video_normalises_like_wan(tiny_models):
    vae = load_vae(tiny_models[0])
    pixels = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    latents = encode_video(vae, pixels)
    assert latents.shape == (1, Z_DIM, 2, 2, 2)
    raw = vae.encode(pixels).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert torch.allclose(latents, (raw - mean) / std, atol=1e-6)
    assert decode_latents(vae, latents).shape == pixels.shape
    with pytest.raises(ValueError, match="4k\\+1"):
        encode_video(vae, torch.zeros(1, 3, 4, 16, 16))


def test_encode_latents_tool_writes_stream_readable_shards(video_folder, tiny_models, tmp_path):
    raw = tmp_path / "raw"
    load_tool("make_shards").main(["--videos", str(video_folder), "--out", str(raw), "--quiet"])
    (raw / "zz-not-a-tar.tar").write_bytes(b"garbage" * 100)  # a broken shard is skipped, not fatal
    out = tmp_path / "latents"
    spec = FrameSpec(5, 12.0, 16, 24)
    report = load_tool("encode_latents").main(
        [
            "--raw",
            str(raw),
            "--out",
            str(out),
            "--vae",
            tiny_models[0],
            "--text-encoder",
            tiny_models[1],
            "--frames",
            "5",
            "--fps",
            "12",
            "--height",
            "16",
            "--width",
            "24",
            "--text-len",
            str(TEXT_LEN),
            "--seed",
            "3",
            "--batch-size",
            "2",
            "--decode-timeout",
            "30",
        ]
    )  # decodes in a DecodePool
    assert report["samples"] == 3 and report["skipped"] == {BAD_TAR: 1}
    stream = LatentShardStream(resolve_shards(str(out)), micro_batch_size=3, dp_rank=0, dp_size=1, seed=0)
    batch = next(stream)
    assert batch["latents"].shape == (3, Z_DIM, 2, 2, 3) and batch["text"].shape == (3, TEXT_LEN, TEXT_DIM)
    assert sorted(batch["caption"]) == ["a cat moving left", "a dog moving up", "a red square"]
    # Each latent is the normalised VAE encoding of the clip that (seed, key) selects.
    vae = load_vae(tiny_models[0])
    raw_samples = dict(s for shard in resolve_shards(str(raw))[:-1] for s in read_shard(shard))
    for key, latents in zip(batch["key"], batch["latents"]):
        members = raw_samples[key]
        video_bytes = next(members[e] for e in ("mp4", "webm") if e in members)
        pixels = decode_video_sample(video_bytes, spec, sample_rng(3, key))
        assert torch.allclose(latents, encode_video(vae, pixels[None])[0], atol=1e-5)
    with open(out / "manifest.json") as f:
        assert json.load(f)["params"]["z_dim"] == Z_DIM
    assert np.isfinite(batch["latents"].numpy()).all()


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--text-dim", "33"], "--text-dim must be even and >= 2 (two attention heads), got 33"),
        (["--z-dim", "0"], "--z-dim must be >= 1, got 0"),
        ([], "is not empty; give a new directory"),
    ],
)
def test_make_random_encoders_refuses_bad_arguments_with_one_line(tmp_path, capsys, args, problem):
    (tmp_path / "already-here").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        load_tool("make_random_encoders").main(["--out", str(tmp_path), *args])
    assert exit_info.value.code == 2
    (message,) = capsys.readouterr().err.strip().splitlines()
    assert message.startswith("error: ") and message.endswith(problem)
    assert os.listdir(tmp_path) == ["already-here"]
