"""LoRA-Mixer routed adapters (megamoe/model/lora_mixer.py) and their exports (posttrain/lora_export.py):
the identity at zero up-projections, the routing against a naive loop, the routing losses against
closed forms, the FLOP count against torch's counter, freezing, training, exports and loading."""

import dataclasses
import math
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megamoe.config import Config, ConfigError, DiffusionConfig, LoRAConfig, ModelConfig, ParallelConfig, load_config
from megamoe.config_checks import validate
from megamoe.diffusion.flow import flow_matching_loss
from megamoe.model.dit import NoSequenceSharding, build_model, count_parameters
from megamoe.model.lora_mixer import (
    RoutedLoRA,
    adapter_flops,
    adapters,
    flops_per_token,
    is_adapter_key,
    routing_losses,
    trainable_parameters,
)
from megamoe.model.weights import WeightsError, load_diffusers_weights, save_diffusers_weights
from megamoe.posttrain import lora_export

BASE = ModelConfig(
    dim=32, num_layers=2, num_heads=4, ffn_dim=64, in_channels=4, out_channels=4, text_dim=24, freq_dim=16,
    rope_max_seq_len=32,
)  # fmt: skip
LORA = LoRAConfig(num_experts=4, rank=3, alpha=6.0, top_k=2)
ADAPTED = dataclasses.replace(BASE, lora=LORA)


def inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 2, 8, 8, generator=g)
    return latents, torch.rand(batch, generator=g) * 1000, torch.randn(batch, 5, 24, generator=g)


