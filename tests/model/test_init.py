"""Initialisation as a function of (seed, name, position): the generator, the distributions, and
blocks of a tensor drawn on their own (what a tensor- or expert-parallel rank draws)."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from megamoe.config import ModelConfig, MoEConfig
from megamoe.model import init as model_init
from megamoe.model.dit import WanDiT, build_model
from megamoe.model.init import Init, draw_, philox4x32

MOE = ModelConfig(
    dim=64,
    num_layers=2,
    num_heads=4,
    ffn_dim=128,
    in_channels=4,
    out_channels=4,
    text_dim=24,
    freq_dim=16,
    rope_max_seq_len=32,
    moe=MoEConfig(
        num_experts=4, layers="every_other", top_k=2, num_shared_experts=1, bias_balancing=True, layer_reg_loss=0.1
    ),
)


def test_philox_matches_random123_known_answers():
    """Random123's published known-answer vectors for Philox4x32-10 (Salmon et al. 2011)."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in cases:
        assert tuple(int(w) for w in philox4x32(counter, key)) == expected
    # Vectorised: each element of a tensor counter is the scalar result.
    counters = torch.tensor([0, 0xFFFFFFFF, 0x243F6A88])
    words = philox4x32((counters, counters, counters, counters), (7, 9))
    for i, c in enumerate(counters.tolist()):
        assert tuple(int(w[i]) for w in words) == tuple(int(w) for w in philox4x32((c,) * 4, (7, 9)))


@pytest.mark.parametrize(
    "shape, dim, count, init",
    [
        ((12, 10), 0, 3, Init.xavier_uniform(3, 5)),
        ((12, 10), 1, 2, Init.normal(0.5)),
        ((4, 6, 10), 2, 5, Init.xavier_uniform(3, 5)),
        ((5, 3, 2, 6), 1, 3, Init.normal(0.5)),
    ],
)
def test_a_block_drawn_alone_is_that_block_of_the_full_tensor(monkeypatch, shape, dim, count, init):
    """Reference: the whole tensor drawn in one piece; chunks of 13 elements cross rows and Philox blocks."""
    monkeypatch.setattr(model_init, "_chunk_elements", lambda device: 13)
    full = torch.empty(shape)
    draw_(full, init, 3, "w", None)
    for index, expected in enumerate(full.chunk(count, dim)):
        block = torch.empty(expected.shape)
        draw_(block, init, 3, "w", (dim, index, count))
        assert torch.equal(block, expected), index
    other = torch.empty(shape)
    draw_(other, init, 4, "w", None)  # another seed, other values
    assert not torch.equal(other, full)


