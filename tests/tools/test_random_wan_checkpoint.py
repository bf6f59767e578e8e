"""data/make_random_wan.py (megamoe/tools/random_wan_checkpoint.py) writes a checkpoint that diffusers itself
loads, whose values do not depend on how it is sharded, and that megamoe's strict loader accepts for the same
config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megamoe.config import ConfigError, load_config
from megamoe.model.dit import build_model
from megamoe.model.weights import INDEX_NAME, load_diffusers_weights, read_state_dict
from megamoe.tools.random_wan_checkpoint import write_random_wan

REPO = Path(__file__).resolve().parents[2]


def test_diffusers_loads_it_and_values_do_not_depend_on_sharding(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    index = write_random_wan(
        str(REPO / "configs/tiny.yaml"), str(tmp_path / "many"), "bf16", seed=3, max_shard_gb=0.0005, log=lambda _: None
    )
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    write_random_wan(
        str(REPO / "configs/tiny.yaml"), str(tmp_path / "one"), "bf16", seed=3, max_shard_gb=100, log=lambda _: None
    )
    many, one = read_state_dict(tmp_path / "many"), read_state_dict(tmp_path / "one")
    assert many.keys() == one.keys() and all(torch.equal(many[k], one[k]) for k in many)
    assert all(v.dtype == torch.bfloat16 for v in many.values())
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in many.values())

    # diffusers reads the index, config.json and every shard, strictly: nothing missing or unexpected.
    model, info = diffusers.WanTransformer3DModel.from_pretrained(
        str(tmp_path / "many"), output_loading_info=True, torch_dtype=torch.bfloat16
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    theirs = model.state_dict()
    assert theirs.keys() == many.keys() and all(torch.equal(theirs[k], many[k]) for k in many)

    ours = build_model(load_config(str(REPO / "configs/tiny.yaml")).model)
    load_diffusers_weights(ours, str(tmp_path / "many"))
    assert torch.equal(
        ours.state_dict()["blocks.0.ffn.net.0.proj.weight"], many["blocks.0.ffn.net.0.proj.weight"].float()
    )


def test_refuses_moe_configs_and_non_empty_directories(tmp_path):
    with pytest.raises(ConfigError, match="MoE config"):
        write_random_wan(str(REPO / "configs/tiny_moe.yaml"), str(tmp_path / "x"), log=lambda _: None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    result = subprocess.run(
        [sys.executable, "data/make_random_wan.py", "--config", "configs/tiny.yaml", "--out", str(tmp_path / "full")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "not empty" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and not (tmp_path / "full" / INDEX_NAME).exists()
