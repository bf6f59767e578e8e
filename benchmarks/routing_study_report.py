"""The routing study's report: plots (PNG, drawn with Pillow) and docs/routing_study.md, from the
record `benchmarks/routing_study.py` writes (study.json).

Every alarm shown is the diagnostics' own (`DiagnosticsReport.depth_profile`, `warnings`), at the
documented thresholds of `DiagnosticsThresholds()`; `alarm_mismatches` recomputes each alarm from
the recorded metric it plots and lists any diagnostic where the two disagree (the report says how
many: there must be none).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from megamoe.moe.diagnostics import DiagnosticsThresholds
from megamoe.moe.heatmap import MARGIN, TOP, _font, labelled_heatmap

TH = DiagnosticsThresholds()
NOTES = "## Reading the results"
"""A hand-written section of the report from this heading to its end, kept when the report is rewritten."""
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (255, 187, 120),
    (152, 223, 138), (174, 199, 232), (197, 176, 213), (196, 156, 148), (247, 182, 210),
]  # fmt: skip
INK, GRID, RED = (30, 30, 30), (225, 225, 225), (220, 20, 60)


# --- what was recorded -------------------------------------------------------------------------
def series(run: dict, metric: str) -> tuple[list[int], np.ndarray]:
    """(diagnostic steps, values [steps, layers]) of `moe/layerNN/<metric>`; NaN where not reported."""
    diags = run["diagnostics"]
    labels = diags[0]["layer_names"] if diags else []
    values = np.full((len(diags), len(labels)), np.nan)
    for i, d in enumerate(diags):
        for j, label in enumerate(labels):
            values[i, j] = d["scalars"].get(f"moe/{label}/{metric}", np.nan)
    return [d["step"] for d in diags], values


def alarms(run: dict, codes: str) -> np.ndarray:
    """[diagnostics, layers] bool: the diagnostics' depth profile has one of `codes` ('DB' deadlock, 'HB' homogenization)."""
    return np.array([[c in codes for c in d["depth_profile"]] for d in run["diagnostics"]], dtype=bool)


def expected_deadlock(monopoly: np.ndarray) -> np.ndarray:
    """The deadlock alarm recomputed from its plotted metric: on at diagnostic i when the top-1 share was
    strictly above `deadlock_share` on `deadlock_patience` consecutive diagnostics ending at i."""
    above = np.nan_to_num(monopoly, nan=0.0) > TH.deadlock_share
    streak = np.zeros(above.shape, dtype=int)
    for i in range(len(above)):
        streak[i] = (streak[i - 1] + 1 if i else 1) * above[i]
    return streak >= TH.deadlock_patience


def expected_homogenization(steps: list[int], similarity: np.ndarray) -> np.ndarray:
    """The homogenization alarm recomputed: output similarity strictly above the threshold at a step past
    the grace period. A diagnostic without the scalar keeps the previous state (the alarm stays as it was)."""
    out = np.zeros(similarity.shape, dtype=bool)
    for i, step in enumerate(steps):
        for j in range(similarity.shape[1]):
            s = similarity[i, j]
            if math.isnan(s):
                out[i, j] = out[i - 1, j] if i else False
            else:
                out[i, j] = step >= TH.homogenization_grace_steps and s > TH.homogenization_similarity
    return out


def alarm_mismatches(run: dict) -> list[str]:
    """Diagnostics where an alarm and its recomputation from the plotted metric disagree (should be none)."""
    steps, monopoly = series(run, "monopoly_share")
    _, similarity = series(run, "expert_output_similarity")
    problems = []
    for name, got, want in (
        ("deadlock", alarms(run, "DB"), expected_deadlock(monopoly)),
        ("homogenization", alarms(run, "HB"), expected_homogenization(steps, similarity)),
    ):
        for i, j in zip(*np.nonzero(got != want)):
            problems.append(
                f"{run['name']} step {steps[i]} layer {j}: {name} alarm {bool(got[i, j])}, metric says {bool(want[i, j])}"
            )
    return problems


