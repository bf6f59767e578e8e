"""Routing replay: a checkpointed block's recomputation routes exactly as its first forward did.

The reference is the same model without checkpointing. A router whose selection draws noise from
its own generator (which torch.utils.checkpoint does not restore) must give identical outputs and
gradients either way; without replay the recomputation picks other experts and it does not.
"""

import gc
import weakref

import pytest
import torch

from megamoe.model import activation_checkpointing
from megamoe.model.activation_checkpointing import (
    RoutingRecord,
    _RecordContext,
    apply_activation_checkpointing,
    current_routing_record,
)
from megamoe.model.dit import build_model
from megamoe.moe.layer import moe_layers
from megamoe.moe.routers import ROUTERS, RouterOutput
from megamoe.moe.routers.base import Router
from megamoe.moe.routers.token_choice import LinearRouter, select_top_k
from tests.model.test_activation_checkpointing import micro_batch, tiny
from tests.moe.test_layer_reference import DIM, B, L, make_cfg, make_context

NOISY_MOE = dict(num_experts=4, top_k=2, router="linear", num_shared_experts=1)


class NoisyLinearRouter(LinearRouter):
    """Linear gate whose selection adds N(0, 1) noise from the router's own generator (an exploration
    router): the combine weights stay the clean scores, so only the selection is random."""

    def __init__(self, dim, cfg):
        super().__init__(dim, cfg)
        self.noise = torch.Generator().manual_seed(0)

    def route(self, tokens, ctx):
        logits = self.logits(tokens, ctx)
        noise = torch.randn(logits.shape, generator=self.noise)
        probs, routing_map, _, picked = select_top_k(logits, self.cfg, noise, self.replay)
        return RouterOutput(probs, routing_map, {}, topk_indices=picked)


def noisy_model(spec: str):
    torch.manual_seed(0)
    model = build_model(tiny(NOISY_MOE))
    with torch.no_grad():
        model.proj_out.weight.normal_(0, 0.05)  # the zero-initialised head would give the trunk no gradient
    for layer in moe_layers(model):
        noisy = NoisyLinearRouter(layer.router.dim, layer.router.cfg)
        noisy.load_state_dict(layer.router.state_dict())
        layer.router = noisy
    apply_activation_checkpointing(model, spec)
    return model.train()


def loss_of(model, seed: int) -> torch.Tensor:
    # Both models draw the same noise in each micro-batch's forward; a recomputation in backward
    # draws the generator on from there, i.e. other noise, unless replay gives it the first selection.
    for layer in moe_layers(model):
        layer.router.noise.manual_seed(seed)
    latents, t, text, target = micro_batch(seed)
    return (model(latents, t, text) - target).square().mean()


def accumulate(model, together: bool = False):
    """Two micro-batches' losses and the accumulated gradients: forward/backward per micro-batch,
    or (together) both forwards first and one backward of their sum."""
    losses = [loss_of(model, seed) for seed in (1, 2)] if together else []
    if together:
        sum(losses).backward()
    else:
        for seed in (1, 2):
            losses.append(loss_of(model, seed))
            losses[-1].backward()
    return [x.detach() for x in losses], {n: p.grad.clone() for n, p in model.named_parameters()}


def grads_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("together", [False, True], ids=["fwd_bwd_per_micro_batch", "two_forwards_one_backward"])
def test_noisy_router_same_step_with_and_without_checkpointing(together):
    # Two forwards before one backward: autograd recomputes the second forward's blocks first,
    # so a replay that paired records first-in-first-out would hand each the other's selection.
    plain_losses, plain_grads = accumulate(noisy_model("none"), together)
    ckpt_losses, ckpt_grads = accumulate(noisy_model("all"), together)
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, ckpt_losses))
    for name in plain_grads:
        assert torch.equal(plain_grads[name], ckpt_grads[name]), name


def test_without_replay_the_recomputation_routes_elsewhere(monkeypatch):
    # The test above has teeth: with replay the identity, the checkpointed gradients are another routing's.
    _, plain_grads = accumulate(noisy_model("none"))
    monkeypatch.setattr(Router, "replay", lambda self, selection: selection)
    try:
        _, ckpt_grads = accumulate(noisy_model("all"))
    except torch.utils.checkpoint.CheckpointError:
        return  # torch noticed that the recomputation saved other tensors: also a failure
    assert not grads_equal(plain_grads, ckpt_grads)


def test_records_live_only_until_backward_or_the_graph_goes(monkeypatch):
    made = []

    class Tracked(RoutingRecord):
        def __init__(self):
            super().__init__()
            made.append(weakref.ref(self))

    monkeypatch.setattr(activation_checkpointing, "RoutingRecord", Tracked)
    model = noisy_model("all")
    loss = loss_of(model, 1)
    assert len(made) == 4  # one per checkpointed block; each MoE block's holds its router's selection
    assert sum(len(r().selections) for r in made) == len(moe_layers(model))
    del loss  # no backward (an exception, an evaluation with grad enabled): the graph goes, and its records
    gc.collect()
    assert all(r() is None for r in made)
    loss = loss_of(model, 2)
    loss.backward()  # backward frees what the checkpoints kept, records included, though the loss lives on
    gc.collect()
    assert len(made) == 8 and all(r() is None for r in made)


def test_identity_outside_checkpointing_and_in_eval():
    router = NoisyLinearRouter(DIM, make_cfg("linear"))
    picked = torch.tensor([[0, 1]])
    assert current_routing_record() is None and router.replay(picked) is picked
    record = RoutingRecord()
    with _RecordContext(record, recompute=False):
        router.eval()
        assert router.replay(picked) is picked
    assert not record.selections


def test_a_recomputation_that_asks_for_another_selection_is_refused():
    router = NoisyLinearRouter(DIM, make_cfg("linear"))
    record = RoutingRecord()
    with _RecordContext(record, recompute=False):
        router.replay(torch.zeros(3, 2, dtype=torch.long))
    with _RecordContext(record, recompute=True), pytest.raises(RuntimeError, match="routing replay"):
        router.replay(torch.zeros(4, 2, dtype=torch.long))
    with _RecordContext(record, recompute=True), pytest.raises(RuntimeError, match="recorded none"):
        router.replay(torch.zeros(3, 2, dtype=torch.long))
        router.replay(torch.zeros(3, 2, dtype=torch.long))  # a second call its forward never made


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_derives_its_routing_from_the_replayed_selection(name):
    """Record a forward on tokens a, then 'recompute' on other tokens b: the routing (map, and
    where the combine weights are non-zero) must be a's, since it comes from what replay returns."""
    gen = torch.Generator().manual_seed(0)
    router = ROUTERS[name](DIM, make_cfg(name)).train()
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(generator=gen)
    ctx = make_context(gen)
    a, b = torch.randn(B * L, DIM, generator=gen), torch.randn(B * L, DIM, generator=gen)
    record = RoutingRecord()
    with _RecordContext(record, recompute=False):
        first = router(a, ctx)
    assert record.selections, f"{name} never calls self.replay(selection)"
    with _RecordContext(record, recompute=True):
        again = router(b, ctx)
    assert torch.equal(again.routing_map, first.routing_map)
    assert torch.equal(again.probs != 0, first.probs != 0)
    if first.topk_indices is not None:
        assert torch.equal(again.topk_indices, first.topk_indices)
