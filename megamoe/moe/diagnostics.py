"""Live per-layer routing diagnostics for the failure modes of the seed study.

Every `moe.diagnostics_every` steps the loop turns recording on for one forward pass, then
asks for a report built from what each MoE layer recorded (`layer.last_routing =
(probs [N, E_total] fp32, routing_map [N, E_total] bool, RoutingContext)`) and from its
parameters:

    diag = RoutingDiagnostics(model, cfg.model.moe)
    diag.enable_recording(True); loss = ...forward...; diag.enable_recording(False)
    diag.snapshot_router_params(); engine.step(); diag.measure_bf16_loss()
    report = diag.compute(step); write_tensorboard(writer, report, step); report.warnings

Failure modes and how they show (per layer, scalars named `moe/layerNN/<name>`, NN = block index):
  load imbalance      `max_violation` = max load / mean load - 1 (0 = balanced), `load_entropy`
                      (entropy of the load over real experts / log E, 1 = balanced)
  dead experts        `dead_experts` (load 0 this diagnostic), `dead_streak` (most consecutive
                      diagnostics any expert has been dead); warns after `dead_patience`
  selective deadlock  `monopoly_share`: of the tokens that chose a real expert, the fraction whose
                      top-1 expert (largest combine weight) is the layer's most common top-1 expert.
                      The top-1 share, not the largest expert's share of all assignments: with top-k
                      routing that share is at most 1/k (a token's k picks are distinct experts), so
                      a layer stuck on one expert shows as top-1 share near 1 for any k.
                      With expert groups (Router.expert_groups: a timestep band's experts), the
                      share within each group of two or more experts, the largest over groups (no
                      scalar when every group has one expert); an expert of a group that no token
                      reached is unobserved, not dead, and keeps its streak.
                      `deadlock_streak` counts consecutive recorded diagnostics with monopoly_share
                      strictly above `deadlock_share`; it warns on the diagnostic where the streak
                      reaches `deadlock_patience`
  homogenization      `expert_output_similarity` (see `expert_output_similarity()`): mean pairwise
                      cosine of the experts' OUTPUTS on a sample of the tokens routed to them, the
                      alarm's scalar; under expert parallelism it covers only the experts this rank
                      holds and is named `expert_output_similarity_local`. Second scalars: the
                      weight cosine `expert_similarity` (mean pairwise cosine of the flattened w1 of
                      the experts held) and `expert_similarity_nn` (mean similarity to each expert's
                      nearest other, which also catches replicated fine-grained slices). Upcycled
                      experts start at 1.0, so it warns only when the output similarity is strictly
                      above `homogenization_similarity` at a step >= `homogenization_grace_steps`
  soft saturation     `mean_max_prob` (mean over tokens of the largest combine weight),
                      `token_entropy` (nats, of each token's combine weights normalised to sum 1),
                      `router_logit_gap`: mean log(p_max / p_min) over the experts a token selected,
                      i.e. the top-1 minus top-k logit for softmax routers, recovered from probs
                      alone because routers do not return logits; `router_logit_norm` (mean L2 norm
                      of the logits per token) only if the router keeps `last_logits` [N, E];
                      `router_param_norm`
  bf16 truncation     `bf16_lost_update_frac`: of the router elements an optimizer step changed,
                      the fraction whose bf16 value did not change (see `track_router_update`)
  shared vs routed    `shared_routed_norm_ratio` = |shared output| / |routed output|, from
                      `layer.last_output_norms = (shared_norm, routed_norm)` that the layer stores
                      when recording (absent -> scalar absent)
  compute per token    `experts_per_token`: real experts a token visits, mean over tokens (top_k
                      for token choice; variable for Expert Race, DiffMoE, DynMoLE, null experts)
  timestep dependence `t<b>_max_violation` per timestep bucket; per-bucket per-expert loads in
                      `report.timestep_load` [layers, buckets, experts]

Depth profile (the seed study's U shape of deadlock over depth): `report.depth_profile` holds one
code per MoE layer in depth order, from the alarms in force after the report: 'D' selective
deadlock, 'H' homogenization, 'B' both, '.' neither. It is a JSON field of diagnostics.jsonl,
`report.depth_line()` for the log, a text and a 2 x layers image (`moe/depth_profile`) in
tensorboard, and the counts `moe/deadlocked_layers`, `moe/homogenized_layers`.

Precision: `check_router_precision` (run once at start-up, after the engine wraps the model)
refuses a router parameter whose optimizer master copy is bf16, or a floating router buffer
(aux-free bias, thresholds) held in bf16: bf16 drops updates below 2^-8 of a value's magnitude.

A step skipped for a non-finite loss gets no report: call `discard_step()` instead of
`measure_bf16_loss()` and `compute()`, and it counts towards no streak.

A failure mode warns once when it starts and again only after it has recovered. Counts come
from the local micro-batch of the last recorded forward; pass `reduce` (sum over data-parallel
ranks, as in Router.after_step) to diagnose the global batch instead. The output similarity is
always this rank's (its tokens, its experts): `reduce` does not apply to it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from megamoe.config import MoEConfig
from megamoe.moe.heatmap import heatmap, labelled_heatmap
from megamoe.moe.routers.base import Router


@dataclass
class DiagnosticsThresholds:
    deadlock_share: float = 0.9
    """Top-1 monopoly share above which a diagnostic counts towards selective deadlock."""
    deadlock_patience: int = 3
    """Consecutive diagnostics above `deadlock_share` before 'selective deadlock' warns."""
    dead_patience: int = 2
    """Consecutive diagnostics with zero load before 'dead experts' warns (one micro-batch can miss an expert)."""
    homogenization_similarity: float = 0.99
    """Mean pairwise cosine of expert outputs (`expert_output_similarity`) above which experts count as homogenized."""
    homogenization_grace_steps: int = 2000
    """Steps during which upcycled (identical) experts are expected and do not warn."""
    timestep_buckets: int = 4
    """Equal-width buckets over timesteps 0..1000 for load by timestep."""


@dataclass
class DiagnosticsReport:
    step: int
    scalars: dict = field(default_factory=dict)
    """name -> float, e.g. 'moe/layer03/max_violation'."""
    load_matrix: np.ndarray = None
    """[MoE layers, real experts] fraction of the layer's expert assignments (rows sum to 1)."""
    timestep_load: np.ndarray | None = None
    """[MoE layers, buckets, real experts] the same per timestep bucket (rows of empty buckets are 0)."""
    layer_names: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    depth_profile: list = field(default_factory=list)
    """One code per MoE layer, aligned with layer_names: 'D' deadlock, 'H' homogenization, 'B' both, '.' neither."""

    def depth_line(self) -> str:
        """The depth profile as one log line, e.g. 'moe depth profile layer01..layer29: D . . H D'."""
        span = f" {self.layer_names[0]}..{self.layer_names[-1]}" if self.layer_names else ""
        return f"moe depth profile{span}: {' '.join(self.depth_profile)} (D deadlock, H homogenized, B both)"

    def to_json(self) -> str:
        def plain(a):
            return None if a is None else np.asarray(a).tolist()

        return json.dumps(
            {
                "step": self.step,
                "scalars": self.scalars,
                "layer_names": self.layer_names,
                "load_matrix": plain(self.load_matrix),
                "timestep_load": plain(self.timestep_load),
                "warnings": self.warnings,
                "depth_profile": self.depth_profile,
            }
        )


