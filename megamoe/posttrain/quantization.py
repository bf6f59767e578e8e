"""Mixed-precision quantization of the routed experts (MC#: bit-widths by importance, chosen by a MILP).

    q = quantize(w, bits, group_size)           # one expert matrix [in, out] -> QuantizedTensor
    w_hat = q.dequantize()                       # fp32, |w - w_hat| <= scale / 2 within each group
    plan = plan_bit_widths(model, stats, average_bits=3.0, group_size=128)  # joint MILP over all layers
    write_quantized(model, cfg, plan, out_dir); model = load_quantized(out_dir)

Scheme: each routed expert's w1 [dim, hidden] and w2 [hidden, dim] is cut into groups of
`group_size` consecutive input rows (the reduction dimension of x @ w), and every (group, output
column) gets its own asymmetric min-max grid: w ~ q * scale + offset with q in [0, 2^bits - 1],
scale and offset (the group minimum, i.e. the zero point in weight units) stored in fp16.
Asymmetric rather than symmetric because at 2 and 3 bits a symmetric grid spends one of its 4 or 8
levels on a sign-balanced range the group rarely has, and the upcycled experts' groups are not
centred; the offset costs 16 bits per group, counted in the budget. The fp16 offset is rounded
down and the fp16 scale up, so the grid covers the group and the rounding error stays within
scale / 2 (the bound the tests check). Integers are bit-packed (bits per weight, LSB first), so
3-bit weights really take 3 bits. Biases, routers, shared experts and everything else stay fp32.

Bit-widths: one per expert from BIT_WIDTHS, chosen jointly over every MoE layer under one budget
of stored bits (integers + fp16 scales and offsets) by scipy's MILP (HiGHS), minimising
sum_e importance_e * error_e(bits): importance = the expert's summed combine weight per
calibration token (RoutingStats.weight_sums / tokens: routing frequency times mean weight),
error = the mean squared output error of the quantized expert on the sampled calibration tokens
that computed it (the rows of RoutingStats.inputs whose routing_map holds the expert), so the
product estimates the squared error the expert adds to its layer's output per token. Both are over
the experts a layer holds: a merged model's (model.moe.merged_from) after its router columns are
folded onto them, never the router's columns.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from megamoe.posttrain.trained_model import PostTrainError

BIT_WIDTHS = (2, 3, 4, 8)
GROUP_OVERHEAD_BITS = 32
"""fp16 scale + fp16 offset per group."""
FORMAT = "megamoe-quantized-experts/1"
MANIFEST = "quantization.json"
CONFIG_FILE = "run_config.yaml"
DENSE_FILE = "model.safetensors"
EXPERTS_FILE = "experts.safetensors"
TOP_ANY_FILE = "top_any.safetensors"
QUANTIZED = ("w1", "w2")


# --------------------------------------------------------------------------------------------
# Bit packing


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers < 2^bits (any shape) -> uint8 [ceil(n * bits / 8)], LSB first."""
    flat = values.reshape(-1).to(torch.uint8)
    if flat.numel() and int(flat.max()) >= 1 << bits:
        raise ValueError(f"pack_bits: a value {int(flat.max())} does not fit in {bits} bits")
    shifts = torch.arange(bits, dtype=torch.uint8)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)
    stream = F.pad(stream, (0, (-stream.numel()) % 8))
    return (stream.view(-1, 8).to(torch.int32) << torch.arange(8, dtype=torch.int32)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of pack_bits: the first `count` integers, uint8 [count]."""
    stream = ((packed.to(torch.uint8)[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
    if stream.numel() < count * bits:
        raise ValueError(f"unpack_bits: {packed.numel()} bytes hold fewer than {count} {bits}-bit values")
    fields = stream[: count * bits].view(count, bits).to(torch.int32)
    return (fields << torch.arange(bits, dtype=torch.int32)).sum(1).to(torch.uint8)


# --------------------------------------------------------------------------------------------
# Group-wise asymmetric min-max quantization of one matrix


def _fp16_toward(x: torch.Tensor, direction: float) -> torch.Tensor:
    """x rounded to fp16, then stepped one fp16 ulp toward `direction` where rounding went the other way."""
    h = x.half()
    wrong = h.float() > x if direction < 0 else h.float() < x
    return torch.where(wrong, torch.nextafter(h, torch.full_like(h, direction)), h)


@dataclass
class QuantizedTensor:
    packed: torch.Tensor  # uint8 [ceil(in * out * bits / 8)]
    scale: torch.Tensor  # fp16 [in / group, out]
    offset: torch.Tensor  # fp16 [in / group, out]
    bits: int
    shape: tuple[int, int]  # (in, out)

    @property
    def group_size(self) -> int:
        return self.shape[0] // self.scale.shape[0]

    def integers(self) -> torch.Tensor:
        return unpack_bits(self.packed, self.bits, math.prod(self.shape)).view(self.shape)

    def dequantize(self) -> torch.Tensor:
        g = self.group_size
        q = self.integers().float().view(-1, g, self.shape[1])
        return (q * self.scale.float()[:, None] + self.offset.float()[:, None]).reshape(self.shape)

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.offset))


def check_group_size(rows: int, group_size: int, what: str = "a matrix") -> None:
    if group_size < 1 or rows % group_size:
        raise PostTrainError(
            f"--group-size {group_size} does not divide the input dimension {rows} of {what}; "
            f"choose a divisor of {rows} (e.g. 64 or 128)"
        )


def quantize(w: torch.Tensor, bits: int, group_size: int) -> QuantizedTensor:
    """w [in, out] -> bits-bit integers with fp16 scale and offset per (group of `group_size` input rows, column)."""
    rows, cols = w.shape
    check_group_size(rows, group_size)
    levels = (1 << bits) - 1
    groups = w.detach().float().reshape(rows // group_size, group_size, cols)
    lo, hi = groups.amin(1), groups.amax(1)
    offset = _fp16_toward(lo, -math.inf)  # <= every weight of the group
    tiny = torch.finfo(torch.float16).smallest_normal * 2.0**-10  # the smallest fp16 subnormal
    scale = _fp16_toward(((hi - offset.float()) / levels).clamp_min(tiny), math.inf)  # grid reaches the max
    q = torch.round((groups - offset.float()[:, None]) / scale.float()[:, None]).clamp_(0, levels)
    return QuantizedTensor(pack_bits(q.reshape(rows, cols), bits), scale, offset, bits, (rows, cols))


def stored_bits(rows: int, cols: int, bits: int, group_size: int) -> int:
    """Bits one quantized [rows, cols] matrix takes: the packed bytes plus fp16 scales and offsets."""
    return 8 * math.ceil(rows * cols * bits / 8) + (rows // group_size) * cols * GROUP_OVERHEAD_BITS


# --------------------------------------------------------------------------------------------
# The MILP


def solve_bit_widths(
    objective: np.ndarray, cost: np.ndarray, budget: int, widths: tuple[int, ...] = BIT_WIDTHS
) -> np.ndarray:
    """One width per row: objective, cost [n, len(widths)] (cost in integer bits); minimise the
    summed objective subject to summed cost <= budget. Returns the chosen column per row [n].

    scipy.optimize.milp (HiGHS) with a zero relative gap (the optimum, not one within 0.01%); the
    integer total is checked afterwards and the budget tightened if tolerances let it slip above.
    Raises PostTrainError when even the cheapest assignment exceeds the budget.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    n, k = objective.shape
    cost = np.asarray(cost, dtype=np.int64)
    floor = int(cost.min(1).sum())
    if floor > budget:
        raise PostTrainError(f"no bit-width assignment fits {budget} bits (the smallest takes {floor})")
    c = objective.reshape(-1).astype(np.float64)
    c = c / c.max() if c.max() > 0 else c
    one_each = np.kron(np.eye(n), np.ones((1, k)))
    # Costs relative to the cheapest width: smaller numbers for the solver, same feasible set.
    extra = (cost - cost.min(1, keepdims=True)).reshape(1, -1).astype(np.float64)
    limit = budget - floor
    while True:
        result = milp(
            c,
            constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(extra, -np.inf, limit)],
            integrality=np.ones(n * k),
            bounds=Bounds(0, 1),
            options={"mip_rel_gap": 0.0, "presolve": True},
        )
        if result.x is None:
            raise PostTrainError(f"the bit-width MILP failed: {result.message}")
        choice = result.x.reshape(n, k).argmax(1)
        used = int(cost[np.arange(n), choice].sum())
        if used <= budget:
            return choice
        limit -= used - budget  # a tolerance let the total slip above: never exceed the budget


