"""Routing diagnostics flag each failure mode from hand-made routing records, and only that one."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from megamoe.config import MoEConfig
from megamoe.moe.diagnostics import (
    DiagnosticsThresholds,
    RoutingDiagnostics,
    check_router_precision,
    expert_output_similarity,
    expert_similarity,
    heatmap,
    labelled_heatmap,
    sample_expert_inputs,
    track_router_update,
    write_tensorboard,
)
from megamoe.moe.experts import GroupedExperts
from megamoe.moe.routers.base import RoutingContext
from megamoe.moe.routers.token_choice import LinearRouter

E, DIM, HIDDEN, B, L = 4, 8, 16, 2, 32
CFG = MoEConfig(num_experts=E, top_k=2)
THRESHOLDS = DiagnosticsThresholds(deadlock_patience=3, dead_patience=2, homogenization_grace_steps=100)


class FakeMoE(nn.Module):
    """Only what diagnostics reads from an MoE layer: router, experts, record, last_routing,
    last_expert_inputs."""

    def __init__(self, cfg=CFG):
        super().__init__()
        self.router = LinearRouter(DIM, cfg)
        self.experts = GroupedExperts(E, DIM, HIDDEN)
        self.record = False
        self.last_routing = None
        self.last_expert_inputs = None


class FakeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ffn = FakeMoE()


def model(num_layers=2):
    torch.manual_seed(0)
    m = nn.Module()
    m.blocks = nn.ModuleList(FakeBlock() for _ in range(num_layers))
    return m


def routing(top1: torch.Tensor, second: torch.Tensor, timestep=None):
    """probs/routing_map for tokens that pick `top1` (weight 0.7) and `second` (0.3)."""
    n = top1.shape[0]
    probs = torch.zeros(n, E)
    probs[torch.arange(n), top1] = 0.7
    probs[torch.arange(n), second] = 0.3
    ctx = RoutingContext(
        batch_size=B, seq_len=n // B, timestep=timestep if timestep is not None else torch.tensor([100.0, 900.0])
    )
    return probs, probs > 0, ctx


def balanced():
    top1 = torch.arange(B * L) % E
    return routing(top1, (top1 + 1) % E)


def deadlocked():
    top1 = torch.zeros(B * L, dtype=torch.long)
    return routing(top1, 1 + torch.arange(B * L) % (E - 1))


def without_expert(dead: int):
    top1 = torch.tensor([e for e in range(E) if e != dead]).repeat(B * L // (E - 1) + 1)[: B * L]
    alive = [e for e in range(E) if e != dead]
    second = torch.tensor([alive[(alive.index(int(t)) + 1) % len(alive)] for t in top1])
    return routing(top1, second)


def run(diag, m, records, step):
    """One diagnostic as if each layer had recorded `record`: its routing and, from random tokens,
    the sample of each expert's tokens that a recording MoE layer keeps."""
    g = torch.Generator().manual_seed(step)
    for block, record in zip(m.blocks, records):
        block.ffn.last_routing = record
        block.ffn.last_expert_inputs = sample_expert_inputs(torch.randn(len(record[1]), DIM, generator=g), record[1], E)
    return diag.compute(step)


def test_recording_flag_reaches_layers():
    m = model()
    diag = RoutingDiagnostics(m, CFG, THRESHOLDS)
    assert [label for label in diag.labels] == ["layer00", "layer01"]
    diag.enable_recording(True)
    assert all(b.ffn.record for b in m.blocks)
    diag.enable_recording(False)
    assert not any(b.ffn.record for b in m.blocks)


