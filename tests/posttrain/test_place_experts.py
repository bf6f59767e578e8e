"""launcher/place_experts.py and megamoe/posttrain/placement.py: expert placement by co-activation."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import re

import numpy as np
import pytest
import torch

from launcher.place_experts import main as place_main
from megamoe.config import MoEConfig, from_yaml_text, to_yaml
from megamoe.diffusion.flow import TIMESTEP_SCALE, interpolate
from megamoe.model.weights import read_state_dict
from megamoe.moe.layer import MoEFeedForward, moe_layers
from megamoe.moe.routers.base import RoutingContext
from megamoe.posttrain import placement
from megamoe.posttrain.routing_stats import collect_routing_stats, save_routing_stats
from megamoe.posttrain.trained_model import data_batches, load_trained_model
from tests.distributed.launch_helpers import pretrain_in_process, read_metrics
from tests.posttrain.conftest import STEPS, TIMESTEP_BAND, config_only_checkpoint, tiny_moe_args


def enumerate_best(coactivation, ep_size: int, max_load_ratio: float = placement.DEFAULT_MAX_LOAD_RATIO) -> float:
    """The largest within-rank co-activation mass W over EVERY balanced partition meeting the load
    bound (the optimum `placement.place_layer` is tested against; small E only)."""
    c = np.array(coactivation, dtype=np.float64)
    e = len(c)
    counts = np.diag(c).copy()
    np.fill_diagonal(c, 0.0)
    c = (c + c.T) / 2
    per = e // ep_size
    current_max = max(counts[r * per : (r + 1) * per].sum() for r in range(ep_size))
    bound = max(max_load_ratio * counts.sum() / ep_size, current_max)
    best = -math.inf

    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for others in itertools.combinations(rest, per - 1):
            group = (first, *others)
            remaining = [i for i in rest if i not in others]
            for tail in partitions(remaining):
                yield [group, *tail]

    for part in partitions(list(range(e))):
        if max(counts[list(g)].sum() for g in part) > bound + 1e-9:
            continue
        w = sum(c[i, j] for g in part for i, j in itertools.combinations(g, 2))
        best = max(best, w)
    return best


EP = 4


def run(argv) -> int:
    return place_main(list(map(str, argv)))


@pytest.fixture(scope="module")
def placed(trained_moe, tmp_path_factory):
    """(original checkpoint, placed checkpoint, {block: perm}) with EP 4, statistics on one batch."""
    root = tmp_path_factory.mktemp("place")
    out = root / "placed"
    assert run(["--checkpoint", trained_moe, "--out", out, "--ep-size", EP, "--calibration-batches", 1]) == 0
    record = json.loads((out / "meta.json").read_text())["expert_placement"][-1]
    perms = {int(b): torch.tensor(p) for b, p in record["permutation"].items()}
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values()), "nothing moved: a vacuous test"
    return trained_moe, out, perms


def _reference_permuted(key: str, old: torch.Tensor, perms: dict) -> torch.Tensor:
    """What placement must do to one tensor, written out independently of permute_tensor."""
    m = re.search(r"blocks\.(\d+)\.ffn\.(experts\.(w1|b1|w2|b2)|router\.gate\.weight)$", key)
    return old[perms[int(m.group(1))]] if m else old


def _state(path) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    from megamoe.train.sharded_state import stored_shapes

    stored = stored_shapes(path / "state")
    state = {k: torch.empty(s, dtype=d) for k, (s, d) in stored.items()}
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(path / "state")), no_dist=True)
    return state


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_stored_tensor_is_the_original_permuted(placed):
    """state/ (module weights, fp32 master, both Adam moments) and weights/: bit for bit the original
    tensors with the experts' rows taken in the permutation's order, everything else unchanged."""
    original, out, perms = placed
    old, new = _state(original), _state(out)
    assert old.keys() == new.keys()
    kinds = {k.split("/")[0] for k in old}
    assert {"model", "master", "exp_avg", "exp_avg_sq"} <= kinds
    for key in old:
        assert torch.equal(new[key], _reference_permuted(key, old[key], perms)), key
    old_w, new_w = read_state_dict(original / "weights"), read_state_dict(out / "weights")
    assert old_w.keys() == new_w.keys()
    for key in old_w:
        assert torch.equal(new_w[key], _reference_permuted(key, old_w[key], perms)), key
    meta_old, meta_new = (json.loads((p / "meta.json").read_text()) for p in (original, out))
    assert meta_new["train_state"] == meta_old["train_state"] and meta_new["config"] == meta_old["config"]


def test_model_output_unchanged(placed):
    """Same input, original vs placed model: routing decisions equal exactly, outputs within rounding.

    Not bit for bit, and this is why: the router's softmax sums the E exponentials in column order and
    the layer's b2 product sums over E in expert order, so permuting the experts changes the order of
    E-term sums (measured: routing weights differ by up to 2.4e-7, the output by ~7 u of its scale,
    u = 2^-24). Reordering an E-term fp32 sum moves it by at most (E - 1) u relative; the bound allows
    that twice per MoE layer (softmax and b2 product): 2 (E - 1) u per layer, times the output scale.
    A misplaced tensor moves the output by orders of magnitude more (>1e-3)."""
    original, out, perms = placed
    a, cfg = load_trained_model(original)
    b, _ = load_trained_model(out)
    latents, text = data_batches(cfg, 1)[0]
    g = torch.Generator().manual_seed(0)
    s = (torch.arange(latents.shape[0]) + 0.5) / latents.shape[0]
    x = interpolate(latents, torch.randn(latents.shape, generator=g), s)
    for m in (a, b):
        for layer in moe_layers(m):
            layer.record = True
    with torch.no_grad():
        ya, yb = a(x, s * TIMESTEP_SCALE, text), b(x, s * TIMESTEP_SCALE, text)
    for block, (la, lb) in enumerate(zip(moe_layers(a), moe_layers(b), strict=True)):
        assert torch.equal(la.last_routing[1][:, perms[block]], lb.last_routing[1]), block
    e, u = cfg.model.moe.num_experts, 2.0**-24
    bound = 2 * (e - 1) * u * len(perms) * float(ya.abs().max())
    assert float((ya - yb).abs().max()) <= bound


def _moe_cfg(router: str) -> MoEConfig:
    extra = {
        "linear": {"bias_balancing": True, "num_null_experts": 2, "layer_reg_loss": 0.1},
        "mlp": {"bias_balancing": True},
        "cross_attention": {"router_hidden_dim": 64},
        "sinkhorn": {},
        "expert_choice": {},
        "expert_race": {},
        "promoe": {"num_prototypes_per_expert": 2},
    }[router]
    return MoEConfig(num_experts=8, top_k=2, router=router, **extra)


@pytest.mark.parametrize(
    "router", ["linear", "mlp", "cross_attention", "sinkhorn", "expert_choice", "expert_race", "promoe"]
)
def test_every_router_computes_the_same_after_permutation(router):
    """One MoE layer per router kind (gate rows, aux-free bias with null experts, Expert Race's
    threshold, ProMoE's prototypes and pinned unconditional expert, a layer-reg head): its state
    permuted by permute_state routes the same tokens to the permuted experts and computes the same
    output up to the reordered E-term sums (2 (E - 1) u of the scale, see test_model_output_unchanged)."""
    torch.manual_seed(0)
    cfg = _moe_cfg(router)
    layer = MoEFeedForward(32, 64, cfg, target_dim=12).eval()
    with torch.no_grad():
        for t in layer.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t) * 0.3)
        if router == "expert_race":  # the eval rule: a fixed threshold
            layer.router.threshold.fill_(0.2)
            layer.router.threshold_initialized.fill_(True)
    # ProMoE's unconditional expert (the last) keeps its index: placement pins it
    perm = torch.tensor([5, 0, 3, 6, 1, 4, 2, 7] if router == "promoe" else [5, 0, 3, 6, 1, 7, 2, 4])
    permuted = copy.deepcopy(layer)
    prefix = "blocks.0.ffn."  # the layer's keys as the model names them
    state = placement.permute_state({prefix + k: v for k, v in layer.state_dict().items()}, {0: perm}, 8)
    permuted.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()})
    x = torch.randn(2, 6, 32)
    ctx = RoutingContext(2, 6, temb=torch.randn(2, 32), text=torch.randn(2, 4, 32))
    ctx.is_null = torch.tensor([False, True])
    for m in (layer, permuted):
        m.record = True
    with torch.no_grad():
        ya, yb = layer(x, ctx), permuted(x, ctx)
    assert torch.equal(layer.last_routing[1][:, :8][:, perm], permuted.last_routing[1][:, :8])
    assert float((ya - yb).abs().max()) <= 2 * 7 * 2.0**-24 * float(ya.abs().max())


# What placement must do to each router's tensors, written out independently of permute_tensor.
_PER_EXPERT_ROUTER_TENSORS = {
    "selective_sinkhorn": {"gate.weight"},  # coin_step is the step counter: one for all experts
    "diffmoe": {"gate.weight", "predictor.2.weight", "predictor.2.bias", "threshold"},  # not the hidden layer
}


@pytest.mark.parametrize("router", sorted(_PER_EXPERT_ROUTER_TENSORS))
def test_selective_sinkhorn_and_diffmoe_compute_the_same_after_permutation(router):
    """Selective Sinkhorn (a step counter beside the gate) and DiffMoE (capacity predictor and
    per-expert threshold [E], learnt by two training steps, then in eval so that the threshold routes):
    every per-expert tensor is the original taken in the permutation's order, everything else is
    unchanged, and the permuted layer routes the same tokens to the permuted experts and computes
    the same output up to the reordered E-term sums (see test_model_output_unchanged)."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, router=router, **({"router_hidden_dim": 16} if router == "diffmoe" else {}))
    layer = MoEFeedForward(32, 64, cfg, target_dim=12)
    with torch.no_grad():
        for t in layer.parameters():
            t.copy_(torch.randn_like(t) * 0.3)
    ctx = RoutingContext(2, 6, temb=torch.randn(2, 32), text=torch.randn(2, 4, 32))
    for _ in range(2):  # DiffMoE's threshold: the predictor's C-th score per expert, then its EMA
        with torch.no_grad():
            layer(torch.randn(2, 6, 32), ctx)
        layer.router.after_step(lambda stats: stats)
    layer.eval()
    if router == "diffmoe":
        assert bool(layer.router.threshold_initialized) and layer.router.threshold.unique().numel() == 8
    else:
        assert int(layer.router.coin_step) == 2
    perm = torch.tensor([5, 0, 3, 6, 1, 7, 2, 4])
    prefix = "blocks.0.ffn."
    old = {prefix + k: v for k, v in layer.state_dict().items()}
    state = placement.permute_state(old, {0: perm}, 8)
    per_expert = {prefix + "router." + k for k in _PER_EXPERT_ROUTER_TENSORS[router]}
    per_expert |= {prefix + "experts." + k for k in ("w1", "b1", "w2", "b2")}
    for key, tensor in old.items():
        assert torch.equal(state[key], tensor[perm] if key in per_expert else tensor), key
    permuted = copy.deepcopy(layer)
    permuted.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()})
    x = torch.randn(2, 6, 32)
    for m in (layer, permuted):
        m.record = True
    with torch.no_grad():
        ya, yb = layer(x, ctx), permuted(x, ctx)
    routed = layer.last_routing[1]
    assert 0 < int(routed.sum()) < routed.numel()  # the threshold (DiffMoE) selects some, not all
    assert torch.equal(routed[:, perm], permuted.last_routing[1])
    assert float((ya - yb).abs().max()) <= 2 * 7 * 2.0**-24 * float(ya.abs().max())


