"""The training objective: the flow-matching velocity loss plus the enabled router losses.

Router losses come from the MoE layers of the forward that just ran (`layer.aux`), are summed
over layers (as Switch and GShard add one balance term per layer) and weighted by the
`model.moe.*_loss` weights. Each part is returned on its own so it can be logged.
"""

from __future__ import annotations

import torch

from megamoe.config import Config
from megamoe.diffusion.flow import flow_matching_loss
from megamoe.moe.layer import collect_aux, moe_layers
from megamoe.moe.router_losses import layer_reg_loss


def loss_weights(cfg: Config) -> dict[str, float]:
    moe = cfg.model.moe
    return {"balance": moe.balance_loss, "z": moe.z_loss, "similarity": moe.similarity_loss,
            "contrastive": moe.contrastive_loss, "layer_reg": moe.layer_reg_loss}


def training_loss(model, module, latents: torch.Tensor, text: torch.Tensor, cfg: Config,
                  generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`model` is what runs the forward (a DeepSpeed engine or the module), `module` the plain
    WanDiT inside it. Returns (total loss, {part name: unweighted value}).

    Under context/sequence parallelism the flow loss is the full one on every rank, but each
    rank's routers saw only its shard of the tokens: its router losses are that shard's, weighted
    by 1 / num_shards so that the gradients, summed over the shards, are those of the mean of the
    per-shard losses (for token means like z and layer_reg: exactly the unsharded loss). The
    logged parts are this rank's shard values.
    """
    flow, target = flow_matching_loss(model, latents, text, cfg.diffusion, generator)
    total, parts = flow, {"flow": flow.detach()}
    weights = loss_weights(cfg)
    sharding = module.sequence_sharding
    for name, value in collect_aux(module).items():
        if weights.get(name, 0.0) > 0:
            total = total + weights[name] * value / sharding.num_shards
            parts[name] = value.detach()
    if weights["layer_reg"] > 0:
        target_tokens = sharding.shard(module.patchify(target)).flatten(0, 1)  # the tokens this rank predicts
        predictions = [layer.aux["layer_reg_prediction"] for layer in moe_layers(module)]
        reg = sum(layer_reg_loss(p, target_tokens) for p in predictions)
        total = total + weights["layer_reg"] * reg / sharding.num_shards
        parts["layer_reg"] = reg.detach()
    return total, parts