def test_healthy_layers_flag_nothing():
    m = model()
    diag = RoutingDiagnostics(m, CFG, THRESHOLDS)
    for step in (0, 50, 150, 200, 250):
        report = run(diag, m, [balanced(), balanced()], step)
        assert report.warnings == []
    s = report.scalars
    assert s["moe/layer00/max_violation"] == pytest.approx(0.0)
    assert s["moe/layer00/load_entropy"] == pytest.approx(1.0)
    assert s["moe/layer00/monopoly_share"] == pytest.approx(1 / E)
    assert s["moe/layer00/dead_experts"] == 0
    assert s["moe/layer00/mean_max_prob"] == pytest.approx(0.7)
    assert s["moe/layer00/experts_per_token"] == pytest.approx(2.0)
    h = -(0.7 * np.log(0.7) + 0.3 * np.log(0.3))
    assert s["moe/layer00/token_entropy"] == pytest.approx(h, rel=1e-6)
    assert s["moe/layer00/router_logit_gap"] == pytest.approx(np.log(0.7 / 0.3), rel=1e-6)
    assert s["moe/layer00/expert_similarity"] < 0.5  # independent random experts
    np.testing.assert_allclose(report.load_matrix, 1 / E)
    json.loads(report.to_json())


def test_deadlock_warns_after_streak_once_until_recovery():
    m = model()
    diag = RoutingDiagnostics(m, CFG, THRESHOLDS)
    warned = [run(diag, m, [balanced(), deadlocked()], step).warnings for step in range(5)]
    assert warned[0] == warned[1] == [] and warned[3] == warned[4] == []
    assert len(warned[2]) == 1 and "layer01" in warned[2][0] and "selective deadlock" in warned[2][0]
    assert "expert 0" in warned[2][0]
    report = run(diag, m, [balanced(), balanced()], 5)  # recovered: streak resets, no warning
    assert report.scalars["moe/layer01/deadlock_streak"] == 0 and report.warnings == []
    warned = [run(diag, m, [balanced(), deadlocked()], step).warnings for step in range(6, 9)]
    assert warned[:2] == [[], []] and "selective deadlock" in warned[2][0]


def test_homogenized_experts_warn_after_grace_steps():
    m = model()
    with torch.no_grad():
        for p in m.blocks[0].ffn.experts.parameters():  # identical experts, as right after upcycling
            p.normal_().copy_(p[:1].expand_as(p))
        w1 = m.blocks[1].ffn.experts.w1
        w1.copy_(w1[:1].expand_as(w1))  # same first linear only: the outputs still differ
    diag = RoutingDiagnostics(m, CFG, THRESHOLDS)
    report = run(diag, m, [balanced(), balanced()], 50)
    assert report.scalars["moe/layer00/expert_output_similarity"] == pytest.approx(1.0)
    assert report.scalars["moe/layer00/expert_similarity"] == pytest.approx(1.0)
    assert report.warnings == []  # expected during the grace period
    report = run(diag, m, [balanced(), balanced()], 150)
    assert len(report.warnings) == 1
    assert "layer00" in report.warnings[0] and "expert homogenization" in report.warnings[0]
    assert report.scalars["moe/layer01/expert_similarity"] == pytest.approx(1.0)  # the weight cosine...
    assert report.scalars["moe/layer01/expert_output_similarity"] < 0.9  # ...is not what the alarm reads
    assert run(diag, m, [balanced(), balanced()], 200).warnings == []  # once, not every step


def test_dead_expert_warns():
    m = model()
    diag = RoutingDiagnostics(m, CFG, THRESHOLDS)
    first = run(diag, m, [without_expert(2), balanced()], 0)
    assert first.scalars["moe/layer00/dead_experts"] == 1 and first.warnings == []
    second = run(diag, m, [without_expert(2), balanced()], 1)
    assert second.scalars["moe/layer00/dead_streak"] == 2
    assert len(second.warnings) == 1 and "layer00" in second.warnings[0] and "dead experts" in second.warnings[0]
    assert "[2]" in second.warnings[0]
    assert second.load_matrix[0, 2] == 0 and second.load_matrix[0].sum() == pytest.approx(1.0)


def test_unrecorded_layer_is_skipped_and_stale_record_not_reused():
    m = model()
    diag = RoutingDiagnostics(m, CFG, THRESHOLDS)
    run(diag, m, [deadlocked(), deadlocked()], 0)
    report = diag.compute(1)  # nothing recorded since
    assert "moe/layer00/monopoly_share" not in report.scalars
    assert report.scalars["moe/layer00/expert_similarity"] < 1.0


