"""launcher/quantize_experts.py and megamoe/posttrain/{quantization,top_any}.py: packing, the per-group
rounding bound, the MILP against enumeration, the loader against the in-memory model, a merged model's
calibration tokens, top-any, bad and ignored inputs, --save-stats only with a complete output."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml

from launcher.quantize_experts import check_arguments, main, parse_args
from megamoe.posttrain.merging import merge_model, plan_merge
from megamoe.posttrain.quantization import (
    BIT_WIDTHS,
    apply_plan,
    expert_tokens,
    load_quantized,
    pack_bits,
    plan_bit_widths,
    quantize,
    read_manifest,
    solve_bit_widths,
    stored_bits,
    unpack_bits,
    write_quantized,
)
from megamoe.posttrain.routing_stats import collect_routing_stats, load_routing_stats, save_routing_stats
from megamoe.posttrain.top_any import dropped_fraction, install_top_any, reset_counts, train_top_any
from megamoe.posttrain.trained_model import data_batches, load_trained_model
from megamoe.train.checkpoint import inspect_checkpoint


@pytest.mark.parametrize("bits", BIT_WIDTHS)
def test_pack_unpack_is_exact(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 1 << bits, (1001,), generator=g).to(torch.uint8)
    values[:2] = torch.tensor([0, (1 << bits) - 1])  # both ends of the range
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1001 * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, 1001), values)


@pytest.mark.parametrize("bits", BIT_WIDTHS)
def test_rounding_error_within_half_a_step_per_group(bits):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 48, generator=g) * 0.05
    w[:64] += 0.3  # an off-centre group
    w[64:128, 5] = 0.125  # a constant group column
    w[128:192, :4] += 1000.45  # fp16 steps of 0.5 here: the nearest fp16 of the minimum lies above it
    q = quantize(w, bits, 64)
    assert q.scale.dtype == q.offset.dtype == torch.float16 and q.scale.shape == (4, 48)
    assert int(q.integers().max()) < 1 << bits
    step = q.scale.float().repeat_interleave(64, 0)
    err = (w - q.dequantize()).abs()
    slack = 4 * torch.finfo(torch.float32).eps * w.abs()  # the fp32 arithmetic of q * scale + offset
    assert bool((err <= step / 2 + slack).all()), float((err - step / 2).max())
    if bits == 8:
        assert float(err[:128].max()) < 1.01 * float(w[:128].max() - w[:128].min()) / 255 / 2


def test_solver_meets_budget_and_is_optimal_against_enumeration():
    rng = np.random.default_rng(0)
    n = 5
    cost = np.array([[stored_bits(64, 32 * (i + 1), b, 32) for b in BIT_WIDTHS] for i in range(n)])
    objective = rng.random((n, 1)) * np.sort(rng.random((n, len(BIT_WIDTHS))), axis=1)[:, ::-1]
    assignments = list(itertools.product(range(len(BIT_WIDTHS)), repeat=n))
    totals = {a: int(cost[np.arange(n), a].sum()) for a in assignments}
    for budget in [min(totals.values()), *np.quantile(list(totals.values()), [0.2, 0.5, 0.8]).astype(int)]:
        choice = solve_bit_widths(objective, cost, int(budget))
        used = int(cost[np.arange(n), choice].sum())
        best = min(objective[np.arange(n), a].sum() for a in assignments if totals[a] <= budget)
        assert used <= budget
        assert objective[np.arange(n), choice].sum() == pytest.approx(best, rel=1e-9, abs=0)
    exact = totals[(1, 3, 0, 2, 1)]  # a budget only some assignments hit exactly
    choice = solve_bit_widths(objective, cost, exact)
    assert int(cost[np.arange(n), choice].sum()) <= exact


@pytest.fixture(scope="module")
def quantized_dir(trained_moe, tmp_path_factory):
    """The tool's output on the shared checkpoint, with top-any (a few steps, a large penalty);
    its routing statistics saved beside it as stats.safetensors."""
    out = tmp_path_factory.mktemp("quantize") / "q"
    argv = ["--checkpoint", trained_moe, "--out", out, "--bits-budget", "3.0", "--group-size", "64"]
    argv += ["--calibration-batches", "2", "--val-batches", "1", "--top-any", "--prune-weight", "2"]
    argv += ["--save-stats", out.parent / "stats.safetensors"]
    assert main([*map(str, argv), "--prune-steps", "4", "--prune-lr", "0.5"]) == 0
    return out


def _expert_out(x, w1, b1, w2, b2):
    return torch.nn.functional.gelu(x @ w1 + b1, approximate="tanh") @ w2 + b2


@torch.no_grad()
def test_merged_model_errors_use_the_tokens_that_computed_each_expert(trained_moe):
    """A merged layer's router scores 8 columns, its 4 experts are what the tokens computed: expert e's
    error is measured on the sampled tokens whose routing_map holds e, not those whose top-k has column e."""
    model, cfg = load_trained_model(trained_moe)
    batches = data_batches(cfg, 1)
    merged = merge_model(model, plan_merge(collect_routing_stats(model, batches, cfg, sample_tokens=256), 4))
    assert merged.cfg.moe.merged_from == 8 and merged.cfg.moe.num_experts == 4
    stats = collect_routing_stats(merged, batches, cfg, sample_tokens=256)
    plan = plan_bit_widths(merged, stats, 3.0, 64)
    columns_differ = False
    for block, s in stats.layers.items():
        ex = merged.blocks[block].ffn.experts
        assert s.routing_map.shape == (256, 4) and s.router_logits.shape == (256, 8)
        assert plan.importance[block] == pytest.approx((s.weight_sums / s.num_tokens).tolist(), rel=1e-12)
        top_columns = s.router_logits.topk(cfg.model.moe.top_k, dim=1).indices
        for e in range(ex.num_experts):
            chosen = s.routing_map[:, e]
            assert bool(chosen.any())
            x = s.inputs[chosen].float()
            assert torch.equal(expert_tokens(s, e), x)
            columns_differ |= not torch.equal(chosen, (top_columns == e).any(1))
            ref = _expert_out(x, ex.w1[e], ex.b1[e], ex.w2[e], ex.b2[e])
            for j, bits in enumerate(BIT_WIDTHS):
                w1, w2 = quantize(ex.w1[e], bits, 64).dequantize(), quantize(ex.w2[e], bits, 64).dequantize()
                expected = float(((_expert_out(x, w1, ex.b1[e], w2, ex.b2[e]) - ref) ** 2).sum(1).mean())
                assert plan.errors[block][e][j] == pytest.approx(expected, rel=1e-6), (block, e, bits)
    assert columns_differ  # otherwise the router's columns would pick the same tokens and prove nothing


def _states_equal(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_loader_equals_the_dequantized_model(trained_moe, tmp_path, quantized_dir):
    model, cfg = load_trained_model(trained_moe)
    stats = collect_routing_stats(model, data_batches(cfg, 1), cfg)
    plan = plan_bit_widths(model, stats, 3.0, 64)
    assert plan.used_bits <= plan.budget_bits and {b for v in plan.bits.values() for b in v} - {2} != set()
    apply_plan(model, plan)
    write_quantized(model, inspect_checkpoint(trained_moe)["config"], plan, tmp_path)
    _states_equal(load_quantized(tmp_path), model)  # written then loaded == in memory
    # The tool's directory: each expert holds exactly quantize(original) at its chosen width, dequantized.
    original, _ = load_trained_model(trained_moe)
    loaded = load_quantized(quantized_dir)
    manifest = read_manifest(quantized_dir)
    for block, widths in manifest["bits"].items():
        src, dst = original.blocks[int(block)].ffn.experts, loaded.blocks[int(block)].ffn.experts
        for e, bits in enumerate(widths):
            for name in ("w1", "w2"):
                expected = quantize(getattr(src, name)[e], bits, 64).dequantize()
                assert torch.equal(getattr(dst, name)[e], expected), (block, e, name)
    rest = {k: v for k, v in original.state_dict().items() if not k.endswith(("experts.w1", "experts.w2"))}
    mine = loaded.state_dict()
    for k, v in rest.items():
        key = k.replace(".router.", ".router.inner.")
        assert torch.equal(mine[key], v), k


def test_top_any_all_keep_is_the_original_model(trained_moe):
    model, cfg = load_trained_model(trained_moe)
    latents, text = data_batches(cfg, 1, held_out=True)[0]
    t = torch.full((latents.shape[0],), 500.0)
    with torch.no_grad():
        ref = model(latents, t, text)
        install_top_any(model)  # an untrained mask keeps every selected expert
        reset_counts(model)
        out = model(latents, t, text)
    assert torch.equal(out, ref)
    assert dropped_fraction(model) == 0.0


def test_trained_mask_drops_experts_and_the_flops_show_it(trained_moe, quantized_dir):
    from megamoe.posttrain.evaluation import flops_per_token
    from megamoe.posttrain.top_any import enable_top_any

    model = load_quantized(quantized_dir)
    _, cfg = load_trained_model(trained_moe)
    held_out = data_batches(cfg, 1, held_out=True)
    reset_counts(model)
    with_masks = flops_per_token(model, held_out)
    dropped = dropped_fraction(model)
    enable_top_any(model, False)
    # at most the second of top-2 (the top-1 is always kept); on the tiny data all seconds may go
    assert 0.05 < dropped <= 0.5
    assert with_masks < flops_per_token(model, held_out)


def test_mask_training_is_deterministic_and_leaves_the_model_frozen(trained_moe):
    model, cfg = load_trained_model(trained_moe)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    install_top_any(model)
    history = train_top_any(model, cfg, data_batches(cfg, 1), prune_weight=2.0, steps=2, lr=0.5)
    assert history[-1][2] < history[0][2]
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k.replace(".router.", ".router.inner.")], v), k


def test_evaluate_reads_the_directory(quantized_dir, capsys, tmp_path):
    assert main(["--evaluate", str(quantized_dir), "--val-batches", "1"]) == 0
    printed = capsys.readouterr().out
    assert "dropped" in printed and "validation loss mean" in printed
    assert main(["--evaluate", str(tmp_path), "--val-batches", "1"]) == 2
    assert "not a quantized model directory" in capsys.readouterr().err


def test_sampler_reads_the_directory(quantized_dir, capsys, tmp_path):
    from launcher.sample import main as sample_main

    video = tmp_path / "quantized.mp4"
    args = ["--checkpoint", quantized_dir, "--caption", "a red ball", "--out", video, "--num-samples", "1"]
    assert sample_main([*map(str, args), "--steps", "2"]) == 0
    assert "quantized weights" in capsys.readouterr().out and video.stat().st_size > 0
    assert sample_main([*map(str, args), "--steps", "2", "--weights", "ema"]) == 2  # would be ignored: refused
    assert "does not apply to a quantized directory" in capsys.readouterr().err


def test_save_stats_is_written_with_the_complete_directory(trained_moe, quantized_dir):
    model, _ = load_trained_model(trained_moe)
    stats = load_routing_stats(quantized_dir.parent / "stats.safetensors", model)  # gathered on this model
    assert sorted(stats.layers) == sorted(map(int, read_manifest(quantized_dir)["bits"])) == [0, 1]


def test_save_stats_is_not_written_when_the_run_fails(trained_moe, tmp_path, monkeypatch):
    from megamoe.posttrain import quantization

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(quantization, "write_quantized", fail)
    out, saved = tmp_path / "q", tmp_path / "stats.safetensors"
    argv = ["--checkpoint", trained_moe, "--out", out, "--bits-budget", "3", "--group-size", "64"]
    argv += ["--calibration-batches", "1", "--val-batches", "1", "--save-stats", saved]
    with pytest.raises(RuntimeError, match="disk full"):
        main(list(map(str, argv)))
    assert not out.exists() and not saved.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary left either


def _bad(capsys, argv, out) -> str:
    assert main(list(map(str, argv))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists()
    return err


def test_bad_inputs(trained_moe, tmp_path, capsys):
    out = tmp_path / "q"
    base = ["--checkpoint", trained_moe, "--out", out, "--calibration-batches", "1", "--val-batches", "1"]
    assert "below the minimum 2.5" in _bad(capsys, [*base, "--bits-budget", "2.4", "--group-size", "64"], out)
    # a dense checkpoint: the same files, the config's experts removed
    dense = tmp_path / "dense"
    shutil.copytree(trained_moe, dense)
    meta = json.loads((dense / "meta.json").read_text())
    config = yaml.safe_load(meta["config"])
    config["model"]["moe"]["num_experts"] = 0
    meta["config"] = yaml.safe_dump(config)
    (dense / "meta.json").write_text(json.dumps(meta))
    argv = ["--checkpoint", dense, "--out", out, "--bits-budget", "3"]
    assert "dense model" in _bad(capsys, argv, out)
    # statistics gathered on another model (one router weight changed)
    model, cfg = load_trained_model(trained_moe)
    with torch.no_grad():
        model.blocks[0].ffn.router.gate.weight[0, 0] += 1.0
    save_routing_stats(collect_routing_stats(model, data_batches(cfg, 1), cfg, sample_tokens=64), tmp_path / "s")
    argv = [*base[:4], "--val-batches", "1", "--bits-budget", "3", "--stats", tmp_path / "s"]
    assert "another model" in _bad(capsys, argv, out)
    # --out exists
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    assert main(list(map(str, [*base[:3], taken, "--bits-budget", "3"]))) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]


def test_budget_must_be_finite_and_at_most_every_expert_at_8_bits(trained_moe, tmp_path, capsys):
    out = tmp_path / "q"
    base = ["--checkpoint", trained_moe, "--out", out, "--calibration-batches", "1", "--val-batches", "1"]
    for budget in ("nan", "inf", "-inf"):
        assert "finite" in _bad(capsys, [*base, f"--bits-budget={budget}"], out)
    err = _bad(capsys, [*base, "--bits-budget", "8.51", "--group-size", "64"], out)
    assert "above the maximum 8.5 " in err and "lower it" in err  # 8 + 32 / 64
    assert "above the maximum 8.25 " in _bad(capsys, [*base, "--bits-budget", "8.3"], out)  # the default group 128


def test_group_size_is_checked_before_the_budget_range(trained_moe, tmp_path, capsys):
    out = tmp_path / "q"
    base = ["--checkpoint", trained_moe, "--out", out, "--calibration-batches", "1", "--val-batches", "1"]
    for budget in ("3", "12"):  # 2 + 32/7 = 6.6 > 3 and 8 + 32/7 = 12.6 > 12: the budget would look wrong
        err = _bad(capsys, [*base, "--bits-budget", budget, "--group-size", "7"], out)
        assert "--group-size 7 does not divide" in err and "bits-budget" not in err


def test_save_stats_path_is_checked_before_any_work(trained_moe, tmp_path, capsys):
    out = tmp_path / "q"
    base = ["--checkpoint", trained_moe, "--out", out, "--bits-budget", "3", "--group-size", "64"]
    taken = tmp_path / "taken.safetensors"
    taken.write_text("x")
    assert "already exists" in _bad(capsys, [*base, "--save-stats", taken], out)
    assert taken.read_text() == "x"
    missing = tmp_path / "no" / "stats.safetensors"
    assert "does not exist" in _bad(capsys, [*base, "--save-stats", missing], out)
    assert not missing.parent.exists()
    empty = tmp_path / "empty"  # an existing empty --out is accepted: the file would land in the output
    empty.mkdir()
    argv = ["--checkpoint", trained_moe, "--out", empty, "--bits-budget", "3", "--save-stats", empty / "s"]
    assert main(list(map(str, argv))) == 2
    assert "inside --out" in capsys.readouterr().err and not any(empty.iterdir())


def test_evaluate_refuses_flags_it_would_ignore_and_zero_batches(quantized_dir, tmp_path, capsys):
    saved = tmp_path / "s.safetensors"
    given = [
        ["--val-batches", "0"],
        ["--checkpoint", tmp_path],
        ["--out", tmp_path / "q"],
        ["--bits-budget", "3"],
        ["--stats", saved],
        ["--save-stats", saved],
        ["--top-any"],
        ["--data", tmp_path],
        ["--group-size", "64"],
        ["--group-size", "128"],  # the default, but still not read
        ["--calibration-batches", "2"],
        ["--weights", "ema"],
        ["--prune-steps", "3"],
    ]
    for extra in given:
        err = _bad(capsys, ["--evaluate", quantized_dir, "--val-batches", "1", *extra], saved)
        assert (extra[0] if extra[1:] != ["0"] else "--val-batches must be >= 1") in err, (extra, err)
    assert not (tmp_path / "q").exists()


def test_flags_that_would_not_be_read_are_refused(trained_moe, tmp_path, capsys):
    out, stats = tmp_path / "q", tmp_path / "s.safetensors"
    base = ["--checkpoint", trained_moe, "--out", out, "--bits-budget", "3"]
    for flag, value in (("--prune-weight", "0.1"), ("--prune-steps", "5"), ("--prune-lr", "0.1")):
        err = _bad(capsys, [*base, flag, value], out)
        assert flag in err and "only apply with --top-any" in err
    for extra in (["--data", tmp_path], ["--calibration-batches", "4"]):
        err = _bad(capsys, [*base, "--stats", stats, *extra], out)
        assert extra[0] in err and "would not be read" in err
    # Accepted where they are read, with the documented defaults when not given.
    args = parse_args(list(map(str, [*base, "--stats", stats, "--top-any", "--calibration-batches", "4"])))
    check_arguments(args)
    assert (args.prune_weight, args.prune_steps, args.prune_lr) == (0.02, 200, 0.01)
    assert (args.calibration_batches, args.group_size, args.weights) == (4, 128, "model")
    args = parse_args(list(map(str, base)))
    check_arguments(args)
    assert args.calibration_batches == 16 and args.prune_weight is None


def test_out_help_says_an_empty_directory_is_accepted(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "absent or empty" in " ".join(capsys.readouterr().out.split())
    empty = tmp_path / "empty"
    empty.mkdir()
    check_arguments(parse_args(["--checkpoint", str(tmp_path), "--out", str(empty), "--bits-budget", "3"]))
