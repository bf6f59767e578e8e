"""Evidence that training works (train/validation.py, train/throughput.py, the loop's start-up record and
progress line): the validation loss against the flow loss written out per sample, the same bit for bit
on 1 and 2 data-parallel ranks; the sample grid's layout; FLOPs per token against torch's FLOP
counter; the config record on resume; what the progress line shows; the settings' refusals."""

import dataclasses
import functools
import re

import numpy as np
import pytest
import torch
from torch import nn

from megamoe.config import Config, ConfigError, DataConfig, LoggingConfig, ModelConfig, MoEConfig, load_config
from megamoe.config_checks import validate
from megamoe.model.dit import build_model
from megamoe.train.validation import (
    GAP,
    VAL_NOISE_LEVELS,
    clip_grid,
    loss_key,
    sample_clips,
    validation_loss,
    validation_noise,
)

MODEL = ModelConfig(
    dim=32,
    num_layers=2,
    num_heads=2,
    ffn_dim=64,
    in_channels=3,
    out_channels=3,
    text_dim=16,
    freq_dim=16,
    rope_max_seq_len=32,
)
MOE = dataclasses.replace(MODEL, moe=MoEConfig(num_experts=4, top_k=2, num_shared_experts=1))


def model(cfg=MODEL):
    """A model whose prediction depends on its input: proj_out (zero at init) drawn too."""
    m = build_model(cfg, seed=3)
    torch.manual_seed(0)
    with torch.no_grad():
        nn.init.normal_(m.proj_out.weight, std=0.5)
    return m


def held_out(sizes=(2, 3, 2)):
    """Batches of unequal sizes, so the mean must be over samples, not batches."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 3, 2, 4, 4, generator=g), torch.randn(b, 5, 16, generator=g)) for b in sizes]


def naive(m, batches, levels):
    """The flow loss written out: each sample alone, at each level, with its own noise; means over samples."""
    out = {}
    with torch.no_grad():
        for j, s in enumerate(levels):
            losses, index = [], 0
            for latents, text in batches:
                for x0, t in zip(latents, text):
                    noise = validation_noise(0, index, j, x0.shape)
                    pred = m(((1 - s) * x0 + s * noise)[None], torch.tensor([1000.0 * s]), t[None])[0]
                    losses.append(float(((pred - (noise - x0)) ** 2).mean()))
                    index += 1
            out[loss_key(s)] = sum(losses) / len(losses)
    return out


@pytest.mark.parametrize("cfg", [MODEL, MOE], ids=["dense", "moe"])
def test_validation_loss_is_deterministic_and_the_flow_loss_per_sample(cfg):
    m, batches = model(cfg), held_out()
    m.train()
    first = validation_loss(m, batches)
    assert m.training  # the mode it was in comes back
    assert first == validation_loss(m, batches)  # bit for bit
    assert sorted(first) == sorted(["loss", *(loss_key(s) for s in VAL_NOISE_LEVELS)])
    expected = naive(m.eval(), batches, VAL_NOISE_LEVELS)
    for key, value in expected.items():
        assert first[key] == pytest.approx(value, rel=1e-5), key  # batched vs one-sample forwards: rounding
    assert first["loss"] == pytest.approx(np.mean(list(expected.values())), rel=1e-5)
    assert first[loss_key(0.9)] != first[loss_key(0.1)]


def test_noise_is_a_function_of_sample_and_level_only():
    a = validation_noise(0, 5, 2, (3, 2, 4, 4))
    assert torch.equal(a, validation_noise(0, 5, 2, (3, 2, 4, 4)))
    assert not torch.equal(a, validation_noise(0, 6, 2, (3, 2, 4, 4)))
    assert not torch.equal(a, validation_noise(0, 5, 3, (3, 2, 4, 4)))


def _two_ranks(rank, world, expected, cfg):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    # Rank 1 evaluates batch 1 and runs batch 1 again (uncounted) to keep step with rank 0's two batches.
    got = validation_loss(model(cfg), held_out(), dp_rank=rank, dp_size=world)
    dist.destroy_process_group()
    assert got == expected, (rank, got, expected)


@pytest.mark.distributed
def test_two_data_parallel_ranks_give_the_one_process_value_bit_for_bit():
    from tests.distributed.launch_helpers import spawn

    expected = validation_loss(model(MODEL), held_out())
    spawn(_two_ranks, 2, expected, MODEL)


def test_sample_grid_has_a_row_per_prompt_and_a_column_per_frame():
    clips = torch.full((2, 3, 4, 8, 8), -1.0)
    clips[1, 0, 2] = 1.0  # row 1, frame 2: red
    grid = clip_grid(clips)
    k = 8  # frames 8 pixels high are scaled to 64
    assert grid.shape == (2 * (8 * k + GAP) - GAP, 4 * (8 * k + GAP) - GAP, 3) and grid.dtype == np.uint8
    cell = 8 * k + GAP
    red = (grid[..., 0] == 255) & (grid[..., 1] == 0)
    ys, xs = np.nonzero(red)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (cell, cell + 8 * k - 1, 2 * cell, 2 * cell + 8 * k - 1)


def test_samples_are_rgb_clips_of_the_sample_shape_and_repeat():
    cfg = Config(model=MODEL)
    text = torch.randn(2, 5, 16)
    m = model()
    a = sample_clips(m, cfg, text, (3, 2, 4, 4))
    assert a.shape == (2, 3, 2, 4, 4) and torch.equal(a, sample_clips(m, cfg, text, (3, 2, 4, 4)))


def test_raw_video_samples_are_decoded_by_the_vae():
    """A raw-video run's latents go through its VAE: a tiny random Wan VAE (8x spatial, 4x temporal)."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKLWan

    from megamoe.data.wan_encoders import decode_latents
    from megamoe.diffusion.sampler import euler_sample

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=3, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.0] * 3, latents_std=[1.0] * 3
    ).eval()
    cfg, m, text = Config(model=MODEL), model(), torch.randn(2, 5, 16)
    clips = sample_clips(m, cfg, text, (3, 2, 4, 4), SimpleNamespace(vae=vae))
    assert clips.shape == (2, 3, 5, 32, 32)  # 1 + (2 - 1) x 4 frames of 8 x 4 pixels
    latents = euler_sample(m.eval(), (2, 3, 2, 4, 4), text, generator=torch.Generator().manual_seed(0))
    assert torch.equal(clips, decode_latents(vae, latents))


