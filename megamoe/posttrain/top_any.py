"""Top-any pruning (MC#): a learned per-token mask that drops some of a token's selected experts.

    install_top_any(model)                                   # wraps every MoE layer's router
    train_top_any(model, cfg, calibration, prune_weight=0.01, steps=200)   # model frozen, masks learn
    save_top_any(model, "out/top_any.safetensors"); load_top_any(model, path)

TopAnyRouter delegates to the router it wraps and then edits its output: a linear head on the
layer's tokens gives one keep logit per (token, expert); of the experts the wrapped router selected,

  * the one with the largest combine weight is always kept (a token never loses every routed
    expert: its FFN output would then be the shared experts alone, a much larger change);
  * every other one is kept where its keep logit is > 0, and dropped otherwise: it leaves the
    routing map and its combine weight becomes 0. The kept weights are NOT renormalised: a kept
    expert contributes exactly what it did before, and a dropped one simply stops contributing
    (the mask is trained under this very rule).

Null-expert columns pass through untouched. In training (`sampling=True`) the mask is a hard
Gumbel-sigmoid sample with a straight-through gradient: the forward sees 0/1 masks (dropped experts
are still computed, with weight 0, so the gradient reaches their keep logits); the loss is the
flow-matching loss plus `prune_weight` times the kept fraction of the droppable selections.
The head starts at keep-everything (weight 0, bias KEEP_BIAS), so an untrained mask is the original
model exactly.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from megamoe.moe.routers.base import Router, RouterOutput, RoutingContext

KEEP_BIAS = 3.0


class TopAnyRouter(Router):
    """A Router that wraps another and drops the selected experts its per-token mask does not keep."""

    name = "top_any"

    def __init__(self, inner: Router, temperature: float = 1.0):
        # Not Router.__init__: the wrapped router checked the config, and this one reads no key.
        nn.Module.__init__(self)
        self.inner = inner
        self.dim, self.cfg = inner.dim, inner.cfg
        self.num_experts, self.num_total = inner.num_experts, inner.num_total
        self.init_kwargs = inner.init_kwargs
        self.layer_reg_head = None  # the wrapped router adds its own prediction
        self.token_shards = inner.token_shards
        self.mask = nn.Linear(self.dim, self.num_total)
        nn.init.zeros_(self.mask.weight)
        nn.init.constant_(self.mask.bias, KEEP_BIAS)
        self.temperature = temperature
        self.sampling = False
        self.enabled = True
        """False: pass the wrapped router's output through (to evaluate the model without the masks)."""
        self.generator: torch.Generator | None = None
        self.penalty: torch.Tensor | None = None
        self.selected = 0
        self.kept = 0

    def reset_counts(self) -> None:
        self.selected = self.kept = 0

    def route(self, tokens: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        out = self.inner(tokens, ctx)
        if not self.enabled:
            return out
        real = slice(0, self.num_experts)
        selected = out.routing_map[:, real]
        weights = out.probs[:, real]
        top = weights.masked_fill(~selected, -1.0).argmax(1, keepdim=True)
        forced = torch.zeros_like(selected).scatter_(1, top, True) & selected
        logits = self.mask(tokens)[:, real]
        droppable = selected & ~forced
        if self.sampling:
            u = torch.rand(logits.shape, generator=self.generator).clamp_(1e-6, 1 - 1e-6)
            soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / self.temperature)
            keep = (soft > 0.5).float() + soft - soft.detach()  # hard 0/1 forward, relaxed gradient
            keep = torch.where(droppable, keep, torch.ones_like(keep))
            self.penalty = (keep * droppable).sum() / droppable.sum().clamp_min(1)
            probs = out.probs.clone()
            probs[:, real] = weights * keep
            return RouterOutput(probs, out.routing_map, out.aux, out.topk_indices)
        keep = forced | (droppable & (logits > 0))
        self.selected += int(selected.sum())
        self.kept += int(keep.sum())
        if bool((keep == selected).all()):
            return out  # nothing dropped: the wrapped router's output as it is
        routing_map = out.routing_map.clone()
        routing_map[:, real] = keep
        return RouterOutput(out.probs * routing_map, routing_map, out.aux, None)

    def after_step(self, reduce) -> None:
        self.inner.after_step(reduce)

    def discard_step(self) -> None:
        self.inner.discard_step()


def top_any_routers(model) -> dict[int, TopAnyRouter]:
    from megamoe.moe.layer import MoEFeedForward

    return {
        int(n.split(".")[1]): m.router
        for n, m in model.named_modules()
        if isinstance(m, MoEFeedForward) and isinstance(m.router, TopAnyRouter)
    }


def install_top_any(model, temperature: float = 1.0) -> dict[int, TopAnyRouter]:
    """Wrap every MoE layer's router (once); returns the wrappers by block index."""
    from megamoe.moe.layer import MoEFeedForward

    for module in model.modules():
        if isinstance(module, MoEFeedForward) and not isinstance(module.router, TopAnyRouter):
            param = next(module.router.parameters(), None)
            module.router = TopAnyRouter(module.router, temperature)
            if param is not None:
                module.router.mask.to(param.device)
    return top_any_routers(model)


def train_top_any(
    model, cfg, batches, prune_weight: float, steps: int, lr: float = 0.01, seed: int = 0, log=None
) -> list[tuple[int, float, float]]:
    """Train the masks of the installed TopAnyRouters for `steps` steps over `batches` (cycled),
    every other weight frozen and the model in eval mode. Returns (step, flow loss, kept fraction)."""
    from megamoe.diffusion.flow import flow_matching_loss

    routers = top_any_routers(model)
    if not routers:
        routers = install_top_any(model)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for r in routers.values() for p in r.mask.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    model.eval()
    history = []
    generator = torch.Generator().manual_seed(seed)
    for r in routers.values():
        r.sampling, r.generator = True, generator
    try:
        for step in range(steps):
            latents, text = batches[step % len(batches)]
            loss, _ = flow_matching_loss(model, latents, text, cfg.diffusion, generator)
            kept = torch.stack([r.penalty for r in routers.values()]).mean()
            optimizer.zero_grad(set_to_none=True)
            (loss + prune_weight * kept).backward()
            optimizer.step()
            history.append((step, float(loss.detach()), float(kept.detach())))
            if log is not None and (step % 50 == 0 or step == steps - 1):
                log(f"  top-any step {step}: flow loss {history[-1][1]:.4f}, kept {history[-1][2]:.3f} of droppable")
    finally:
        for r in routers.values():
            r.sampling, r.generator, r.penalty = False, None, None
        for p in params:
            p.requires_grad_(False)
    return history


def dropped_fraction(model) -> float | None:
    """Share of the selected expert computations the masks dropped since the last reset_counts."""
    routers = top_any_routers(model).values()
    selected = sum(r.selected for r in routers)
    return None if not routers or selected == 0 else 1.0 - sum(r.kept for r in routers) / selected


def enable_top_any(model, enabled: bool) -> None:
    for r in top_any_routers(model).values():
        r.enabled = enabled


def reset_counts(model) -> None:
    for r in top_any_routers(model).values():
        r.reset_counts()


def save_top_any(model, path) -> None:
    state = {
        f"{b}.{k}": v.detach().cpu().contiguous()
        for b, r in top_any_routers(model).items()
        for k, v in r.mask.state_dict().items()
    }
    save_file(state, str(path))


@torch.no_grad()
def load_top_any(model, path) -> None:
    state = load_file(str(path))
    for block, router in install_top_any(model).items():
        router.mask.load_state_dict({k: state[f"{block}.{k}"] for k in ("weight", "bias")})
