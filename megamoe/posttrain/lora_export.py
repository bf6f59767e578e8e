"""Exports of a LoRA-Mixer fine-tune (megamoe/model/lora_mixer.py): the adapters on their own, and a
dense model with them merged in.

Adapters: one safetensors file holding every router and expert tensor under its model key
(`blocks.3.attn1.lora.to_q.lora_A` [E, r, in], `...lora_B` [E, out, r], `...router.weight` [E, in])
and, in its metadata, the `model.lora` settings they were trained with. `load_adapters` refuses a
file whose settings or keys differ from the model's.

Merged (dense): a per-token top-k mixture cannot be folded into one weight exactly: the update of
a token x is (alpha / r) sum_e g_e(x) B_e A_e x, and g depends on x. The merged export replaces g(x)
by its mean over calibration data, gbar_e = E_x[g_e(x)] (each adapter's own tokens: the video
tokens, or the text for a cross-attention's k and v):

    W_merged = W + (alpha / r) * sum_e gbar_e B_e A_e

so it is exact when every token's gates equal the mean (top_k = E with a router that does not
depend on x), and otherwise the routing-weighted average expert. `prediction_error` measures what
that costs; benchmarks/lora_mixer.py reports it.

    gates = calibrate(model, batches, cfg.diffusion, generator)     # {adapter name: gbar [E]}
    save_adapters(model, "run/lora_mixer.safetensors")
    save_merged(model, gates, "run/merged")                         # diffusers-layout dense model
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megamoe.atomic_files import write_atomic
from megamoe.config import DiffusionConfig, LoRAConfig
from megamoe.diffusion.flow import flow_matching_loss
from megamoe.model.lora_mixer import adapters, is_adapter_key
from megamoe.model.weights import WeightsError, write_diffusers_weights

METADATA_KEY = "megamoe_lora_mixer"
"""safetensors metadata entry holding the JSON of model.lora."""


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors (routers and experts) by model key, detached, on the CPU."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if is_adapter_key(k)}


def save_adapters(model: torch.nn.Module, path: str) -> None:
    """Write the adapters alone to the safetensors file `path` (atomically), with model.lora as metadata."""
    tensors = adapter_state_dict(model)
    if not tensors:
        raise WeightsError("the model has no LoRA-Mixer adapters to export; set model.lora.num_experts > 0")
    meta = {"format": "pt", METADATA_KEY: json.dumps(dataclasses.asdict(model.cfg.lora), sort_keys=True)}
    write_atomic(os.fspath(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


@torch.no_grad()
def load_adapters(model: torch.nn.Module, path: str) -> None:
    """Copy the adapters of `path` (written by save_adapters) into `model`; WeightsError (one line) when
    the file was trained with other model.lora settings or does not hold exactly the model's adapters."""
    with safe_open(os.fspath(path), framework="pt") as f:
        saved = json.loads((f.metadata() or {}).get(METADATA_KEY, "null"))
        mine = dataclasses.asdict(model.cfg.lora)
        if saved != mine:
            diffs = [f"model.lora.{k}={v}" for k, v in (saved or {}).items() if mine.get(k) != v]
            raise WeightsError(
                f"{path} holds LoRA-Mixer adapters of other settings; set {', '.join(diffs) or 'model.lora as trained'}"
            )
        targets = {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}
        if set(f.keys()) != set(targets):
            missing = sorted(set(targets) - set(f.keys()))[:2]
            raise WeightsError(f"{path} does not hold this model's adapters (lacks e.g. {missing}); export them again")
        for key, target in targets.items():
            target.copy_(f.get_tensor(key))


@torch.no_grad()
def calibrate(
    model: torch.nn.Module, batches, diffusion: DiffusionConfig, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """{adapter name: mean gate weights [E] over the tokens of `batches`} (iterable of (latents, text)),
    each batch run at noise levels, noise and text dropout drawn from `generator` as training draws them."""
    found = adapters(model)
    sums = {name: 0.0 for name in found}
    tokens = dict.fromkeys(found, 0)
    for latents, text in batches:
        flow_matching_loss(model, latents, text, diffusion, generator)
        for name, adapter in found.items():
            sums[name] = sums[name] + adapter.stats.gate_sum
            tokens[name] += adapter.stats.tokens
    return {name: sums[name] / tokens[name] for name in found}


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module, gates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base's state dict (no adapter keys) with each adapted projection's weight replaced by
    W + (alpha / r) sum_e gates[name]_e B_e A_e, in W's dtype."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not is_adapter_key(k)}
    for name, adapter in adapters(model).items():
        attention, _, projection = name.rpartition(".lora.")
        key = f"{attention}.{projection}{'.0' if projection == 'to_out' else ''}.weight"
        state[key] = (state[key].float() + adapter.delta_weight(gates[name]).to(state[key].device)).to(state[key].dtype)
    return state


def save_merged(model: torch.nn.Module, gates: dict[str, torch.Tensor], directory: str) -> None:
    """Write the merged dense model as a diffusers-layout directory (config.json + safetensors)."""
    dense = dataclasses.replace(model.cfg, lora=LoRAConfig())
    write_diffusers_weights(merged_state_dict(model, gates), dense, directory)


@torch.no_grad()
def prediction_error(reference, other, batches, diffusion: DiffusionConfig, seed: int) -> float:
    """RMS of other's velocity prediction minus reference's, over `batches`, at the same noise levels,
    noise and text dropout (both runs draw from a generator seeded `seed`)."""
    squares, count = 0.0, 0
    ga, gb = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for latents, text in batches:
        outputs = []
        for model, generator in ((reference, ga), (other, gb)):
            captured = {}
            handle = model.register_forward_hook(lambda _m, _a, out, c=captured: c.setdefault("out", out))
            try:
                flow_matching_loss(model, latents, text, diffusion, generator)
            finally:
                handle.remove()
            outputs.append(captured["out"].float())
        squares += (outputs[1] - outputs[0]).square().sum().item()
        count += outputs[0].numel()
    return (squares / count) ** 0.5