def test_flops_per_token_match_torch_flop_counter():
    """Attention included on every backend (the CPU's fused kernel is invisible to the counter)."""
    from megamoe.posttrain.evaluation import flops_per_token
    from megamoe.train.throughput import forward_flops_per_token

    data = [(torch.randn(2, 3, 2, 8, 8), torch.randn(2, 5, 16))]  # 2 x 4 x 4 = 32 tokens a sample
    for cfg in (MODEL, MOE):
        counted = flops_per_token(build_model(cfg), data)
        assert forward_flops_per_token(cfg, 32, 5) == pytest.approx(counted, rel=1e-9)


def test_mfu_peak_by_device_name():
    from megamoe.train.throughput import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert peak_flops("NVIDIA H100 PCIe")[0] == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert peak_flops("Tesla T4") is None


def record_config(directory, cfg, start_step):
    """What a run starting at `start_step` writes as its config record in `directory` (its log line)."""
    from megamoe.train.logging import RunLogger

    log = RunLogger(str(directory), cfg.train.steps, tensorboard=False, enabled=True)
    line = log.record_config(cfg, start_step)
    log.close()
    return line


def test_config_record_keeps_the_first_and_writes_a_changed_one_beside_it(tmp_path):
    from megamoe.config import from_yaml_text
    from megamoe.train.logging import resolved_intervals

    record = functools.partial(record_config, tmp_path)

    cfg = Config(model=MODEL)
    assert "config.yaml" in record(cfg, 0)
    assert from_yaml_text((tmp_path / "config.yaml").read_text()) == resolved_intervals(cfg)
    record(cfg, 40)  # resumed unchanged
    assert sorted(p.name for p in tmp_path.glob("config*")) == ["config.yaml"]
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=900))
    assert "differs" in record(longer, 300)
    assert from_yaml_text((tmp_path / "config.yaml").read_text()) == resolved_intervals(cfg)
    assert from_yaml_text((tmp_path / "config.resume-00000300.yaml").read_text()) == resolved_intervals(longer)