def track_router_update(before: dict, after: dict) -> float:
    """Fraction of changed elements (fp32 after != before) whose bf16 value did not change: the
    part of the update that bf16 weights would have lost. 0.0 when nothing changed."""
    lost, changed = _bf16_counts(before, after)
    return sum(lost.values()) / max(1, sum(changed.values()))


def _bf16_counts(before: dict, after: dict) -> tuple[dict, dict]:
    lost, changed = {}, {}
    for name, old in before.items():
        old, new = old.float(), after[name].float()
        moved = new != old
        lost[name] = int((moved & (old.bfloat16() == new.bfloat16())).sum())
        changed[name] = int(moved.sum())
    return lost, changed


def expert_similarity(w: torch.Tensor, chunk: int = 1 << 16) -> tuple[float, float]:
    """(mean pairwise cosine, mean nearest-other cosine) of w [E, ...] flattened per expert.
    The Gram matrix is accumulated over column chunks so no fp32 copy of all experts is made."""
    flat = w.detach().flatten(1)
    e = flat.shape[0]
    if e < 2:
        return 1.0, 1.0
    gram = torch.zeros(e, e, dtype=torch.float64, device=flat.device)
    for part in flat.split(chunk, dim=1):
        part = part.float()
        gram += (part @ part.t()).double()
    norm = gram.diagonal().clamp_min(1e-300).sqrt()
    cos = gram / norm[:, None] / norm[None, :]
    eye = torch.eye(e, dtype=torch.bool, device=cos.device)
    return float(cos[~eye].mean()), float(cos.masked_fill(eye, -2.0).amax(1).mean())


