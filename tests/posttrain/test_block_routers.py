"""Dr.LLM path search and router training: the focal loss and class weights against their closed forms,
the greedy search against brute force where the best path is known, router training against labels a
router can learn, and the two command-line tools end to end on a trained checkpoint."""

import dataclasses
import itertools
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megamoe.config import BlockRouterConfig, load_config, to_yaml
from megamoe.model.dit import build_model
from megamoe.posttrain.block_routers import (
    ROUTERS,
    class_weights,
    focal_loss,
    load_block_routers,
    router_inputs,
    train_routers,
)
from megamoe.posttrain.block_routers import main as train_main
from megamoe.posttrain.trained_model import PostTrainError
from megamoe.tools.block_path_search import (
    example_inputs,
    greedy_path_search,
    max_runs,
    path_losses,
    read_labels,
    search_labels,
)
from megamoe.tools.block_path_search import main as search_main
from tests.model.test_block_routing import DENSE
from tests.posttrain.conftest import config_only_checkpoint


def test_focal_loss_equals_its_closed_form():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    labels = torch.tensor([0, 2])
    weights = torch.tensor([0.5, 1.0, 1.5])
    expected = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        p = math.exp(row[y]) / sum(math.exp(v) for v in row)
        expected += -weights[y].item() * (1 - p) ** 2 * math.log(p)
    assert math.isclose(focal_loss(logits, labels, 2.0, weights).item(), expected / 2, rel_tol=1e-6)
    cross_entropy = torch.nn.functional.cross_entropy(logits, labels)  # gamma 0, unit weights
    assert math.isclose(focal_loss(logits, labels, 0.0, torch.ones(3)).item(), cross_entropy.item(), rel_tol=1e-6)


def test_class_weights_are_the_effective_number_weights():
    labels = torch.tensor([1, 1, 1, 0])  # 1 skip, 3 execute, no repeat
    raw = [0.1 / (1 - 0.9), 0.1 / (1 - 0.9**3)]
    scale = 2 / sum(raw)  # two classes present
    expected = [raw[0] * scale, raw[1] * scale, 0.0]
    torch.testing.assert_close(class_weights(labels, 0.9), torch.tensor(expected), rtol=1e-6, atol=0)
    torch.testing.assert_close(class_weights(labels, 0.0), torch.tensor([1.0, 1.0, 0.0]))


def brute_force(loss, num_layers, runs):
    feasible = [p for p in itertools.product(range(3), repeat=num_layers) if sum(p) <= runs]
    return min(feasible, key=loss)


def test_greedy_search_finds_the_best_path_where_it_is_known():
    """Additive losses (a table per block and run count) under a budget of 3 runs of 4 blocks: the best
    path repeats block 0, runs block 2 once and skips blocks 1 and 3; brute force over all 3^4 paths agrees."""
    table = [[0.0, -1.0, -1.6], [0.4, 0.0, -0.1], [0.0, -0.5, -0.3], [-0.1, 0.0, 0.0]]
    tables = [table, [row[::-1] for row in table]]  # a second example with other answers

    def loss(e, p):
        return sum(tables[e][i][n] for i, n in enumerate(p))

    calls = []

    def score(rows):
        calls.append(len(rows))
        return [loss(e, p) for e, p in rows]

    paths, losses = greedy_path_search(score, 2, 4, runs=3)
    for e in range(2):
        best = brute_force(lambda p: loss(e, p), 4, 3)
        assert paths[e] == best and losses[e] == loss(e, best)
    assert paths[0] == (2, 0, 1, 0)
    assert sum(calls) < 2 * 3**4  # fewer evaluations than brute force


def test_search_labels_are_the_brute_force_best_on_a_real_model():
    """Two blocks, one run: every feasible path is one move from every other, so the greedy search must
    end at the brute-force best of each example's flow loss. search_labels searches batch after batch
    (a progress line each), with each sample's noise as example_inputs gives it for all batches at once."""
    cfg = dataclasses.replace(DENSE, num_layers=2, block_router=BlockRouterConfig(enabled=True))
    model = build_model(cfg, seed=3).eval()
    with torch.no_grad():
        model.proj_out.weight.normal_(std=0.3)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(1, 4, 2, 8, 8, generator=g), torch.randn(1, 5, 24, generator=g)) for _ in range(2)]
    lines = []
    labels = search_labels(model, batches, (0.3, 0.7), seed=0, draws=2, progress=lines.append)
    assert max_runs(cfg.block_router.budget, 2) == 1
    paths, losses = labels["paths"].flatten(0, 1).tolist(), labels["loss"].flatten().tolist()
    inputs = example_inputs(batches, (0.3, 0.7), seed=0, draws=2)
    for e in range(4):
        feasible = [(0, 0), (1, 0), (0, 1)]
        expected = path_losses(model, inputs, [(e, p) for p in feasible])
        assert tuple(paths[e]) == feasible[min(range(3), key=expected.__getitem__)]
        assert math.isclose(losses[e], min(expected), rel_tol=1e-6)
    assert [line.split(":")[0] for line in lines] == ["batch 1/2", "batch 2/2"]
    assert all(line.endswith(" s elapsed") for line in lines)


def routers_trained_on(tmp_path, *overrides):
    """A routers directory whose config.yaml is configs/tiny_moe.yaml + overrides with block routers on."""
    routers = tmp_path / "routers"
    routers.mkdir()
    cfg = load_config("configs/tiny_moe.yaml", [*overrides, "model.block_router.enabled=true"])
    (routers / "config.yaml").write_text(to_yaml(cfg))
    save_file({"block_paths.routers.0.fc2.bias": torch.zeros(3)}, str(routers / ROUTERS))
    return routers