def test_timestep_band_is_refused_in_one_line(tmp_path, capsys):
    """An expert's index is its noise band: placement would move experts between bands."""
    ckpt = config_only_checkpoint(tmp_path / "tb", *TIMESTEP_BAND)
    code = run(["--checkpoint", ckpt, "--out", tmp_path / "out", "--ep-size", 2, "--calibration-batches", 1])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "model.moe.router=timestep_band" in lines[0], lines
    assert "another noise band" in lines[0] and not (tmp_path / "out").exists()


def test_unknown_router_tensor_is_refused():
    with pytest.raises(placement.PostTrainError, match="teach"):
        placement.permute_tensor("blocks.0.ffn.router.new_table", torch.zeros(8), {0: torch.arange(8)}, 8)


def _coactivation(rng, e=8, tokens=1500, k=2, skew=1.0) -> np.ndarray:
    """Tokens that pick their top-k experts from a popularity plus a low-rank affinity: structured co-activation."""
    scores = rng.normal(size=e) * skew + rng.normal(size=(tokens, 3)) @ rng.normal(size=(3, e)) * 1.5
    picked = np.argsort(-scores, axis=1)[:, :k]
    routed = np.zeros((tokens, e))
    np.put_along_axis(routed, picked, 1.0, axis=1)
    return routed.T @ routed