EXPERT_SAMPLE_CAP = 64
"""Tokens per expert, at most, that a recording MoE layer keeps for `expert_output_similarity`."""


def sample_expert_inputs(
    tokens: torch.Tensor, routing_map: torch.Tensor, num_experts: int, cap: int = EXPERT_SAMPLE_CAP
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens an MoE layer keeps while recording, for comparing its experts' outputs.

    tokens [N, dim], routing_map [N, E_total] bool (columns >= num_experts are null experts and are
    ignored). Of the n_e tokens routed to expert e, those at ranks r (0-based, token order) with
    floor((r + 1) * cap / n_e) > floor(r * cap / n_e) are kept: all of them when n_e <= cap, else
    exactly `cap` spread evenly over the micro-batch (deterministic, no RNG drawn). Returns
    (rows [S, dim] detached, member [S, num_experts] bool): the union of the kept tokens in token
    order, and which expert's sample each belongs to. Costs one [N, E] cumsum and a gather, only
    on recorded forwards.
    """
    real = routing_map[:, :num_experts]
    n = real.sum(0, keepdim=True).clamp_min(1)
    rank = real.long().cumsum(0) - 1
    member = real & ((rank + 1) * cap // n > rank * cap // n)
    keep = member.any(1)
    return tokens.detach()[keep], member[keep]


@torch.no_grad()
def expert_output_similarity(
    experts, rows: torch.Tensor, member: torch.Tensor, max_rows: int = 8192
) -> tuple[float, int]:
    """Mean pairwise cosine of experts' outputs on the tokens routed to them (homogenization).

    experts: GroupedExperts holding E experts; rows [S, dim]; member [S, E] bool, rows routed to
    each expert (`sample_expert_inputs`, restricted to these experts' columns). For each pair
    i < j with X_ij = {rows routed to i or to j} non-empty,

        c_ij = mean over x in X_ij of cos(FFN_i(x), FFN_j(x)),   FFN_e(x) = gelu(x w1_e + b1_e) w2_e + b2_e

    and the result is the mean of c_ij over those pairs (fp32 experts, fp64 cosines). 1.0 means every
    expert computes the same function (up to scale) where it is used, as upcycled clones do.
    Returns (similarity, pairs); pairs = 0 (similarity nan) when fewer than two experts or no row.
    Every expert runs on every row: E * S rows, `max_rows` at a time.
    """
    s, e = member.shape
    if e < 2 or s == 0:
        return math.nan, 0
    cos_sum = torch.zeros(e, e, dtype=torch.float64, device=rows.device)
    count = torch.zeros(e, e, dtype=torch.float64, device=rows.device)
    chunk = max(1, max_rows // e)
    for x, m in zip(rows.float().split(chunk), member.split(chunk)):
        c = x.shape[0]
        per_expert = torch.full((e,), c, dtype=torch.long, device=x.device)
        out = experts.rows(x.repeat(e, 1), per_expert).view(e, c, -1)
        # Cosines in fp64, so that a value next to the alarm's threshold is not a rounding artefact.
        unit = torch.nn.functional.normalize(out.double(), dim=-1)
        cos = torch.einsum("isd,jsd->sij", unit, unit)  # [c, E, E]
        used = (m[:, :, None] | m[:, None, :]).double()  # row s in X_ij
        cos_sum += (cos * used).sum(0)
        count += used.sum(0)
    pair = torch.triu(torch.ones(e, e, dtype=torch.bool, device=rows.device), 1) & (count > 0)
    if not pair.any():
        return math.nan, 0
    return float((cos_sum[pair] / count[pair]).mean()), int(pair.sum())


_HALF = (torch.bfloat16, torch.float16)


def check_router_precision(model: torch.nn.Module, master_dtype: Callable | None = None) -> None:
    """Raise RuntimeError, one line naming the tensor and the fix, if a router's state is bf16 where
    updates land: a trainable parameter whose optimizer master is bf16, or a floating buffer
    (aux-free bias, Expert Race threshold) held in bf16. bf16 keeps 8 significant bits, so an update
    below 2^-8 of a value's magnitude vanishes silently (the seed study's lost router updates).

    master_dtype(name, param) -> dtype of the copy the optimizer updates, or None where this rank
    holds none of it (ZeRO partitions); default: the parameter itself. Under DeepSpeed bf16 the
    module's router weights are bf16 but its masters fp32: that passes (routers compute in fp32).
    Run once after the engine wraps the model.
    """
    for name, module in model.named_modules():
        router = getattr(module, "router", None)
        if not isinstance(router, Router) or not hasattr(module, "experts"):
            continue
        for pname, param in router.named_parameters():
            full = f"{name}.router.{pname}"
            dtype = master_dtype(full, param) if master_dtype is not None else param.dtype
            if param.requires_grad and dtype in _HALF:
                raise RuntimeError(
                    f"router parameter {full}: the optimizer updates a {dtype} copy, which loses small router "
                    f"updates; train in fp32 or with train.precision=bf16 (DeepSpeed keeps fp32 masters)"
                )
        for bname, buffer in router.named_buffers():
            if buffer.dtype in _HALF:
                raise RuntimeError(
                    f"router buffer {name}.router.{bname} is {buffer.dtype}, which loses its small in-place "
                    f"updates; the router must keep it fp32 through module casts (see Router.fp32_buffers)"
                )


def write_tensorboard(writer, report: DiagnosticsReport, step: int) -> None:
    """Scalars, the [layers x experts] load heatmap under 'moe/load_heatmap' (moe/heatmap.py's
    labelled_heatmap: layers down, experts across, a colour bar from 0 through the mean load 1/E to
    2x mean or more; dead experts black-purple), warnings as text, and the depth profile as text and a
    [2 x layers] image under 'moe/depth_profile'."""
    for name, value in report.scalars.items():
        writer.add_scalar(name, value, step)
    if report.load_matrix is not None and report.load_matrix.size:
        experts = report.load_matrix.shape[1]
        image = labelled_heatmap(
            report.load_matrix,
            2.0 / experts,
            list(report.layer_names),
            f"expert load at step {step}: share of a layer's routed tokens",
            scale_label="load",
            marks={1.0 / experts: "mean"},
        )
        writer.add_image("moe/load_heatmap", image, step, dataformats="HWC")
    if report.warnings:
        writer.add_text("moe/warnings", "  \n".join(report.warnings), step)
    if report.depth_profile:
        writer.add_text("moe/depth_profile", report.depth_line(), step)
        # Row 0 deadlock, row 1 homogenization, one column per MoE layer in depth order: bright = alarm.
        rows = [[c in "DB" for c in report.depth_profile], [c in "HB" for c in report.depth_profile]]
        writer.add_image("moe/depth_profile", heatmap(np.array(rows, dtype=np.float64), 1.0), step, dataformats="HWC")
    writer.flush()


class RoutingDiagnostics:
    def __init__(
        self,
        model: torch.nn.Module,
        moe_cfg: MoEConfig,
        thresholds: DiagnosticsThresholds | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        # Duck-typed so a DeepSpeed engine or a wrapped model works: an MoE layer has a Router and experts.
        self.layers = [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(getattr(m, "router", None), Router) and hasattr(m, "experts")
        ]
        self.labels = []
        for i, (name, _) in enumerate(self.layers):
            found = re.search(r"blocks\.(\d+)\.", name + ".")
            self.labels.append(f"layer{int(found.group(1)) if found else i:02d}")
        self.num_experts = moe_cfg.num_experts
        self.t = thresholds or DiagnosticsThresholds()
        self.reduce = reduce
        n = len(self.layers)
        self.dead_streak = np.zeros((n, self.num_experts), dtype=np.int64)
        self.deadlock_streak = np.zeros(n, dtype=np.int64)
        self._active: set[tuple[str, str]] = set()  # (label, failure mode) currently warned about
        self._snapshot: dict | None = None
        self._bf16_scalars: dict[str, float] = {}

    def enable_recording(self, flag: bool) -> None:
        for _, layer in self.layers:
            layer.record = bool(flag)

    # --- bf16 truncation of router updates -------------------------------------------------
    def _router_params(self, get_fp32):
        for (name, layer), label in zip(self.layers, self.labels):
            for pname, p in layer.router.named_parameters():
                full = f"{name}.router.{pname}"
                yield label, full, (get_fp32(full, p) if get_fp32 else p).detach().float().clone()

    def snapshot_router_params(self, get_fp32: Callable | None = None) -> None:
        """Call before the optimizer step. get_fp32(name, param) -> fp32 master tensor, for engines
        whose module holds bf16 copies (DeepSpeed bf16: deepspeed.utils.safe_get_full_fp32_param)."""
        self._snapshot = {full: (label, t) for label, full, t in self._router_params(get_fp32)}

    def measure_bf16_loss(self, get_fp32: Callable | None = None) -> float:
        """Call after the optimizer step; returns the overall lost fraction and adds per-layer
        `bf16_lost_update_frac` scalars to the next report."""
        if self._snapshot is None:
            raise RuntimeError("call snapshot_router_params() before the optimizer step, then measure_bf16_loss()")
        after = {full: t for _, full, t in self._router_params(get_fp32)}
        lost, changed = _bf16_counts({k: v[1] for k, v in self._snapshot.items()}, after)
        per_layer: dict[str, list[int]] = {}
        for full, (label, _) in self._snapshot.items():
            acc = per_layer.setdefault(label, [0, 0])
            acc[0] += lost[full]
            acc[1] += changed[full]
        self._bf16_scalars = {
            f"moe/{label}/bf16_lost_update_frac": l / max(1, c) for label, (l, c) in per_layer.items()
        }
        total = sum(lost.values()) / max(1, sum(changed.values()))
        self._bf16_scalars["moe/bf16_lost_update_frac"] = total
        self._snapshot = None
        return total

    def discard_step(self) -> None:
        """The step was skipped (non-finite loss or gradient norm): drop what was recorded for it
        (each layer's routing and output norms, the router snapshot), so that no report and no
        dead/deadlock streak counts a routing that never trained. Call it instead of
        `measure_bf16_loss` and `compute` for that step."""
        for _, layer in self.layers:
            layer.last_routing = None
            if hasattr(layer, "last_output_norms"):
                layer.last_output_norms = None
            if hasattr(layer, "last_expert_inputs"):
                layer.last_expert_inputs = None
        self._snapshot = None
        self._bf16_scalars = {}

    # --- the report -------------------------------------------------------------------------
    def _counts(self, probs, routing_map, ctx) -> torch.Tensor:
        """Everything additive over tokens in one float64 vector, so one `reduce` call sums it over ranks."""
        e, buckets = self.num_experts, self.t.timestep_buckets
        probs, real = probs.detach().float(), routing_map[:, :e]
        n = probs.shape[0]
        load = real.sum(0).double()
        chosen = real.any(1)
        top1 = torch.bincount(probs[:, :e].argmax(1)[chosen], minlength=e).double()
        weights = probs / probs.sum(1, keepdim=True).clamp_min(1e-30)
        token_entropy = -(weights * weights.clamp_min(1e-30).log()).sum(1)
        has_weight = probs.sum(1) > 0
        selected = routing_map & (probs > 0)
        logp = probs.clamp_min(1e-30).log()
        gap = logp.masked_fill(~selected, -math.inf).amax(1) - logp.masked_fill(~selected, math.inf).amin(1)
        multi = selected.sum(1) >= 2
        by_time = torch.zeros(buckets, e, dtype=torch.float64, device=probs.device)
        timestep = getattr(ctx, "timestep", None)
        if timestep is not None and timestep.numel() in (ctx.batch_size, n):  # per sample or per token (Wan2.2 TI2V)
            t = timestep.reshape(ctx.batch_size, -1).float()
            t = t.expand(-1, ctx.seq_len) if t.shape[1] == 1 else t
            bucket = (t.reshape(-1) / 1000.0 * buckets).long().clamp(0, buckets - 1).to(probs.device)
            by_time.index_add_(0, bucket, real.double())
        sums = torch.tensor(
            [
                token_entropy[has_weight].sum(),
                has_weight.sum(),
                probs.max(1).values.sum(),
                n,
                gap[multi].sum(),
                multi.sum(),
                routing_map[:, e:].sum(),
                routing_map.sum(),
            ],
            dtype=torch.float64,
            device=probs.device,
        )
        out = torch.cat([load, top1, by_time.flatten(), sums])
        return self.reduce(out) if self.reduce is not None else out

    def _warn(self, label: str, mode: str, condition: bool, message: str, warnings: list) -> None:
        if condition and (label, mode) not in self._active:
            warnings.append(f"moe {label}: {mode}: {message}")
        (self._active.add if condition else self._active.discard)((label, mode))

    @torch.no_grad()
    def compute(self, step: int) -> DiagnosticsReport:
        e, nb, th = self.num_experts, self.t.timestep_buckets, self.t
        report = DiagnosticsReport(step=step, layer_names=list(self.labels))
        loads = np.zeros((len(self.layers), e))
        time_loads = np.zeros((len(self.layers), nb, e))
        s = report.scalars
        for i, ((_, layer), label) in enumerate(zip(self.layers, self.labels)):
            p = f"moe/{label}/"
            w1 = getattr(layer.experts, "w1", None)
            if w1 is not None:  # the weight cosine: a second scalar, the alarm reads the outputs'
                s[p + "expert_similarity"], s[p + "expert_similarity_nn"] = expert_similarity(w1)
            sampled = getattr(layer, "last_expert_inputs", None)
            if sampled is not None:
                layer.last_expert_inputs = None  # a later compute must not reuse a stale sample
                self._homogenization(layer, label, sampled, step, report)
            s[p + "router_param_norm"] = (
                float(sum(q.detach().float().pow(2).sum() for q in layer.router.parameters())) ** 0.5
            )
            norms = getattr(layer, "last_output_norms", None)
            if norms is not None:
                s[p + "shared_routed_norm_ratio"] = float(norms[0]) / max(float(norms[1]), 1e-30)
            logits = getattr(layer.router, "last_logits", None)
            if logits is not None:
                s[p + "router_logit_norm"] = float(logits.detach().float().norm(dim=-1).mean())

            recorded = getattr(layer, "last_routing", None)
            if recorded is None:
                continue  # not recorded this step: routing scalars are left out, streaks unchanged
            c = self._counts(*recorded).cpu().numpy()
            load, top1 = c[:e], c[e : 2 * e]
            by_time = c[2 * e : 2 * e + nb * e].reshape(nb, e)
            ent_sum, ent_n, maxp_sum, n, gap_sum, gap_n, null_assign, all_assign = c[2 * e + nb * e :]
            layer.last_routing = None  # a later compute must not re-count a stale forward

            total = load.sum()
            loads[i] = load / total if total > 0 else 0.0
            frac = loads[i]
            s[p + "max_violation"] = float(frac.max() * e - 1) if total > 0 else 0.0
            positive = frac[frac > 0]
            s[p + "load_entropy"] = float(-(positive * np.log(positive)).sum() / math.log(e)) if e > 1 else 1.0
            s[p + "token_entropy"] = ent_sum / max(ent_n, 1)
            s[p + "mean_max_prob"] = maxp_sum / max(n, 1)
            s[p + "router_logit_gap"] = gap_sum / max(gap_n, 1)
            s[p + "experts_per_token"] = total / max(n, 1)
            if recorded[1].shape[1] > e:  # the router has null experts
                s[p + "null_share"] = null_assign / max(all_assign, 1)
            for b in range(nb):
                rows = by_time[b].sum()
                if rows > 0:
                    time_loads[i, b] = by_time[b] / rows
                    s[p + f"t{b}_max_violation"] = float(time_loads[i, b].max() * e - 1)

            # Experts that compete only within a group (timestep bands): a group no token reached
            # this time is unobserved, not dead (its streaks stay), and deadlock is judged per group.
            groups = layer.router.expert_groups() or [list(range(e))]
            observed = np.ones(e, dtype=bool)
            if len(groups) > 1:
                for g in groups:
                    observed[g] = load[g].sum() > 0
            dead = (load == 0) & observed
            self.dead_streak[i] = np.where(observed, (self.dead_streak[i] + 1) * dead, self.dead_streak[i])
            s[p + "dead_experts"] = float(dead.sum())
            s[p + "dead_streak"] = float(self.dead_streak[i].max(initial=0))
            stuck = np.flatnonzero(self.dead_streak[i] >= th.dead_patience)
            self._warn(
                label,
                "dead experts",
                len(stuck) > 0,
                f"experts {stuck.tolist()} got no tokens for {th.dead_patience}+ diagnostics in a row at step {step}",
                report.warnings,
            )

            contested = [g for g in groups if len(g) >= 2]  # a group of one expert cannot deadlock
            if not contested:
                self.deadlock_streak[i] = 0
                self._warn(label, "selective deadlock", False, "", report.warnings)  # nothing to judge
                continue
            monopoly, leader = 0.0, contested[0][0]
            for g in contested:
                if top1[g].sum() > 0 and top1[g].max() / top1[g].sum() > monopoly:
                    monopoly, leader = top1[g].max() / top1[g].sum(), g[int(top1[g].argmax())]
            self.deadlock_streak[i] = self.deadlock_streak[i] + 1 if monopoly > th.deadlock_share else 0
            s[p + "monopoly_share"], s[p + "monopoly_expert"] = float(monopoly), float(leader)
            s[p + "deadlock_streak"] = float(self.deadlock_streak[i])
            self._warn(
                label,
                "selective deadlock",
                self.deadlock_streak[i] >= th.deadlock_patience,
                f"expert {leader} is top-1 for {monopoly:.0%} of tokens for {self.deadlock_streak[i]} "
                f"diagnostics in a row at step {step}",
                report.warnings,
            )

        s.update(self._bf16_scalars)
        self._bf16_scalars = {}
        report.depth_profile = [self._depth_code(label) for label in self.labels]
        s["moe/deadlocked_layers"] = float(sum(code in "DB" for code in report.depth_profile))
        s["moe/homogenized_layers"] = float(sum(code in "HB" for code in report.depth_profile))
        self._summarise(s)
        report.load_matrix, report.timestep_load = loads, time_loads
        return report

    def _held_experts(self, layer) -> slice:
        """The global ids of the experts this rank's layer holds: all, or its expert-parallel slice
        (expert e lives on rank e // (E / EP) of the dispatcher's group, see parallel/expert.py)."""
        local = layer.experts.num_experts
        if local == self.num_experts:
            return slice(0, local)
        first = torch.distributed.get_rank(layer.dispatcher.group) * local
        return slice(first, first + local)

    def _homogenization(self, layer, label: str, sampled: tuple, step: int, report: DiagnosticsReport) -> None:
        """`expert_output_similarity` of the experts this rank holds, on the tokens of this rank's
        recorded micro-batch routed to them (not reduced over ranks), and its alarm."""
        th, held = self.t, self._held_experts(layer)
        rows, member = sampled
        member = member[:, held]
        used = member.any(1)
        sim, pairs = expert_output_similarity(layer.experts, rows[used], member[used])
        if pairs == 0:
            return  # nothing to compare this time: no scalar, the alarm stays as it was
        local = "" if held == slice(0, self.num_experts) else "_local"
        report.scalars[f"moe/{label}/expert_output_similarity{local}"] = sim
        self._warn(
            label,
            "expert homogenization",
            step >= th.homogenization_grace_steps and sim > th.homogenization_similarity,
            f"mean pairwise cosine of expert outputs on their tokens {sim:.4f} > {th.homogenization_similarity} "
            f"at step {step}; experts compute the same function (raise router LR / add shared-expert noise)",
            report.warnings,
        )

    def _depth_code(self, label: str) -> str:
        deadlock = (label, "selective deadlock") in self._active
        homogenized = (label, "expert homogenization") in self._active
        return "B" if deadlock and homogenized else "D" if deadlock else "H" if homogenized else "."

    def _summarise(self, s: dict) -> None:
        """Model-wide lines for a dashboard's first glance."""
        for name, how in (
            ("max_violation", max),
            ("monopoly_share", max),
            ("expert_similarity", max),
            ("expert_output_similarity", max),
            ("dead_experts", sum),
            ("mean_max_prob", max),
        ):
            values = [v for k, v in s.items() if k.endswith("/" + name) and k.count("/") == 2]
            if values:
                s[f"moe/{'total' if how is sum else 'max'}_{name}"] = float(how(values))
