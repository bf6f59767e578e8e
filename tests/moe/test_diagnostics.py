"""Routing diagnostics flag each failure mode from hand-made routing records, and only that one."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from megamoe.config import MoEConfig
from megamoe.moe.diagnostics import (
    DiagnosticsThresholds,
    RoutingDiagnostics,
    expert_similarity,
    heatmap,
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
    """Only what diagnostics reads from an MoE layer: router, experts, record, last_routing."""

    def __init__(self):
        super().__init__()
        self.router = LinearRouter(DIM, CFG)
        self.experts = GroupedExperts(E, DIM, HIDDEN)
        self.record = False
        self.last_routing = None


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
    for block, record in zip(m.blocks, records):
        block.ffn.last_routing = record
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
        w1 = m.blocks[0].ffn.experts.w1
        w1.copy_(w1[:1].expand_as(w1))  # identical experts, as right after upcycling
    diag = RoutingDiagnostics(m, CFG, THRESHOLDS)
    report = run(diag, m, [balanced(), balanced()], 50)
    assert report.scalars["moe/layer00/expert_similarity"] == pytest.approx(1.0)
    assert report.warnings == []  # expected during the grace period
    report = run(diag, m, [balanced(), balanced()], 150)
    assert len(report.warnings) == 1
    assert "layer00" in report.warnings[0] and "expert homogenization" in report.warnings[0]
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
    assert (image.width, image.height) == (E * 8, 2 * 8)
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

    diag.enable_recording(True)
    loss = moe(latents, timestep, text).square().mean()
    diag.enable_recording(False)
    loss.backward()
    assert moe.blocks[1].ffn.router.gate.weight.grad.abs().max() > 0
    optimizer = torch.optim.Adam(moe.parameters(), lr=1e-6)  # steps ~1e-6: seen by fp32, lost in bf16
    diag.snapshot_router_params()
    optimizer.step()
    lost = diag.measure_bf16_loss()
    report = diag.compute(step=1)
    s = report.scalars
    assert s["moe/layer01/expert_similarity"] == pytest.approx(1.0)  # upcycled clones, within grace
    assert report.warnings == []
    assert report.load_matrix.shape == (1, 4) and report.load_matrix.sum() == pytest.approx(1.0)
    assert report.timestep_load[0, 0].sum() == pytest.approx(1.0) and report.timestep_load[0, 3].sum() == pytest.approx(
        1.0
    )
    assert lost > 0.9 and s["moe/layer01/bf16_lost_update_frac"] == lost
    assert "moe/layer01/shared_routed_norm_ratio" not in s or s["moe/layer01/shared_routed_norm_ratio"] >= 0