def test_load_by_timestep_bucket():
    m = model(1)
    diag = RoutingDiagnostics(m, CFG, THRESHOLDS)
    # Sample 0 (t=100, bucket 0) routes to experts 0/1, sample 1 (t=900, bucket 3) to 2/3.
    top1 = torch.cat([torch.zeros(L, dtype=torch.long), torch.full((L,), 2)])
    report = run(diag, m, [routing(top1, top1 + 1)], 0)
    np.testing.assert_allclose(report.timestep_load[0, 0], [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(report.timestep_load[0, 3], [0, 0, 0.5, 0.5])
    np.testing.assert_allclose(report.timestep_load[0, 1], 0)
    assert report.scalars["moe/layer00/t0_max_violation"] == pytest.approx(1.0)
    assert "moe/layer00/t1_max_violation" not in report.scalars
    # Per-token timesteps [B, L] (Wan2.2 TI2V) bucket each token on its own.
    t = torch.cat([torch.full((1, L), 100.0), torch.full((1, L), 600.0)])
    report = run(diag, m, [routing(top1, top1 + 1, timestep=t)], 1)
    np.testing.assert_allclose(report.timestep_load[0, 2], [0, 0, 0.5, 0.5])


def test_reduce_sums_counts_over_ranks():
    m = model(1)
    calls = []
    diag = RoutingDiagnostics(m, CFG, THRESHOLDS, reduce=lambda t: calls.append(t) or 2 * t)
    report = run(diag, m, [without_expert(1)], 0)
    assert len(calls) == 1  # one collective per layer
    assert report.load_matrix[0, 1] == 0 and report.scalars["moe/layer00/mean_max_prob"] == pytest.approx(0.7)


def test_bf16_truncation_of_router_updates():
    torch.manual_seed(0)
    before = {"gate": torch.randn(64, 64).abs() + 0.5}
    tiny = {"gate": before["gate"] * (1 + 1e-6)}
    large = {"gate": before["gate"] * (1 + 1e-1)}
    assert track_router_update(before, tiny) > 0.99  # a few cross a bf16 rounding boundary
    assert track_router_update(before, large) == 0.0
    assert track_router_update(before, {"gate": before["gate"].clone()}) == 0.0  # nothing changed

    m = model()
    diag = RoutingDiagnostics(m, CFG, THRESHOLDS)
    diag.snapshot_router_params()
    with torch.no_grad():
        gate0, gate1 = m.blocks[0].ffn.router.gate.weight, m.blocks[1].ffn.router.gate.weight
        gate0.mul_(1 + 1e-6)  # an "optimizer step" bf16 weights would lose
        gate1.add_(gate1.sign() * 0.1)  # one bf16 keeps
    assert diag.measure_bf16_loss() == pytest.approx(0.5, abs=0.02)
    s = run(diag, m, [balanced(), balanced()], 0).scalars
    assert s["moe/layer00/bf16_lost_update_frac"] > 0.95
    assert s["moe/layer01/bf16_lost_update_frac"] == 0.0
    with pytest.raises(RuntimeError, match="snapshot_router_params"):
        diag.measure_bf16_loss()


def test_expert_similarity_chunks_match_direct():
    w = torch.randn(5, 7, 9)
    flat = torch.nn.functional.normalize(w.flatten(1).double(), dim=1)
    cos = flat @ flat.t()
    mean, nn_sim = expert_similarity(w, chunk=4)
    assert mean == pytest.approx(float(cos[~torch.eye(5, dtype=torch.bool)].mean()), abs=1e-6)
    assert nn_sim == pytest.approx(float(cos.fill_diagonal_(-2).amax(1).mean()), abs=1e-6)


def test_tensorboard_scalars_and_heatmap(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    m = model()
    diag = RoutingDiagnostics(m, CFG, THRESHOLDS)
    report = run(diag, m, [balanced(), without_expert(3)], 7)
    writer = SummaryWriter(log_dir=str(tmp_path))
    write_tensorboard(writer, report, 7)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert "moe/load_heatmap" in tags["images"]
    image = events.Images("moe/load_heatmap")[0]
    # The labelled picture of the report's loads (its layout is tested in tests/moe/test_heatmap.py).
    import io

    from PIL import Image

    drawn = labelled_heatmap(
        report.load_matrix,
        2.0 / E,
        report.layer_names,
        "expert load at step 7: share of a layer's routed tokens",
        scale_label="load",
        marks={1.0 / E: "mean"},
    )
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")), drawn)
    for name in ("moe/layer01/max_violation", "moe/layer00/monopoly_share", "moe/max_max_violation"):
        (event,) = events.Scalars(name)
        assert event.step == 7 and event.value == pytest.approx(report.scalars[name], rel=1e-6)


def test_heatmap_colours_dead_dark_and_hot_bright():
    img = heatmap(np.array([[0.0, 0.25, 0.5]]), vmax=0.5, cell=2)
    assert img.shape == (2, 6, 3) and img.dtype == np.uint8
    assert img[0, 0].sum() < img[0, 2].sum() < img[0, 4].sum()


def test_real_upcycled_model_end_to_end():
    """On a real upcycled WanDiT: recording, a report per MoE block, identical experts tolerated
    during the grace period, and the bf16 measurement around a real optimizer step."""
    from megamoe.config import ModelConfig
    from megamoe.model.dit import WanDiT
    from megamoe.moe.upcycle import upcycle_model

    cfg = ModelConfig(
        dim=24,
        num_layers=3,
        num_heads=2,
        ffn_dim=64,
        in_channels=4,
        out_channels=4,
        text_dim=8,
        freq_dim=8,
        rope_max_seq_len=16,
    )
    torch.manual_seed(0)
    moe_cfg = MoEConfig(num_experts=4, top_k=2, layers="every_other")
    moe = upcycle_model(WanDiT(cfg), dataclasses.replace(cfg, moe=moe_cfg), mode="train", seed=0)
    diag = RoutingDiagnostics(moe, moe_cfg, THRESHOLDS)
    assert diag.labels == ["layer01"]
    latents, timestep, text = torch.randn(2, 4, 2, 8, 8), torch.tensor([100.0, 900.0]), torch.randn(2, 5, 8)

    with torch.no_grad():
        moe.proj_out.weight.normal_()  # the zero-initialised head would stop all gradient

    layer = moe.blocks[1].ffn
    seen = []
    layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().flatten(0, 1)))
    moe(latents, timestep, text)
    assert layer.last_expert_inputs is None  # nothing kept off diagnostic steps
    diag.enable_recording(True)
    loss = moe(latents, timestep, text).square().mean()
    diag.enable_recording(False)
    loss.backward()
    rows, member = layer.last_expert_inputs  # the layer's tokens, sampled per expert as by the naive loop
    kept = naive_sample(layer.last_routing[1][:, :4], 64)
    union = sorted(set().union(*kept.values()))
    assert torch.equal(rows, seen[-1][union]) and member.sum(0).tolist() == [len(kept[e]) for e in range(4)]
    assert moe.blocks[1].ffn.router.gate.weight.grad.abs().max() > 0
    optimizer = torch.optim.Adam(moe.parameters(), lr=1e-6)  # steps ~1e-6: seen by fp32, lost in bf16
    diag.snapshot_router_params()
    optimizer.step()
    lost = diag.measure_bf16_loss()
    report = diag.compute(step=1)
    s = report.scalars
    assert s["moe/layer01/expert_similarity"] == pytest.approx(1.0)  # upcycled clones, within grace
    assert s["moe/layer01/expert_output_similarity"] == pytest.approx(1.0, abs=1e-4)
    assert report.depth_profile == ["."]
    assert report.warnings == []
    assert report.load_matrix.shape == (1, 4) and report.load_matrix.sum() == pytest.approx(1.0)
    assert report.timestep_load[0, 0].sum() == pytest.approx(1.0) and report.timestep_load[0, 3].sum() == pytest.approx(
        1.0
    )
    assert lost > 0.9 and s["moe/layer01/bf16_lost_update_frac"] == lost
    assert "moe/layer01/shared_routed_norm_ratio" not in s or s["moe/layer01/shared_routed_norm_ratio"] >= 0


# --- the seed study's alarms: each fires exactly when its plotted scalar crosses its threshold ---------


def naive_sample(routing_map, cap):
    """Per expert, its tokens at ranks r with floor((r+1)*cap/n) > floor(r*cap/n), by a plain loop."""
    kept = {}
    for e in range(routing_map.shape[1]):
        mine = [t for t in range(routing_map.shape[0]) if routing_map[t, e]]
        n = len(mine)
        kept[e] = [mine[r] for r in range(n) if (r + 1) * cap // n > r * cap // n]
    return kept


def test_sample_expert_inputs_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(300, DIM, generator=g)
    # Expert 0 gets most tokens (over the cap), expert 3 a few, expert 4 is a null expert.
    routing_map = torch.rand(300, E + 1, generator=g) < torch.tensor([0.9, 0.3, 0.2, 0.05, 0.5])
    rows, member = sample_expert_inputs(tokens, routing_map, E, cap=64)
    kept = naive_sample(routing_map[:, :E], 64)
    union = sorted(set().union(*kept.values()))
    assert torch.equal(rows, tokens[union])
    for e in range(E):
        assert [union[s] for s in member[:, e].nonzero().flatten().tolist()] == kept[e]
        assert len(kept[e]) == min(64, int(routing_map[:, e].sum()))
    assert len(kept[0]) == 64 and kept[0][-1] > 250  # spread over the batch, not its first tokens


@torch.no_grad()
def naive_output_similarity(experts, rows, member):
    """Mean over pairs i < j of the mean over x routed to i or j of cos(FFN_i(x), FFN_j(x)), by loops."""

    def ffn(e, x):
        w1, b1, w2, b2 = (p[e].double() for p in (experts.w1, experts.b1, experts.w2, experts.b2))
        return torch.nn.functional.gelu(x @ w1 + b1, approximate="tanh") @ w2 + b2

    pair_means = []
    for i in range(member.shape[1]):
        for j in range(i + 1, member.shape[1]):
            cosines = [
                torch.nn.functional.cosine_similarity(ffn(i, rows[s].double()), ffn(j, rows[s].double()), dim=0)
                for s in range(rows.shape[0])
                if member[s, i] or member[s, j]
            ]
            if cosines:
                pair_means.append(sum(cosines) / len(cosines))
    return float(sum(pair_means) / len(pair_means))


def test_expert_output_similarity_matches_naive_loop():
    torch.manual_seed(0)
    experts = GroupedExperts(E, DIM, HIDDEN)
    with torch.no_grad():
        experts.b1.normal_()
        experts.b2.normal_()
        experts.w2[1].copy_(experts.w2[0] + 0.3 * experts.w2[1])  # one pair close, the others not
    rows = torch.randn(40, DIM)
    member = torch.rand(40, E) < 0.3
    member[:, 3] = False  # expert 3 got no token: its pairs are still counted over the partner's tokens
    got, pairs = expert_output_similarity(experts, rows, member, max_rows=12)  # several chunks
    assert pairs == E * (E - 1) // 2
    assert got == pytest.approx(naive_output_similarity(experts, rows, member), abs=1e-5)
    assert expert_output_similarity(experts, rows, torch.zeros(40, E, dtype=torch.bool)) == (
        pytest.approx(np.nan, nan_ok=True),
        0,
    )


class FixedCosineExperts(nn.Module):
    """Two experts whose outputs on every token have cosine exactly `cos` (unit u and cos u + sin v)."""

    num_experts = 2

    def __init__(self, cos: float):
        super().__init__()
        self.cos = cos

    def rows(self, x, tokens_per_expert):
        n = x.shape[0] // 2
        u = torch.zeros(n, DIM, dtype=torch.float64)
        u[:, 0] = 1.0
        v = torch.zeros(n, DIM, dtype=torch.float64)
        v[:, 0], v[:, 1] = self.cos, math.sqrt(1 - self.cos**2)
        return torch.cat([u, v])


def test_homogenization_alarm_fires_exactly_above_threshold_after_grace():
    cfg = dataclasses.replace(CFG, num_experts=2, top_k=1)
    m = nn.Module()
    m.blocks = nn.ModuleList([FakeBlock()])
    m.blocks[0].ffn = FakeMoE(cfg)
    th = dataclasses.replace(THRESHOLDS, homogenization_similarity=0.99, homogenization_grace_steps=100)
    diag = RoutingDiagnostics(m, cfg, th)
    layer = m.blocks[0].ffn

    def diagnose(cos, step):
        layer.experts = FixedCosineExperts(cos)
        layer.last_expert_inputs = (torch.randn(8, DIM), torch.tensor([[True, False], [False, True]] * 4))
        report = diag.compute(step)
        return report.scalars["moe/layer00/expert_output_similarity"], report

    above, below = 0.99 + 1e-6, 0.99 - 1e-6
    sim, report = diagnose(above, 99)  # in the grace period: plotted above, no alarm
    assert sim == pytest.approx(above, abs=1e-12) and sim > 0.99 and report.warnings == []
    sim, report = diagnose(below, 100)
    assert sim < 0.99 and report.warnings == [] and report.depth_profile == ["."]
    sim, report = diagnose(0.99, 200)  # at the threshold (up to rounding): the alarm follows the scalar
    assert (report.depth_profile == ["H"]) == (sim > 0.99) == (len(report.warnings) == 1)
    sim, report = diagnose(below, 250)
    assert report.depth_profile == ["."]
    sim, report = diagnose(above, 300)
    assert sim > 0.99 and len(report.warnings) == 1 and "expert homogenization" in report.warnings[0]
    assert report.depth_profile == ["H"]
    assert diagnose(above, 400)[1].warnings == []  # still on: not repeated
    assert diagnose(below, 500)[1].depth_profile == ["."]  # recovered
    assert len(diagnose(above, 600)[1].warnings) == 1  # and warns again


def top1_share(count: int, n: int = B * L):
    """A record whose top-1 monopoly share is exactly count / n (expert 0 leads, the rest spread)."""
    top1 = torch.cat([torch.zeros(count, dtype=torch.long), 1 + torch.arange(n - count) % (E - 1)])
    return routing(top1, (top1 + 1) % E)


def test_deadlock_alarm_fires_exactly_after_patience_strictly_above_threshold():
    m = model(1)
    diag = RoutingDiagnostics(m, CFG, dataclasses.replace(THRESHOLDS, deadlock_share=0.9, deadlock_patience=3))
    above, below, at = top1_share(58), top1_share(57), top1_share(63, n=70)  # 0.906, 0.891, exactly 0.9
    sequence = [above, above, below, above, above, at, above, above, above, above]
    fired, shares, profiles = [], [], []
    for step, record in enumerate(sequence):
        report = run(diag, m, [record], step)
        shares.append(report.scalars["moe/layer00/monopoly_share"])
        fired.append(len(report.warnings))
        profiles.append(report.depth_profile[0])
    assert shares[:3] == [58 / 64, 58 / 64, 57 / 64] and shares[5] == 0.9
    # The naive streak of diagnostics strictly above 0.9 reaches 3 only at the 9th diagnostic.
    streak, expected = 0, []
    for share in shares:
        streak = streak + 1 if share > 0.9 else 0
        expected.append(streak >= 3)
    assert [p == "D" for p in profiles] == expected == [False] * 8 + [True] * 2
    assert fired == [0] * 8 + [1, 0]


def test_depth_profile_marks_each_layer_in_depth_order(tmp_path):
    m = model(4)
    with torch.no_grad():
        for layer in (m.blocks[2].ffn, m.blocks[3].ffn):
            for p in layer.experts.parameters():
                p.normal_().copy_(p[:1].expand_as(p))
    diag = RoutingDiagnostics(
        m, CFG, dataclasses.replace(THRESHOLDS, deadlock_patience=1, homogenization_grace_steps=0)
    )
    report = run(diag, m, [deadlocked(), balanced(), balanced(), deadlocked()], 5)
    assert report.depth_profile == ["D", ".", "H", "B"]
    assert report.depth_line() == "moe depth profile layer00..layer03: D . H B (D deadlock, H homogenized, B both)"
    assert json.loads(report.to_json())["depth_profile"] == ["D", ".", "H", "B"]
    assert report.scalars["moe/deadlocked_layers"] == 2 and report.scalars["moe/homogenized_layers"] == 2

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    write_tensorboard(writer, report, 5)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    image = events.Images("moe/depth_profile")[0]
    assert (image.width, image.height) == (4 * 8, 2 * 8)
    (text,) = events.Tensors("moe/depth_profile/text_summary")
    assert text.tensor_proto.string_val[0].decode() == report.depth_line()


def test_router_precision_check_refuses_bf16_masters_and_buffers():
    m = model(1)
    check_router_precision(m)  # fp32: fine
    m.bfloat16()
    with pytest.raises(RuntimeError, match=r"router parameter blocks\.0\.ffn\.router\.gate\.weight.*train\.precision"):
        check_router_precision(m)
    check_router_precision(m, lambda name, p: torch.float32)  # bf16 module, fp32 masters (DeepSpeed bf16)
    check_router_precision(m, lambda name, p: None)  # a ZeRO rank that holds none of it

    biased = nn.Module()
    biased.blocks = nn.ModuleList([FakeBlock()])
    biased.blocks[0].ffn = FakeMoE(dataclasses.replace(CFG, bias_balancing=True))
    router = biased.blocks[0].ffn.router
    biased.bfloat16()  # the router keeps its bias fp32 through casts
    check_router_precision(biased, lambda name, p: torch.float32)
    router.expert_bias = router.expert_bias.bfloat16()  # a router that would not
    with pytest.raises(RuntimeError, match=r"router buffer blocks\.0\.ffn\.router\.expert_bias is torch\.bfloat16"):
        check_router_precision(biased, lambda name, p: torch.float32)


@pytest.fixture(scope="module")
def world_of_one():
    import os

    from megamoe.config import ParallelConfig
    from megamoe.parallel.topology import destroy_distributed, init_distributed

    environ = dict(os.environ)  # init_distributed sets RANK, WORLD_SIZE, MASTER_* for its world of one
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    try:
        yield init_distributed(ParallelConfig(), torch.device("cpu"))
    finally:
        destroy_distributed()
        os.environ.clear()
        os.environ.update(environ)


def test_precision_check_at_start_up_reads_deepspeed_fp32_masters(world_of_one):
    """Under DeepSpeed bf16 (ZeRO-1) the module's router weights are bf16 and their optimizer masters
    fp32: the MoE step hooks, built once after the engine, accept it; a router buffer in bf16 stops them."""
    from megamoe.train.engine import build_engine
    from megamoe.train.moe_step_hooks import master_dtype, step_hooks_for
    from tests.distributed.parallel_training_harness import SMALL_MOE, build_reference_model, make_config

    moe = dataclasses.replace(SMALL_MOE.moe, bias_balancing=True)
    cfg = make_config({}, model=dataclasses.replace(SMALL_MOE, moe=moe), zero_stage=1)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="bf16"))
    engine = build_engine(build_reference_model(cfg), cfg)
    router = engine.module.blocks[0].ffn.router
    assert router.gate.weight.dtype == torch.bfloat16 and master_dtype("", router.gate.weight) == torch.float32
    step_hooks_for(cfg, engine.module)
    router.expert_bias = router.expert_bias.bfloat16()
    with pytest.raises(RuntimeError, match=r"router buffer blocks\.0\.ffn\.router\.expert_bias is torch\.bfloat16"):
        step_hooks_for(cfg, engine.module)


