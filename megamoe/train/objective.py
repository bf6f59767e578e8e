"""The training objective: the flow-matching velocity loss plus the enabled router losses.

Router losses come from the MoE layers of the forward that just ran (`layer.aux`), are summed
over layers (as Switch and GShard add one balance term per layer) and weighted by the
`model.moe.*_loss` weights. Each part is returned on its own so it can be logged.
"""

from __future__ import annotations

import torch

from megamoe.config import Config
from megamoe.diffusion.flow import flow_matching_loss
from megamoe.model.lora_mixer import routing_losses
from megamoe.model.mixture_of_depths import collect_mod_aux
from megamoe.moe.layer import collect_aux, moe_layers
from megamoe.moe.router_losses import layer_reg_loss


def loss_weights(cfg: Config) -> dict[str, float]:
    moe = cfg.model.moe
    return {
        "balance": moe.balance_loss,
        "z": moe.z_loss,
        "similarity": moe.similarity_loss,
        "contrastive": moe.contrastive_loss,
        "layer_reg": moe.layer_reg_loss,
        "capacity": moe.capacity_loss,
        "tsallis": moe.tsallis_loss,
        "lora_balance": cfg.model.lora.balance_loss,  # LoRA-Mixer's routing loss (model/lora_mixer.py)
        "lora_entropy": cfg.model.lora.entropy_loss,
        "mod_sparsity": cfg.model.mod.sparsity_loss,  # mixture-of-depths (model/mixture_of_depths.py)
    }


def weighted_total(cfg: Config, parts: dict[str, float]) -> float:
    """The total loss from its parts ({'flow': ..., router loss name: unweighted value}), as
    `training_loss` forms it: flow + sum of weight x part over the enabled router losses."""
    weights = loss_weights(cfg)
    return parts["flow"] + sum(
        weights[n] * v for n, v in sorted(parts.items()) if n != "flow" and weights.get(n, 0.0) > 0
    )


def training_loss(
    model, module, latents: torch.Tensor, text: torch.Tensor, cfg: Config, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`model` is what runs the forward (a DeepSpeed engine or the module), `module` the plain
    WanDiT inside it. Returns (total loss, {part name: unweighted value}).

    Under context/sequence parallelism each rank's routers see only its shard of the tokens, but
    every router loss is formed from statistics summed over the shards (megamoe/moe/token_shards.py):
    its value is the unsharded loss on every rank, and each rank's backward leaves its partial
    gradient, like the gathered flow loss. So the parts, and the total, are the unsharded ones.
    """
    flow, target = flow_matching_loss(model, latents, text, cfg.diffusion, generator)
    total, parts = flow, {"flow": flow.detach()}
    weights = loss_weights(cfg)
    for name, value in {**collect_aux(module), **routing_losses(module), **collect_mod_aux(module)}.items():
        if weights.get(name, 0.0) > 0:
            total = total + weights[name] * value
            parts[name] = value.detach()
    if weights["layer_reg"] > 0:
        target_tokens = module.sequence_sharding.shard(module.patchify(target)).flatten(0, 1)  # this rank's tokens
        reg = sum(
            layer.router.token_shards.mean(layer_reg_loss(layer.aux["layer_reg_prediction"], target_tokens))
            for layer in moe_layers(module)
        )
        total = total + weights["layer_reg"] * reg
        parts["layer_reg"] = reg.detach()
    return total, parts