# --------------------------------------------------------------------------------------------
# Planning the bit-widths of a model


def _moe_layers(model) -> dict[int, torch.nn.Module]:
    from megamoe.moe.layer import MoEFeedForward

    return {int(n.split(".")[1]): m for n, m in model.named_modules() if isinstance(m, MoEFeedForward)}


def expert_weight_count(model) -> int:
    return sum(m.experts.w1.numel() + m.experts.w2.numel() for m in _moe_layers(model).values())


def expert_stored_bits(experts, bits: int, group_size: int) -> int:
    """Stored bits of one expert's w1 and w2 at `bits`."""
    return stored_bits(experts.dim, experts.hidden, bits, group_size) + stored_bits(
        experts.hidden, experts.dim, bits, group_size
    )


def check_model_group_size(model, group_size: int) -> None:
    """PostTrainError unless `group_size` divides the input rows of every routed expert's w1 and w2."""
    for m in _moe_layers(model).values():
        check_group_size(m.experts.dim, group_size, "w1 (model.dim)")
        check_group_size(m.experts.hidden, group_size, "w2 (the expert hidden width)")


def uniform_average_bits(model, group_size: int, bits: int) -> float:
    """Stored bits per routed-expert weight with every expert at `bits`, scales and offsets included."""
    layers = _moe_layers(model).values()
    total = sum(m.experts.num_experts * expert_stored_bits(m.experts, bits, group_size) for m in layers)
    return total / expert_weight_count(model)


