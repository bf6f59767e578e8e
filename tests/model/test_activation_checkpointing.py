"""Activation checkpointing changes memory, not results: a training step with and without it gives
the same loss, gradients, router state and weights, and recomputation counts nothing twice."""

import copy

import pytest
import torch

from megamoe.config import ConfigError, ModelConfig, MoEConfig, load_config
from megamoe.config_checks import validate
from megamoe.model.activation_checkpointing import (
    SavedActivationMeter,
    apply_activation_checkpointing,
    checkpointed_blocks,
)
from megamoe.model.dit import build_model
from megamoe.moe.layer import collect_aux, moe_layers, routers_after_step

MODELS = {
    "dense": dict(num_experts=0),
    # aux-loss-free bias (load counts gathered in forward) + losses whose gradient crosses the checkpoint
    "bias_balancing": dict(
        num_experts=4,
        top_k=2,
        router="linear",
        bias_balancing=True,
        bias_update_rate=0.01,
        num_shared_experts=1,
        balance_loss=0.01,
        z_loss=0.001,
    ),
    # Expert Race: K-th score statistics gathered in forward, the threshold updated after the step
    "expert_race": dict(num_experts=4, top_k=2, router="expert_race", similarity_loss=0.01),
}


def tiny(moe: dict) -> ModelConfig:
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
        moe=MoEConfig(**moe),
    )


def micro_batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 2, 4, 4, generator=gen),
        torch.rand(2, generator=gen) * 1000,
        torch.randn(2, 5, 24, generator=gen),
        torch.randn(2, 4, 2, 4, 4, generator=gen),
    )


def build(name: str, spec: str):
    torch.manual_seed(0)
    model = build_model(tiny(MODELS[name]))
    with torch.no_grad():
        model.proj_out.weight.normal_(0, 0.05)  # the zero-initialised head would give the trunk no gradient
    apply_activation_checkpointing(model, spec)
    return model.train()


def forward_backward_update(model, weights=(("balance", 0.01), ("z", 0.001), ("similarity", 0.01)), record=False):
    """Two accumulated micro-batches, the routers' after-step update and one AdamW step;
    returns everything a step produces or changes."""
    calls = []
    for layer in moe_layers(model):
        layer.record = record
        layer.router.register_forward_hook(lambda *_: calls.append(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, routed, recorded, counts = [], [], [], []
    for seed in (1, 2):
        latents, t, text, target = micro_batch(seed)
        loss = (model(latents, t, text) - target).square().mean()
        aux = collect_aux(model)
        loss = loss + sum(w * aux[n] for n, w in weights if n in aux)
        loss.backward()
        losses.append(loss.detach())
        # Read after backward: a recomputation in backward must not have changed them.
        routed.append(
            {i: {k: v.detach().clone() for k, v in layer.aux.items()} for i, layer in enumerate(moe_layers(model))}
        )
        recorded.append(
            [tuple(t.clone() for t in layer.last_routing[:2]) for layer in moe_layers(model)] if record else []
        )
    for layer in moe_layers(model):  # what the routers gathered in forward for their after-step update
        r = layer.router
        counts.append(r.load_counts if hasattr(r, "load_counts") else (r._kth_sum, r._kth_count))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    routers_after_step(model, lambda x: x)  # one process: the data-parallel sum is the identity
    optimizer.step()
    state = {n: t.clone() for n, t in model.state_dict().items()}
    return dict(
        losses=losses, aux=routed, recorded=recorded, counts=counts, grads=grads, state=state, router_calls=len(calls)
    )


def assert_same(a, b, path="step"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs: max |diff| {(a.float() - b.float()).abs().max()}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a} != {b}"


def test_which_blocks_and_config_key():
    assert checkpointed_blocks("none", 5) == []
    assert checkpointed_blocks("all", 3) == [0, 1, 2]
    assert checkpointed_blocks("every_2", 5) == [0, 2, 4]
    assert checkpointed_blocks("every_1", 2) == [0, 1]
    for bad in ("every_0", "some", "every_x"):
        with pytest.raises(ValueError, match="activation_checkpointing"):
            checkpointed_blocks(bad, 4)
        with pytest.raises(ConfigError, match="train.activation_checkpointing"):
            validate(load_config("configs/tiny.yaml", [f"train.activation_checkpointing={bad}"]))
    validate(load_config("configs/tiny.yaml", ["train.activation_checkpointing=every_3"]))


@pytest.mark.parametrize("spec", ["all", "every_2"])
@pytest.mark.parametrize("name", list(MODELS))
def test_step_is_identical_with_checkpointing(name, spec):
    reference = forward_backward_update(build(name, "none"), record=True)
    checkpointed = forward_backward_update(build(name, spec), record=True)
    if name != "dense":
        # The recomputation really ran (every checkpointed MoE block routed twice per micro-batch)...
        recomputed = len(checkpointed_blocks(spec, 4))
        assert checkpointed["router_calls"] == reference["router_calls"] + 2 * recomputed
        # ...and the routers still counted each micro-batch once.
        assert len(reference["counts"]) == 4 and all(c is not None and c[0] is not None for c in reference["counts"])
    checkpointed.pop("router_calls"), reference.pop("router_calls")
    assert_same(reference, checkpointed)


def test_router_state_after_step_matches_a_closed_form():
    """The aux-free bias moves by exactly rate * sign(mean load - load) from the loads of the two
    micro-batches, counted once each, also when every block is recomputed."""
    model = build("bias_balancing", "all")
    layer = moe_layers(model)[0]
    loads = []
    layer.router.register_forward_hook(lambda module, args, out: loads.append(out.routing_map.sum(0)))
    before = layer.router.expert_bias.clone()
    forward_backward_update(model)
    # Forward hooks run in the recomputation too: keep one load per micro-batch (forward, then its recompute).
    assert len(loads) == 4 and torch.equal(loads[0], loads[1]) and torch.equal(loads[2], loads[3])
    load = (loads[0] + loads[2]).float()
    expected = before + 0.01 * torch.sign(load.mean() - load)
    assert torch.equal(layer.router.expert_bias, expected)


def test_keys_copies_and_inference_unchanged():
    plain, checkpointed = build("bias_balancing", "none"), build("bias_balancing", "all")
    assert list(plain.state_dict()) == list(checkpointed.state_dict())
    assert apply_activation_checkpointing(checkpointed, "all") == [0, 1, 2, 3]  # applying twice is harmless
    twin = copy.deepcopy(checkpointed)
    assert twin.blocks[0].forward.__self__ is twin.blocks[0]  # a copy runs its own blocks
    latents, t, text, _ = micro_batch(3)
    with torch.no_grad():
        assert torch.equal(plain(latents, t, text), checkpointed(latents, t, text))
        assert torch.equal(plain(latents, t, text), twin(latents, t, text))


@pytest.mark.parametrize("name", ["dense", "bias_balancing"])
def test_checkpointing_keeps_less_for_backward(name):
    held = {}
    for spec in ("none", "every_2", "all"):
        model = build(name, spec)
        latents, t, text, _ = micro_batch(1)
        with SavedActivationMeter(model) as meter:
            model(latents, t, text).square().mean()
        held[spec] = meter.bytes
    # Half the blocks keep everything under every_2; with all, a block keeps only its input.
    assert held["all"] < 0.25 * held["none"]
    assert held["all"] < held["every_2"] < 0.7 * held["none"]