def pretrained(cfg, seed=0):
    """A model standing in for a trained base: its zero-initialised head made non-zero, so that the
    adapters' output reaches the prediction."""
    model = build_model(cfg, seed=seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(99)
        model.proj_out.weight.copy_(torch.randn(model.proj_out.weight.shape, generator=g) * 0.1)
    return model


def test_zero_up_projections_equal_the_base_bit_for_bit():
    base, adapted = pretrained(BASE), pretrained(ADAPTED)
    assert all(torch.equal(adapted.state_dict()[k], v) for k, v in base.state_dict().items())  # same base draws
    assert all(not a.lora_B.any() and a.lora_A.abs().sum() > 0 for a in adapters(adapted).values())
    assert len(adapters(adapted)) == BASE.num_layers * 2 * 4
    latents, t, text = inputs()
    assert torch.equal(adapted(latents, t, text), base(latents, t, text))


def naive_update(adapter: RoutedLoRA, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax, the top_k experts by sorting, their renormalised weights, the sum of
    (alpha / r) g_e B_e (A_e x)."""
    out = []
    for token in x:
        logits = [sum(w * v for w, v in zip(row.tolist(), token.tolist())) for row in adapter.router.weight]
        z = sum(math.exp(v) for v in logits)
        probs = [math.exp(v) / z for v in logits]
        chosen = sorted(range(len(probs)), key=lambda e: -probs[e])[: adapter.top_k]
        norm = sum(probs[e] for e in chosen) if adapter.top_k > 1 else 1.0  # top-1 keeps p (Switch)
        y = torch.zeros(adapter.lora_B.shape[1], dtype=torch.float64)
        for e in chosen:
            y += probs[e] / norm * adapter.scaling * (adapter.lora_B[e].double() @ (adapter.lora_A[e].double() @ token))
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_hard_soft_top_k_routing_equals_a_naive_loop(top_k):
    torch.manual_seed(0)
    adapter = RoutedLoRA(6, 5, dataclasses.replace(LORA, top_k=top_k))
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    got = adapter.double()(x)
    assert got.shape == (2, 7, 5)
    torch.testing.assert_close(got.reshape(-1, 5), naive_update(adapter, x.reshape(-1, 6)), rtol=1e-10, atol=1e-10)
    # Soft: the router learns from the update through the selected experts' weights, top-1 included.
    got.square().sum().backward()
    assert adapter.router.weight.grad.abs().min() > 0


def test_routing_losses_equal_their_closed_forms():
    """One-hot tokens through a router whose weight is c * identity: a token of class j has logits
    c * e_j, so p_j = a = e^c / (e^c + E - 1) and every other p = b = 1 / (e^c + E - 1); top-1 picks j.
    With n_j tokens of class j out of N: load_j = n_j / N, P_e = (n_e a + (N - n_e) b) / N,
    balance = E sum_j load_j P_j, entropy = -(a ln a + (E - 1) b ln b)."""
    e, c, counts = 4, 1.5, [5, 2, 1, 0]
    adapter = RoutedLoRA(e, 3, dataclasses.replace(LORA, num_experts=e, top_k=1))
    with torch.no_grad():
        adapter.router.weight.copy_(c * torch.eye(e))
    x = torch.cat([torch.eye(e)[j].expand(n, e) for j, n in enumerate(counts)])
    holder = torch.nn.Module()
    holder.adapter, holder.sequence_sharding = adapter, NoSequenceSharding()
    adapter(x)
    losses = routing_losses(holder)
    n, a = sum(counts), math.exp(c) / (math.exp(c) + e - 1)
    b = 1 / (math.exp(c) + e - 1)
    balance = e * sum(nj / n * (nj * a + (n - nj) * b) / n for nj in counts)
    entropy = -(a * math.log(a) + (e - 1) * b * math.log(b))
    assert losses["lora_balance"].item() == pytest.approx(balance, rel=1e-6)
    assert losses["lora_entropy"].item() == pytest.approx(entropy, rel=1e-6)
    assert routing_losses(holder) == {}  # read once: an adapter that does not run again is not counted again
    # Uniform routing (zero router): balance 1 and entropy ln E, the two ends of the scale.
    with torch.no_grad():
        adapter.router.weight.zero_()
    adapter(torch.randn(16, e))
    losses = routing_losses(holder)
    assert losses["lora_balance"].item() == pytest.approx(1.0, rel=1e-6)
    assert losses["lora_entropy"].item() == pytest.approx(math.log(e), rel=1e-6)


def test_flop_count_equals_torchs_counter():
    """adapter_flops against FlopCounterMode on one adapter, and flops_per_token against the counted
    difference of a whole forward with and without adapters (cross-attention's k and v on the text)."""
    adapter = RoutedLoRA(32, 32, LORA)
    with FlopCounterMode(display=False) as counter:
        adapter(torch.randn(3, 7, 32))
    assert counter.get_total_flops() == adapter_flops(21, 32, 32, LORA)
    latents, t, text = inputs()
    counted = []
    for cfg in (BASE, ADAPTED):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            build_model(cfg)(latents, t, text)
        counted.append(counter.get_total_flops())
    tokens = 2 * 4 * 4  # per sample: 2 x 8 x 8 latents in (1, 2, 2) patches
    assert counted[1] - counted[0] == pytest.approx(2 * tokens * flops_per_token(32, 2, tokens, 5, LORA), rel=1e-12)


def test_only_the_adapters_train_and_the_loss_falls():
    """Thirty AdamW steps on one fixed batch through the parameters that require gradients: the flow
    loss falls, every base weight is bit-equal to its start, every adapter tensor moved."""
    model = pretrained(ADAPTED)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trainable_parameters(model) == sum(p.numel() for a in adapters(model).values() for p in a.parameters())
    optimizer = torch.optim.AdamW(trained, lr=3e-3)
    latents, _, text = inputs()
    losses = []
    for _ in range(30):
        loss, _ = flow_matching_loss(model, latents, text, DiffusionConfig(text_dropout=0.0), torch.Generator())
        optimizer.zero_grad()
        (loss + 0.01 * routing_losses(model)["lora_balance"]).backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    for key, value in model.state_dict().items():
        assert torch.equal(value, start[key]) != is_adapter_key(key), key


def test_5b_config_builds_on_meta_and_trains_two_percent():
    cfg = load_config("configs/wan2.2_ti2v_5b_lora_mixer.yaml", ["train.init_from=/weights/Wan2.2-TI2V-5B/transformer"])
    validate(cfg)
    model = build_model(cfg.model, device="meta")
    base = count_parameters(build_model(dataclasses.replace(cfg.model, lora=LoRAConfig()), device="meta"))
    lora, d = cfg.model.lora, cfg.model.dim
    per_adapter = lora.num_experts * (d + 2 * lora.rank * d)  # router, A, B
    expected = cfg.model.num_layers * 2 * len(lora.targets) * per_adapter
    assert trainable_parameters(model) == expected == count_parameters(model) - base
    print(f"5B LoRA-Mixer: {expected:,} trainable of {count_parameters(model):,} ({expected / base:.2%} of the base)")
    assert abs(base - 5.0e9) / 5.0e9 < 0.01 and expected / base < 0.03


def test_adapters_export_alone_and_load_back(tmp_path):
    model = pretrained(ADAPTED)
    with torch.no_grad():
        for a in adapters(model).values():
            a.lora_B.normal_()
    path = tmp_path / "adapters.safetensors"
    lora_export.save_adapters(model, path)
    other = build_model(ADAPTED, seed=5)
    lora_export.load_adapters(other, path)
    theirs = other.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(theirs[key], value) == is_adapter_key(key) or not is_adapter_key(key), key
    wrong = build_model(dataclasses.replace(BASE, lora=dataclasses.replace(LORA, rank=2)))
    with pytest.raises(WeightsError, match="model.lora.rank=3"):
        lora_export.load_adapters(wrong, path)


def test_merged_export_is_exact_where_the_routing_is_constant(tmp_path):
    """top_k = E and a zero router give every token the gates 1/E: the fold is exact, and the merged
    dense model (written, then loaded into the plain architecture) predicts what the adapted one does."""
    cfg = dataclasses.replace(BASE, lora=dataclasses.replace(LORA, top_k=LORA.num_experts))
    model = pretrained(cfg)
    with torch.no_grad():
        for a in adapters(model).values():
            a.lora_B.normal_(std=0.1)
            a.router.weight.zero_()
    batches = [inputs(seed)[::2] for seed in range(2)]
    gates = lora_export.calibrate(model, batches, DiffusionConfig(), torch.Generator().manual_seed(0))
    assert all(torch.allclose(g, torch.full((4,), 0.25)) for g in gates.values())
    lora_export.save_merged(model, gates, tmp_path / "merged")
    dense = build_model(BASE, initialize=False)
    load_diffusers_weights(dense, str(tmp_path / "merged"))
    base = pretrained(BASE)
    diffusion = DiffusionConfig()
    assert lora_export.prediction_error(model, dense, batches, diffusion, seed=1) < 1e-5
    assert lora_export.prediction_error(model, base, batches, diffusion, seed=1) > 1e-2  # the adapters matter


def test_init_from_a_dense_base_draws_the_adapters_as_the_seed_does(tmp_path):
    from megamoe.parallel.sharded_weights import init_from

    save_diffusers_weights(pretrained(BASE), str(tmp_path / "base"))
    model = build_model(ADAPTED, initialize=False)
    assert "adapters drawn from seed 3" in init_from(model, str(tmp_path / "base"), seed=3)
    fresh, base = build_model(ADAPTED, seed=3), pretrained(BASE)
    for key, value in model.state_dict().items():
        assert torch.equal(value, (fresh if is_adapter_key(key) else base).state_dict()[key]), key


@pytest.mark.parametrize(
    "lora, parallel, message",
    [
        (LoRAConfig(rank=4), {}, "model.lora.rank=4 has no effect without adapters"),
        (dataclasses.replace(LORA, top_k=5), {}, "model.lora.top_k=5 must be in 1..model.lora.num_experts=4"),
        (dataclasses.replace(LORA, targets=["q", "x"]), {}, "must name distinct projections among q, k, v, o"),
        (LORA, {"tensor_parallel_size": 2}, "does not support parallel.tensor_parallel_size=2"),
        (LORA, {}, "LoRA-Mixer fine-tunes a frozen base: set train.init_from to its weights"),
        (dataclasses.replace(LORA, rank=33), {}, "model.lora.rank=33 exceeds the width of the attention projections"),
    ],
)
def test_config_checks(lora, parallel, message):
    cfg = Config(model=dataclasses.replace(BASE, lora=lora), parallel=ParallelConfig(**parallel))
    if "init_from" not in message:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from="/weights/base"))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate(cfg, world_size=2 if parallel else 1)
    if "rank=33" in message:  # a rank of the full width is still a (pointless but valid) choice
        validate(dataclasses.replace(cfg, model=dataclasses.replace(BASE, lora=dataclasses.replace(LORA, rank=32))))
    if "init_from" in message:
        validate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from="/weights/base")))


