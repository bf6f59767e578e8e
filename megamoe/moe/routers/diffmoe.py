"""DiffMoE: expert choice over a batch-level global token pool, and a capacity predictor for inference.

Shi et al. 2025, "DiffMoE: Dynamic Token Selection for Scalable Diffusion Transformers"
(Tsinghua / Kuaishou, arXiv:2503.14487).

Training (the batch-level global token pool):
    scores = score_func(tokens @ W_gate^T)                     [N, E]  (softmax over experts by default)
    C      = round(capacity_factor * N * top_k / E), in [1, N]   N = B * L: every token of the micro-batch
    expert e takes the C tokens of the pool with the largest scores[:, e] (all tokens tied at the C-th)
    probs[t, e] = scores[t, e] where taken, 0 elsewhere

This is expert choice with `expert_choice_scope: batch` (routers/expert_choice.py): tokens of all
samples and noise levels compete for one expert, so noisy, hard samples can take more compute
than clean, easy ones while every expert is exactly full.

Capacity predictor: a two-layer SiLU MLP (dim -> router_hidden_dim -> E) on the DETACHED tokens
predicts, per (token, expert), whether the pool would select the pair. It is trained by binary
cross-entropy against the training selection (loss 'capacity', weight `capacity_loss`); tokens
and mask are detached, so its gradient reaches the predictor only, never the tokens or the gate.

Inference (`eval()`): the pool's top-C of a batch depends on the other samples in it (the CFG-null
copy, the other prompts). Instead, token t goes to expert e iff sigmoid(predictor(t))[e] >=
threshold[e]: a per-expert fp32 buffer, the EMA (decay `diffmoe_threshold_decay`) of the C-th
largest predictor score of each expert in the training pool, i.e. the threshold that reproduces
the training capacity. `after_step` updates it from the mean over the step's forwards and over
the data-parallel ranks (`reduce`), so every rank holds the same threshold; it is saved with the
model; the first update copies the value; a skipped step's statistics are dropped
(`discard_step`); a recomputed forward is not counted again. Before any update, eval falls back
to the training rule. A token's inference routing depends on that token only. `capacity_loss: 0`
builds no predictor: inference then keeps the training rule and depends on the batch. (The authors'
code uses the predictor to count each expert's tokens, k_e = #{t: score >= threshold}, and then
takes the top-k_e tokens by gate score, which depends on the batch again; routing each token by
its own predictor score keeps sampling independent of what else is batched.)

Under sequence sharding the pool spans the shards: C counts every token and the C-th scores are
found by exchanging each rank's own top-C (TokenShards.kth_largest), as expert choice does.

Score function: the authors' gate is a softmax over experts followed by the per-expert top-C
(as in EC-DiT); `score_func: sigmoid` is accepted as the alternative. Defaults follow their code:
capacity-loss weight 0.01 (it also shares the gradient-norm clip with the model), threshold EMA
decay 0.95.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config import MoEConfig
from megamoe.model.activation_checkpointing import is_recomputing
from megamoe.moe.routers.base import (
    SCORE_FUNCS,
    Reduce,
    Router,
    RouterOutput,
    RoutingContext,
    register_router,
    require,
    update_threshold_ema,
)
from megamoe.moe.routers.expert_choice import expert_capacity


@register_router("diffmoe")
class DiffMoERouter(Router):
    # Balanced by construction (every expert exactly full in training): no balance loss or bias.
    fp32_buffers = ("threshold",)  # a bf16 EMA drops small updates
    config_keys = Router.config_keys | {
        "capacity_factor",
        "score_func",
        "router_hidden_dim",
        "capacity_loss",
        "diffmoe_threshold_decay",
    }

    @classmethod
    def check_config(cls, cfg: MoEConfig) -> None:
        super().check_config(cfg)
        require(cfg.capacity_factor > 0, f"model.moe.capacity_factor must be > 0, got {cfg.capacity_factor}")
        require(
            cfg.score_func in SCORE_FUNCS,
            f"model.moe.score_func must be one of {', '.join(SCORE_FUNCS)}, got '{cfg.score_func}'",
        )
        if cfg.capacity_loss > 0:
            require(
                cfg.router_hidden_dim >= 1, f"model.moe.router_hidden_dim must be >= 1, got {cfg.router_hidden_dim}"
            )
            require(
                0.0 <= cfg.diffmoe_threshold_decay < 1.0,
                f"model.moe.diffmoe_threshold_decay must be in [0, 1), got {cfg.diffmoe_threshold_decay}",
            )
            return
        default = MoEConfig()
        for key in ("router_hidden_dim", "diffmoe_threshold_decay"):  # the predictor's keys
            require(
                getattr(cfg, key) == getattr(default, key),
                f"model.moe.{key}={getattr(cfg, key)} has no effect with router=diffmoe and capacity_loss=0 "
                f"(no capacity predictor); set capacity_loss > 0 or remove {key}",
            )

    def __init__(self, dim: int, cfg: MoEConfig, **kwargs):
        super().__init__(dim, cfg, **kwargs)
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)
        # capacity_loss = 0: no predictor; inference then keeps the pool rule (batch-dependent).
        self.predictor: nn.Sequential | None = None
        if cfg.capacity_loss > 0:
            self.predictor = nn.Sequential(
                nn.Linear(dim, cfg.router_hidden_dim),
                nn.SiLU(),
                nn.Linear(cfg.router_hidden_dim, cfg.num_experts),
            )
            # Persistent: inference routing depends on it, so it must survive checkpoints.
            self.register_buffer("threshold", torch.empty(cfg.num_experts))
            self.register_buffer("threshold_initialized", torch.empty((), dtype=torch.bool))
            self.reset_buffers()
        # Per-expert C-th predictor scores summed over the step's forwards (per-step scratch).
        self._kth_sum: torch.Tensor | None = None
        self._kth_count = 0

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """No threshold yet: the first step's sets it (also after a meta-device build, see megamoe/model/init.py)."""
        if self.predictor is not None:
            self.threshold.zero_()
            self.threshold_initialized.fill_(False)

    def predictor_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, dim] -> [N, E] capacity-predictor logits, on detached tokens (fp32 weights)."""
        hidden, out = self.predictor[0], self.predictor[2]
        h = F.silu(F.linear(tokens.detach(), hidden.weight.float(), hidden.bias.float()))
        return F.linear(h, out.weight.float(), out.bias.float())

    def route(self, tokens: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        n, e = tokens.shape[0], self.num_experts
        if ctx.batch_size * ctx.seq_len != n:
            raise ValueError(f"diffmoe router got {n} tokens but batch_size*seq_len = {ctx.batch_size}*{ctx.seq_len}")
        logits = F.linear(tokens, self.gate.weight.float())
        scores = logits.softmax(-1) if self.cfg.score_func == "softmax" else logits.sigmoid()
        predicted = None if self.predictor is None else self.predictor_logits(tokens)
        shards = self.token_shards
        aux = {}
        if predicted is not None and not self.training and bool(self.threshold_initialized):
            mask = self.replay(predicted.detach().sigmoid() >= self.threshold.float())
        else:
            # The pool is every token of the micro-batch, on every shard.
            c = expert_capacity(self.cfg.capacity_factor, n * shards.num, self.cfg.top_k, e)
            mask = scores.detach() >= shards.kth_largest(scores.detach(), c, dim=0)  # [N, E]
            mask = self.replay(mask)
            if self.training and predicted is not None:
                aux["capacity"] = shards.mean(F.binary_cross_entropy_with_logits(predicted, mask.float()))
                if not is_recomputing():  # a recomputed forward was counted already
                    kth = shards.kth_largest(predicted.detach().sigmoid(), c, dim=0).reshape(e)
                    self._kth_sum = kth if self._kth_sum is None else self._kth_sum + kth
                    self._kth_count += 1
        probs = scores * mask
        aux["unrouted_fraction"] = (~mask.any(dim=1)).float().mean().detach()
        return RouterOutput(probs=probs, routing_map=mask, aux=aux)

    @torch.no_grad()
    def after_step(self, reduce: Reduce) -> None:
        if self.predictor is None:
            return
        kth_sum, kth_count = self._kth_sum, self._kth_count
        self._kth_sum, self._kth_count = None, 0
        update_threshold_ema(
            self.threshold, self.threshold_initialized, kth_sum, kth_count, self.cfg.diffmoe_threshold_decay, reduce
        )

    def discard_step(self) -> None:
        """A skipped step's statistics must not reach the threshold EMA (see Router.discard_step)."""
        self._kth_sum, self._kth_count = None, 0