@pytest.mark.parametrize(
    "checkpoint_overrides, key",
    [
        (["model.num_layers=2"], "model.num_layers=4, but checkpoint '{}' has model.num_layers=2"),
        (["model.num_layers=4", "model.moe.num_experts=0"], "model.moe.num_experts=8, but checkpoint '{}' has model"),
        (["model.num_layers=4", "model.mod.layers=all"], "model.mod.layers=none, but checkpoint '{}' has model.mod"),
    ],
)
def test_routers_of_another_base_are_refused_naming_the_key(tmp_path, checkpoint_overrides, key):
    """Routers trained on the 4-block tiny MoE against a 2-block, a dense and a mixture-of-depths base:
    refused before any weight is read, naming the first model key that differs."""
    routers = routers_trained_on(tmp_path, "model.num_layers=4")
    checkpoint = config_only_checkpoint(tmp_path / "base", *checkpoint_overrides)
    with pytest.raises(PostTrainError) as info:
        load_block_routers(checkpoint, routers)
    assert f"routers in '{routers}' were trained on a base with " + key.format(checkpoint) in str(info.value)


def test_router_training_lowers_the_focal_loss_and_fits_the_labels():
    """Labels that depend on the noise level only (repeat block 0 at s=0.3, skip block 1 at s=0.7),
    which the routers see (and the hidden states show): the loss falls tenfold and the routed model
    then takes exactly the labelled paths."""
    cfg = dataclasses.replace(DENSE, block_router=BlockRouterConfig(enabled=True, hidden_dim=16))
    model = build_model(cfg, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 4, 2, 8, 8, generator=g), torch.randn(4, 5, 24, generator=g))]
    inputs = example_inputs(batches, (0.3, 0.7), seed=0, draws=1)
    paths = torch.tensor([[2, 1, 1], [1, 0, 1]]).repeat(4, 1)  # example = sample * 2 + level
    features = router_inputs(model, inputs, paths)
    history = train_routers(model.block_paths, features, paths, cfg.block_router, steps=60, lr=1e-2)
    assert history[-1] < 0.1 * history[0], history[::10]
    with torch.no_grad():
        x0, noise, s = inputs["x0"], inputs["noise"][0], inputs["level"]
        model((1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * noise, s * 1000, inputs["text"])
    assert torch.equal(model.block_paths.last_counts, paths)


def test_search_and_router_training_tools_end_to_end(trained_moe, tmp_path, capsys):
    """The two commands on a trained 2-block MoE checkpoint, budget 1 run: labels within the budget at
    the brute-force best, routers saved and loadable, a report with both models' held-out figures."""
    labels_dir, routers_dir = tmp_path / "labels", tmp_path / "routers"
    common = [
        "--checkpoint",
        str(trained_moe),
        "--out",
        str(labels_dir),
        "--batches",
        "1",
        "--draws",
        "1",
        "--rounds",
        "1",
    ]
    assert search_main([*common, "--set", "model.block_router.budget=0.5"]) == 0
    labels, meta = read_labels(labels_dir)
    assert labels["paths"].shape == (4, 5, 2) and meta["search"] == "greedy"
    assert int(labels["paths"].long().sum(-1).max()) <= max_runs(0.5, 2) == 1
    assert bool((labels["loss"] <= labels["loss_plain"] + 1.0).all())
    assert (
        train_main(["--labels", str(labels_dir), "--out", str(routers_dir), "--steps", "20", "--eval-batches", "1"])
        == 0
    )
    report = json.loads((routers_dir / "report.json").read_text())
    assert report["router_loss"]["last"] < report["router_loss"]["first"]
    assert set(report["held_out"]) >= {"loss_plain", "loss_routed", "runs_per_sample"}
    model, cfg = load_block_routers(trained_moe, routers_dir)
    assert cfg.model.block_router.budget == 0.5 and model.block_paths.routers[0].fc2.weight.abs().sum() > 0
    saved = load_file(str(routers_dir / ROUTERS))
    for key, value in model.state_dict().items():
        if key.startswith("block_paths."):
            assert torch.equal(value, saved.pop(key)), key
    assert not saved
    # a router more than the checkpoint's blocks (as 4-block routers on this 2-block base) or another step
    extra = shutil.copytree(routers_dir, tmp_path / "extra")
    tensors = load_file(str(extra / ROUTERS))
    tensors["block_paths.routers.2.fc2.bias"] = tensors["block_paths.routers.1.fc2.bias"].clone()
    save_file(tensors, str(extra / ROUTERS))
    with pytest.raises(PostTrainError, match=r"block_paths\.routers\.2\.fc2\.bias is \(3,\) there, absent in the"):
        load_block_routers(trained_moe, extra)
    moved = shutil.copytree(routers_dir, tmp_path / "moved")
    report["base"]["step"] += 1
    (moved / "report.json").write_text(json.dumps(report))
    with pytest.raises(PostTrainError, match=f"trained on step {report['base']['step']} "):
        load_block_routers(trained_moe, moved)
    report["base"]["step"] -= 1
    report["base"]["fingerprint"] = "0" * 64  # as another run's weights at the same step
    (moved / "report.json").write_text(json.dumps(report))
    with pytest.raises(PostTrainError, match="were trained on other model weights than those of checkpoint"):
        load_block_routers(trained_moe, moved)
    assert search_main([*common[:3], str(tmp_path / "x"), "--set", "model.moe.top_k=1"]) == 2
    assert "only model.block_router.*" in capsys.readouterr().err