def test_export_api_refuses_bad_input_in_one_line(tmp_path):
    """Each bad input gets a ValueError (WeightsError is one) naming the problem and the fix, not a raw
    FileNotFoundError, KeyError or ZeroDivisionError, and not a silent copy of a model without adapters."""
    model, dense = pretrained(ADAPTED), pretrained(BASE)
    path, plain = tmp_path / "adapters.safetensors", tmp_path / "plain"
    lora_export.save_adapters(model, path)
    save_diffusers_weights(dense, str(plain))
    one_block = build_model(dataclasses.replace(ADAPTED, num_layers=1))
    lora_export.save_adapters(one_block, tmp_path / "one_block.safetensors")
    three_blocks = build_model(dataclasses.replace(ADAPTED, num_layers=3))
    cases = [
        (lambda: lora_export.load_adapters(model, tmp_path / "none.safetensors"), "no such adapters file"),
        (
            lambda: lora_export.load_adapters(model, next(plain.glob("*.safetensors"))),
            "holds no LoRA-Mixer adapters (no megamoe_lora_mixer metadata)",
        ),
        (lambda: lora_export.load_adapters(one_block, path), "has adapters the model lacks, e.g. ['blocks.1."),
        (lambda: lora_export.load_adapters(three_blocks, path), "lacks e.g. ['blocks.2."),
        (lambda: lora_export.load_adapters(dense, path), "the model has no LoRA-Mixer adapters to load into"),
        (lambda: lora_export.calibrate(model, [], DiffusionConfig(), torch.Generator()), "it got none"),
        (lambda: lora_export.save_merged(model, {}, tmp_path / "m1"), "gates lack 16 of the model's 16 adapters"),
        (lambda: lora_export.save_merged(dense, {}, tmp_path / "m2"), "no LoRA-Mixer adapters to merge"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)) as caught:
            call()
        assert len(str(caught.value).splitlines()) == 1
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()