def minimum_average_bits(model, group_size: int) -> float:
    """The smallest --bits-budget: every expert at 2 bits, scales and offsets included."""
    return uniform_average_bits(model, group_size, min(BIT_WIDTHS))


def maximum_average_bits(model, group_size: int) -> float:
    """The largest useful --bits-budget: every expert at 8 bits, scales and offsets included."""
    return uniform_average_bits(model, group_size, max(BIT_WIDTHS))


@dataclass
class BitPlan:
    bits: dict[int, list[int]]  # block -> bit-width per expert
    group_size: int
    budget_bits: int
    used_bits: int
    importance: dict[int, list[float]] = field(default_factory=dict)
    errors: dict[int, list[list[float]]] = field(default_factory=dict)  # [expert][width]
    quantized: dict = field(default_factory=dict)  # (block, expert, name) -> QuantizedTensor


def _expert_out(x, w1, b1, w2, b2):
    return F.gelu(x @ w1 + b1, approximate="tanh") @ w2 + b2


def expert_tokens(layer_stats, expert: int) -> torch.Tensor:
    """The sampled calibration tokens [n, dim] (fp32) that computed `expert` of the layer (the rows of
    `inputs` whose `routing_map` holds it); every sampled token when none did."""
    chosen = layer_stats.routing_map[:, expert].bool()
    tokens = layer_stats.inputs.float()
    return tokens[chosen] if bool(chosen.any()) else tokens


