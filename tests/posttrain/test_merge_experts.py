"""MC-SMoE expert merging against references: alignment against the unpermuted expert, a merge of
identical experts against the model before merging, the merged checkpoint through training and
sampling, and the CLI's refusals (one line, exit 2, nothing written)."""

import copy
import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from launcher.merge_experts import main as merge_main
from megamoe.config import from_yaml_text, to_yaml
from megamoe.moe.layer import moe_layers
from megamoe.moe.routers import RoutingContext
from megamoe.posttrain.merging import align_permutation, merge_model, permute_units, plan_merge
from megamoe.posttrain.routing_stats import collect_routing_stats, save_routing_stats
from megamoe.posttrain.trained_model import data_batches, load_trained_model
from tests.distributed.launch_helpers import pretrain_in_process
from tests.posttrain.conftest import TIMESTEP_BAND, config_only_checkpoint, tiny_moe_args


def expert_out(x, w1, b1, w2, b2):
    return F.gelu(x @ w1 + b1, approximate="tanh") @ w2 + b2


def test_alignment_keeps_each_expert_and_undoes_a_permutation():
    g = torch.Generator().manual_seed(0)
    dim, hidden = 12, 40
    w1, b1, w2, b2 = (0.2 * torch.randn(*s, generator=g) for s in ((dim, hidden), (hidden,), (hidden, dim), (dim,)))
    x = torch.randn(64, dim, generator=g)
    shuffled = permute_units(w1, b1, w2, torch.randperm(hidden, generator=g))
    noisy = tuple(t + 0.01 * torch.randn(t.shape, generator=g) for t in shuffled)  # a similar, not equal, expert
    perm = align_permutation((w1, b1, w2), noisy)
    aligned = permute_units(*noisy, perm)
    # The function is unchanged, and the aligned units sit where the reference's are.
    torch.testing.assert_close(expert_out(x, *aligned, b2), expert_out(x, *noisy, b2), rtol=0, atol=1e-6)
    assert (aligned[0] - w1).abs().max() < 0.06 < (noisy[0] - w1).abs().max()


@pytest.fixture(scope="module")
def trained(trained_moe):
    model, cfg = load_trained_model(trained_moe)
    return model, cfg, data_batches(cfg, 2)


