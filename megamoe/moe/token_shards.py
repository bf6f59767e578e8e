"""Where the other tokens of a router's batch are: the statistics a router shares across ranks.

Under context parallelism (and tensor parallelism with sequence parallelism) every sequence of a
micro-batch is cut into `num` equal chunks held by the ranks of one group; a rank's router sees
only its chunk. Losses and selections that look at more than one token (the balance loss, the
z-loss's mean, Expert Race's top-K, expert choice, Sinkhorn, ProMoE's centroids) must then be
formed from statistics summed over that group to equal the unsharded computation, as
megatron-core and torchtitan all-reduce tokens-per-expert before forming their aux loss.

`parallelize()` gives every router its `TokenShards` (megamoe/parallel/parallelize.py); the
default, `TokenShards()`, is one process holding every token, where each method is the identity
(or a plain top-k) and no collective runs.

Gradient convention (megamoe/parallel/context.py): a loss formed from `sum` has the same value on
every rank of the group, and each rank back-propagates only into its own addend, so the
gradients summed over the group (DeepSpeed's context-parallel reduction, the SP gradient hooks)
are the unsharded gradient. A parameter that such a loss uses directly, not through a token
statistic (ProMoE's prototypes), would then be counted once per rank: pass it through
`replicated`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.parallel.collectives import gather_along_dim, reduce_from_group


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class TokenShards:
    """The token-shard group of a router (`group`) and the ranks of its whole global batch (`batch_group`).

    group: ranks holding the other chunks of this micro-batch's sequences (the sequence-sharding
        group: CP, or TP x CP under sequence parallelism); None when this rank holds them whole.
    batch_group: every rank holding other tokens of the global batch (data parallel times `group`);
        None in one process. Used only by the `global` balance scope and Expert Race's `global` race.
    """

    def __init__(self, group=None, batch_group=None):
        self.group = group
        self.batch_group = batch_group
        self.num = 1 if group is None else dist.get_world_size(group)
        """How many equal chunks each sequence is cut into."""

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the shards; backward is the identity (see the module docstring)."""
        return x if self.group is None else reduce_from_group(x, self.group)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over the shards of a per-shard mean: the unsharded mean, as the shards are equal."""
        return x if self.group is None else self.sum(x) / self.num

    def replicated(self, x: torch.Tensor) -> torch.Tensor:
        """x unchanged; its gradient divided by the number of shards (a parameter used identically
        by every rank's copy of a loss, whose gradients the optimizer then sums over the shards)."""
        return x if self.group is None else _ScaleGrad.apply(x, 1.0 / self.num)

    @torch.no_grad()
    def sum_over_batch(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over every rank of the global batch (no gradient)."""
        if self.batch_group is None:
            return x
        x = x.detach().clone()
        dist.all_reduce(x, group=self.batch_group)
        return x

    @torch.no_grad()
    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The shards' tensors concatenated along `dim` in chunk order (no gradient)."""
        return x if self.group is None else gather_along_dim(x.detach(), dim, self.group)

    @torch.no_grad()
    def kth_largest(self, values: torch.Tensor, k: int, dim: int) -> torch.Tensor:
        """The k-th largest entry along `dim` of the tensor concatenated over the shards, keepdim.

        Each shard contributes only its own min(k, size) largest entries, which always contain the
        global top-k: the exchange is k (not the whole dimension) per slice when k is small.
        """
        if self.group is not None:
            own = min(k, values.shape[dim])
            values = self.gather(values.topk(own, dim=dim).values, dim)
        return values.topk(k, dim=dim).values.narrow(dim, k - 1, 1)

    @torch.no_grad()
    def kth_largest_over_batch(self, values: torch.Tensor, k_per_row: int) -> torch.Tensor:
        """0-dim: the K-th largest entry of every rank's `values` [rows, m] of the global batch
        together, K = k_per_row * (rows summed over `batch_group`); ranks may hold different rows.

        Two all-gathers over `batch_group`: the row counts, then each rank's own min(K, rows * m)
        largest entries (which contain the global top-K), padded with -inf to the longest. One
        process (no batch_group): the K-th largest of `values`.
        """
        flat = values.flatten()
        if self.batch_group is None:
            return flat.topk(k_per_row * values.shape[0]).values[-1]
        world = dist.get_world_size(self.batch_group)
        rows = torch.tensor([values.shape[0]], dtype=torch.long, device=values.device)
        all_rows = [torch.empty_like(rows) for _ in range(world)]
        dist.all_gather(all_rows, rows, group=self.batch_group)
        all_rows = torch.cat(all_rows)
        k = k_per_row * int(all_rows.sum())
        sent = int((all_rows * values.shape[1]).clamp_max(k).max())
        own = flat.topk(min(k, flat.numel())).values
        padded = torch.full((sent,), float("-inf"), dtype=flat.dtype, device=flat.device)
        padded[: own.numel()] = own
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded, group=self.batch_group)
        return torch.cat(gathered).topk(k).values[-1]

    @torch.no_grad()
    def logsumexp(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """logsumexp along `dim` of the tensor concatenated over the shards, keepdim (no gradient)."""
        local = torch.logsumexp(x, dim=dim, keepdim=True)
        return local if self.group is None else torch.logsumexp(self.gather(local, dim), dim=dim, keepdim=True)


ONE_PROCESS = TokenShards()
"""Every token in this process: what a router holds until parallelize() gives it its group."""