@pytest.mark.parametrize("ep", [2, 4])
def test_optimiser_reaches_the_enumerated_optimum_and_keeps_balance(ep):
    """E=8: within-rank co-activation equal to the best of every balanced partition meeting the load
    bound (enumerated), equal expert counts per rank, the bound kept, never worse than before."""
    rng = np.random.default_rng(ep)
    for trial in range(8):
        c = _coactivation(rng, k=(2, 3)[trial % 2], skew=(0.3, 1.0, 2.0, 3.0)[trial % 4])
        for ratio in (1.05, 1.10, 10.0):
            perm = placement.place_layer(c, ep, ratio)
            assert sorted(perm.tolist()) == list(range(8))
            assert placement.within_rank_mass(c, perm, ep) == pytest.approx(enumerate_best(c, ep, ratio))
            before = placement.placement_figures(c, 1500, np.arange(8), ep)
            after = placement.placement_figures(c, 1500, perm, ep)
            assert after.imbalance <= max(ratio, before.imbalance) + 1e-9
            assert after.distinct_ranks <= before.distinct_ranks + 1e-12
            assert after.remote_assignments == pytest.approx(before.remote_assignments)
    pinned = placement.place_layer(_coactivation(rng), ep, 10.0, pinned=(7,))
    assert pinned[7] == 7


