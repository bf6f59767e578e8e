"""Upcycling by the three laws: experts are the dense FFN, shared experts zero (verify) or tiny
noise (train), only routers are new; the MoE model then reproduces the dense one."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from megamoe.config import ModelConfig, MoEConfig
from megamoe.model.dit import WanDiT, build_model, count_parameters
from megamoe.model.weights import load_diffusers_weights, write_diffusers_weights
from megamoe.moe.upcycle import parameter_counts, upcycle_model, upcycle_state_dict

CFG = ModelConfig(
    dim=24,
    num_layers=2,
    num_heads=2,
    ffn_dim=64,
    in_channels=4,
    out_channels=4,
    text_dim=8,
    freq_dim=8,
    rope_max_seq_len=16,
)


def moe_cfg(**moe):
    base = dict(num_experts=4, top_k=2, num_shared_experts=1, shared_init_std=1e-4)
    return dataclasses.replace(CFG, moe=MoEConfig(**{**base, **moe}))


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    model = WanDiT(CFG)
    with torch.no_grad():  # nonzero biases and output head, so every weight shows in the output
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 2, 8, 8, generator=g), torch.tensor([120.0, 870.0]), torch.randn(2, 5, 8, generator=g)


def outputs(model):
    with torch.no_grad():
        return model.eval()(*inputs())


def test_verify_mode_reproduces_dense_model(dense):
    moe = upcycle_model(dense, moe_cfg(), mode="verify", seed=0)
    ref, out = outputs(dense), outputs(moe)
    diff = (ref - out).abs().max().item()
    print(f"verify mode max |dense - moe| = {diff:.2e} (output scale {ref.abs().max():.2f})")
    assert ref.abs().max() > 0.1 and diff < 1e-5
    # Not trivially: the routers really spread tokens over several experts.
    for block in moe.blocks:
        block.ffn.record = True
    outputs(moe)
    assert all(block.ffn.last_routing[1].any(0).sum() >= 2 for block in moe.blocks)


def test_unnormalised_top_k_scales_ffn_by_weight_sum(dense):
    moe = upcycle_model(dense, moe_cfg(renormalize=False), mode="verify", seed=0)
    layer, dense_ffn = moe.blocks[1].ffn, dense.blocks[1].ffn
    x = torch.randn(2, 16, CFG.dim, generator=torch.Generator().manual_seed(3))
    layer.record = True
    with torch.no_grad():
        y, ref = layer(x), dense_ffn(x)
    weight_sum = layer.last_routing[0].sum(1).view(2, 16, 1)
    assert (weight_sum < 0.99).all()  # softmax top-2 of 4 experts: weights sum below one
    torch.testing.assert_close(y, ref * weight_sum, atol=1e-6, rtol=1e-5)


def test_train_mode_adds_tiny_shared_noise(dense):
    cfg = moe_cfg(shared_init_std=1e-3)
    moe = upcycle_model(dense, cfg, mode="train", seed=0)
    diff = (outputs(dense) - outputs(moe)).abs().max().item()
    assert 0 < diff < 0.05
    shared = torch.cat([p.flatten() for n, p in moe.named_parameters() if ".ffn.shared." in n])
    assert shared.std().item() == pytest.approx(1e-3, rel=0.05) and abs(shared.mean().item()) < 1e-4
    verify = upcycle_model(dense, cfg, mode="verify", seed=0)
    assert all((p == 0).all() for n, p in verify.named_parameters() if ".ffn.shared." in n)


def test_only_routers_are_new(dense):
    cfg = moe_cfg(layers="1")  # block 0 keeps its dense FFN
    dense_sd = dense.state_dict()
    sd0 = upcycle_state_dict(dense_sd, cfg, "train", 0)
    for key, value in dense_sd.items():
        if not key.startswith("blocks.1.ffn."):
            assert torch.equal(sd0[key], value), key  # attention, norms, embeddings, modulation, dense FFN
    w_in, b_in = dense_sd["blocks.1.ffn.net.0.proj.weight"], dense_sd["blocks.1.ffn.net.0.proj.bias"]
    w_out, b_out = dense_sd["blocks.1.ffn.net.2.weight"], dense_sd["blocks.1.ffn.net.2.bias"]
    for e in range(4):
        assert torch.equal(sd0["blocks.1.ffn.experts.w1"][e], w_in.t())
        assert torch.equal(sd0["blocks.1.ffn.experts.b1"][e], b_in)
        assert torch.equal(sd0["blocks.1.ffn.experts.w2"][e], w_out.t())
        assert torch.equal(sd0["blocks.1.ffn.experts.b2"][e], b_out)
    sd0_again = upcycle_state_dict(dense_sd, cfg, "train", 0)
    sd1 = upcycle_state_dict(dense_sd, cfg, "train", 1)
    gate = "blocks.1.ffn.router.gate.weight"
    assert torch.equal(sd0[gate], sd0_again[gate]) and not torch.equal(sd0[gate], sd1[gate])
    assert sd0[gate].dtype == torch.float32 and sd0[gate].std() > 0
    assert set(sd0) == set(build_model(cfg, "meta").state_dict())


def test_fine_grained_slices_of_one_replica_sum_to_dense_ffn(dense):
    cfg = moe_cfg(num_experts=8, expert_ffn_dim=16, num_shared_experts=0)  # G = 4 slices, 2 replicas
    moe = upcycle_model(dense, cfg, mode="verify", seed=0)
    experts, dense_ffn = moe.blocks[0].ffn.experts, dense.blocks[0].ffn
    x = torch.randn(10, CFG.dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = dense_ffn(x)
        for replica in range(2):
            counts = torch.zeros(8, dtype=torch.long)
            counts[4 * replica : 4 * replica + 4] = 10  # every token visits all 4 slices, weight 1 each
            out = experts.rows(x.repeat(4, 1), counts)
            torch.testing.assert_close(out.view(4, 10, -1).sum(0), ref, atol=1e-5, rtol=1e-5)
        # A slice is the dense FFN restricted to its hidden units (plus b2 / G).
        w1, b1 = dense_ffn.net[0].proj.weight[16:32], dense_ffn.net[0].proj.bias[16:32]
        one = (
            F.gelu(x @ w1.t() + b1, approximate="tanh") @ dense_ffn.net[2].weight[:, 16:32].t()
            + dense_ffn.net[2].bias / 4
        )
        torch.testing.assert_close(experts.rows(x, torch.tensor([0, 0, 0, 0, 0, 10, 0, 0])), one, atol=1e-5, rtol=1e-5)


def test_sources_save_and_load(dense, tmp_path):
    cfg = moe_cfg()
    write_diffusers_weights(dense.state_dict(), CFG, tmp_path / "dense")
    from_dir = upcycle_model(tmp_path / "dense", cfg, mode="train", seed=3)
    from_file = upcycle_model(tmp_path / "dense" / "diffusion_pytorch_model.safetensors", cfg, mode="train", seed=3)
    from_module = upcycle_model(dense, cfg, mode="train", seed=3)
    for key, value in from_module.state_dict().items():
        assert torch.equal(from_dir.state_dict()[key], value) and torch.equal(from_file.state_dict()[key], value)

    write_diffusers_weights(from_module.state_dict(), cfg, tmp_path / "moe")
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["moe"]["num_experts"] == 4
    fresh = build_model(cfg)
    load_diffusers_weights(fresh, tmp_path / "moe")  # the training loop's train.init_from path
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in from_module.state_dict().items())
    with pytest.raises(ValueError, match=r"model\.moe\.num_experts=4") as info:
        load_diffusers_weights(build_model(moe_cfg(num_experts=8)), tmp_path / "moe")
    assert "\n" not in str(info.value)


def test_parameter_counts(dense):
    cfg = moe_cfg(num_shared_experts=0, layers="1")
    counts = parameter_counts(build_model(cfg, "meta"))
    ffn = 2 * CFG.dim * CFG.ffn_dim + CFG.ffn_dim + CFG.dim
    gate = CFG.dim * 4
    assert counts["dense"] == count_parameters(dense)
    assert counts["moe_total"] == counts["dense"] + 3 * ffn + gate
    assert counts["activated"] == counts["dense"] + ffn + gate  # top-2 of cloned experts: one more FFN


@pytest.mark.parametrize(
    "change, mode, match",
    [
        (dict(num_experts=0), "verify", r"model\.moe\.num_experts is 0"),
        (dict(expert_ffn_dim=24), "verify", r"expert_ffn_dim=24 does not divide model\.ffn_dim=64"),
        (dict(num_experts=6, expert_ffn_dim=16), "verify", r"num_experts=6 is not a multiple of the 4 slices"),
        (dict(), "fast", r"mode 'fast' is unknown"),
    ],
)
def test_config_errors(dense, change, mode, match):
    with pytest.raises(ValueError, match=match) as info:
        upcycle_state_dict(dense.state_dict(), moe_cfg(**change), mode, 0)
    assert "\n" not in str(info.value)


def test_dense_checkpoint_errors(dense):
    small = WanDiT(dataclasses.replace(CFG, ffn_dim=32)).state_dict()
    with pytest.raises(ValueError, match=r"ffn\.net\.0\.proj\.weight of shape \(32, 24\).*model\.ffn_dim=32"):
        upcycle_state_dict(small, moe_cfg(), "verify", 0)
    partial = {k: v for k, v in dense.state_dict().items() if "attn2.to_k" not in k}
    with pytest.raises(ValueError, match=r"lacks blocks\.0\.attn2\.to_k\.bias"):
        upcycle_state_dict(partial, moe_cfg(), "verify", 0)
    already = upcycle_state_dict(dense.state_dict(), moe_cfg(), "verify", 0)
    with pytest.raises(ValueError, match="already an MoE checkpoint"):
        upcycle_state_dict(already, moe_cfg(), "verify", 0)


def test_launcher_writes_weights_and_checks(dense, tmp_path, capsys):
    from launcher.upcycle import main

    write_diffusers_weights(dense.state_dict(), CFG, tmp_path / "dense")
    config = tmp_path / "moe.yaml"
    model = {k: v for k, v in dataclasses.asdict(CFG).items() if k != "moe"}
    config.write_text(json.dumps({"model": {**model, "moe": {"num_experts": 4, "top_k": 2}}}))  # JSON is YAML
    assert (
        main(
            [
                "--config",
                str(config),
                "--dense",
                str(tmp_path / "dense"),
                "--out",
                str(tmp_path / "moe"),
                "--mode",
                "verify",
                "--check",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    print(out)
    assert "parameters: dense" in out and "activated per token" in out and "expected ~0" in out
    diff = float(out.split("max |dense - moe| = ")[1].split()[0])
    assert diff < 1e-5
    fresh = build_model(moe_cfg(num_shared_experts=0))
    load_diffusers_weights(fresh, tmp_path / "moe")
    assert main(["--config", str(config), "--dense", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a training checkpoint directory: its exported weights/ folder is what to pass
    write_diffusers_weights(dense.state_dict(), CFG, tmp_path / "step_00000010" / "weights")
    checkpoint = str(tmp_path / "step_00000010")
    assert main(["--config", str(config), "--dense", checkpoint, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pass '{tmp_path / 'step_00000010' / 'weights'}'" in err
    assert not (tmp_path / "x").exists()


ROUTER_OPTIONS = {
    "expert_choice": dict(capacity_factor=1.0),
    "sinkhorn": dict(sinkhorn_iterations=3),
    "promoe": dict(num_prototypes_per_expert=2),
    "linear": dict(num_null_experts=1),
}


@pytest.mark.parametrize(
    "router", ["linear", "mlp", "cross_attention", "expert_choice", "expert_race", "promoe", "sinkhorn"]
)
def test_every_router_scales_the_dense_ffn_by_its_weight_sum(dense, router):
    """Law 1 for any router: with cloned experts and zero shared experts, a token's MoE output is
    the dense FFN output times the sum of its (real-expert) combine weights."""
    from megamoe.moe.routers.base import RoutingContext

    hidden = dict(router_hidden_dim=16) if router in ("mlp", "cross_attention") else {}
    cfg = moe_cfg(router=router, **hidden, **ROUTER_OPTIONS.get(router, {}))
    moe = upcycle_model(dense, cfg, mode="verify", seed=1)
    layer, dense_ffn = moe.blocks[0].ffn, dense.blocks[0].ffn
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 16, CFG.dim, generator=g)
    ctx = RoutingContext(
        batch_size=2,
        seq_len=16,
        temb=torch.randn(2, CFG.dim, generator=g),
        text=torch.randn(2, 5, CFG.dim, generator=g),
        is_null=torch.tensor([False, True]),
        timestep=torch.tensor([100.0, 900.0]),
    )
    layer.train()  # Expert Race selects by its batch top-K in training
    layer.record = True
    with torch.no_grad():
        y, ref = layer(x, ctx), dense_ffn(x)
    weight_sum = layer.last_routing[0][:, : cfg.moe.num_experts].sum(1).view(2, 16, 1)
    assert layer.last_routing[1].any(0).sum() >= 2  # tokens really spread over several experts
    torch.testing.assert_close(y, ref * weight_sum, atol=1e-5, rtol=1e-5)