def lost_fraction(run: dict) -> np.ndarray:
    """Per applied step, the fraction of changed router elements whose bf16 value did not change (direct count)."""
    out = []
    for counts in run["lost_updates"]:
        lost = sum(c[0] for c in counts.values())
        changed = sum(c[1] for c in counts.values())
        out.append(lost / max(1, changed))
    return np.array(out)


def warned(run: dict, mode: str) -> list[str]:
    """Layers that ever got a `warning` of `mode` ('selective deadlock', 'dead experts', 'expert homogenization')."""
    return sorted(
        {w.split(":")[0].removeprefix("moe ") for d in run["diagnostics"] for w in d["warnings"] if f": {mode}:" in w}
    )


# --- drawing -----------------------------------------------------------------------------------
def line_chart(
    lines: dict, title: str, y_label: str, hlines: dict | None = None, log_y: bool = False, size=(760, 380)
) -> Image.Image:
    """lines: name -> (xs, ys). A plain chart with axes, a legend at the right, optional horizontal marks."""
    width, height = size
    legend_w, left, top, bottom = 190, 64, 30, 40
    img = Image.new("RGB", (width + legend_w, height), (255, 255, 255))
    draw, font = ImageDraw.Draw(img), _font(11)
    xs_all = [x for xs, _ in lines.values() for x in xs]
    ys_all = [y for _, ys in lines.values() for y in ys if np.isfinite(y) and (y > 0 or not log_y)]
    ys_all += [v for v in (hlines or {}) if not log_y or v > 0]
    if not xs_all or not ys_all:
        draw.text((left, top), f"{title}: nothing recorded", fill=INK, font=font)
        return img
    f = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    x0, x1 = min(xs_all), max(max(xs_all), min(xs_all) + 1)
    y0, y1 = f(min(ys_all)), f(max(ys_all))
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = width - left - 16, height - top - bottom

    def px(x, y):
        return left + (x - x0) / (x1 - x0) * pw, top + (1 - (f(y) - y0) / (y1 - y0)) * ph

    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        yy = top + (1 - k / 4) * ph
        draw.line([(left, yy), (left + pw, yy)], fill=GRID)
        draw.text((4, yy - 6), f"{10**yv:.2g}" if log_y else f"{yv:.3g}", fill=INK, font=font)
        xv = x0 + (x1 - x0) * k / 4
        draw.text((left + k / 4 * pw - 10, top + ph + 4), f"{xv:.0f}", fill=INK, font=font)
    draw.rectangle([left, top, left + pw, top + ph], outline=INK)
    for value, text in (hlines or {}).items():
        if log_y and value <= 0:
            continue
        _, yy = px(x0, value)
        draw.line([(left, yy), (left + pw, yy)], fill=RED, width=1)
        draw.text((left + 4, yy - 13), text, fill=RED, font=font)
    for i, (name, (xs, ys)) in enumerate(lines.items()):
        colour = PALETTE[i % len(PALETTE)]
        pts = [px(x, y) for x, y in zip(xs, ys) if np.isfinite(y) and (y > 0 or not log_y)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        elif pts:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        ly = top + 14 * i
        draw.line([(width + 4, ly + 6), (width + 20, ly + 6)], fill=colour, width=3)
        draw.text((width + 24, ly), name, fill=INK, font=font)
    draw.text((left, 8), title, fill=INK, font=font)
    draw.text((left + pw // 2 - 20, height - 18), "step", fill=INK, font=font)
    draw.text((4, top - 16), y_label, fill=INK, font=font)
    return img


def depth_time_map(
    values: np.ndarray, alarm: np.ndarray, steps: list[int], title: str, threshold: float, vmax: float = 1.0
) -> Image.Image:
    """[diagnostics, layers] -> layers down, diagnostics across, the threshold on the colour bar, and a red
    frame on every cell where the diagnostics' alarm was on."""
    labels = [f"layer{j:02d}" for j in range(values.shape[1])]
    img = Image.fromarray(
        labelled_heatmap(
            np.nan_to_num(values.T, nan=0.0),
            vmax,
            labels,
            title,
            column_axis=f"diagnostic (every {steps[1] - steps[0] if len(steps) > 1 else 1} steps)",
            marks={threshold: "threshold"},
        )
    )
    if alarm.any():  # find the cell grid again the way labelled_heatmap lays it out
        cols = values.shape[0]
        cell_w = int(np.clip(480 // max(cols, 1), 6, 40))
        cell_h = max(cell_w, 12)
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        left = MARGIN + math.ceil(max(probe.textlength(t, font=_font(11)) for t in labels)) + MARGIN
        top = TOP
        draw = ImageDraw.Draw(img)
        for i, j in zip(*np.nonzero(alarm)):
            x, y = left + i * cell_w, top + j * cell_h
            draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], outline=RED, width=2)
    return img


def side_by_side(images: list[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), (255, 255, 255))
    x = 0
    for i in images:
        out.paste(i, (x, 0))
        x += i.width
    return out


# --- the report --------------------------------------------------------------------------------
def plots(study: dict, folder: Path, prefix: str = "", charts: bool = True) -> dict[str, str]:
    """Write every PNG into `folder` (file names start with `prefix`): per run its depth x time maps and
    load heatmaps, and with `charts` the charts over runs. Returns name -> path relative to the report."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}

    def save(img, name):
        img.save(folder / f"{prefix}{name}.png")
        files[name] = f"{folder.name}/{prefix}{name}.png"

    runs = study["runs"]
    e = study["scale"]["num_experts"]
    for run in runs:
        if not run["diagnostics"]:
            continue
        steps, monopoly = series(run, "monopoly_share")
        _, similarity = series(run, "expert_output_similarity")
        save(
            side_by_side(
                [
                    depth_time_map(
                        monopoly, alarms(run, "DB"), steps, f"{run['name']}: top-1 share (deadlock)", TH.deadlock_share
                    ),
                    depth_time_map(
                        similarity,
                        alarms(run, "HB"),
                        steps,
                        f"{run['name']}: expert output cosine (homogenization)",
                        TH.homogenization_similarity,
                    ),
                ]
            ),
            f"depth_time_{run['name']}",
        )
        diags = run["diagnostics"]
        picks = sorted({0, len(diags) // 2, len(diags) - 1})
        save(
            side_by_side(
                [
                    Image.fromarray(
                        labelled_heatmap(
                            np.array(diags[i]["load_matrix"]),
                            2.0 / e,
                            diags[i]["layer_names"],
                            f"{run['name']} load, step {diags[i]['step']}",
                            marks={1.0 / e: "mean"},
                        )
                    )
                    for i in picks
                ]
            ),
            f"load_{run['name']}",
        )
    if not charts:
        return files
    val = {r["name"]: ([s for s, _ in r["history"]["val"]], [v for _, v in r["history"]["val"]]) for r in runs}
    dense_val = study["dense"]["history"]["val"][-1][1]
    save(
        line_chart(val, "validation loss (held-out flow loss, 9 noise levels)", "loss", {dense_val: "dense model"}),
        "validation_loss",
    )
    lost = {}
    for r in runs:
        frac = lost_fraction(r)
        window = max(1, len(frac) // 50)  # mean over windows: per-step values are noisy
        xs = list(range(window, len(frac) + 1, window))
        lost[r["name"] + (" (bf16 masters)" if r["bf16_router_masters"] else "")] = (
            xs,
            [float(frac[x - window : x].mean()) for x in xs],
        )
    save(
        line_chart(lost, "router updates lost to bf16 rounding (fraction of changed elements)", "fraction"),
        "bf16_lost_updates",
    )
    counts = {}
    for r in runs:
        steps, mono = series(r, "monopoly_share")
        counts[r["name"]] = (steps, list((np.nan_to_num(mono) > TH.deadlock_share).sum(1)))
    save(line_chart(counts, f"layers whose top-1 share is above {TH.deadlock_share}", "layers"), "deadlocked_layers")
    ratio = {}
    for r in runs:
        steps, v = series(r, "shared_routed_norm_ratio")
        if np.isfinite(v).any():
            ratio[r["name"]] = (steps, list(np.nanmean(v, axis=1)))
    save(
        line_chart(ratio, "|shared expert output| / |routed output|, mean over layers", "ratio", log_y=True),
        "shared_routed_ratio",
    )
    return files


def trace_by_noise(run: dict) -> str:
    """From the run's last routing trace: for the layer whose traced tokens concentrate most on one
    top-1 expert, that expert's share of top-1 picks on the tokens at the lower and the higher noise
    levels of the traced micro-batch (split at their median timestep); '-' without traces."""
    import torch

    from megamoe.moe.routing_trace import load_traces

    run_dir = Path(run["trace_dir"]).parent
    traces = load_traces(run_dir) if run_dir.is_dir() else []
    if not traces:
        return "-"
    best = None
    for label, t in traces[-1].layers.items():
        top1 = t.experts.gather(1, t.weights.argmax(1, keepdim=True)).squeeze(1)
        leader = int(torch.mode(top1).values)
        low = t.timestep <= t.timestep.median()
        shares = [float((top1[m] == leader).float().mean()) if m.any() else float("nan") for m in (low, ~low)]
        overall = float((top1 == leader).float().mean())
        if best is None or overall > best[0]:
            best = (overall, label, shares)
    overall, label, (low, high) = best
    return f"{label}: {low:.0%} / {high:.0%}".replace("nan%", "-")


def summary_row(run: dict) -> dict:
    steps, mono = series(run, "monopoly_share")
    _, sim = series(run, "expert_output_similarity")
    _, ratio = series(run, "shared_routed_norm_ratio")
    last = run["diagnostics"][-1] if run["diagnostics"] else None
    frac = lost_fraction(run)
    return {
        "val": run["history"]["val"][-1][1],
        "profile": "".join(last["depth_profile"]) if last else "",
        "deadlock_layers": warned(run, "selective deadlock"),
        "dead_layers": warned(run, "dead experts"),
        "homog_layers": warned(run, "expert homogenization"),
        "max_top1_end": float(np.nanmax(mono[-1])) if len(mono) and np.isfinite(mono[-1]).any() else float("nan"),
        "sim_end": float(np.nanmean(sim[-1])) if len(sim) and np.isfinite(sim[-1]).any() else float("nan"),
        "sim_end_max": float(np.nanmax(sim[-1])) if len(sim) and np.isfinite(sim[-1]).any() else float("nan"),
        "sim_above": int((np.nan_to_num(sim) > TH.homogenization_similarity).any(0).sum()) if len(sim) else 0,
        "lost_mean": float(frac.mean()) if len(frac) else 0.0,
        "ratio": (float(np.nanmean(ratio[0])), float(np.nanmean(ratio[-1])))
        if len(ratio) and np.isfinite(ratio).any()
        else None,
        "seconds_per_step": run["history"]["train_seconds"] / run["steps"],
        "trace": trace_by_noise(run),
    }


def u_shape(layers: list[str], num_layers: int) -> str:
    """Where over depth the layers are: counts in the first, middle and last third."""
    idx = [int(x.removeprefix("layer")) for x in layers]
    third = num_layers / 3
    parts = [sum(i < third for i in idx), sum(third <= i < 2 * third for i in idx), sum(i >= 2 * third for i in idx)]
    return f"{parts[0]} shallow / {parts[1]} middle / {parts[2]} deep"


def training_minutes(*studies) -> float:
    return sum(r["history"]["train_seconds"] for st in studies if st for r in [st["dense"], *st["runs"]]) / 60


def config_table(runs: list[dict], rows: dict) -> list[str]:
    lines = [
        "| configuration | what | val loss | depth profile at end | deadlock alarms (layers) | dead-expert alarms | "
        "max top-1 share at end | expert output cosine at end (mean) | layers ever > 0.99 | bf16-lost router updates | "
        "shared/routed norm start -> end | top-1 expert's share, lower / higher noise half (last trace) | s/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        s = rows[r["name"]]
        ratio = f"{s['ratio'][0]:.2g} -> {s['ratio'][1]:.2g}" if s["ratio"] else "-"
        lines.append(
            f"| {r['name']} | {r['what']} | {s['val']:.4f} | `{s['profile']}` | {len(s['deadlock_layers'])} "
            f"{','.join(x.removeprefix('layer') for x in s['deadlock_layers'])} | {len(s['dead_layers'])} | "
            f"{s['max_top1_end']:.2f} | {s['sim_end']:.4f} | {s['sim_above']} | {s['lost_mean']:.2%} | {ratio} | "
            f"{s['trace']} | {s['seconds_per_step']:.2f} |"
        )
    return lines


def write_report(study: dict, path: Path, command: str, long: dict | None = None) -> list[str]:
    """Write the markdown report and its plots (folder `<stem>/` next to it); `long` is the study of a
    smaller model trained past the homogenization grace period. Returns alarm mismatches (none expected)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files = plots(study, path.parent / path.stem)
    long_files = plots(long, path.parent / path.stem, "long_", charts=False) if long else {}
    runs, scale, model = study["runs"], study["scale"], study["model"]
    rows = {r["name"]: summary_row(r) for r in runs}
    for r in long["runs"] if long else []:
        r["name"] = "long_" + r["name"] if not r["name"].startswith("long_") else r["name"]
    long_rows = {r["name"]: summary_row(r) for r in (long["runs"] if long else [])}
    mismatches = [p for r in runs + (long["runs"] if long else []) for p in alarm_mismatches(r)]
    n_layers = model["num_layers"]
    lines = [
        "# The seed study at toy scale",
        "",
        f"Written by `{command}`. Its training steps took {training_minutes(study, long):.0f} min in all (validation "
        "and set-up excluded) on 2 CPU cores, one thread, shared with other work while it ran: times are indicative "
        "only. A rerun reuses the runs in `<out>/study.json` whose settings are unchanged. What the numbers say: "
        f"'{NOTES.removeprefix('## ')}', at the end.",
        "",
        f"A dense DiT ({n_layers} blocks, dim {model['dim']}, FFN {model['ffn_dim']}) is trained for "
        f"{study['dense']['steps']} steps on the embedded synthetic data (validation loss "
        f"{study['dense']['history']['val'][-1][1]:.4f}), then upcycled by the three laws "
        f"(`megamoe/moe/upcycle.py`: {scale['num_experts']} cloned experts, top-2, one shared expert with tiny noise, "
        "routers new) into each configuration below, and each is trained on the same batches with the same seeds "
        "through the training loop's `train_step` and MoE step hooks. Diagnostics every "
        f"{scale['diag_every']} steps, validation loss every {scale['val_every']} steps, routing traces under each run's "
        "`routing_traces/`. Thresholds are the diagnostics' documented defaults "
        f"(deadlock: top-1 share > {TH.deadlock_share} on {TH.deadlock_patience} diagnostics in a row; homogenization: "
        f"expert output cosine > {TH.homogenization_similarity} from step {TH.homogenization_grace_steps} on).",
        "",
        f"Alarm check: every deadlock and homogenization alarm was recomputed from the metric plotted for it; "
        f"{len(mismatches)} disagreement(s)." + ("" if not mismatches else " " + "; ".join(mismatches[:5])),
        "",
        "## Per configuration",
        "",
    ]
    lines += config_table(runs, rows)
    lines += ["", "Depth profile: one code per block, D deadlock, H homogenized, B both, . neither.", ""]
    lines += failure_table(runs + (long["runs"] if long else []), {**rows, **long_rows}, n_layers)
    if long:
        lm, ls = long["model"], long["scale"]
        lines += [
            "",
            f"## Past the homogenization grace period: a smaller model, {ls['moe_steps']} steps",
            "",
            f"The alarm cannot fire before step {TH.homogenization_grace_steps}, beyond the runs above. A smaller model "
            f"({lm['num_layers']} blocks, dim {lm['dim']}, FFN {lm['ffn_dim']}, {ls['num_experts']} experts, dense "
            f"{long['dense']['steps']} steps, validation loss {long['dense']['history']['val'][-1][1]:.4f}) was upcycled "
            f"and trained for {ls['moe_steps']} steps, diagnostics every {ls['diag_every']}:",
            "",
        ]
        lines += config_table(long["runs"], long_rows)
        lines += [""] + [
            f"![{r['name']} depth x time]({long_files['depth_time_' + r['name'].removeprefix('long_')]})\n"
            for r in long["runs"]
            if "depth_time_" + r["name"].removeprefix("long_") in long_files
        ]
    lines += ["", "## Plots", ""]
    lines += [
        f"Validation loss: ![validation loss]({files['validation_loss']})",
        "",
        f"Layers above the deadlock share over steps: ![deadlocked layers]({files['deadlocked_layers']})",
        "",
        f"Router updates that bf16 would lose (fp32 runs) or lost (the bf16-master run), direct count: "
        f"![lost updates]({files['bf16_lost_updates']})",
        "",
        f"Shared expert against routed output (the functional redundancy hypothesis): ![ratio]({files['shared_routed_ratio']})",
        "",
        "Per configuration, deadlock (top-1 share) and homogenization (expert output cosine) per layer over time, "
        "red frames where the diagnostics' alarm was on, and expert load over depth at the first, middle and last diagnostic:",
        "",
    ]
    for r in runs:
        if f"depth_time_{r['name']}" in files:
            lines += [
                f"### {r['name']}",
                "",
                f"![{r['name']} depth x time]({files['depth_time_' + r['name']]})",
                "",
                f"![{r['name']} load]({files['load_' + r['name']]})",
                "",
            ]
    notes = path.read_text().partition(NOTES)[2] if path.exists() else ""
    text = "\n".join(lines) + "\n" + (NOTES + notes if notes else "")
    path.write_text(text)
    return mismatches


def failure_table(runs: list[dict], rows: dict, n_layers: int) -> list[str]:
    """The table the issue asks for: failure mode -> appeared? where? which remedy cleared it?"""
    # The plain MLP run differs from mlp_no_balance only by its balance loss (0.01): a remedy against it.
    remedies = [r["name"] for r in runs if r["what"].startswith("remedy") or r["name"] == "mlp"]

    def where(pred):
        return [r["name"] for r in runs if pred(rows[r["name"]])]

    def cleared(pred, base):
        if base not in rows:
            return f"- ({base} not run)"
        if not pred(rows[base]):
            return f"not judged: it did not appear in {base}, which the remedies are set against"
        good = [n for n in remedies if n in rows and not pred(rows[n])]
        return f"against {base}: " + (", ".join(good) or "none")

    def bf16_remedy():
        if "mlp" not in rows or "mlp_bf16" not in rows:
            return "-"
        fp32, bf16 = rows["mlp"], rows["mlp_bf16"]
        return (
            f"fp32 router masters (megamoe refuses bf16 ones at start-up): mlp with fp32 masters ends at validation "
            f"loss {fp32['val']:.4f}, depth profile `{fp32['profile']}`; with bf16 masters {bf16['val']:.4f}, `{bf16['profile']}`"
        )

    modes = [
        ("linear routers homogenize (alarm)", lambda s: bool(s["homog_layers"]), cleared, "linear"),
        (
            "expert output cosine above 0.99 at the last diagnostic, in some layer (metric)",
            lambda s: s["sim_end_max"] > TH.homogenization_similarity,
            cleared,
            "linear",
        ),
        ("selective deadlock (alarm)", lambda s: bool(s["deadlock_layers"]), cleared, "mlp_no_balance"),
        ("dead experts (alarm)", lambda s: bool(s["dead_layers"]), cleared, "mlp_no_balance"),
        (
            "bf16 drops router updates (> 1% of changed elements; fp32 runs: what bf16 would drop)",
            lambda s: s["lost_mean"] > 0.01,
            None,
            "mlp_bf16",
        ),
    ]
    out = [
        "## Failure modes",
        "",
        "| failure mode | appeared? | in which configurations | remedy that cleared it |",
        "| --- | --- | --- | --- |",
    ]
    for title, pred, judge, base in modes:
        found = where(pred)
        remedy = judge(pred, base) if judge else bf16_remedy()
        out.append(f"| {title} | {'yes' if found else 'no'} | {', '.join(found) or '-'} | {remedy} |")
    main = [r for r in runs if not r["name"].startswith("long_")]
    deadlocked = [x for r in main for x in rows[r["name"]]["deadlock_layers"]]
    out.append(
        f"| deadlock U-shaped over depth | {'see counts' if deadlocked else 'no deadlock'} | deadlocked layers, summed over "
        f"the {n_layers}-block runs: {u_shape(deadlocked, n_layers)} | - |"
    )
    return out
