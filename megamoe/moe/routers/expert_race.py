"""Expert Race: one top-K over all (token, expert) scores of the micro-batch.

Yuan et al. 2025, "Expert Race: A Flexible Routing Strategy for Scaling Diffusion Transformer
with Mixture of Experts" (Race-DiT, ICML 2025, arXiv:2503.16057).

Training:
    scores = tokens @ W_gate^T                    [N, E], identity activation (raw logits)
    K      = N * top_k                            (N = B * L: B x L x E scores race together)
    selected = the K largest entries of scores, over tokens AND experts at once
               (every pair whose score reaches the K-th largest; ties at it are all taken)
    probs    = scores where selected, 0 elsewhere

Tokens and experts compete together, so hard tokens (detail, late denoising steps) can take
many experts and easy ones (flat background) none, while the average stays top_k.

Why identity: a softmax over experts makes a token's scores sum to one, so scores of
different tokens are not comparable and a token can never out-bid another on all experts;
Race-DiT uses the raw gate output both to race and as the combine weight, and we follow
it (a selected weight can therefore be any real number, also negative).

Inference: the top-K of a batch depends on the other samples in it (the CFG-null copy, the
other prompts), so at `eval()` a pair (t, e) is selected iff scores[t, e] >= threshold, a
buffer tracking an EMA (decay `race_threshold_decay`) of the K-th largest training score.
`after_step` updates it from the mean K-th score of the step's forwards, averaged over the
data-parallel ranks, so every rank holds the same threshold; it is saved with the model. A
skipped step's scores are dropped (`discard_step`) and never reach it.
The first update copies the value (no warm-up from zero). Before any update, eval falls
back to the training rule.

Under sequence sharding each rank holds a chunk of every sample: the race still runs over the
whole micro-batch (each rank sends its own top-K scores, at most N_local * E, to find the global
K-th score; see moe/token_shards.py), so every shard selects what one process would.

Losses (unweighted, in aux; the loop multiplies by the config weights):
    'similarity'            router similarity loss (router_losses.router_similarity_loss),
                            when model.moe.similarity_loss > 0.
    'layer_reg_prediction'  from the base Router (any router), see routers/base.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config import MoEConfig
from megamoe.model.activation_checkpointing import is_recomputing
from megamoe.moe.router_losses import router_similarity_loss
from megamoe.moe.routers.base import Reduce, Router, RouterOutput, RoutingContext, register_router, require


@register_router("expert_race")
class ExpertRaceRouter(Router):
    # Not read: num_null_experts (a token may already take zero experts), bias_balancing,
    # score_func and renormalize (raw scores are the weights), balance_loss and z_loss
    # (a logsumexp penalty would only shrink the raw combine weights).
    config_keys = Router.config_keys | {"race_threshold_decay", "similarity_loss"}

    @classmethod
    def check_config(cls, cfg: MoEConfig) -> None:
        super().check_config(cfg)
        require(
            0.0 <= cfg.race_threshold_decay < 1.0,
            f"model.moe.race_threshold_decay must be in [0, 1), got {cfg.race_threshold_decay}",
        )

    def __init__(self, dim: int, cfg: MoEConfig, **kwargs):
        super().__init__(dim, cfg, **kwargs)
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)
        # Persistent: inference routing depends on it, so it must survive checkpoints.
        self.register_buffer("threshold", torch.empty(()))
        self.register_buffer("threshold_initialized", torch.empty((), dtype=torch.bool))
        self.reset_buffers()
        # K-th scores seen since the last optimizer step (one per forward, e.g. per micro-batch
        # under gradient accumulation). Plain attributes: per-step scratch, not model state.
        self._kth_sum: torch.Tensor | None = None
        self._kth_count = 0

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """No threshold yet: the first step's sets it (also after a meta-device build, see megamoe/model/init.py)."""
        self.threshold.zero_()
        self.threshold_initialized.fill_(False)

    def _apply(self, fn, recurse=True):
        # Module-wide casts (model.bfloat16(), DeepSpeed bf16) would round the threshold, and a
        # bf16 EMA silently drops updates smaller than its precision ((1 - decay) * gap is
        # small): keep it fp32, only follow the device.
        kept = self.threshold
        out = super()._apply(fn, recurse)
        if self.threshold.dtype != torch.float32:
            self.threshold = kept.to(device=self.threshold.device, dtype=torch.float32)
        return out

    def route(self, tokens: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        n = tokens.shape[0]
        if ctx.batch_size * ctx.seq_len != n:
            raise ValueError(
                f"expert_race router got {n} tokens but batch_size*seq_len = {ctx.batch_size}*{ctx.seq_len}"
            )
        scores = F.linear(tokens, self.gate.weight.float())  # identity activation, fp32

        shards = self.token_shards
        if self.training or not bool(self.threshold_initialized):
            # The race runs over the tokens of every shard: K counts them all, and a pair is
            # selected iff its score reaches the K-th largest score of the whole micro-batch.
            kth = shards.kth_largest(scores.detach().flatten()[None], n * shards.num * self.cfg.top_k, dim=1)
            mask = scores.detach() >= kth.reshape(())
            if self.training and not is_recomputing():  # a recomputed forward was counted already
                kth = kth.reshape(()).float()
                self._kth_sum = kth if self._kth_sum is None else self._kth_sum + kth
                self._kth_count += 1
        else:
            mask = scores.detach() >= self.threshold.float()
        probs = scores * mask  # selected raw scores are the combine weights (Race-DiT)

        aux = {"unrouted_fraction": (~mask.any(dim=1)).float().mean().detach()}
        if self.cfg.similarity_loss > 0:
            aux["similarity"] = router_similarity_loss(scores, mask, shards)
        return RouterOutput(probs=probs, routing_map=mask, aux=aux)

    @torch.no_grad()
    def after_step(self, reduce: Reduce) -> None:
        # Every rank calls reduce exactly once, also a rank that ran no forward this step,
        # so the collective cannot hang; the count tells whether anyone saw a batch.
        stats = torch.zeros(2, dtype=torch.float32, device=self.threshold.device)
        if self._kth_sum is not None:
            stats[0] = self._kth_sum.to(stats.device)
            stats[1] = float(self._kth_count)
        self._kth_sum, self._kth_count = None, 0
        stats = reduce(stats)
        if stats[1] <= 0:
            return
        step_threshold = stats[0] / stats[1]
        if bool(self.threshold_initialized):
            d = self.cfg.race_threshold_decay
            new = d * self.threshold.float() + (1.0 - d) * step_threshold
        else:
            new = step_threshold
        self.threshold.copy_(new)
        self.threshold_initialized.fill_(True)

    def discard_step(self) -> None:
        """A skipped step's K-th scores (NaN for a NaN batch) must not reach the threshold EMA,
        where a NaN would stay for good (see Router.discard_step)."""
        self._kth_sum, self._kth_count = None, 0