def test_resume_from_placed_checkpoint_continues_the_same_training(placed, tmp_path):
    """Three steps resumed from the original and from the placed checkpoint (world of one): the same
    losses and gradient norms. The Adam moments are 20 steps old, so a moment left in the old
    order changes the update of the moved experts and shows in the next steps' losses."""
    original, out, _ = placed
    extra = [f"train.steps={STEPS + 3}", "logging.every_steps=1", "checkpoint.every_steps=1000"]
    runs = {}
    for name, ckpt in (("original", original), ("placed", out)):
        pretrain_in_process([*tiny_moe_args(tmp_path / name), *extra, "--resume", ckpt])
        runs[name] = read_metrics(tmp_path / name)
    assert sorted(runs["original"]) == [STEPS + 1, STEPS + 2, STEPS + 3]
    for step, m in runs["original"].items():
        p = runs["placed"][step]
        for key in ("loss", "grad_norm"):
            assert p[key] == pytest.approx(m[key], rel=1e-5, abs=0), (step, key)


def _dense_checkpoint(trained_moe, path, moe=None):
    """A checkpoint whose config is dense, or has the MoE config `moe` (only meta.json is read before the refusal)."""
    path.mkdir()
    meta = json.loads((trained_moe / "meta.json").read_text())
    cfg = from_yaml_text(meta["config"])
    dense = dataclasses.replace(cfg.model, moe=moe or MoEConfig())
    meta.update(config=to_yaml(dataclasses.replace(cfg, model=dense)), files={})
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def _other_model_stats(trained_moe, path):
    model, cfg = load_trained_model(trained_moe)
    with torch.no_grad():
        moe_layers(model)[0].router.gate.weight.mul_(1.01)
    batches = data_batches(cfg, 1)
    save_routing_stats(collect_routing_stats(model, batches, cfg, sample_tokens=8), str(path))
    return path


@pytest.mark.parametrize(
    "case", ["dense", "merged", "other_stats", "stats_and_calibration", "ep_not_dividing", "out_exists", "save_exists"]
)
def test_bad_input_one_line_exit_2_nothing_written(case, trained_moe, tmp_path, capsys):
    out = tmp_path / "out"
    ckpt, extra, needle = trained_moe, ["--calibration-batches", 1], ""
    if case == "dense":
        ckpt, needle = _dense_checkpoint(trained_moe, tmp_path / "dense"), "dense model"
    elif case == "merged":
        merged = MoEConfig(num_experts=4, merged_from=8, num_shared_experts=1)
        ckpt, needle = _dense_checkpoint(trained_moe, tmp_path / "merged", merged), "place the experts before merging"
    elif case.endswith("stats"):
        extra, needle = ["--stats", _other_model_stats(trained_moe, tmp_path / "o.safetensors")], "another model"
    elif case == "stats_and_calibration":
        extra = ["--stats", tmp_path / "unread.safetensors", "--calibration-batches", 1]
        needle = "--calibration-batches has no effect with --stats"
    elif case == "save_exists":
        (tmp_path / "saved.safetensors").write_text("mine")
        extra, needle = ["--save-stats", tmp_path / "saved.safetensors"], "already exists"
    elif case == "ep_not_dividing":
        extra, needle = ["--ep-size", 3], "does not divide"
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        needle = "already exists"
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    code = run(["--checkpoint", ckpt, "--out", out, "--ep-size", 2, *extra])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary directory
    if case == "out_exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
