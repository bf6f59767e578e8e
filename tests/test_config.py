"""Bad configs fail before start-up with one line that names the key, and exit code 2."""

import pytest

from launcher.pretrain import main
from megamoe.config import Config, ConfigError, load_config, merge_config, to_yaml, from_yaml_text, validate

TINY = "configs/tiny.yaml"


def test_yaml_and_overrides_merge_onto_defaults():
    cfg = load_config(TINY, ["model.num_layers=4", "optim.betas=[0.8,0.9]", "data.path=/x"])
    assert cfg.model.num_layers == 4 and cfg.model.dim == 128  # override and YAML
    assert cfg.optim.betas == [0.8, 0.9] and cfg.data.path == "/x"
    assert cfg.train.grad_accum == Config().train.grad_accum  # default kept
    assert from_yaml_text(to_yaml(cfg)) == cfg


def test_every_shipped_config_validates():
    for path, world in [("configs/tiny.yaml", 2), ("configs/wan2.2_ti2v_5b.yaml", 64), ("configs/tiny_moe.yaml", 2),
                        ("configs/wan2.2_ti2v_5b_moe.yaml", 64)]:
        validate(load_config(path), world_size=world)


@pytest.mark.parametrize("overrides, key_in_message", [
    (["model.hidden=3"], "model.hidden"),
    (["modle.dim=3"], "modle.dim"),
    (["model.dim=wide"], "model.dim"),
    (["train.steps=1.5"], "train.steps"),
    (["model.num_heads=5"], "model.num_heads"),
    (["model.num_heads=32"], "model.num_heads"),  # head dim 2 cannot hold 3D RoPE
    (["train.precision=fp16"], "train.precision"),
    (["optim.zero_stage=3"], "optim.zero_stage"),
    (["diffusion.timestep_sampling=cosine"], "diffusion.timestep_sampling"),
    (["data.synthetic_size=15"], "data.synthetic_size"),
    (["parallel.tensor_parallel_size=2"], "parallel.tensor_parallel_size"),
    (["parallel.expert_parallel_size=2"], "parallel.expert_parallel_size"),
    (["parallel.expert_parallel_size=0"], "parallel.expert_parallel_size"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
    (["model.num_layers"], "model.num_layers"),
    (["model.moe.num_experts=4", "model.moe.router=topk"], "model.moe.router"),
    (["model.moe.num_experts=4", "model.moe.top_k=5"], "model.moe.top_k"),
    (["model.moe.num_experts=4", "model.moe.layers=0,9"], "model.moe.layers"),
    (["model.moe.num_experts=4", "model.moe.score_func=relu"], "model.moe.score_func"),
    (["model.moe.num_experts=4", "model.moe.balance_loss=-1"], "model.moe.balance_loss"),
    (["model.moe.num_experts=4", "model.moe.expert_choice_scope=global"], "model.moe.expert_choice_scope"),
    (["model.moe.experts=4"], "model.moe.experts"),
    (["model.moe.num_experts=4", "model.moe.router=sinkhorn", "model.moe.num_null_experts=1"], "num_null_experts"),
    (["model.moe.num_experts=4", "model.moe.router=expert_race", "model.moe.bias_balancing=true"], "bias_balancing"),
    (["model.moe.num_experts=4", "model.moe.router=promoe", "model.moe.top_k=4"], "promoe"),
])
def test_bad_config_is_one_line_naming_the_key(overrides, key_in_message, capsys, tmp_path):
    code = main(["--config", TINY, f"train.output_dir={tmp_path}", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert key_in_message in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_experts_not_divisible_by_expert_parallel_size(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    code = main(["--config", "configs/tiny_moe.yaml", "parallel.expert_parallel_size=4", "model.moe.num_experts=6"])
    err = capsys.readouterr().err
    assert code == 2 and "model.moe.num_experts=6 is not divisible by parallel.expert_parallel_size=4" in err
    monkeypatch.setenv("WORLD_SIZE", "6")
    assert main(["--config", "configs/tiny_moe.yaml", "parallel.expert_parallel_size=4"]) == 2
    assert "world size 6 is not divisible by parallel.expert_parallel_size=4" in capsys.readouterr().err


def test_world_size_not_divisible_by_parallel_sizes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    code = main(["--config", TINY, "parallel.tensor_parallel_size=2"])
    err = capsys.readouterr().err
    assert code == 2 and "world size 3 is not divisible" in err and "parallel" in err


def test_missing_and_malformed_config_files(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert main(["--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    assert main(["--config", str(scalar)]) == 2
    assert "mapping" in capsys.readouterr().err


def test_validate_raises_config_error_directly():
    with pytest.raises(ConfigError, match="model.num_heads=7 does not divide model.dim=64"):
        validate(merge_config({"model": {"dim": 64, "num_heads": 7}}))


@pytest.mark.parametrize("world, overrides, message", [
    (8, ["parallel.tensor_parallel_size=2", "parallel.context_parallel_size=4"],
     "model.num_heads=4 is not divisible by parallel.tensor_parallel_size x parallel.context_parallel_size = 8"),
    (2, ["parallel.tensor_parallel_size=2", "model.ffn_dim=513"],
     "model.ffn_dim=513 is not divisible by parallel.tensor_parallel_size=2"),
    (2, ["parallel.tensor_parallel_size=2", "model.moe.num_experts=4", "parallel.sequence_parallel=false"],
     "needs parallel.sequence_parallel=true"),
    (2, ["parallel.context_parallel_size=2", "data.synthetic_size=6"],
     "data.synthetic_frames/data.synthetic_size gives 45 tokens per sample, not divisible by "
     "parallel.context_parallel_size = 2"),
    (4, ["parallel.tensor_parallel_size=2", "parallel.context_parallel_size=2", "data.synthetic_size=6",
         "data.synthetic_frames=2"], "gives 18 tokens per sample, not divisible by parallel.context_parallel_size x "
                                     "parallel.tensor_parallel_size (sequence parallel) = 4"),
    (2, ["parallel.context_parallel_size=2", "data.path=/shards", "data.buckets=[[4,8,8],[5,6,6]]"],
     "data.buckets entry [5, 6, 6] gives 45 tokens per sample"),
    (2, ["parallel.expert_parallel_size=2", "model.moe.num_experts=4", "optim.zero_stage=0"],
     "optim.zero_stage=0 with parallel.expert_parallel_size > 1 clips by a wrong gradient norm"),
])
def test_model_parallel_layout_errors(world, overrides, message, monkeypatch, capsys, tmp_path):
    """Each bad tensor/context-parallel layout is one line naming the key, before any process group."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    code = main(["--config", TINY, f"train.output_dir={tmp_path}", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_model_parallel_layouts_that_divide_validate():
    validate(load_config(TINY, ["parallel.tensor_parallel_size=2", "parallel.context_parallel_size=2"]), world_size=8)
    validate(load_config("configs/tiny_moe.yaml", ["parallel.tensor_parallel_size=2", "parallel.expert_parallel_size=4"]),
             world_size=4)
    # EMA is kept per shard under every layout (tests/distributed/test_parallel_training.py)
    validate(load_config("configs/tiny_moe.yaml", ["parallel.tensor_parallel_size=2", "parallel.expert_parallel_size=2",
                                                   "parallel.context_parallel_size=2", "train.ema_decay=0.99"]),
             world_size=8)
    # Without sequence parallelism a dense model's tokens are split by CP only (45 tokens under TP=2 is fine).
    validate(load_config(TINY, ["parallel.tensor_parallel_size=2", "parallel.sequence_parallel=false",
                                "data.synthetic_size=6"]), world_size=2)