@torch.no_grad()
def plan_bit_widths(model, stats, average_bits: float, group_size: int) -> BitPlan:
    """Quantize every routed expert at every width, measure its errors, and choose the widths by
    the MILP under a budget of `average_bits` stored bits per expert weight (all layers jointly).

    Each expert's error is measured on the sampled tokens that computed it (`expert_tokens`) and
    weighted by its importance (weight_sums / tokens), both over the experts the layer holds."""
    layers = _moe_layers(model)
    check_model_group_size(model, group_size)
    for block, m in layers.items():
        s = stats.layers.get(block)
        held = m.experts.num_experts
        if s is None or s.routing_map.shape[1] != held or s.weight_sums.shape[0] != held:
            raise PostTrainError(
                f"the routing statistics do not cover the {held} experts block {block} holds; "
                f"gather them on this model again"
            )
    budget = math.floor(average_bits * expert_weight_count(model))
    keys, objective, cost = [], [], []
    plan = BitPlan({}, group_size, budget, 0)
    for block, layer in layers.items():
        ex, s = layer.experts, stats.layers[block]
        importance = (s.weight_sums / max(s.num_tokens, 1)).tolist()
        plan.importance[block], plan.errors[block] = importance, []
        for e in range(ex.num_experts):
            x = expert_tokens(s, e)
            ref = _expert_out(x, ex.w1[e], ex.b1[e], ex.w2[e], ex.b2[e])
            errors = []
            for bits in BIT_WIDTHS:
                q1, q2 = quantize(ex.w1[e], bits, group_size), quantize(ex.w2[e], bits, group_size)
                plan.quantized[(block, e, bits)] = (q1, q2)
                out = _expert_out(x, q1.dequantize(), ex.b1[e], q2.dequantize(), ex.b2[e])
                errors.append(float(((out - ref) ** 2).sum(1).mean()))
            plan.errors[block].append(errors)
            keys.append((block, e))
            objective.append([importance[e] * err for err in errors])
            cost.append([expert_stored_bits(ex, bits, group_size) for bits in BIT_WIDTHS])
    floor = sum(min(c) for c in cost)
    if floor > budget:
        raise PostTrainError(
            f"--bits-budget {average_bits} is below the minimum {floor / expert_weight_count(model):.4g} "
            f"(every expert at 2 bits plus fp16 scale and offset per group of {group_size}); raise it"
        )
    choice = solve_bit_widths(np.array(objective), np.array(cost), budget)
    for (block, _), j in zip(keys, choice, strict=True):
        plan.bits.setdefault(block, []).append(BIT_WIDTHS[j])
    plan.used_bits = int(sum(cost[i][j] for i, j in enumerate(choice)))
    plan.quantized = {
        (block, e, name): q
        for (block, e), j in zip(keys, choice, strict=True)
        for name, q in zip(QUANTIZED, plan.quantized[(block, e, BIT_WIDTHS[j])], strict=True)
    }
    return plan


@torch.no_grad()
def apply_plan(model, plan: BitPlan) -> None:
    """Replace each routed expert's w1 and w2 by their dequantized values (in place)."""
    for (block, e, name), q in plan.quantized.items():
        getattr(_moe_layers(model)[block].experts, name)[e].copy_(q.dequantize())


# --------------------------------------------------------------------------------------------
# The output directory and its loader


def _expert_key(block: int, expert: int, name: str) -> str:
    return f"blocks.{block}.ffn.experts.{name}.{expert}"


def _is_quantized_key(key: str) -> bool:
    return ".ffn.experts." in key and key.rsplit(".", 1)[-1] in QUANTIZED