def test_merging_identical_experts_is_exact(trained):
    model, cfg, batches = trained
    stats = collect_routing_stats(model, batches, cfg, sample_tokens=256)
    plan = plan_merge(stats, 4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every member becomes its dominant expert, hidden units shuffled (alignment undoes it)
        for block, layer in zip(sorted(plan), moe_layers(model), strict=True):
            ex = layer.experts
            for members, d in zip(plan[block].groups(), plan[block].dominant, strict=True):
                for e in members:
                    w1, b1, w2 = permute_units(ex.w1[d], ex.b1[d], ex.w2[d], torch.randperm(ex.hidden, generator=g))
                    ex.w1[e], ex.b1[e], ex.w2[e], ex.b2[e] = w1, b1, w2, ex.b2[d].clone()
    assert any(len(m) > 1 for p in plan.values() for m in p.groups())
    merged = merge_model(model, plan)
    latents, text = batches[0]
    t = torch.linspace(100.0, 900.0, latents.shape[0])
    with torch.no_grad():
        want, got = model(latents, t, text), merged(latents, t, text)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert merged.cfg.moe.num_experts == 4 and merged.cfg.moe.merged_from == 8
    # The router is the trained one; each merged expert receives its members' summed weights.
    layer, merged_layer = moe_layers(model)[0], moe_layers(merged)[0]
    torch.testing.assert_close(merged_layer.router.gate.weight, layer.router.gate.weight, rtol=0, atol=0)
    tokens = torch.randn(20, cfg.model.dim)
    routed = layer.router(tokens, RoutingContext(batch_size=1, seq_len=20))
    merged_layer.record = True
    merged_layer(tokens[None])
    probs, merged_layer.record = merged_layer.last_routing[0], False
    summed = torch.zeros(20, 4).index_add_(1, plan[min(plan)].expert_map, routed.probs)
    torch.testing.assert_close(probs, summed, rtol=0, atol=1e-6)


def run_cli(*args, capsys):
    code = merge_main(list(map(str, args)))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_timestep_band_is_refused_in_one_line(tmp_path, capsys):
    """MC-SMoE's groups span noise bands (e.g. [[0, 1, 4, 5], [2], [3]] on three bands of two): refused."""
    ckpt = config_only_checkpoint(tmp_path / "tb", *TIMESTEP_BAND)
    code, text, err = run_cli(
        "--checkpoint", ckpt, "--out", tmp_path / "out", "--experts-per-layer", 3,
        "--calibration-batches", 1, "--val-batches", 1, capsys=capsys,
    )  # fmt: skip
    assert code == 2 and text == "" and err.count("\n") == 1, err
    assert "model.moe.router=timestep_band" in err and "across bands" in err and not (tmp_path / "out").exists()


def test_sampler_on_a_merged_folder_says_to_train_from_it(tmp_path, capsys):
    """A merge_experts.py output is complete but not a training checkpoint: the sampler says what it is
    and gives the overrides to train from it (the merged expert count included), not 'incomplete'."""
    from launcher.sample import main as sample

    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"moe": {"num_experts": 4, "merged_from": 8}}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    code = sample(["--checkpoint", str(folder), "--caption", "a red circle", "--out", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is a model folder" in err, err
    assert f"train.init_from={folder} model.moe.num_experts=4 model.moe.merged_from=8" in err
    assert "incomplete" not in err and not (tmp_path / "x.mp4").exists()


def test_merged_checkpoint_trains_and_samples(trained_moe, tmp_path, capsys):
    out = tmp_path / "merged"
    code, text, err = run_cli(
        "--checkpoint", trained_moe, "--out", out, "--experts-per-layer", 4,
        "--calibration-batches", 2, "--val-batches", 1, capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "validation_loss mean" in text and "parameter_bytes experts" in text
    config = json.loads((out / "config.json").read_text())
    assert config["moe"]["num_experts"] == 4 and config["moe"]["merged_from"] == 8
    command = next(line for line in text.splitlines() if line.startswith("train from it with: "))
    overrides = command.removeprefix("train from it with: ").split()
    assert overrides[0] == f"train.init_from={out}"

    run = tmp_path / "run"
    pretrain_in_process(
        tiny_moe_args(run, *overrides, "train.steps=3", "checkpoint.every_steps=3", "logging.every_steps=1")
    )
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    ckpt = run / "checkpoints" / "step_00000003"

    from launcher.sample import main as sample_main

    video = tmp_path / "merged.mp4"
    args = ["--checkpoint", ckpt, "--caption", "a red ball", "--out", video, "--num-samples", "1", "--steps", "2"]
    assert sample_main(list(map(str, args))) == 0
    assert video.stat().st_size > 0


def dense_checkpoint(trained_moe, tmp_path):
    """A checkpoint whose config is dense (only meta.json is read before the refusal)."""
    path = tmp_path / "dense"
    path.mkdir()
    meta = json.loads((trained_moe / "meta.json").read_text())
    cfg = from_yaml_text(meta["config"])
    dense = dataclasses.replace(cfg.model, moe=dataclasses.replace(cfg.model.moe.__class__()))
    meta.update(config=to_yaml(dataclasses.replace(cfg, model=dense)), files={})
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def other_stats(trained, tmp_path):
    model, cfg, batches = trained
    other = copy.deepcopy(model)
    with torch.no_grad():
        moe_layers(other)[0].router.gate.weight.mul_(1.01)
    path = tmp_path / "other.safetensors"
    save_routing_stats(collect_routing_stats(other, batches[:1], cfg, sample_tokens=8), str(path))
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("dense", "holds a dense model"),
        ("model folder", "is a model folder"),
        ("stats", "was gathered on another model"),
        ("stats and calibration", "--calibration-batches has no effect with --stats"),
        ("k=1", "below the router's top_k=2"),
        ("k=0", "below the router's top_k=2"),
        ("k=8", "must be below the model's 8 experts"),
        ("out exists", "already exists"),
        ("save-stats exists", "--save-stats"),
    ],
)
def test_bad_inputs_fail_in_one_line_and_write_nothing(case, message, trained, trained_moe, tmp_path, capsys):
    out, saved = tmp_path / "out", tmp_path / "saved.safetensors"
    checkpoint, k, extra = trained_moe, 4, ["--calibration-batches", 1]
    if case == "dense":
        checkpoint = dense_checkpoint(trained_moe, tmp_path)
    elif case == "model folder":  # what merge_experts.py and upcycle.py write: not a training checkpoint
        checkpoint = tmp_path / "folder"
        checkpoint.mkdir()
        (checkpoint / "config.json").write_text("{}")
    elif case.startswith("stats"):
        extra = ["--stats", other_stats(trained, tmp_path)] + (extra if "calibration" in case else [])
    elif case.startswith("k="):
        k = int(case[2:])
    elif case == "save-stats exists":
        saved.write_text("keep")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("x")
    code, text, err = run_cli(
        "--checkpoint", checkpoint, "--out", out, "--experts-per-layer", k, "--save-stats", saved,
        "--val-batches", 1, *extra, capsys=capsys,
    )  # fmt: skip
    assert code == 2 and text == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert (not saved.exists()) if case != "save-stats exists" else saved.read_text() == "keep"
    assert (not out.exists()) if case != "out exists" else sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    shutil.rmtree(tmp_path / "dense", ignore_errors=True)
