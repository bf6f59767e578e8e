"""Routing traces: which experts sampled tokens visited, where the tokens sit in the video, and
at what noise level (`model.moe.trace_every`, `model.moe.trace_tokens`).

They are the raw material of routing analyses by position and by noise level, as DiT-MoE
(Fei et al. 2024, "Scaling Diffusion Transformers to 16 Billion Parameters", arXiv:2407.11633)
plots expert choice per timestep and per spatial position. (The post-training tools in
megamoe/posttrain/ gather their own statistics on the checkpoint they change: they also need the
layer inputs, and routings of earlier steps describe an earlier router.) Every `trace_every` steps each rank writes what the MoE layers
routed in the last micro-batch of the step (the one diagnostics record too), once the step has
been applied (a skipped step writes nothing); on other steps nothing is recorded or computed.

Layout. One safetensors file per traced step and rank, written atomically:

    <train.output_dir>/routing_traces/step_<step:08d>.rank_<global rank:05d>.safetensors

holding, for every MoE layer `<label>` ('layer03' is block 3, the labels of diagnostics), one
row per traced token:

    <label>.sample    int32   [n]         sample index in this rank's micro-batch
    <label>.position  int64   [n]         token index in the WHOLE sequence of its sample,
                                          f * H' * W' + h * W' + w (global under context and
                                          sequence parallelism: a rank's chunk is offset)
    <label>.frame     int32   [n]         f, h, w: the token's place in the (F', H', W') patch grid
    <label>.row       int32   [n]
    <label>.col       int32   [n]
    <label>.timestep  float32 [n]         the token's noise level in 0..1000 (per token under
                                          Wan2.2 TI2V's per-token timesteps); NaN if not given
    <label>.experts   int32   [n, k_max]  the visited expert columns, ascending, padded with -1;
                                          k_max = the most any traced token of the layer visits
                                          (top_k for token-choice routers; 0..E for expert choice).
                                          Columns >= num_experts are null experts; a merged
                                          layer's (MC-SMoE) columns are its merged experts
    <label>.weights   float32 [n, k_max]  the combine weight of each visited column, 0 at padding

and the metadata (strings): format ('megamoe.routing_trace/1'), step, rank, layers (labels,
comma separated), grid ('F,H,W' patch grid of the whole sequence), positions ('global').

Sampling. With `trace_tokens` = k > 0 each layer traces k of the B * L tokens of the whole
micro-batch, drawn without replacement from a generator seeded by (step, block): the same
tokens in every run, and chosen among global positions, so under context parallelism each rank
writes the chosen tokens of its chunk and the union of a data-parallel rank's context-parallel
files is the one-process trace. k = 0 traces every token. Ranks that hold the same tokens
(tensor parallelism without sequence parallelism) write the same rows.

    traces = load_traces(run_dir)   # [RoutingTrace], sorted by (step, rank)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megamoe.atomic_files import write_atomic
from megamoe.moe.layer import MoEFeedForward
from megamoe.moe.routers.base import RoutingContext

TRACE_DIR = "routing_traces"
FORMAT = "megamoe.routing_trace/1"
FIELDS = ("sample", "position", "frame", "row", "col", "timestep", "experts", "weights")


@dataclass
class LayerTrace:
    """One MoE layer's traced tokens (the fields of the module docstring)."""

    sample: torch.Tensor
    position: torch.Tensor
    frame: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    timestep: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor


@dataclass
class RoutingTrace:
    """One file: a traced step on one rank."""

    step: int
    rank: int
    grid: tuple[int, int, int]
    layers: dict[str, LayerTrace]


def trace_path(run_dir: str | Path, step: int, rank: int) -> Path:
    return Path(run_dir) / TRACE_DIR / f"step_{step:08d}.rank_{rank:05d}.safetensors"


def sampled_tokens(step: int, layer: int, num_tokens: int, k: int) -> torch.Tensor:
    """The k traced token ids (b * L + position over the whole sequences, ascending) of `num_tokens`;
    all of them when k is 0 or at least num_tokens. A pure function of its arguments."""
    if k == 0 or k >= num_tokens:
        return torch.arange(num_tokens)
    seed = np.random.SeedSequence([step, layer]).generate_state(1, dtype=np.uint32)[0]
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(num_tokens, generator=gen)[:k].sort().values


