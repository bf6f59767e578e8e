"""Routing statistics of a trained MoE model on calibration data: what the post-training tools decide from.

For each MoE layer (block index b), over the calibration tokens, for the E experts the layer holds
and computes (a merged layer's: after its router columns are folded onto them):

    counts        [E]     float64  tokens that computed expert e (routing frequency, MC-SMoE / MC#)
    weight_sums   [E]     float64  sum of the combine weights expert e received (importance, MC#)
    coactivation  [E, E]  float64  tokens that computed both i and j (diagonal: counts; Speculative
                                   MoE's expert grouping)
    inputs        [T, dim] float32 a fixed sample of T tokens as the layer received them (calibration
                                   inputs for output-space errors)
    routing_map   [T, E]  bool     the experts each sampled token computed
    router_logits [T, R]  float32  the router's scores of the sampled tokens, over its R columns (R = E
                                   unless merged: model.moe.merged_from); MC-SMoE groups experts by the
                                   similarity of these columns; the routing weights for routers without
                                   a logit layer
    experts_per_token      float   real experts the layer computed per token, on average

Null experts (AdaMoE) are left out: they cost nothing and hold no weights.

Saved as one safetensors file whose metadata carries a fingerprint of the model (shapes, router
kind and a digest of every router weight), so statistics are never applied to another model:
`load_routing_stats` raises PostTrainError naming the first difference.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megamoe.config import Config
from megamoe.diffusion.flow import TIMESTEP_SCALE, interpolate
from megamoe.error_messages import describe
from megamoe.posttrain.trained_model import PostTrainError

FIELDS = ("counts", "weight_sums", "coactivation", "router_logits", "inputs", "routing_map")


@dataclass
class LayerStats:
    counts: torch.Tensor
    weight_sums: torch.Tensor
    coactivation: torch.Tensor
    router_logits: torch.Tensor
    inputs: torch.Tensor
    routing_map: torch.Tensor
    experts_per_token: float = 0.0
    num_tokens: int = 0


@dataclass
class RoutingStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)
    """By block index, in order."""
    fingerprint: dict = field(default_factory=dict)
    num_tokens: int = 0
    """Calibration tokens per layer."""


def model_fingerprint(model: torch.nn.Module) -> dict:
    """What identifies a trained MoE model for its statistics: the MoE layout and a digest of its routers."""
    from megamoe.moe.layer import MoEFeedForward

    digest = hashlib.sha256()
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, MoEFeedForward):
            layers.append(name)
            for key, tensor in sorted(module.router.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    moe = model.cfg.moe
    return {
        "dim": model.cfg.dim,
        "num_layers": model.cfg.num_layers,
        "moe_layers": layers,
        "num_experts": moe.num_experts,
        "router": moe.router,
        "routers_sha256": digest.hexdigest()[:16],
    }


def _block_index(name: str) -> int:
    return int(name.split(".")[1])  # "blocks.3.ffn"


@torch.no_grad()
def collect_routing_stats(
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: Config,
    sample_tokens: int = 4096,
    noise_level: float | None = None,
    seed: int = 0,
) -> RoutingStats:
    """Run `model` (eval, no grad) over calibration `batches` and gather each MoE layer's statistics.

    Each batch is noised as in training: at noise level `noise_level` when given, else at levels
    spread evenly over (0, 1) across the batch's samples, with noise from `seed` (deterministic).
    sample_tokens: tokens kept per layer for inputs, routing_map and router_logits, spread evenly over the batches.
    """
    from megamoe.moe.layer import MoEFeedForward

    layers = {_block_index(n): m for n, m in model.named_modules() if isinstance(m, MoEFeedForward)}
    if not layers:
        raise PostTrainError("the model has no MoE layer; the post-training tools work on MoE models")
    num_experts = next(iter(layers.values())).num_experts
    acc = {
        b: {
            "counts": torch.zeros(num_experts, dtype=torch.float64),
            "weight_sums": torch.zeros(num_experts, dtype=torch.float64),
            "coactivation": torch.zeros(num_experts, num_experts, dtype=torch.float64),
            "router_logits": [],
            "inputs": [],
            "routing_map": [],
            "computed": 0.0,
        }
        for b in layers
    }
    per_batch = max(1, math.ceil(sample_tokens / len(batches)))

    def hook(block):
        def record(router, args, out):
            tokens, ctx = args
            keep = torch.linspace(0, tokens.shape[0] - 1, min(per_batch, tokens.shape[0])).long()
            scores = router.logits(tokens.float(), ctx) if hasattr(router, "logits") else out.probs
            acc[block]["router_logits"].append(scores[keep, : router.num_experts].float().cpu())
            acc[block]["inputs"].append(tokens[keep].float().cpu())
            acc[block]["keep"] = keep

        return record

    handles = [layer.router.register_forward_hook(hook(b)) for b, layer in layers.items()]
    for layer in layers.values():
        layer.record = True
    total = 0
    try:
        dtype = next(model.parameters()).dtype
        for i, (latents, text) in enumerate(batches):
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            b = latents.shape[0]
            s = torch.full((b,), noise_level) if noise_level is not None else (torch.arange(b) + 0.5) / b
            noise = torch.randn(latents.shape, generator=g)
            xs = interpolate(latents.float(), noise, s)
            model(xs.to(dtype), s * TIMESTEP_SCALE, text.to(dtype))
            for block, layer in layers.items():  # what the layer executed, over the experts it holds
                probs, routing_map = (t[:, : layer.num_experts] for t in layer.last_routing[:2])
                routed = routing_map.double()
                a = acc[block]
                a["counts"] += routed.sum(0)
                a["weight_sums"] += (probs.double() * routed).sum(0)
                a["coactivation"] += routed.T @ routed
                a["computed"] += float(routed.sum())
                a["routing_map"].append(routing_map[a["keep"]].cpu())
            total += layers[next(iter(layers))].last_routing[1].shape[0]
    finally:
        for h in handles:
            h.remove()
        for layer in layers.values():
            layer.record, layer.last_routing = False, None
    stats = RoutingStats(fingerprint=model_fingerprint(model), num_tokens=total)
    for block, a in acc.items():
        stats.layers[block] = LayerStats(
            counts=a["counts"],
            weight_sums=a["weight_sums"],
            coactivation=a["coactivation"],
            router_logits=torch.cat(a["router_logits"])[:sample_tokens],
            inputs=torch.cat(a["inputs"])[:sample_tokens],
            routing_map=torch.cat(a["routing_map"])[:sample_tokens],
            experts_per_token=a["computed"] / max(total, 1),
            num_tokens=total,
        )
    return stats


def save_routing_stats(stats: RoutingStats, path: str) -> None:
    tensors = {f"{block}.{name}": getattr(s, name).contiguous() for block, s in stats.layers.items() for name in FIELDS}
    meta = {
        "fingerprint": stats.fingerprint,
        "num_tokens": stats.num_tokens,
        "experts_per_token": {str(b): s.experts_per_token for b, s in stats.layers.items()},
    }
    save_file(tensors, path, metadata={"megamoe_routing_stats": json.dumps(meta, sort_keys=True)})


def load_routing_stats(path: str, model: torch.nn.Module | None = None) -> RoutingStats:
    """Read statistics saved by `save_routing_stats`; with `model`, refuse them unless they were
    gathered on this very model (PostTrainError naming the first field that differs)."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {})["megamoe_routing_stats"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error type for a bad header; the user needs one line
        raise PostTrainError(
            f"'{path}' is not a routing statistics file ({describe(exc)}); write one with --save-stats"
        ) from None
    if model is not None:
        expected = model_fingerprint(model)
        for key, value in expected.items():
            if meta["fingerprint"].get(key) != value:
                raise PostTrainError(
                    f"'{path}' was gathered on another model ({key}: {meta['fingerprint'].get(key)} there, "
                    f"{value} here); gather statistics on this checkpoint instead"
                )
    stats = RoutingStats(fingerprint=meta["fingerprint"], num_tokens=meta["num_tokens"])
    missing = sorted(
        {name for b in meta["experts_per_token"] for name in FIELDS} - {k.split(".", 1)[1] for k in tensors}
    )
    if missing:
        raise PostTrainError(f"'{path}' lacks {', '.join(missing)} (an older format); gather the statistics again")
    for block_text, per_token in meta["experts_per_token"].items():
        block = int(block_text)
        stats.layers[block] = LayerStats(
            **{name: tensors[f"{block}.{name}"] for name in FIELDS},
            experts_per_token=per_token,
            num_tokens=meta["num_tokens"],
        )
    return stats
