"""Selective Sinkhorn Routing: on a fraction of the training steps, gate by an optimal-transport plan.

Nguyen, Ta, Le Duc, Nguyen and Tran 2025, "Selective Sinkhorn Routing for Improved Sparse Mixture
of Experts" (arXiv:2511.08972). Token-to-expert assignment is an entropic optimal-transport
problem whose plan is balanced by construction; the gate's combine weights come from the plan
itself, so the gate learns to balance without an auxiliary loss. Running Sinkhorn on only some
steps keeps its cost small and leaves the experts free to specialise on the others.

Each training step draws one coin, heads with probability p = `ssr_probability`:

  heads (Sinkhorn step):
    logits = tokens @ W_gate^T                                        [N, E]
    log P  = log of the plan of exp(logits): `sinkhorn_iterations` rounds of
             column normalisation (every expert holds N / E) then row normalisation
             (every token holds 1), in log space, WITH gradient
    selected = top_k of P in each row
    weights  = P at the selected experts / their sum (the plan renormalised over the selection)
  tails (top-k step):
    selected = top_k of logits + ssr_noise_std * Gaussian noise (exploration; default none)
    weights  = softmax(logits) at the selected experts / their sum (the noise picks, never weights)
  inference (eval()): the tails rule without noise, so a token's experts do not depend on the batch.

The coin is a function of (`ssr_seed`, step) alone (its own generator, never the global RNG):
every rank and every layer draws the same one without a collective, all micro-batches of a step
(gradient accumulation) share it, and the step counter (`coin_step`, applied optimizer steps,
advanced in `after_step`; a skipped step draws no new coin) is a buffer saved with the model, so
a resumed run continues the same sequence. The coin, then the top-k selection, pass through
`Router.replay`, so a recomputed block routes as its first forward did.

Under sequence sharding the plan's columns span the tokens of every shard: each column
normalisation gathers the shards' column log-sums with an all-gather whose backward is a
reduce-scatter, so the plan and its gradient equal the one-process ones.

No balance or z-loss is computed (the plan balances); `balance_loss`/`z_loss` are refused.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config import MoEConfig
from megamoe.moe.routers.base import Reduce, Router, RouterOutput, RoutingContext, register_router, require
from megamoe.moe.token_shards import ONE_PROCESS, TokenShards
from megamoe.parallel.collectives import gather_sequence


def _column_logsumexp(log_a: torch.Tensor, shards: TokenShards) -> torch.Tensor:
    """logsumexp over the tokens of every shard, [1, E], differentiable.

    Each rank's weights depend on every shard's column sums, so the gradient of shard s's local
    log-sum is the sum over ranks of what their weights send it: all-gather forward,
    reduce-scatter backward (`gather_sequence`)."""
    local = torch.logsumexp(log_a, dim=0, keepdim=True)
    if shards.group is None:
        return local
    return torch.logsumexp(gather_sequence(local, 0, shards.group), dim=0, keepdim=True)


def sinkhorn_plan_log(logits: torch.Tensor, iterations: int, shards: TokenShards = ONE_PROCESS) -> torch.Tensor:
    """log P [N, E] of the entropic transport plan of exp(logits) [N, E], with gradient.

    Rows of P sum to 1 (exactly, the last step normalises them); columns to N_total / E, where
    N_total counts the tokens of every shard, approximately after a few `iterations` (exactly in
    the limit). 0 iterations gives softmax(logits). Runs in the dtype of `logits` (fp32 from the
    router; float64 in tests).
    """
    n, e = logits.shape
    log_col_mass = math.log(n * shards.num / e)
    log_a = logits
    for _ in range(iterations):
        log_a = log_a - _column_logsumexp(log_a, shards) + log_col_mass
        log_a = log_a - torch.logsumexp(log_a, dim=1, keepdim=True)
    return log_a.log_softmax(dim=1) if iterations == 0 else log_a


def draw_coin(seed: int, step: int, probability: float) -> bool:
    """True (a Sinkhorn step) with `probability`, a pure function of (seed, step).

    numpy's SeedSequence mixes both integers into the generator's state (torch's CPU generator
    would keep only 32 bits of a combined seed, dropping the seed or the step)."""
    return bool(np.random.default_rng([seed, step]).random() < probability)


@register_router("selective_sinkhorn")
class SelectiveSinkhornRouter(Router):
    # Not read: num_null_experts (the plan would balance them like real experts), score_func and
    # renormalize (the weights are always renormalised plan entries or softmax scores),
    # bias_balancing, balance_loss and z_loss (the plan balances; the paper drops them).
    config_keys = Router.config_keys | {"sinkhorn_iterations", "ssr_probability", "ssr_noise_std", "ssr_seed"}

    @classmethod
    def check_config(cls, cfg: MoEConfig) -> None:
        super().check_config(cfg)
        require(
            cfg.sinkhorn_iterations >= 0, f"model.moe.sinkhorn_iterations must be >= 0, got {cfg.sinkhorn_iterations}"
        )
        require(
            0.0 <= cfg.ssr_probability <= 1.0,
            f"model.moe.ssr_probability must be in [0, 1] (the fraction of Sinkhorn steps), got {cfg.ssr_probability}",
        )
        require(cfg.ssr_noise_std >= 0, f"model.moe.ssr_noise_std must be >= 0 (0 = no noise), got {cfg.ssr_noise_std}")
        require(cfg.ssr_seed >= 0, f"model.moe.ssr_seed must be >= 0, got {cfg.ssr_seed}")
        # Settings under which a key can never act (no Sinkhorn step, no top-k step, a plan that is
        # the softmax) are refused rather than ignored.
        default = MoEConfig()
        require(
            cfg.ssr_probability > 0 or cfg.sinkhorn_iterations == default.sinkhorn_iterations,
            f"model.moe.sinkhorn_iterations={cfg.sinkhorn_iterations} has no effect with ssr_probability=0 "
            f"(no Sinkhorn step); remove it or raise ssr_probability",
        )
        require(
            cfg.ssr_probability < 1 or cfg.ssr_noise_std == 0,
            f"model.moe.ssr_noise_std={cfg.ssr_noise_std} has no effect with ssr_probability=1 (every training "
            f"step routes by the plan; the noise acts on top-k steps only); set it to 0 or lower ssr_probability",
        )
        require(
            cfg.ssr_probability == 0 or cfg.sinkhorn_iterations >= 1,
            "model.moe.sinkhorn_iterations=0 makes the Sinkhorn plan the softmax, so Sinkhorn steps equal top-k "
            "steps; set sinkhorn_iterations >= 1 (or ssr_probability=0)",
        )

    def __init__(self, dim: int, cfg: MoEConfig, **kwargs):
        super().__init__(dim, cfg, **kwargs)
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)
        # Persistent: the coin sequence continues from it on resume. Read at every training
        # forward, not cached, so a checkpoint loaded in place (tensor.copy_) takes effect.
        self.register_buffer("coin_step", torch.empty((), dtype=torch.long))
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Step 0 (also after a meta-device build, see megamoe/model/init.py)."""
        self.coin_step.zero_()

    def sinkhorn_step(self) -> bool:
        """This step's coin: whether training forwards route by the Sinkhorn plan."""
        return draw_coin(self.cfg.ssr_seed, int(self.coin_step), self.cfg.ssr_probability)

    def route(self, tokens: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        n, e, k = tokens.shape[0], self.num_experts, self.cfg.top_k
        logits = F.linear(tokens, self.gate.weight.float())
        log_weights = logits  # log of the unnormalised weights, at the selected experts
        if self.training:
            coin = self.replay(torch.tensor(self.sinkhorn_step()))  # on the CPU: read back without a GPU sync
            if bool(coin):
                log_weights = sinkhorn_plan_log(logits, self.cfg.sinkhorn_iterations, self.token_shards)
                scores = log_weights.detach()
            else:
                scores = logits.detach()
                if self.cfg.ssr_noise_std > 0:
                    scores = scores + self.cfg.ssr_noise_std * torch.randn_like(scores)
        else:
            scores = logits.detach()
        picked = self.replay(scores.topk(k, dim=-1).indices)
        weights = log_weights.gather(1, picked).softmax(dim=-1)  # entries renormalised over the selection
        probs = torch.zeros(n, e, dtype=torch.float32, device=tokens.device).scatter(1, picked, weights)
        routing_map = torch.zeros(n, e, dtype=torch.bool, device=tokens.device).scatter(1, picked, True)
        return RouterOutput(probs=probs, routing_map=routing_map, aux={}, topk_indices=picked)

    @torch.no_grad()
    def after_step(self, reduce: Reduce) -> None:
        """Next step, next coin (no collective: every rank counts the same applied steps)."""
        self.coin_step += 1