def test_progress_line_shows_flow_val_tokens_and_gpu_figures(tmp_path, capsys):
    from megamoe.train.logging import RunLogger

    log = RunLogger(str(tmp_path), 20, tensorboard=False, enabled=True)
    log.count_flops(1e9, 1e15)
    base = {"lr": 1e-3, "grad_norm": 1.0, "max_memory_gib": 3.25}
    log.log_step(1, {"loss": 1.5, "loss_flow": 1.5, **base}, 8, {"video_tokens": 1000})
    log.log_step(
        2, {"loss": 1.2, "loss_flow": 1.1, "loss_balance": 10.0, **base}, 8, {"video_tokens": 3000}, {"loss": 1.3}
    )
    first, second = capsys.readouterr().out.strip().splitlines()
    assert "flow" not in first and "val" not in first and "tokens/s" not in first  # no router loss, no rate yet
    assert "loss 1.2000 (flow 1.1000) | val 1.3000 |" in second and "mem 3.2 GiB" in second
    rate = re.search(r"\| ([\d.]+[kMG]?) tokens/s", second).group(1)
    tflops = float(re.search(r"\| ([\d.]+) TFLOP/s", second).group(1))
    mfu = float(re.search(r"MFU ([\d.]+)%", second).group(1))
    log.close()
    import json

    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])
    assert record["val"] == {"loss": 1.3}
    assert record["tflops"] == pytest.approx(record["tokens_per_s"] * 1e9 / 1e12)
    assert record["mfu"] == pytest.approx(record["tflops"] * 1e12 / 1e15)
    assert tflops == pytest.approx(record["tflops"], abs=0.06) and mfu == pytest.approx(100 * record["mfu"], abs=0.06)
    assert rate[0] != "0"


def test_settings_that_cannot_act_are_refused():
    shards = dataclasses.replace(DataConfig(), path="/data/shards")
    with pytest.raises(ConfigError, match="logging.val_every=10 needs held-out data.*data.val_path"):
        validate(Config(data=shards, logging=LoggingConfig(val_every=10)))
    with pytest.raises(ConfigError, match="data.val_path is read only by the validation loss"):
        validate(Config(data=dataclasses.replace(shards, val_path="/data/val"), logging=LoggingConfig(val_every=0)))
    with pytest.raises(ConfigError, match="logging.sample_every=5 needs captions embedded"):
        validate(Config(data=shards, logging=LoggingConfig(sample_every=5)))
    with pytest.raises(ConfigError, match="logging.sample_captions has no effect"):
        validate(Config(logging=LoggingConfig(sample_every=0, sample_captions=["a red bar moving up"])))
    with pytest.raises(ConfigError, match="logging.val_every must be >= 0"):
        validate(Config(logging=LoggingConfig(val_every=-1)))
    validate(Config(data=shards))  # the defaults switch themselves off where they cannot act
    validate(Config(data=dataclasses.replace(shards, val_path="/data/val")))
    cfg = load_config(None, ["logging.sample_captions=[a white circle moving down]"])
    assert cfg.logging.sample_captions == ["a white circle moving down"]


def write_held_out(directory, count, start=0):
    """One latent shard of `count` samples with keys held-<start>..., sized for MODEL and DataConfig's text_len."""
    from megamoe.tools.latent_shards import encode_sample, write_shard

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    samples = [
        (
            f"held-{i:04d}",
            encode_sample(rng.standard_normal((3, 2, 4, 4)), rng.standard_normal((16, 16)), "a red circle"),
        )
        for i in range(start, start + count)
    ]
    write_shard(str(directory / f"shard-{start:06d}.tar"), samples)


def test_val_path_is_checked_before_start_up_even_where_validation_never_runs(tmp_path, capsys):
    from launcher.pretrain import main
    from tests.train.test_checkpoint_checks import TINY, assert_one_line_error

    (tmp_path / "empty").mkdir()
    for val_path in (tmp_path / "missing", tmp_path / "empty"):
        out = tmp_path / "run"
        # train.steps=1: the default interval (100) is past the end, so no validation would read it.
        code = main(["--config", TINY, "train.steps=1", f"train.output_dir={out}", f"data.val_path={val_path}"])
        assert_one_line_error(code, capsys.readouterr().err.strip(), "data.val_path", "no shards found")
        assert not out.exists()  # refused before the run directory, its lock or metrics.jsonl