def reference_init(model: WanDiT) -> None:
    """The from-scratch initialisation as the model did it with torch.nn.init before it was declared
    per module: the reference for which distribution each parameter has."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            if hasattr(m, "w1"):  # GroupedExperts: per-expert Xavier, zero biases
                for e in range(m.num_experts):
                    nn.init.xavier_uniform_(m.w1[e])
                    nn.init.xavier_uniform_(m.w2[e])
                nn.init.zeros_(m.b1)
                nn.init.zeros_(m.b2)
            if hasattr(m, "scale_shift_table"):
                m.scale_shift_table.normal_(0, model.cfg.dim**-0.5)
            if hasattr(m, "prototypes"):
                m.prototypes.normal_(0, 0.02)
                m.log_scale.fill_(math.log(10.0))
        nn.init.xavier_uniform_(model.patch_embedding.weight.view(model.cfg.dim, -1))
        nn.init.zeros_(model.patch_embedding.bias)
        for m in model.condition_embedder.modules():
            if isinstance(m, nn.Linear) and m is not model.condition_embedder.time_proj:
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(model.proj_out.weight)
        nn.init.zeros_(model.proj_out.bias)


@pytest.mark.parametrize("router", ["linear", "promoe"])
def test_every_parameter_keeps_its_distribution(router):
    """Against the reference above: the same constants where it has constants; elsewhere the same
    standard deviation, mean zero and, for tensors large enough to tell, the same family (kurtosis
    1.8 for a uniform, 3 for a normal), within sampling error."""
    cfg = dataclasses.replace(MOE, moe=dataclasses.replace(MOE.moe, router=router, bias_balancing=router == "linear"))
    ours = build_model(cfg, seed=11)
    torch.manual_seed(0)
    ref = WanDiT(cfg)
    for m in ref.modules():  # norms as their constructors leave them
        if isinstance(m, (nn.RMSNorm, nn.LayerNorm)):
            m.reset_parameters()
    reference_init(ref)
    reference = dict(ref.named_parameters())
    assert list(reference) == [name for name, _ in ours.named_parameters()]
    for name, value in ours.named_parameters():
        expected = reference[name].detach()
        if expected.unique().numel() == 1:
            assert torch.equal(value, expected), name
            continue
        n, std = value.numel(), expected.std()
        assert abs(value.std() - std) < 6 * std / math.sqrt(n), (name, value.std().item(), std.item())
        assert abs(value.mean()) < 6 * std / math.sqrt(n), name
        if n >= 2000:
            assert abs(kurtosis(value) - kurtosis(expected)) < 0.5, (name, kurtosis(value), kurtosis(expected))


def kurtosis(x: torch.Tensor) -> float:
    x = x.detach().double().flatten()
    return ((x - x.mean()) ** 4).mean().item() / x.var(unbiased=False).item() ** 2


def test_build_is_a_function_of_the_seed_only():
    torch.manual_seed(0)
    a = build_model(MOE, seed=5)
    torch.manual_seed(1)  # the global RNG plays no part
    b = build_model(MOE, seed=5)
    c = build_model(MOE, seed=6)
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name
    drawn = [n for n, v in a.named_parameters() if v.unique().numel() > 1]
    assert drawn and all(not torch.equal(a.state_dict()[n], c.state_dict()[n]) for n in drawn)
    assert a.blocks[1].ffn.router.expert_bias.device.type == "cpu"


def test_buffers_are_computed_on_the_device_after_a_meta_build():
    """Reference: each buffer's closed form at the start of training."""
    race = dataclasses.replace(MOE.moe, router="expert_race", bias_balancing=False, layer_reg_loss=0.0)
    promoe = dataclasses.replace(race, router="promoe", num_experts=3, num_prototypes_per_expert=2)
    buffers = dict(build_model(MOE).named_buffers())
    assert list(buffers) == ["blocks.1.ffn.router.expert_bias", "blocks.1.ffn.router.bias_update_count"]
    assert torch.equal(buffers["blocks.1.ffn.router.expert_bias"], torch.zeros(4))  # aux-free bias: none yet
    assert buffers["blocks.1.ffn.router.bias_update_count"].item() == 0  # the step-size schedule's t
    buffers = dict(build_model(dataclasses.replace(MOE, moe=race)).named_buffers())
    assert buffers["blocks.1.ffn.router.threshold"].item() == 0  # no threshold learnt yet
    assert not buffers["blocks.1.ffn.router.threshold_initialized"].item()
    ssr = dataclasses.replace(race, router="selective_sinkhorn")
    assert build_model(dataclasses.replace(MOE, moe=ssr)).blocks[1].ffn.router.coin_step.item() == 0  # step 0's coin
    diffmoe = dataclasses.replace(race, router="diffmoe", capacity_loss=0.01)
    buffers = dict(build_model(dataclasses.replace(MOE, moe=diffmoe)).named_buffers())
    assert torch.equal(buffers["blocks.1.ffn.router.threshold"], torch.zeros(4))  # per expert, none learnt yet
    assert not buffers["blocks.1.ffn.router.threshold_initialized"].item()
    for builder in (build_model, WanDiT):  # non-persistent: computed also by the plain constructor
        router = builder(dataclasses.replace(MOE, moe=promoe)).blocks[1].ffn.router
        assert torch.equal(router.prototype_expert, torch.tensor([0, 0, 1, 1]))  # expert of each prototype


def test_a_parameter_without_a_rule_or_a_buffer_without_reset_is_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.empty(3))

    with pytest.raises(ValueError, match=r"no initialisation rule for parameter\(s\) \['scale'\]"):
        model_init.inits_of(Odd())

    class Buffered(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.zeros(3))

    with torch.device("meta"):
        module = Buffered()
    with pytest.raises(TypeError, match="holds buffers \\['table'\\] but no reset_buffers"):
        model_init.materialize(module, {}, "cpu", 0)
