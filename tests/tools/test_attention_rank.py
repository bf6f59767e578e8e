"""ARank (megamoe/tools/attention_rank.py) against constructed cases: attention maps whose keys take r
distinct values have rank r, and blocks whose attention is forced to rank 1 are the ones named."""

import dataclasses

import pytest
import torch

import megamoe.posttrain.trained_model as trained_model
from megamoe.config import Config, ModelConfig, MoEConfig
from megamoe.model.dit import build_model
from megamoe.tools import attention_rank
from megamoe.tools.attention_rank import attention_map_rank, attention_ranks, blocks_to_convert

TINY = ModelConfig(
    dim=32, num_layers=4, num_heads=4, ffn_dim=64, in_channels=4, out_channels=4, text_dim=24, freq_dim=16,
    rope_max_seq_len=32,
)  # fmt: skip


@pytest.mark.parametrize("distinct_keys", [1, 3, 7])
def test_a_map_whose_keys_take_r_values_has_rank_r(distinct_keys):
    """Keys repeating r distinct vectors make r distinct columns of softmax(q k^T): rank r exactly."""
    g = torch.Generator().manual_seed(distinct_keys)
    q = torch.randn(2, 3, 40, 8, generator=g)
    values = torch.randn(2, 3, distinct_keys, 8, generator=g)
    k = values[:, :, torch.arange(40) % distinct_keys]
    assert (attention_map_rank(q, k, rtol=1e-4, max_queries=256) == distinct_keys).all()
    assert (attention_map_rank(q, k, rtol=1e-4, max_queries=16) == distinct_keys).all()  # a row subset


def low_rank_model(cfg=TINY, low=(1, 3)):
    """Blocks `low` attend uniformly (zero query projection: every logit is 0), a rank-1 map."""
    model = build_model(cfg, seed=0).eval()
    with torch.no_grad():
        for i in low:
            model.blocks[i].attn1.to_q.weight.zero_()
            model.blocks[i].attn1.to_q.bias.zero_()
    return model


def calibration(n=2):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 4, 2, 8, 8, generator=g), torch.randn(2, 5, 24, generator=g)) for _ in range(n)]


def test_the_forced_low_rank_blocks_are_named():
    model = low_rank_model()
    ranks = attention_ranks(model, calibration())
    assert ranks[1] == ranks[3] == 1.0
    assert min(ranks[0], ranks[2]) > 4, ranks
    assert blocks_to_convert(ranks, 2) == [1, 3]
    assert blocks_to_convert([3.0, 1.0, 1.0, 2.0], 1) == [1]  # a tie goes to the earlier block
    assert all(block.attn1.attend.__name__ == "attend" for block in model.blocks)  # probes removed


def test_the_command_prints_the_override(monkeypatch, capsys):
    monkeypatch.setattr(attention_rank, "load_checkpoint_model", lambda path, weights: (low_rank_model(), Config()))
    monkeypatch.setattr(trained_model, "data_batches", lambda cfg, n: calibration(n))
    assert attention_rank.main(["ckpt", "--convert", "2", "--batches", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "model.mod.layers=1,3"
    assert attention_rank.main(["ckpt", "--convert", "5"]) == 2
    assert capsys.readouterr().err.strip() == "error: --convert must be in 1..4 (the model's blocks), got 5"


def run(monkeypatch, capsys, model, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(attention_rank, "load_checkpoint_model", lambda path, weights: (model, Config()))
    monkeypatch.setattr(trained_model, "data_batches", lambda cfg, n: calibration(n))
    code = attention_rank.main(["ckpt", "--batches", "1", *args])
    out, err = capsys.readouterr()
    return code, out, err.strip()


def test_only_dense_blocks_are_named_in_a_model_with_moe_blocks(monkeypatch, capsys):
    """Blocks 1 and 3 are MoE (mixture-of-depths cannot go there); 1, 2 and 3 have rank-1 maps: the
    lowest dense block, 2, is named, and asking for more blocks than the dense ones is refused."""
    cfg = dataclasses.replace(TINY, moe=MoEConfig(num_experts=4, layers="every_other"))
    model = low_rank_model(cfg, low=(1, 2, 3))
    code, out, _ = run(monkeypatch, capsys, model, "--convert", "1")
    assert code == 0 and out.splitlines()[-1] == "model.mod.layers=2", out
    assert "block   1  ARank     1.00  (MoE: not convertible)" in out
    code, _, err = run(monkeypatch, capsys, model, "--convert", "3")
    assert (code, err) == (
        2,
        "error: --convert must be in 1..2 (its dense blocks; model.moe.layers=every_other are MoE), got 3",
    )
    code, _, err = run(monkeypatch, capsys, low_rank_model(dataclasses.replace(TINY, moe=MoEConfig(num_experts=4))))
    assert code == 2 and "every block of 'ckpt' is an MoE block (model.moe.layers=all)" in err, err


@pytest.mark.parametrize(
    "flag, value, rule",
    [
        ("--rtol", "0", "must be in (0, 1)"),
        ("--rtol", "2", "must be in (0, 1)"),
        ("--rtol", "nan", "must be in (0, 1)"),
        ("--batches", "0", "must be >= 1"),
        ("--max-queries", "0", "must be >= 1"),
        ("--noise-level", "1.5", "must be in [0, 1]"),
    ],
)
def test_a_bad_flag_is_named(monkeypatch, capsys, flag, value, rule):
    code, _, err = run(monkeypatch, capsys, None, flag, value)  # refused before any checkpoint is read
    assert (
        code == 2 and err.startswith(f"error: {flag} {rule}") and err.rsplit("got ", 1)[1] in (value, str(float(value)))
    ), err


def test_a_file_is_not_called_missing(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert attention_rank.main([str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"error: '{tmp_path / 'notes.txt'}' is a file, not a checkpoint; pass a checkpoints/step_* directory of launcher/pretrain.py"
    )
