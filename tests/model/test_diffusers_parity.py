"""WanDiT must compute exactly what diffusers' WanTransformer3DModel computes on the same weights."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

from megamoe.config import ModelConfig  # noqa: E402
from megamoe.model.dit import WanDiT, build_model  # noqa: E402
from megamoe.model.weights import diffusers_config, load_diffusers_weights, save_diffusers_weights  # noqa: E402

TOL = 1e-5

# A: Wan2.2-like patch (1, 2, 2); B: other heads / head dim (12: uneven RoPE split 4/4/4),
# a temporal patch, non-square patch, no cross-attention norm, different eps.
CFG_A = ModelConfig(
    dim=32,
    num_layers=2,
    num_heads=2,
    ffn_dim=64,
    in_channels=4,
    out_channels=6,
    text_dim=24,
    freq_dim=16,
    patch_size=[1, 2, 2],
    rope_max_seq_len=64,
)
CFG_B = ModelConfig(
    dim=48,
    num_layers=2,
    num_heads=4,
    ffn_dim=80,
    in_channels=3,
    out_channels=3,
    text_dim=20,
    freq_dim=32,
    patch_size=[2, 2, 1],
    cross_attn_norm=False,
    eps=1e-5,
    rope_max_seq_len=32,
)

SHAPES = [  # (cfg, B, F, H, W)
    ("A", 2, 1, 4, 4),
    ("A", 1, 3, 6, 10),  # odd frames, non-square
    ("A", 2, 5, 8, 4),
    ("B", 2, 2, 4, 3),
    ("B", 1, 6, 6, 5),  # odd patch-grid frames and width
]


def from_pretrained(path) -> WanTransformer3DModel:
    # diffusers 0.42 cannot from_pretrained a WanTransformer3DModel without accelerate
    # (its _keep_in_fp32_modules forces low_cpu_mem_usage, which needs accelerate).
    pytest.importorskip("accelerate", reason="diffusers' from_pretrained of Wan needs accelerate")
    return WanTransformer3DModel.from_pretrained(path).eval()


def diffusers_model(cfg: ModelConfig) -> WanTransformer3DModel:
    kwargs = {k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")}
    return WanTransformer3DModel(**kwargs).eval()


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm weights around 1), so zero-init cannot make parity trivial."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        if "norm" in name and name.endswith("weight"):
            p.add_(1.0)


def inputs(cfg: ModelConfig, b: int, f: int, h: int, w: int, text_len: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, cfg.in_channels, f, h, w, generator=gen),
        torch.rand(b, generator=gen) * 1000,
        torch.randn(b, text_len, cfg.text_dim, generator=gen),
    )


@pytest.fixture(scope="module")
def pairs():
    out = {}
    for name, cfg in (("A", CFG_A), ("B", CFG_B)):
        ref = diffusers_model(cfg)
        randomize(ref, seed=len(name) + ord(name))
        ours = WanDiT(cfg).eval()
        load_diffusers_weights(ours, ref.state_dict())
        out[name] = (cfg, ref, ours)
    return out


@pytest.mark.parametrize("grid", [(31, 22, 40), (3, 1024, 2)])
def test_rope_tables_match_diffusers_at_5b_head_dim(grid):
    """Large positions (up to rope_max_seq_len) at the 5B head dim, beyond what the tiny models reach."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from megamoe.model.rope import WanRotaryEmbedding

    ref_cos, ref_sin = WanRotaryPosEmbed(128, (1, 2, 2), 1024)(torch.zeros(1, 1, grid[0], 2 * grid[1], 2 * grid[2]))
    cos, sin = WanRotaryEmbedding(128, 1024)(grid)
    for ours, ref in ((cos, ref_cos[0, :, 0]), (sin, ref_sin[0, :, 0])):
        assert torch.equal(ours, ref[:, 0::2]) and torch.equal(ours, ref[:, 1::2])


def test_state_dict_keys_identical():
    for cfg in (CFG_A, CFG_B):
        ref, ours = diffusers_model(cfg).state_dict(), WanDiT(cfg).state_dict()
        assert ref.keys() == ours.keys()
        assert {k: v.shape for k, v in ref.items()} == {k: v.shape for k, v in ours.items()}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "{}-B{}F{}H{}W{}".format(*s))
