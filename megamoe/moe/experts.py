"""The routed experts of one MoE layer, stored stacked so one grouped GEMM runs them all.

Parameters (layouts fixed: upcycling clones the dense FFN into them, and expert
parallelism shards them along dim 0):

    w1 [E, dim, hidden]   expert e's first linear is  x @ w1[e] + b1[e]   (= net.0.proj.weight.T)
    b1 [E, hidden]
    w2 [E, hidden, dim]   expert e's second linear is h @ w2[e] + b2[e]   (= net.2.weight.T)
    b2 [E, dim]

with GELU-tanh in between, exactly the dense `FeedForward`. `num_experts` is the number of
experts this module holds, which under expert parallelism is a slice of the global experts;
nothing here assumes the expert ids are global.

The layer's path is `forward`: a fused gather -> expert FFN -> weighted scatter-add, with an
explicit backward, so that no [M, dim] tensor of gathered tokens, expert outputs or weighted
outputs is ever built or saved (M = token-expert assignments, k times the tokens):

    out[index[i]] += weights[i] * (gelu(x[index[i]] @ w1[e] + b1[e]) @ w2[e])    for row i of expert e

The routing weight multiplies the hidden activation [M, hidden] (narrower than dim in
fine-grained MoE) before the second GEMM rather than the output. The second bias is left out:
each token's weighted share of it, sum_e p[t, e] * b2[e], is one [N, E] x [E, dim] product that
the MoE layer adds (per-row bias gathers would cost two more [M, dim] passes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.model.init import ZEROS, Init, reset_parameters

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_supported(tokens: torch.Tensor, dim: int, hidden: int) -> bool:
    """Whether `torch._grouped_mm` accepts these operands (measured on torch 2.13).

    It needs fp32/bf16/fp16 operands of one dtype, int32 offsets, and every row stride a
    multiple of 16 bytes (so `dim` and `hidden` times the element size). It has no bias
    operand (the first bias is added as one [M, hidden] pass).
    """
    item = tokens.element_size()
    return tokens.dtype in _GROUPED_MM_DTYPES and (dim * item) % 16 == 0 and (hidden * item) % 16 == 0


class _ExpertFFN(torch.autograd.Function):
    """The fused expert FFN of `GroupedExperts.forward`, with an explicit backward.

    Saves for backward only x (the layer's tokens, which its router keeps anyway; under expert
    parallelism the rows the all-to-all delivered), the index and weights, and the first linear's
    pre-activation [M, hidden]; the gathered rows and the GELU output are recomputed in backward,
    and the [M, dim] output rows never exist.
    """

    @staticmethod
    def forward(ctx, x, index, weights, tokens_per_expert, grouped, w1, b1, w2):
        # The loop needs the counts on the host; grouped_mm reads them on the device (no sync).
        counts = None if grouped else tokens_per_expert.tolist()
        out = x.new_zeros(x.shape[0], w2.shape[2], dtype=torch.promote_types(x.dtype, weights.dtype))
        if grouped:
            ends = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
            expert_of_row = torch.repeat_interleave(
                torch.arange(len(tokens_per_expert), device=x.device), tokens_per_expert, output_size=index.numel()
            )
            pre = torch._grouped_mm(x.index_select(0, index), w1, offs=ends)
            pre += b1.index_select(0, expert_of_row)
            hidden = (F.gelu(pre, approximate="tanh") * weights[:, None]).to(x.dtype)
            out.index_add_(0, index, torch._grouped_mm(hidden, w2, offs=ends).to(out.dtype))
        else:
            # One expert at a time: every temporary is one expert's rows (allocator-friendly on CPU).
            pre = x.new_empty(index.numel(), w1.shape[2])
            start = 0
            for e, n in enumerate(counts):
                rows = slice(start, start + n)
                torch.addmm(b1[e], x.index_select(0, index[rows]), w1[e], out=pre[rows])
                hidden = F.gelu(pre[rows], approximate="tanh").mul_(weights[rows, None])
                out.index_add_(0, index[rows], (hidden @ w2[e]).to(out.dtype))
                start += n
        ctx.grouped, ctx.counts = grouped, counts
        ctx.save_for_backward(x, index, weights, tokens_per_expert, pre, w1, b1, w2)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, index, weights, tokens_per_expert, pre, w1, b1, w2 = ctx.saved_tensors
        grad_out = grad_out.to(x.dtype)
        grad_x = torch.zeros_like(x)
        grad_weights = torch.empty_like(weights)
        if ctx.grouped:
            ends = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
            rows_in, grad_rows = x.index_select(0, index), grad_out.index_select(0, index)
            act = F.gelu(pre, approximate="tanh")
            grad_w2 = torch._grouped_mm((act * weights[:, None]).to(x.dtype).t(), grad_rows, offs=ends)
            grad_hidden = torch._grouped_mm(grad_rows, w2.transpose(1, 2), offs=ends)
            grad_weights.copy_((grad_hidden.float() * act.float()).sum(1))
            grad_act = (grad_hidden * weights[:, None]).to(x.dtype)
            grad_pre = torch.ops.aten.gelu_backward(grad_act, pre, approximate="tanh")
            grad_w1 = torch._grouped_mm(rows_in.t(), grad_pre, offs=ends)
            expert_of_row = torch.repeat_interleave(
                torch.arange(len(tokens_per_expert), device=x.device), tokens_per_expert, output_size=index.numel()
            )
            grad_b1 = torch.zeros_like(b1).index_add_(0, expert_of_row, grad_pre)
            grad_x.index_add_(0, index, torch._grouped_mm(grad_pre, w1.transpose(1, 2), offs=ends))
        else:
            grad_w1, grad_b1, grad_w2 = torch.empty_like(w1), torch.empty_like(b1), torch.empty_like(w2)
            start = 0
            for e, n in enumerate(ctx.counts):
                rows = slice(start, start + n)
                idx, weight = index[rows], weights[rows, None]
                grad_rows = grad_out.index_select(0, idx)
                act = F.gelu(pre[rows], approximate="tanh")
                grad_hidden = grad_rows @ w2[e].t()
                grad_weights[rows] = torch.linalg.vecdot(grad_hidden.float(), act.float())
                torch.mm(act.mul_(weight).t(), grad_rows, out=grad_w2[e])  # act * weight: the second GEMM's input
                grad_pre = torch.ops.aten.gelu_backward(grad_hidden.mul_(weight), pre[rows], approximate="tanh")
                torch.mm(x.index_select(0, idx).t(), grad_pre, out=grad_w1[e])
                torch.sum(grad_pre, 0, out=grad_b1[e])
                grad_x.index_add_(0, idx, grad_pre @ w1[e].t())
                start += n
        return grad_x, None, grad_weights, None, None, grad_w1, grad_b1, grad_w2


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        if num_experts < 1 or dim < 1 or hidden < 1:
            raise ValueError(
                f"GroupedExperts needs positive sizes, got experts={num_experts} dim={dim} hidden={hidden}"
            )
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.use_grouped_mm: bool | None = None
        """None: torch._grouped_mm on CUDA when `grouped_mm_supported`, the per-expert loop of plain
        GEMMs elsewhere (on CPU the loop is the faster); False: the loop; True: grouped_mm or an error."""
        self.reset_parameters()

    def parameter_inits(self) -> dict[str, Init]:
        """Each expert as the model initialises a dense FFN: Xavier-uniform weights, zero bias.

        Per-expert Xavier (fans dim and hidden) rather than over the stacked tensor, whose
        fans would include E and shrink the weights as experts are added.
        """
        expert = Init.xavier_uniform(self.dim, self.hidden)
        return {"w1": expert, "b1": ZEROS, "w2": expert, "b2": ZEROS}

    def reset_parameters(self) -> None:
        reset_parameters(self)

    def forward(
        self, x: torch.Tensor, index: torch.Tensor, tokens_per_expert: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Weighted sum of expert outputs per row of x, without the second bias (see the module doc).

        x [S, dim] (the layer's tokens, or the rows an all-to-all delivered); index [M] int64 rows
        of x, grouped by expert in expert order; tokens_per_expert [E] ints summing to M; weights
        [M] the routing weight of each assignment. Returns [S, dim] in the promoted dtype of x and
        weights (fp32 weights: an fp32 sum), with out[s] = sum over i with index[i] = s of
        weights[i] * (gelu(x[s] @ w1[e_i] + b1[e_i]) @ w2[e_i]); rows no assignment names are 0.
        Raises ValueError on mismatched shapes, or when use_grouped_mm=True cannot run.
        """
        m = index.shape[0]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expert input must be [S, {self.dim}], got {tuple(x.shape)}")
        if tokens_per_expert.shape != (self.num_experts,):
            raise ValueError(
                f"tokens_per_expert must have {self.num_experts} entries, got {tuple(tokens_per_expert.shape)}"
            )
        if weights.shape != (m,):
            raise ValueError(f"weights must be [{m}] like index, got {tuple(weights.shape)}")
        # Under autocast, compute in its dtype as nn.Linear would, on both paths alike.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x = x.to(dtype)
        use = self.use_grouped_mm
        supported = grouped_mm_supported(x, self.dim, self.hidden)
        if use and not supported:
            raise ValueError(
                f"torch._grouped_mm cannot run {dtype} tokens with dim {self.dim} and hidden {self.hidden} "
                f"(needs fp32/bf16/fp16 and 16-byte row strides); set use_grouped_mm=None to fall back to the loop"
            )
        if use is None:
            use = supported and x.device.type == "cuda"
        use = use and m > 0  # nothing to multiply: the loop returns zeros and zero gradients
        with torch.autocast(x.device.type, enabled=False):
            w1, b1, w2 = (p.to(dtype) for p in (self.w1, self.b1, self.w2))
            return _ExpertFFN.apply(x, index, weights, tokens_per_expert, bool(use), w1, b1, w2)

    def rows(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Each row through its expert, unweighted and with both biases: rows [M, dim] grouped by
        expert -> [M, dim]. The plain form of the experts, for tools and tests."""
        m = rows.shape[0]
        index = torch.arange(m, device=rows.device)
        out = self(rows, index, tokens_per_expert, torch.ones(m, device=rows.device))
        return out + self.b2.repeat_interleave(tokens_per_expert, dim=0, output_size=m)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}"