def test_output_similarity_under_expert_parallelism_covers_the_held_slice(monkeypatch):
    """A rank holding experts 2 and 3 of 4 (expert parallelism) compares those two on its tokens
    routed to them, and names the scalar `_local`."""
    import types

    m = model(1)
    layer = m.blocks[0].ffn
    full = layer.experts
    layer.experts = GroupedExperts(2, DIM, HIDDEN)
    with torch.no_grad():
        for name, p in layer.experts.named_parameters():
            p.copy_(getattr(full, name)[2:4])
    layer.dispatcher = types.SimpleNamespace(group="expert group")
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group: 1 if group == "expert group" else 0)
    diag = RoutingDiagnostics(m, CFG, THRESHOLDS)
    record = balanced()
    report = run(diag, m, [record], 0)
    rows, member = sample_expert_inputs(
        torch.randn(B * L, DIM, generator=torch.Generator().manual_seed(0)), record[1], E
    )
    mine = member[:, 2:4].any(1)
    expected = naive_output_similarity(layer.experts, rows[mine], member[mine][:, 2:4])
    assert "moe/layer00/expert_output_similarity" not in report.scalars
    assert report.scalars["moe/layer00/expert_output_similarity_local"] == pytest.approx(expected, abs=1e-5)


def test_experts_per_token_counts_real_experts_of_a_variable_routing():
    """Tokens visiting 0..3 real experts and a null column: the mean count of real experts, by a loop."""
    m = model(num_layers=1)
    cfg = dataclasses.replace(CFG, num_null_experts=1)
    m.blocks[0].ffn.router = LinearRouter(DIM, cfg)
    diag = RoutingDiagnostics(m, cfg, THRESHOLDS)
    g = torch.Generator().manual_seed(3)
    routing_map = torch.rand(B * L, E + 1, generator=g) < 0.4
    probs = routing_map * torch.rand(B * L, E + 1, generator=g)
    m.blocks[0].ffn.last_routing = (probs, routing_map, RoutingContext(batch_size=B, seq_len=L))
    expected = sum(int(row[:E].sum()) for row in routing_map) / (B * L)
    assert diag.compute(0).scalars["moe/layer00/experts_per_token"] == pytest.approx(expected)


