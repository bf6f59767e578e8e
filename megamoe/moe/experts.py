"""The routed experts of one MoE layer, stored stacked so one grouped GEMM runs them all.

Parameters (layouts fixed: upcycling clones the dense FFN into them, and expert
parallelism will shard them along dim 0):

    w1 [E, dim, hidden]   expert e's first linear is  x @ w1[e] + b1[e]   (= net.0.proj.weight.T)
    b1 [E, hidden]
    w2 [E, hidden, dim]   expert e's second linear is h @ w2[e] + b2[e]   (= net.2.weight.T)
    b2 [E, dim]

with GELU-tanh in between, exactly the dense `FeedForward`. `num_experts` is the number of
experts this module holds, which under expert parallelism is a slice of the global experts;
nothing here assumes the expert ids are global.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.model.init import ZEROS, Init, reset_parameters

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_supported(tokens: torch.Tensor, dim: int, hidden: int) -> bool:
    """Whether `torch._grouped_mm` accepts this call (measured on torch 2.13).

    It needs fp32/bf16/fp16 operands of one dtype, int32 offsets, and every row stride a
    multiple of 16 bytes (so `dim` and `hidden` times the element size). It has no bias
    operand on CPU (bias is added separately), and its backward fails for zero rows, which
    `GroupedExperts` therefore always runs on the loop.
    """
    item = tokens.element_size()
    return tokens.dtype in _GROUPED_MM_DTYPES and (dim * item) % 16 == 0 and (hidden * item) % 16 == 0


def _contiguous_grad(grad: torch.Tensor) -> torch.Tensor:
    # _grouped_mm's backward rejects the stride-0 gradients that e.g. `.sum().backward()` produces.
    return grad.contiguous()


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
        """None: torch._grouped_mm whenever `grouped_mm_supported`; False: the per-expert loop
        (the reference); True: grouped_mm or an error (zero tokens still take the loop)."""
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

    def forward(self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """tokens [M, dim] grouped by expert in expert order; tokens_per_expert [E] ints summing
        to M -> [M, dim], row i the output of the expert that row i belongs to."""
        if tokens.ndim != 2 or tokens.shape[1] != self.dim:
            raise ValueError(f"expert input must be [M, {self.dim}], got {tuple(tokens.shape)}")
        if tokens_per_expert.shape != (self.num_experts,):
            raise ValueError(
                f"tokens_per_expert must have {self.num_experts} entries, got {tuple(tokens_per_expert.shape)}"
            )
        # Under autocast, compute in its dtype as nn.Linear would, on both paths alike.
        dtype = (
            torch.get_autocast_dtype(tokens.device.type)
            if torch.is_autocast_enabled(tokens.device.type)
            else tokens.dtype
        )
        tokens = tokens.to(dtype)
        weights = [p.to(dtype) for p in (self.w1, self.b1, self.w2, self.b2)]
        use = self.use_grouped_mm
        supported = grouped_mm_supported(tokens, self.dim, self.hidden)
        if use and not supported:
            raise ValueError(
                f"torch._grouped_mm cannot run {dtype} tokens [{tokens.shape[0]}, {self.dim}] with "
                f"hidden {self.hidden} (needs fp32/bf16/fp16 and 16-byte row strides); "
                f"set use_grouped_mm=None to fall back to the loop"
            )
        if use is None:
            use = supported
        use = use and tokens.shape[0] > 0
        with torch.autocast(tokens.device.type, enabled=False):
            if use:
                return self._grouped(tokens, tokens_per_expert, *weights)
            return self._loop(tokens, tokens_per_expert, *weights)

    @staticmethod
    def _grouped(x, tokens_per_expert, w1, b1, w2, b2):
        ends = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
        # Row r's expert, for the biases (grouped_mm takes no bias on CPU).
        expert_of_row = torch.repeat_interleave(
            torch.arange(len(tokens_per_expert), device=x.device), tokens_per_expert, output_size=x.shape[0]
        )
        h = torch._grouped_mm(x.contiguous(), w1, offs=ends)
        if h.requires_grad:
            h.register_hook(_contiguous_grad)
        h = F.gelu(h + b1.index_select(0, expert_of_row), approximate="tanh")
        y = torch._grouped_mm(h, w2, offs=ends)
        if y.requires_grad:
            y.register_hook(_contiguous_grad)
        return y + b2.index_select(0, expert_of_row)

    @staticmethod
    def _loop(x, tokens_per_expert, w1, b1, w2, b2):
        # Empty experts run too (a 0-row matmul), so every parameter is in the graph and gets a
        # (zero) gradient: data-parallel gradient hooks expect the same parameters on all ranks.
        outs = []
        for e, chunk in enumerate(x.split(tokens_per_expert.tolist())):
            h = F.gelu(chunk @ w1[e] + b1[e], approximate="tanh")
            outs.append(h @ w2[e] + b2[e])
        return torch.cat(outs)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}"
