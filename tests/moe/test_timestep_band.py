"""Timestep-band experts against naive references: bands, the restricted inner router, upcycling, per-band CFG."""

import dataclasses

import pytest
import torch
from torch import nn

from megamoe.config import ConfigError, ModelConfig, MoEConfig
from megamoe.diffusion.flow import TIMESTEP_SCALE, sampling_schedule
from megamoe.diffusion.sampler import check_guidance_per_band, euler_sample
from megamoe.model.dit import WanDiT
from megamoe.moe.routers.base import RoutingContext
from megamoe.moe.routers.timestep_band import TimestepBandRouter, band_index
from megamoe.moe.token_shards import TokenShards
from megamoe.moe.upcycle import upcycle_model

DIM = 16


def make_router(**kw) -> TimestepBandRouter:
    torch.manual_seed(0)
    return TimestepBandRouter(DIM, MoEConfig(**{"router": "timestep_band", **kw}))


def per_token_batch(b=2, l=8, seed=0):
    """Per-token timesteps (Wan2.2 TI2V), exact boundary values included."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(b, l, generator=g) * 1000
    t[0, :4] = torch.tensor([0.0, 300.0, 700.0, 299.9])
    return torch.randn(b * l, DIM, generator=g), RoutingContext(batch_size=b, seq_len=l, timestep=t)


def naive_band(t: float, boundaries) -> int:
    return sum(1 for b in boundaries if t >= b)


def test_band_is_the_number_of_boundaries_at_or_below_the_timestep():
    t = torch.tensor([0.0, 299.99, 300.0, 300.01, 699.0, 700.0, 1000.0])
    assert band_index(t, [300.0, 700.0]).tolist() == [0, 0, 1, 1, 1, 2, 2]  # a boundary opens the band above


def test_one_expert_per_band_takes_every_token_of_the_band_with_weight_one():
    router = make_router(num_experts=3, top_k=1, timestep_band_boundaries=[300.0, 700.0])
    x, ctx = per_token_batch()
    out = router(x, ctx)
    for n, t in enumerate(ctx.timestep.flatten().tolist()):
        expected = torch.zeros(3)
        expected[naive_band(t, [300.0, 700.0])] = 1.0
        assert torch.equal(out.probs[n], expected) and torch.equal(out.routing_map[n], expected.bool())
    assert out.topk_indices.flatten().tolist() == [naive_band(t, [300.0, 700.0]) for t in ctx.timestep.flatten()]
    assert set(out.topk_indices.flatten().tolist()) == {0, 1, 2}
    # A timestep per sample is every token's timestep.
    ctx.timestep = ctx.timestep[:, 0]
    per_sample = router(x, ctx)
    assert per_sample.topk_indices.view(2, 8).eq(band_index(ctx.timestep, [300.0, 700.0])[:, None]).all()


def naive_restricted(router, x, t, score_func, renormalize, top_k):
    """Per token: the linear gate's logits on its band's experts only, scores, top-k, weights."""
    w = router.inner.gate.weight
    per, rows, maps = router.experts_per_band, [], []
    for n in range(x.shape[0]):
        band = naive_band(t[n].item(), router.boundaries)
        cols = list(range(band * per, (band + 1) * per))
        logits = w[cols] @ x[n]
        scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
        top = scores.topk(top_k).indices
        weights = scores[top] / scores[top].sum() if renormalize else scores[top]
        row, chosen = torch.zeros(w.shape[0]), torch.zeros(w.shape[0], dtype=torch.bool)
        for i, j in enumerate(top.tolist()):
            row[cols[j]], chosen[cols[j]] = weights[i], True
        rows.append(row)
        maps.append(chosen)
    return torch.stack(rows), torch.stack(maps)


@pytest.mark.parametrize("score_func, renormalize, top_k", [("softmax", True, 2), ("sigmoid", False, 1)])
def test_inner_router_picks_top_k_among_its_bands_experts_only(score_func, renormalize, top_k):
    router = make_router(
        num_experts=6,
        top_k=top_k,
        timestep_band_boundaries=[300.0, 700.0],
        timestep_band_router="linear",
        score_func=score_func,
        renormalize=renormalize,
        balance_loss=0.01 if top_k < 2 else 0.0,  # top-2 of a band of 2: the load is fixed (refused)
        z_loss=0.001,
    )
    x, ctx = per_token_batch()
    out = router(x, ctx)
    probs, routing_map = naive_restricted(router, x, ctx.timestep.flatten(), score_func, renormalize, top_k)
    assert torch.equal(out.routing_map, routing_map)
    torch.testing.assert_close(out.probs, probs)
    # The inner router's losses still work, with gradient to its gate.
    losses = {"balance", "z"} if top_k < 2 else {"z"}
    assert losses <= set(out.aux)
    (sum(out.aux[name] for name in losses) + out.probs.sum()).backward()
    assert router.inner.gate.weight.grad.isfinite().all() and router.inner.gate.weight.grad.abs().sum() > 0


def test_expert_groups_are_the_bands_experts_that_the_routing_keeps_to():
    """Diagnostics judge dead experts and deadlock per group: the groups must be where tokens go."""
    router = make_router(num_experts=6, top_k=1, timestep_band_boundaries=[300.0, 700.0], timestep_band_router="linear")
    assert router.expert_groups() == [[0, 1], [2, 3], [4, 5]]
    x, ctx = per_token_batch()
    chosen = router(x, ctx).routing_map.nonzero()
    bands = band_index(ctx.timestep.flatten(), [300.0, 700.0])
    assert all(int(e) in router.expert_groups()[int(bands[t])] for t, e in chosen)


def test_the_band_is_what_replay_returns():
    router = make_router(num_experts=2, top_k=1, timestep_band_boundaries=[500.0])
    x, ctx = per_token_batch()
    router.replay = lambda band: torch.ones_like(band)
    assert router(x, ctx).routing_map[:, 1].all()


def test_token_shards_reach_the_inner_router():
    router = make_router(num_experts=4, top_k=1, timestep_band_boundaries=[500.0], timestep_band_router="mlp")
    shards = TokenShards()
    router.token_shards = shards
    assert router.token_shards is shards and router.inner.token_shards is shards


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(num_experts=3, top_k=1), "must equal the number of bands"),
        (dict(num_experts=2, top_k=2), "top_k=2 must be 1 with timestep_band_router=none"),
        (dict(num_experts=2, top_k=1, timestep_band_boundaries=[700.0, 300.0]), "strictly increasing"),
        (dict(num_experts=2, top_k=1, timestep_band_boundaries=[1000.0]), r"in \(0, 1000\)"),
        (dict(num_experts=2, top_k=1, timestep_band_boundaries=[]), "non-empty"),
        (dict(num_experts=4, top_k=1, timestep_band_router="expert_choice"), "must be one of none, linear"),
        (dict(num_experts=5, top_k=1, timestep_band_router="linear"), "must split evenly into 2 bands"),
        (dict(num_experts=4, top_k=3, timestep_band_router="linear"), "must split evenly into 2 bands"),
        (dict(num_experts=4, top_k=1, timestep_band_router="linear", router_hidden_dim=8), "router_hidden_dim=8"),
        (dict(num_experts=2, top_k=1, balance_loss=0.01), "balance_loss=0.01 has no effect"),
        (dict(num_experts=4, top_k=1, timestep_band_router="linear", bias_balancing=True), "bias_balancing"),
        (dict(num_experts=2, top_k=1, num_null_experts=1), "num_null_experts"),
        (dict(num_experts=4, top_k=1, timestep_band_router="linear", balance_scope="x", balance_loss=1.0), "scope"),
        (dict(num_experts=2, top_k=1, capacity_factor=2.0), "capacity_factor=2.0 has no effect"),
        (dict(num_experts=4, top_k=2, timestep_band_router="linear", balance_loss=0.01), "takes its whole band"),
    ],
)
def test_config_errors_name_the_key(change, match):
    with pytest.raises(ConfigError, match=match):
        TimestepBandRouter.check_config(MoEConfig(router="timestep_band", **change))


# ---------------------------------------------------------------- upcycling

CFG = ModelConfig(dim=24, num_layers=2, num_heads=2, ffn_dim=64, in_channels=4, out_channels=4, text_dim=8, freq_dim=8)


@pytest.mark.parametrize(
    "moe",
    [
        dict(num_experts=2, top_k=1),  # Wan2.2-A14B: one expert per band, no gate at all
        dict(num_experts=4, top_k=2, timestep_band_router="linear"),  # renormalised: weights sum to 1
    ],
)
def test_upcycled_band_experts_reproduce_the_dense_model(moe):
    torch.manual_seed(0)
    dense = WanDiT(CFG)
    with torch.no_grad():  # nonzero biases and output head, so every weight shows in the output
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    cfg = dataclasses.replace(
        CFG, moe=MoEConfig(router="timestep_band", timestep_band_boundaries=[500.0], num_shared_experts=1, **moe)
    )
    model = upcycle_model(dense, cfg, mode="verify", seed=1).eval()
    experts = model.blocks[0].ffn.experts
    dense_ffn = dense.blocks[0].ffn.net
    torch.testing.assert_close(experts.w1[-1], dense_ffn[0].proj.weight.t(), rtol=0, atol=0)
    g = torch.Generator().manual_seed(1)
    latents, text = torch.randn(2, 4, 2, 8, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    timestep = torch.tensor([120.0, 870.0])  # one sample in each band
    model.blocks[0].ffn.record = True
    with torch.no_grad():
        out, ref = model(latents, timestep, text), dense.eval()(latents, timestep, text)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert model.blocks[0].ffn.last_routing[1].any(0).all()  # every band expert was used


# ---------------------------------------------------------------- per-band CFG at sampling


class _Velocity(nn.Module):
    """v(x, t, text) = 0.1 x + (t / 1000) mean(text): the text and null branches differ."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, text):
        return 0.1 * x + (t / 1000)[:, None, None, None, None] * text.mean((1, 2))[:, None, None, None, None]


