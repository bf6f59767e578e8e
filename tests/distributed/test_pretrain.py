"""The main job on 2 gloo ranks under torchrun: it learns, logs and checkpoints; an MoE run at EP=2 resumes exactly."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.launch_helpers import REPO, pretrain, read_metrics

TINY = str(REPO / "configs" / "tiny.yaml")


def common(tmp, data_cache, steps):
    return ["--config", TINY, f"train.output_dir={tmp}", f"data.cache_dir={data_cache}", f"train.steps={steps}"]


def test_main_job_learns_logs_to_tensorboard_and_checkpoints(tmp_path, data_cache):
    out = tmp_path / "run"
    # 100 steps: in the main job's log tiny.yaml's loss is still near 1.0 at step 30 and about 0.23 at step 70.
    args = common(out, data_cache, 100) + [
        "logging.every_steps=5",
        "checkpoint.every_steps=50",
        "optim.warmup_steps=10",
        "logging.val_every=100",  # the default sample interval, 200, is past this run's end
        "logging.sample_every=100",
    ]
    result = pretrain(args)
    assert "step 100/100" in result.stdout and "samples/s" in result.stdout
    metrics = read_metrics(out)
    losses = [metrics[s]["loss"] for s in sorted(metrics)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, f"loss did not fall: first {first:.4f}, last {last:.4f}"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for name in ("loss", "lr", "grad_norm"):
        scalars = {e.step: e.value for e in events.Scalars(f"train/{name}")}
        assert sorted(scalars) == sorted(metrics)
        for step, value in scalars.items():
            assert value == pytest.approx(metrics[step][name], rel=1e-6)

    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_00000050", "step_00000100"]
    final = out / "checkpoints" / "step_00000100"
    assert (final / "meta.json").is_file() and (final / "weights" / "config.json").is_file()
    check_evidence(args, final, result.stdout, events, metrics, losses)

    # The sampler turns the checkpoint into a viewable clip: 4 samples side by side, 5 frames.
    video = tmp_path / "samples.mp4"
    sample = subprocess.run(
        [
            sys.executable,
            str(REPO / "launcher" / "sample.py"),
            "--checkpoint",
            str(final),
            "--caption",
            "a red circle moving right",
            "--steps",
            "4",
            "--out",
            str(video),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sample.returncode == 0, sample.stderr
    import av

    with av.open(str(video)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape[1] == 4 * frames[0].shape[0]


def check_evidence(args, final, stdout, events, metrics, losses):
    """The start-up record, the validation loss (that of the checkpoint's weights, recomputed in this
    process) and the sample grid in tensorboard, at the steps the resolved config asks for."""
    import math

    from megamoe.config import from_yaml_text, load_config, sample_interval, val_interval
    from megamoe.model.dit import build_model
    from megamoe.model.weights import load_diffusers_weights
    from megamoe.train.validation import GAP, MIN_FRAME_PIXELS, read_held_out, validation_loss

    cfg = load_config(TINY, args[2:])
    out = Path(cfg.train.output_dir)
    from megamoe.train.logging import resolved_intervals

    assert from_yaml_text((out / "config.yaml").read_text()) == resolved_intervals(cfg)  # the whole resolved config
    assert f"resolved config written to {out / 'config.yaml'}" in stdout and "tokens/s" in stdout
    steps = cfg.train.steps
    val_steps = [s for s in range(1, steps + 1) if val_interval(cfg) and s % val_interval(cfg) == 0]
    assert val_steps and sorted(s for s in metrics if "val" in metrics[s]) == val_steps
    for name in ("loss", "loss_s0.1", "loss_s0.9"):
        logged = {e.step: e.value for e in events.Scalars(f"val/{name}")}
        assert sorted(logged) == val_steps
        assert all(v == pytest.approx(metrics[s]["val"][name], rel=1e-6) for s, v in logged.items())
    assert f"| val {metrics[val_steps[-1]]['val']['loss']:.4f} |" in stdout
    if val_steps[-1] == steps:  # the final checkpoint's weights give the logged figure
        model = build_model(cfg.model, initialize=False)
        load_diffusers_weights(model, final / "weights")
        again = validation_loss(model, read_held_out(cfg))
        assert again == pytest.approx(metrics[steps]["val"], rel=1e-5)
    assert metrics[val_steps[-1]]["val"]["loss"] < 0.6 * sum(losses[:3]) / 3  # held-out clips learned too

    sample_steps = [s for s in range(1, steps + 1) if sample_interval(cfg) and s % sample_interval(cfg) == 0]
    grids = events.Images("samples/grid")
    assert sample_steps and [g.step for g in grids] == sample_steps
    k = math.ceil(MIN_FRAME_PIXELS / cfg.data.synthetic_size)
    cell = k * cfg.data.synthetic_size + GAP
    rows, frames = len(cfg.logging.sample_captions), cfg.data.synthetic_frames
    assert (grids[-1].height, grids[-1].width) == (rows * cell - GAP, frames * cell - GAP)


MOE = [
    "--config",
    str(REPO / "configs" / "tiny_moe.yaml"),
    "model.dim=64",
    "model.num_layers=2",
    "model.ffn_dim=256",
    "model.moe.num_experts=4",
    "model.moe.diagnostics_every=5",
]


def resume_args(data_cache):
    return [
        *MOE,
        f"data.cache_dir={data_cache}",
        "train.steps=8",
        "logging.every_steps=1",
        "checkpoint.every_steps=4",
        "train.grad_accum=2",
        "optim.zero_stage=2",
        "train.ema_decay=0.8",
        "data.micro_batch_size=4",
        "optim.warmup_steps=2",
        "parallel.expert_parallel_size=2",
        "model.moe.bias_balancing=true",
    ]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, data_cache):
    """An MoE run at EP=2 with gradient accumulation, ZeRO-2, EMA and aux-free biases, so that every
    piece of state must come back: uninterrupted (`full`), and a second run (`part`) that starts from
    the uninterrupted run's checkpoint of step 4, as a job does after a preemption. Returns (full, part,
    the resumed run's result). (Stopping at a signal and `--resume auto` are test_resilience.py's.)"""
    tmp = tmp_path_factory.mktemp("resume")
    extra = resume_args(data_cache)
    full, part = tmp / "full", tmp / "part"
    pretrain([*extra, f"train.output_dir={full}"])
    resumed = pretrain([*extra, f"train.output_dir={part}", "--resume", str(full / "checkpoints" / "step_00000004")])
    return full, part, resumed


def test_resume_reproduces_the_uninterrupted_losses_exactly(interrupted):
    full, part, resumed = interrupted
    assert f"resumed from {full / 'checkpoints' / 'step_00000004'} at step 4" in resumed.stdout
    uninterrupted, continued = read_metrics(full), read_metrics(part)
    assert sorted(continued) == list(range(5, 9))
    for step in range(5, 9):
        for name in ("loss", "grad_norm", "lr"):
            assert continued[step][name] == uninterrupted[step][name], (step, name)
    # The weights (experts' aux-free biases included) and the EMA weights (each rank's average of
    # its own experts, gathered), too, are bit-identical at the end.
    from megamoe.model.weights import read_state_dict

    for name in ("weights", "ema_weights"):  # sharded exports: read through their index
        a = read_state_dict(full / "checkpoints/step_00000008" / name)
        b = read_state_dict(part / "checkpoints/step_00000008" / name)
        assert a.keys() == b.keys() and b["blocks.0.ffn.experts.w1"].shape[0] == 4
        assert any("expert_bias" in k for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_unloadable_checkpoint_is_one_line_error_and_left_untouched(interrupted, tmp_path, data_cache):
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "step_00000004"
    shutil.copytree(interrupted[0] / "checkpoints" / "step_00000004", ckpt)
    victim = ckpt / "rank_00001.pt"
    victim.write_bytes(b"\0" * victim.stat().st_size)  # same size: passes the size check, fails to load
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    result = pretrain([*resume_args(data_cache), f"train.output_dir={out}", "--resume", str(ckpt)], check=False)
    assert result.returncode != 0
    assert "could not be loaded" in result.stderr and "rank_00001.pt" not in result.stdout
    after = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    assert before == after
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004"]
