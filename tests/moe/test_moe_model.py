"""A tiny WanDiT with MoE FFNs: which blocks get them, keys, forward/backward, aux, routing context."""

import pytest
import torch

from megamoe.config import ModelConfig, MoEConfig
from megamoe.model.dit import build_model
from megamoe.model.feed_forward import FeedForward
from megamoe.moe.layer import MoEFeedForward, collect_aux, moe_layers, routers_after_step


def tiny(**moe) -> ModelConfig:
    base = dict(num_experts=4, top_k=2)
    base.update(moe)
    if base.get("router", "linear") in ("mlp", "cross_attention"):
        base.setdefault("router_hidden_dim", 16)
    return ModelConfig(
        dim=32,
        num_layers=4,
        num_heads=2,
        ffn_dim=64,
        in_channels=4,
        out_channels=4,
        text_dim=24,
        freq_dim=16,
        rope_max_seq_len=32,
        moe=MoEConfig(**base),
    )


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(2, 5, 24, generator=gen)
    text[1] = 0  # sample 1 has the CFG-null text
    return torch.randn(2, 4, 2, 4, 4, generator=gen), torch.tensor([250.0, 900.0]), text


@pytest.mark.parametrize("router", ["linear", "mlp", "cross_attention"])
def test_forward_backward_reaches_experts_and_router(router):
    torch.manual_seed(0)
    model = build_model(tiny(router=router, num_shared_experts=1, balance_loss=0.01, z_loss=0.001))
    with torch.no_grad():
        model.proj_out.weight.normal_(0, 0.02)  # zero-init head would give the trunk no gradient
    out = model(*inputs())
    aux = collect_aux(model)
    assert out.shape == (2, 4, 2, 4, 4) and torch.isfinite(out).all()
    assert set(aux) == {"balance", "z"} and all(v.ndim == 0 for v in aux.values())
    (out.square().mean() + 0.01 * aux["balance"] + 0.001 * aux["z"]).backward()
    for layer in moe_layers(model):
        for p in (layer.experts.w1, layer.experts.w2, layer.shared.net[2].weight, *layer.router.parameters()):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_every_other_and_state_dict_keys():
    model = build_model(tiny(layers="every_other", num_shared_experts=2))
    kinds = [type(block.ffn) for block in model.blocks]
    assert kinds == [FeedForward, MoEFeedForward, FeedForward, MoEFeedForward]
    keys = set(model.state_dict())
    for k in (
        "blocks.1.ffn.experts.w1",
        "blocks.1.ffn.experts.b2",
        "blocks.1.ffn.router.gate.weight",
        "blocks.1.ffn.shared.net.0.proj.weight",
        "blocks.1.ffn.shared.net.2.bias",
        "blocks.0.ffn.net.0.proj.weight",
        "blocks.2.ffn.net.2.weight",
    ):
        assert k in keys, k
    assert model.blocks[1].ffn.experts.w1.shape == (4, 32, 64)
    assert model.blocks[1].ffn.shared.net[0].proj.weight.shape == (2 * 64, 32)


def test_dense_model_has_no_moe_and_no_aux():
    model = build_model(tiny(num_experts=0))
    assert moe_layers(model) == [] and collect_aux(model) == {}
    model(*inputs())


def test_collect_aux_sums_over_layers():
    model = build_model(tiny(balance_loss=0.1))
    model(*inputs())
    per_layer = [layer.aux["balance"] for layer in moe_layers(model)]
    assert len(per_layer) == 4 and set(collect_aux(model)) == {"balance"}
    torch.testing.assert_close(collect_aux(model)["balance"], sum(per_layer))


def test_routing_context_carries_conditioning():
    model = build_model(tiny(router="cross_attention"))
    layer = model.blocks[0].ffn
    layer.record = True
    latents, timestep, text = inputs()
    model(latents, timestep, text)
    _, routing_map, ctx = layer.last_routing
    assert (ctx.batch_size, ctx.seq_len) == (2, 2 * 2 * 2) and routing_map.shape == (16, 4)
    assert ctx.is_null.tolist() == [False, True]
    assert ctx.text.shape == (2, 5, 32) and ctx.temb.shape == (2, 32)
    assert ctx.timestep.tolist() == [250.0, 900.0]


def test_routers_after_step_updates_every_bias():
    model = build_model(tiny(bias_balancing=True, bias_update_rate=0.01)).train()
    model(*inputs())
    routers_after_step(model, lambda t: t)
    for layer in moe_layers(model):
        assert layer.router.expert_bias.abs().sum() > 0  # 16 tokens x 2 picks over 4 experts: some imbalance
        assert "router.expert_bias" in dict(layer.named_buffers())


def test_per_token_timesteps_and_meta_build():
    model = build_model(tiny(router="cross_attention"))
    latents, _, text = inputs()
    per_token = torch.full((2, 8), 500.0)
    per_token[:, :4] = 0.0  # Wan2.2 TI2V: the conditioning frame's tokens are clean
    layer = model.blocks[2].ffn
    layer.record = True
    model(latents, per_token, text)
    assert layer.last_routing[2].temb.shape == (2, 8, 32)
    meta = build_model(tiny(num_shared_experts=1), device="meta")
    assert all(p.is_meta for p in meta.parameters()) and len(moe_layers(meta)) == 4
