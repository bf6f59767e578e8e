"""A LoRA-Mixer run end to end at toy size: a dense base trained one step, adapters trained one step on
it (train.init_from). The disk-space check's checkpoint size against the bytes each run really wrote,
and the export command line against the Python API it wraps."""

import dataclasses
from pathlib import Path

import pytest
import torch

from megamoe.config import LoRAConfig, load_config
from megamoe.model.dit import build_model
from megamoe.model.lora_mixer import adapter_parameters, adapters
from megamoe.model.weights import read_state_dict
from megamoe.posttrain import lora_export
from megamoe.tools.parameter_counts import (
    CHECKPOINT_FIXED_BYTES,
    RANK_FILE_BYTES,
    checkpoint_bytes,
    config_parameter_counts,
)
from tests.distributed.launch_helpers import pretrain_in_process
from tests.train.test_checkpoint_checks import assert_one_line_error

SMALL = ["model.num_layers=2", "data.synthetic_num_clips=16", "train.steps=1", "checkpoint.every_steps=1"]
LORA = ["model.lora.num_experts=4", "model.lora.rank=8"]
STEP = "checkpoints/step_00000001"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{'base': (run dir, overrides), 'lora': ...}: configs/tiny.yaml (fp32, EMA on) shrunk, one step each."""
    root = tmp_path_factory.mktemp("lora_runs")
    base = [*SMALL, f"train.output_dir={root / 'base'}"]
    lora = [*SMALL, *LORA, f"train.output_dir={root / 'lora'}", f"train.init_from={root / 'base' / STEP / 'weights'}"]
    for overrides in (base, lora):
        pretrain_in_process(["--config", "configs/tiny.yaml", *overrides])
    return {"base": (root / "base", base), "lora": (root / "lora", lora)}


@pytest.mark.parametrize("run", ["base", "lora"])
def test_planned_checkpoint_size_is_what_the_run_wrote(runs, run):
    """Adapters on, the frozen base has no master weight and no Adam moments: the plan must follow
    (it counted 24 bytes per base parameter, 1.4x what such a checkpoint holds). It may exceed the
    written bytes by no more than its allowances for headers and rank files."""
    directory, overrides = runs[run]
    written = sum(p.stat().st_size for p in (directory / STEP).rglob("*") if p.is_file())
    planned = checkpoint_bytes(load_config("configs/tiny.yaml", overrides), 1)
    assert written <= planned <= written + CHECKPOINT_FIXED_BYTES + RANK_FILE_BYTES, (written, planned)


def test_5b_lora_checkpoint_is_the_frozen_base_plus_trained_adapters():
    """Closed form for the 5B LoRA config (bf16, no EMA): 2 + 2 bytes per frozen base parameter (state/
    and weights/), 2 + 12 + 2 per adapter parameter; about 21.6 GB where full training needs 80 GB."""
    cfg = load_config("configs/wan2.2_ti2v_5b_lora_mixer.yaml", ["train.init_from=/weights/base"])
    base = config_parameter_counts(dataclasses.replace(cfg.model, lora=LoRAConfig())).total
    expected = 4 * base + 16 * adapter_parameters(cfg.model) + 8 * RANK_FILE_BYTES + CHECKPOINT_FIXED_BYTES
    assert checkpoint_bytes(cfg, 8) == expected < 22e9


def test_command_line_exports_what_the_python_api_does(runs, tmp_path, capsys):
    ckpt = runs["lora"][0] / STEP
    out_adapters, out_merged = tmp_path / "adapters.safetensors", tmp_path / "merged"
    args = ["--checkpoint", str(ckpt), "--adapters", str(out_adapters), "--merged", str(out_merged)]
    assert lora_export.main([*args, "--calibration-batches", "2"]) == 0
    printed = capsys.readouterr().out
    assert "calibrated on batch 2/2" in printed and f"wrote the merged dense model to {out_merged}" in printed

    model, cfg = lora_export.load_adapted_model(ckpt)
    other = build_model(cfg.model, seed=7)
    lora_export.load_adapters(other, out_adapters)
    for name, adapter in adapters(model).items():
        assert all(torch.equal(p, q) for p, q in zip(adapter.parameters(), adapters(other)[name].parameters()))

    from megamoe.posttrain.trained_model import data_batches

    gates = lora_export.calibrate(model, data_batches(cfg, 2), cfg.diffusion, torch.Generator().manual_seed(0))
    expected = lora_export.merged_state_dict(model, gates)
    written = read_state_dict(str(out_merged))
    assert written.keys() == expected.keys() and all(torch.equal(written[k], v) for k, v in expected.items())

    # Outputs that exist are refused before any work, and left as they were.
    before = out_adapters.read_bytes()
    assert lora_export.main(args) == 2
    assert_one_line_error(2, capsys.readouterr().err.strip(), f"--adapters '{out_adapters}' already exists")
    assert out_adapters.read_bytes() == before
    args = ["--checkpoint", str(ckpt), "--merged", str(out_merged)]
    assert lora_export.main(args) == 2
    assert_one_line_error(2, capsys.readouterr().err.strip(), f"--merged '{out_merged}' already exists")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--adapters", "{tmp}/a.safetensors", "--calibration-batches", "3"],
            "--calibration-batches is read only with --merged",
        ),
        ([], "nothing to export; give --adapters FILE and/or --merged DIR"),
        (["--merged", "{tmp}/m", "--calibration-batches", "0"], "--calibration-batches must be >= 1"),
    ],
)
def test_command_line_refuses_bad_flags_in_one_line(tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    assert lora_export.main(["--checkpoint", str(tmp_path / "nowhere"), *args]) == 2
    assert_one_line_error(2, capsys.readouterr().err.strip(), message)
    assert list(Path(tmp_path).iterdir()) == []


def test_command_line_refuses_a_checkpoint_without_adapters(runs, tmp_path, capsys):
    ckpt = runs["base"][0] / STEP
    assert lora_export.main(["--checkpoint", str(ckpt), "--adapters", str(tmp_path / "a.safetensors")]) == 2
    assert_one_line_error(2, capsys.readouterr().err.strip(), "has no LoRA-Mixer adapters (model.lora.num_experts=0)")
    assert list(tmp_path.iterdir()) == []
