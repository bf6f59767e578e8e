"""Activation checkpointing of transformer blocks (`train.activation_checkpointing`).

A checkpointed block keeps only its inputs for backward and runs its forward a second time
during backward to rebuild the activations it needs: about one extra forward of compute for
a block's activation memory, which at video sequence lengths is most of the memory.

    apply_activation_checkpointing(model, "every_2")   # blocks 0, 2, 4, ... recompute

It uses `torch.utils.checkpoint` with `use_reentrant=False` (keyword arguments, no
requires-grad input needed, and a check that the recomputation saves the same tensors).

Recomputation must not repeat side effects. Routers and the MoE layer update state in
forward: aux-loss-free load counts, Expert Race's K-th score statistics, the layer's `aux`
dict and diagnostics records. They ask `is_recomputing()` and skip those updates when a
block is being rebuilt in backward, so a step counts each micro-batch exactly once whether
or not its blocks are checkpointed (tests/model/test_activation_checkpointing.py).

Routing replay. A recomputed router must also select what it selected the first time: a router
with randomness that the checkpoint does not restore (its own generator, a collective whose
timing decides a tie) would otherwise send tokens to other experts in backward than in forward,
and the gradients would belong to a routing that never produced the loss. Every checkpoint call
gets its own `RoutingRecord`, shared by its first forward and its recomputation (torch's
`context_fn` makes both contexts at the call): `Router.replay` appends each selection to it in
the first forward and hands them back, in the same order, in the recomputation (megatron-core's
router replay does the same per layer). The record lives as long as that call's autograd graph,
so several forwards before their backwards (in any backward order), a forward that never gets a
backward, or an exception in between cannot pair a recomputation with another forward's
selection, and nothing outlives the graph.
"""

from __future__ import annotations

import re
import threading
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megamoe.config import ConfigError

# Per thread: backward (hence recomputation) may run on an autograd worker thread.
_state = threading.local()


def is_recomputing() -> bool:
    """True while a checkpointed block re-runs its forward inside backward."""
    return getattr(_state, "depth", 0) > 0


def current_routing_record() -> RoutingRecord | None:
    """The record of the checkpointed block running now on this thread (first forward or
    recomputation); None outside checkpointed blocks."""
    return getattr(_state, "record", None)


class RoutingRecord:
    """The selections the routers of one checkpointed block call made, for routing replay.

    `replay(router, selection)`: in the first forward, keeps a detached copy of `selection`
    under `router` and returns it unchanged; in the recomputation, returns the router's
    recorded selections one per call, in the order they were made. Raises RuntimeError when a
    recomputation asks for more selections than its forward made or of another shape.
    """

    def __init__(self):
        self.selections: dict[object, list[torch.Tensor]] = {}
        self.cursors: dict[object, int] = {}
        self.recomputing = False

    def replay(self, router: object, selection: torch.Tensor) -> torch.Tensor:
        if not self.recomputing:
            self.selections.setdefault(router, []).append(selection.detach())
            return selection
        recorded, i = self.selections.get(router, []), self.cursors.get(router, 0)
        if i >= len(recorded) or recorded[i].shape != selection.shape or recorded[i].dtype != selection.dtype:
            got = "none" if i >= len(recorded) else f"{tuple(recorded[i].shape)} {recorded[i].dtype}"
            raise RuntimeError(
                f"routing replay: the recomputation of a checkpointed block asked for selection {i} of "
                f"{type(router).__name__} as {tuple(selection.shape)} {selection.dtype}, its first forward "
                f"recorded {got}; a router must call replay() in the same order with the same shapes"
            )
        self.cursors[router] = i + 1
        return recorded[i]


class _RecordContext:
    """Installs `record` on this thread for the first forward (`recompute=False`) or the
    recomputation of one checkpoint call. Re-enterable: a graph kept with retain_graph=True
    recomputes once per backward, each time replaying from the first selection."""

    def __init__(self, record: RoutingRecord, recompute: bool):
        self.record, self.recompute = record, recompute

    def __enter__(self):
        self.outer = current_routing_record(), self.record.recomputing
        _state.record = self.record
        if self.recompute:
            self.record.recomputing = True
            self.record.cursors = {}
            _state.depth = getattr(_state, "depth", 0) + 1
        return self

    def __exit__(self, *exc):
        if self.recompute:
            _state.depth -= 1
        _state.record, self.record.recomputing = self.outer[0], self.outer[1]


def _contexts():
    # torch.utils.checkpoint's context_fn, called once per checkpoint call: (context of the first
    # forward, context of the recomputation), sharing that call's routing record.
    record = RoutingRecord()
    return _RecordContext(record, recompute=False), _RecordContext(record, recompute=True)


def checkpointed_blocks(spec: str, num_blocks: int) -> list[int]:
    """Block indices that `spec` ('none', 'all', 'every_<n>') checkpoints, out of `num_blocks`.

    The one parser of `train.activation_checkpointing`: config validation calls it too.
    Raises ConfigError (a ValueError) naming the key.
    """
    spec = str(spec).strip()
    if spec == "none":
        return []
    if spec == "all":
        return list(range(num_blocks))
    every = re.fullmatch(r"every_([1-9][0-9]*)", spec)
    if every is None:
        raise ConfigError(
            f"train.activation_checkpointing='{spec}' must be 'none', 'all' or 'every_<n>' (n >= 1, e.g. every_2)"
        )
    return list(range(0, num_blocks, int(every.group(1))))


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    forward = type(self).forward
    if not torch.is_grad_enabled():  # inference: nothing is kept for backward anyway
        return forward(self, *args, **kwargs)
    meter = SavedActivationMeter._active
    if meter is not None:  # the checkpoint keeps its inputs alive until backward
        for tensor in _tensors_in((args, kwargs)):
            meter.add(tensor)
    return checkpoint(forward, self, *args, use_reentrant=False, context_fn=_contexts, **kwargs)


def apply_activation_checkpointing(model: nn.Module, spec: str) -> list[int]:
    """Make the chosen blocks of `model.blocks` recompute in backward; returns their indices.

    The blocks stay where they are (an instance-level `forward` is set, not a wrapper module),
    so parameter names, state dicts and checkpoints are unchanged, and whatever is applied to
    the blocks afterwards (expert, tensor, context parallelism) runs inside the checkpoint.
    Applying twice is harmless.
    """
    chosen = checkpointed_blocks(spec, len(model.blocks))
    for i in chosen:
        block = model.blocks[i]
        if not getattr(block, "activation_checkpointed", False):
            # A bound method (not a closure), so copy.deepcopy rebinds it to the copied block.
            block.forward = types.MethodType(_checkpointed_forward, block)
            block.activation_checkpointed = True
    return chosen


class SavedActivationMeter:
    """Bytes that a forward keeps alive for backward: what autograd saves, plus the inputs a
    checkpointed block holds for its recomputation. Each storage is counted once, parameters
    never (they are weights, not activations). For tests and benchmarks/activation_memory.py:

        with SavedActivationMeter(model) as meter:
            loss = model(...).square().mean()
        meter.bytes
    """

    _active: SavedActivationMeter | None = None

    def __init__(self, model: nn.Module | None = None):
        self._skip = {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._skip and storage.device.type != "meta":
            self._seen[storage.data_ptr()] = storage.nbytes()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.add(tensor)
        return tensor

    def __enter__(self) -> SavedActivationMeter:
        SavedActivationMeter._active = self
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        SavedActivationMeter._active = None


def _tensors_in(value):
    """The tensors in a block's arguments: tensors, tuples/lists of them, dataclass-like objects."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            yield from _tensors_in(getattr(value, name))