def test_sampler_uses_each_bands_cfg_scale_at_its_timesteps():
    shape, steps, shift = (2, 3, 1, 2, 2), 10, 1.0
    scales, boundaries = [1.5, 1.0, 6.0], [300.0, 700.0]
    text = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(3))
    got = euler_sample(
        _Velocity(), shape, text, steps, 99.0, shift, torch.Generator().manual_seed(1), scales, boundaries
    )

    model, x = _Velocity(), torch.randn(shape, generator=torch.Generator().manual_seed(1))
    levels, used = sampling_schedule(steps, shift), set()
    for s, s_next in zip(levels[:-1], levels[1:]):  # the naive loop: the scale chosen by comparisons
        t = torch.full((2,), s * TIMESTEP_SCALE)
        ts = t[0].item()
        w = scales[0] if ts < 300 else scales[1] if ts < 700 else scales[2]
        used.add(w)
        v_text, v_null = model(x, t, text), model(x, t, torch.zeros_like(text))
        x = x + (s_next - s) * (v_null + w * (v_text - v_null))
    assert used == set(scales)  # the schedule crosses every band
    torch.testing.assert_close(got, x, rtol=0, atol=1e-6)


def test_cfg_per_band_is_refused_without_timestep_bands():
    bands = MoEConfig(num_experts=2, top_k=1, router="timestep_band", timestep_band_boundaries=[500.0])
    check_guidance_per_band(bands, [3.0, 5.0])
    check_guidance_per_band(MoEConfig(num_experts=4), None)
    with pytest.raises(ValueError, match="needs timestep-band experts"):
        check_guidance_per_band(MoEConfig(num_experts=4), [3.0, 5.0])
    with pytest.raises(ValueError, match="got 3 CFG scales for 2 bands"):
        check_guidance_per_band(bands, [1.0, 3.0, 5.0])


@pytest.mark.parametrize("flags", [["--guidance", "nan"], ["--guidance-per-band", "1", "inf"]])
def test_sampler_refuses_a_non_finite_guidance_scale(tmp_path, capsys, flags):
    """argparse reads 'nan' and 'inf' as floats: refused in one line before any checkpoint is read."""
    from launcher.sample import main as sample

    code = sample(["--checkpoint", str(tmp_path / "absent"), "--caption", "a red circle", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "CFG scales must be finite" in err, err