class BandRouter(LinearRouter):
    """Two bands of two experts, as the timestep_band router declares them."""

    def expert_groups(self):
        return [[0, 1], [2, 3]]


def test_expert_groups_judge_dead_experts_and_deadlock_within_each_band():
    """Every recorded token in band 0: band 1's experts are unobserved, never dead, and keep their
    streak; deadlock is the top-1 share within band 0 (naive count), alarmed after the patience."""
    m = model(num_layers=1)
    m.blocks[0].ffn.router = BandRouter(DIM, CFG)
    diag = RoutingDiagnostics(m, CFG, THRESHOLDS)
    n = B * L
    healthy = routing(torch.arange(n) % 2, (torch.arange(n) + 1) % 2)  # band 0 only, balanced
    for step in range(5):
        report = run(diag, m, [healthy], step)
        assert report.warnings == [] and report.scalars["moe/layer00/dead_experts"] == 0
        assert report.scalars["moe/layer00/monopoly_share"] == pytest.approx(0.5)
    # Half the tokens in band 0, all on expert 0; the other half balanced over band 1: the layer-wide
    # top-1 share is 0.5, band 0's is 1.
    t = torch.arange(n)
    stuck = routing(torch.where(t < n // 2, 0, 2 + t % 2), torch.where(t < n // 2, 1, 3 - t % 2))
    shares = [run(diag, m, [stuck], 10 + step) for step in range(THRESHOLDS.deadlock_patience)]
    assert [r.scalars["moe/layer00/monopoly_share"] for r in shares] == [1.0] * THRESHOLDS.deadlock_patience
    assert [any("selective deadlock" in w for w in r.warnings) for r in shares] == [False, False, True]
    # A band of one expert cannot deadlock: no monopoly scalar, no alarm.
    m.blocks[0].ffn.router.expert_groups = lambda: [[0], [1], [2], [3]]
    report = run(diag, m, [stuck], 20)
    assert "moe/layer00/monopoly_share" not in report.scalars and report.depth_profile == ["."]


def test_without_groups_an_unreached_expert_is_dead():
    """The same band-0-only routing from a router that declares no groups: experts 2 and 3 are dead."""
    m = model(num_layers=1)
    diag = RoutingDiagnostics(m, CFG, THRESHOLDS)
    n = B * L
    healthy = routing(torch.arange(n) % 2, (torch.arange(n) + 1) % 2)
    reports = [run(diag, m, [healthy], step) for step in range(THRESHOLDS.dead_patience)]
    assert reports[-1].scalars["moe/layer00/dead_experts"] == 2
    assert any("dead experts: experts [2, 3]" in w for w in reports[-1].warnings)