@torch.no_grad()
def test_forward_matches_diffusers(pairs, shape):
    cfg, ref, ours = pairs[shape[0]]
    x, t, text = inputs(cfg, *shape[1:])
    expected = ref(x, t, text, return_dict=False)[0]
    got = ours(x, t, text)
    assert got.shape == expected.shape == (shape[1], cfg.out_channels, *shape[2:])
    diff = (got - expected).abs().max().item()
    print(f"shape {shape}: max abs diff {diff:.3e} (output max {expected.abs().max().item():.2f})")
    assert diff < TOL


@torch.no_grad()
def test_per_token_timesteps_match_diffusers(pairs):
    """Wan2.2 TI2V gives each token its own timestep (0 on the conditioning first frame)."""
    cfg, ref, ours = pairs["A"]
    x, _, text = inputs(cfg, 2, 3, 4, 6)
    tokens = 3 * 2 * 3
    t = torch.rand(2, tokens) * 1000
    t[:, :6] = 0.0
    diff = (ours(x, t, text) - ref(x, t, text, return_dict=False)[0]).abs().max().item()
    print(f"per-token timesteps: max abs diff {diff:.3e}")
    assert diff < TOL


@torch.no_grad()
def test_export_loads_in_diffusers(tmp_path):
    torch.manual_seed(1)
    ours = WanDiT(CFG_A).eval()
    randomize(ours, seed=5)
    save_diffusers_weights(ours, tmp_path / "ckpt")
    ref = from_pretrained(tmp_path / "ckpt")
    x, t, text = inputs(CFG_A, 2, 3, 6, 10)
    diff = (ours(x, t, text) - ref(x, t, text, return_dict=False)[0]).abs().max().item()
    print(f"export -> from_pretrained: max abs diff {diff:.3e}")
    assert diff < TOL
    back = WanDiT(CFG_A)
    load_diffusers_weights(back, tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_moe_export_is_refused_by_diffusers_and_loaded_by_megamoe(tmp_path):
    """diffusers would load an MoE export as a dense model with random FFNs and a warning; its
    config.json must make from_pretrained raise, naming what it is."""
    import dataclasses

    from megamoe.config import MoEConfig

    cfg = dataclasses.replace(CFG_A, moe=MoEConfig(num_experts=2, num_shared_experts=1))
    torch.manual_seed(0)
    moe = build_model(cfg)
    save_diffusers_weights(moe, tmp_path)
    with pytest.raises(ValueError, match="megamoe Mixture-of-Experts WanDiT") as info:
        from_pretrained(tmp_path)
    print(info.value)
    back = build_model(cfg)
    load_diffusers_weights(back, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), moe.state_dict().values()))


@torch.no_grad()
def test_sharded_directory_loads(tmp_path):
    ref = diffusers_model(CFG_B)
    randomize(ref, seed=9)
    state = ref.state_dict()
    keys = list(state)
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for name, part in shards.items():
        save_file({k: state[k].contiguous() for k in part}, str(tmp_path / name), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
        "weight_map": {k: name for name, part in shards.items() for k in part},
    }
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(diffusers_config(CFG_B)))

    ours = WanDiT(CFG_B).eval()
    load_diffusers_weights(ours, tmp_path)
    assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())
    # diffusers reads the same hand-written layout, so it is the real sharded format.
    again = from_pretrained(tmp_path)
    x, t, text = inputs(CFG_B, 1, 2, 4, 3)
    assert (ours(x, t, text) - again(x, t, text, return_dict=False)[0]).abs().max().item() < TOL


def test_load_casts_to_model_dtype():
    ref = diffusers_model(CFG_A)
    ours = WanDiT(CFG_A).to(torch.bfloat16)
    load_diffusers_weights(ours, ref.state_dict())
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert torch.equal(ours.proj_out.weight, ref.proj_out.weight.to(torch.bfloat16))


# ---- behaviour beyond parity --------------------------------------------------------------------


def test_init_is_deterministic_and_predicts_zero():
    torch.manual_seed(0)
    a = build_model(CFG_A)
    torch.manual_seed(0)
    b = build_model(CFG_A)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    x, t, text = inputs(CFG_A, 2, 3, 4, 6)
    with torch.no_grad():
        assert torch.count_nonzero(a(x, t, text)) == 0


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = build_model(CFG_B)
    with torch.no_grad():
        model.proj_out.weight.normal_(0, 0.02)  # zero-init head would block gradient to the trunk
    x, t, text = inputs(CFG_B, 2, 2, 4, 3)
    model(x, t, text).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_indivisible_latents_raise():
    model = WanDiT(CFG_A)
    x, t, text = inputs(CFG_A, 1, 3, 5, 4)
    with pytest.raises(ValueError, match="patch_size"):
        model(x, t, text)