def test_held_out_errors_name_val_path_and_a_short_set_is_refused(tmp_path):
    from megamoe.data.loader import DataError
    from megamoe.train.validation import read_held_out

    write_held_out(tmp_path / "val", 5)
    data = DataConfig(path=str(tmp_path / "train"), val_path=str(tmp_path / "val"), micro_batch_size=2)
    cfg = Config(model=MODEL, data=data, logging=LoggingConfig(val_batches=3))  # 6 samples needed, 5 there
    with pytest.raises(DataError, match=rf"^data.val_path={tmp_path / 'val'}: it starts over after 5 usable"):
        read_held_out(cfg)
    write_held_out(tmp_path / "val", 1, start=5)
    batches = read_held_out(cfg)  # each of the 6 samples once
    assert len(batches) == 3 and all(latents.shape == (2, 3, 2, 4, 4) for latents, _ in batches)
    seen = sorted(round(float(latents[i, 0, 0, 0, 0]), 5) for latents, _ in batches for i in range(2))
    expected = []
    for start, count in ((0, 5), (5, 1)):
        rng = np.random.default_rng(start)
        for _ in range(count):
            expected.append(round(float(rng.standard_normal((3, 2, 4, 4))[0, 0, 0, 0]), 5))
            rng.standard_normal((16, 16))
    assert seen == sorted(expected)
    from megamoe.tools.latent_shards import write_shard

    junk = {"caption.txt": b"x", "latents.npy": b"junk", "text.npy": b"junk"}
    (tmp_path / "bad").mkdir()
    write_shard(str(tmp_path / "bad" / "shard-000000.tar"), [(f"bad-{i}", junk) for i in range(6)])
    strict = dataclasses.replace(data, val_path=str(tmp_path / "bad"), min_samples_before_failure_check=1)
    with pytest.raises(DataError, match=rf"^data.val_path={tmp_path / 'bad'}: 6 of 6 samples failed"):
        read_held_out(dataclasses.replace(cfg, data=strict))  # the loader's own error, prefixed


def test_checks_and_loop_use_one_interval():
    from megamoe.config import TrainConfig, sample_interval, val_interval

    short = Config(data=DataConfig(val_path="/data/val"), train=TrainConfig(steps=50))  # embedded data
    assert (val_interval(short), sample_interval(short)) == (0, 0)  # defaults 100 and 200 are past the end
    # Null intervals past the end are off for this run only: their keys stay accepted.
    validate(dataclasses.replace(short, logging=LoggingConfig(val_batches=3, sample_captions=["a red bar"])))
    longer = dataclasses.replace(short, train=TrainConfig(steps=200))
    assert (val_interval(longer), sample_interval(longer)) == (100, 200)
    with pytest.raises(ConfigError, match="logging.val_every=60 is past train.steps=50"):
        validate(dataclasses.replace(short, logging=LoggingConfig(val_every=60)))
    with pytest.raises(ConfigError, match="logging.sample_every=51 is past train.steps=50"):
        validate(dataclasses.replace(short, logging=LoggingConfig(sample_every=51)))
    with pytest.raises(ConfigError, match="data.val_path is read only by the validation loss"):
        validate(dataclasses.replace(short, logging=LoggingConfig(val_every=0)))
    validate(dataclasses.replace(short, logging=LoggingConfig(val_every=50, sample_every=50)))


def test_config_record_holds_the_run_intervals_and_each_change_once(tmp_path):
    from megamoe.config import TrainConfig, from_yaml_text

    record = functools.partial(record_config, tmp_path)

    def written(name):
        return from_yaml_text((tmp_path / name).read_text()).logging

    short = Config(model=MODEL, train=TrainConfig(steps=150))  # embedded data: val every 100, samples past the end
    record(short, 0)
    assert (written("config.yaml").val_every, written("config.yaml").sample_every) == (100, 0)
    longer = dataclasses.replace(short, train=TrainConfig(steps=400))
    assert "differs from config.yaml" in record(longer, 150)
    assert (written("config.resume-00000150.yaml").val_every, written("config.resume-00000150.yaml").sample_every) == (
        100,
        200,
    )
    assert "differs" not in record(longer, 250)  # restarted again under the same, changed config
    assert sorted(p.name for p in tmp_path.glob("config*")) == ["config.resume-00000150.yaml", "config.yaml"]
    assert "differs from config.resume-00000150.yaml" in record(short, 300)  # changed back: a change again
    assert (tmp_path / "config.resume-00000300.yaml").is_file() and len(list(tmp_path.glob("config*"))) == 3