def layer_trace(
    probs: torch.Tensor, routing_map: torch.Tensor, ctx: RoutingContext, token_ids: torch.Tensor
) -> LayerTrace:
    """The rows of one layer's routing (probs, routing_map [N, E_total] for this rank's N = B * L
    tokens) for the traced `token_ids` (over the whole sequences) that this rank holds."""
    if ctx.grid is None:
        raise ValueError("routing traces need RoutingContext.grid (the patch grid); the model sets it")
    f, h, w = ctx.grid
    total_len, local_len = math.prod(ctx.grid), ctx.seq_len
    sample, position = token_ids // total_len, token_ids % total_len
    here = (position >= ctx.token_offset) & (position < ctx.token_offset + local_len)
    sample, position = sample[here], position[here]
    local = position - ctx.token_offset
    rows = (sample * local_len + local).to(routing_map.device)

    chosen = routing_map[rows].cpu()
    num_cols = chosen.shape[1]
    k_max = int(chosen.sum(1).max()) if len(rows) else 0
    # Visited columns first, in ascending order: unvisited ones sort last as num_cols.
    cols = torch.where(chosen, torch.arange(num_cols), num_cols).sort(1).values[:, :k_max]
    visited = cols < num_cols
    weights = probs[rows].detach().float().cpu().gather(1, cols.clamp(max=num_cols - 1)) * visited

    if ctx.timestep is None:
        timestep = torch.full((len(rows),), float("nan"))
    elif ctx.timestep.ndim == 1:
        timestep = ctx.timestep.detach().float().cpu()[sample]
    else:
        timestep = ctx.timestep.detach().float().cpu()[sample, local]
    return LayerTrace(
        sample=sample.int(),
        position=position.long(),
        frame=(position // (h * w)).int(),
        row=(position // w % h).int(),
        col=(position % w).int(),
        timestep=timestep,
        experts=torch.where(visited, cols, -1).int(),
        weights=weights,
    )


def moe_layer_labels(model: torch.nn.Module) -> list[tuple[str, MoEFeedForward]]:
    """(label, layer) of the model's MoE layers: 'layerNN' for the layer in block NN."""
    found = []
    for i, (name, module) in enumerate(m for m in model.named_modules() if isinstance(m[1], MoEFeedForward)):
        block = re.search(r"blocks\.(\d+)\.", name + ".")
        found.append((f"layer{int(block.group(1)) if block else i:02d}", module))
    return found


class RoutingTracer:
    """Records the MoE layers' routings of a micro-batch and writes them as this rank's trace file.

    tracer.start()          # before the traced forward: the layers keep their routing
    tracer.capture(step)    # after it: the traced rows are taken (small)
    tracer.stop()           # the layers stop keeping their routing
    tracer.write(step)      # after the applied step; or tracer.discard() after a skipped one
    """

    def __init__(self, model: torch.nn.Module, trace_tokens: int, run_dir: str | Path, rank: int):
        self.layers = moe_layer_labels(model)
        self.trace_tokens = trace_tokens
        self.run_dir, self.rank = Path(run_dir), rank
        self.pending: tuple[tuple[int, int, int], dict[str, LayerTrace]] | None = None

    def start(self) -> None:
        for _, layer in self.layers:
            layer.record = True

    def capture(self, step: int) -> None:
        traces, grid = {}, None
        for label, layer in self.layers:
            probs, routing_map, ctx = layer.last_routing
            grid = ctx.grid
            ids = sampled_tokens(step, int(label[5:]), ctx.batch_size * math.prod(ctx.grid), self.trace_tokens)
            traces[label] = layer_trace(probs, routing_map, ctx, ids)
        self.pending = (grid, traces)

    def stop(self) -> None:
        for _, layer in self.layers:
            layer.record = False

    def discard(self) -> None:
        self.pending = None

    def write(self, step: int) -> Path:
        grid, traces = self.pending
        self.pending = None
        tensors = {f"{label}.{name}": getattr(t, name).contiguous() for label, t in traces.items() for name in FIELDS}
        metadata = {
            "format": FORMAT,
            "step": str(step),
            "rank": str(self.rank),
            "layers": ",".join(traces),
            "grid": ",".join(map(str, grid)),
            "positions": "global",
        }
        path = trace_path(self.run_dir, step, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
        return path


def read_trace(path: str | Path) -> RoutingTrace:
    """One trace file; ValueError if it is not one."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a routing trace ({FORMAT}); format is {meta.get('format')!r}")
        labels = meta["layers"].split(",") if meta["layers"] else []
        layers = {label: LayerTrace(**{name: f.get_tensor(f"{label}.{name}") for name in FIELDS}) for label in labels}
    grid = tuple(int(x) for x in meta["grid"].split(","))
    return RoutingTrace(step=int(meta["step"]), rank=int(meta["rank"]), grid=grid, layers=layers)


def load_traces(run_dir: str | Path) -> list[RoutingTrace]:
    """Every trace file of a run directory (train.output_dir), sorted by (step, rank); [] if the run
    traced nothing yet. FileNotFoundError if `run_dir` is not a directory (a typo must not read as
    'no traces')."""
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run directory (train.output_dir); no routing traces there")
    files = sorted((Path(run_dir) / TRACE_DIR).glob("step_*.rank_*.safetensors"))
    return sorted((read_trace(p) for p in files), key=lambda t: (t.step, t.rank))