def write_quantized(model, config_text: str, plan: BitPlan, directory, extra: dict | None = None) -> dict:
    """Write DIR: run_config.yaml, model.safetensors (every tensor but the experts' w1/w2, as held),
    experts.safetensors (packed integers, fp16 scales and offsets) and quantization.json. Returns the manifest."""
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not _is_quantized_key(k)}
    save_file(state, directory / DENSE_FILE)
    tensors = {}
    shapes = {}
    for (block, e, name), q in plan.quantized.items():
        key = _expert_key(block, e, name)
        tensors[key + ".packed"], tensors[key + ".scale"], tensors[key + ".offset"] = q.packed, q.scale, q.offset
        shapes[key] = [q.bits, *q.shape]
    save_file(tensors, directory / EXPERTS_FILE)
    (directory / CONFIG_FILE).write_text(config_text)
    manifest = {
        "format": FORMAT,
        "scheme": "asymmetric min-max, fp16 scale and offset per group of input rows",
        "group_size": plan.group_size,
        "bits": {str(b): v for b, v in plan.bits.items()},
        "budget_bits": plan.budget_bits,
        "used_bits": plan.used_bits,
        "tensors": shapes,
        **(extra or {}),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def read_manifest(directory) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        raise PostTrainError(
            f"'{directory}' is not a quantized model directory (no readable {MANIFEST}); "
            f"write one with launcher/quantize_experts.py"
        ) from None
    if manifest.get("format") != FORMAT:
        raise PostTrainError(f"'{directory}' holds format {manifest.get('format')!r}, this loader reads {FORMAT!r}")
    return manifest


def read_run_config(directory):
    from megamoe.config import from_yaml_text

    return from_yaml_text((Path(directory) / CONFIG_FILE).read_text())


def read_quantized_experts(directory) -> dict[str, QuantizedTensor]:
    manifest = read_manifest(directory)
    out = {}
    with safe_open(os.fspath(Path(directory) / EXPERTS_FILE), framework="pt") as f:
        for key, (bits, rows, cols) in manifest["tensors"].items():
            out[key] = QuantizedTensor(
                f.get_tensor(key + ".packed"),
                f.get_tensor(key + ".scale"),
                f.get_tensor(key + ".offset"),
                int(bits),
                (int(rows), int(cols)),
            )
    return out


@torch.no_grad()
def load_quantized(directory) -> torch.nn.Module:
    """The fp32 model of a directory written by launcher/quantize_experts.py, experts dequantized,
    with the top-any routers installed when the directory holds them; eval mode."""
    from safetensors.torch import load_file

    from megamoe.model.dit import build_model

    read_manifest(directory)
    cfg = read_run_config(directory)
    model = build_model(cfg.model, initialize=False)  # every parameter is written next
    state = load_file(os.fspath(Path(directory) / DENSE_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    quantized = read_quantized_experts(directory)
    expected = {f"{k}.{e}" for k in missing for e in range(model.cfg.moe.num_experts)}
    if unexpected or any(not _is_quantized_key(k) for k in missing) or expected != set(quantized):
        raise PostTrainError(
            f"'{directory}' does not match its run config (missing {missing[:3]}, extra {unexpected[:3]})"
        )
    params = dict(model.named_parameters())
    for key, q in quantized.items():
        base, expert = key.rsplit(".", 1)
        params[base][int(expert)].copy_(q.dequantize())
    if (Path(directory) / TOP_ANY_FILE).is_file():
        from megamoe.posttrain.top_any import load_top_any

        load_top_any(model, Path(directory) / TOP_ANY_FILE)
    return model.float().eval()


def stored_parameter_bytes(model, directory) -> dict[str, int]:
    """parameter_bytes as stored in DIR: the model's parameters with each routed expert's w1/w2
    counted at its packed size plus scales and offsets (the top-any masks, when present, included)."""
    total = experts = 0
    for name, p in model.named_parameters():
        if _is_quantized_key(name):
            continue
        size = p.numel() * p.element_size()
        total += size
        experts += size if ".experts." in name else 0
    packed = sum(q.stored_bytes() for q in read_quantized_experts(directory).values())
    return {"total": total + packed, "experts": experts + packed}
