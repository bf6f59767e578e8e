"""A small trained MoE checkpoint that the post-training tests share (trained once per session)."""

from __future__ import annotations

import json

import pytest

from tests.distributed.launch_helpers import pretrain_in_process

STEPS = 20


def pytest_collection_modifyitems(config, items):
    """A test that reads the trained checkpoint is `slow`: the first one trains it (about 20 s)."""
    for item in items:
        if "trained_moe" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def tiny_moe_args(output_dir, *extra) -> list[str]:
    """configs/tiny_moe.yaml, shrunk to 2 blocks and 32 clips so that it trains in seconds."""
    return [
        "--config",
        "configs/tiny_moe.yaml",
        f"train.output_dir={output_dir}",
        f"train.steps={STEPS}",
        f"checkpoint.every_steps={STEPS}",
        "model.num_layers=2",
        "data.synthetic_num_clips=32",
        "data.micro_batch_size=4",
        "model.moe.diagnostics_every=0",
        "logging.every_steps=10",
        *extra,
    ]


TIMESTEP_BAND = (
    "model.moe.router=timestep_band",
    "model.moe.timestep_band_router=linear",
    "model.moe.timestep_band_boundaries=[300,700]",
    "model.moe.num_experts=6",
    "model.moe.top_k=1",
)
"""Overrides of configs/tiny_moe.yaml for timestep-band experts: 3 noise bands of 2 experts, top-1 in each."""


def config_only_checkpoint(path, *overrides):
    """A checkpoint directory with only meta.json (configs/tiny_moe.yaml + overrides, no files): enough
    for a tool that refuses the config before it reads any weight."""
    from megamoe.config import load_config, to_yaml

    path.mkdir()
    meta = {"config": to_yaml(load_config("configs/tiny_moe.yaml", list(overrides))), "files": {}}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="session")
def trained_moe(tmp_path_factory):
    """The checkpoint directory of a 20-step tiny MoE run (linear router, 8 experts top-2, a shared expert)."""
    out = tmp_path_factory.mktemp("posttrain") / "run"
    pretrain_in_process(tiny_moe_args(out))
    return out / "checkpoints" / f"step_{STEPS:08d}"
