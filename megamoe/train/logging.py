"""What rank 0 tells the user: a progress line, tensorboard scalars, and metrics.jsonl.

The same scalars go to all three, so a test (or a notebook) can read the JSON lines or the
tensorboard events and see what the console showed:

    step 100/400 | loss 0.2312 (flow 0.2288) | val 0.2410 | lr 1.00e-03 | grad_norm 0.412 |
    31.2 samples/s | 10.0k tokens/s | 95.1 TFLOP/s | MFU 9.6% | mem 21.4 GiB | eta 0:03:12

`flow` (the flow-matching loss) stands beside the total when router losses are added to it, so an
MoE run compares with a dense one; `val` is the held-out loss (train/validation.py) on the steps it
is computed. tokens/s counts video (patch) tokens of every data-parallel rank; TFLOP/s, MFU (against
the peak of train/throughput.py's table, named in the start-up line) and mem (rank 0's
torch.cuda.max_memory_allocated) appear on GPU only. Rates are over the time since the last line,
less the time spent on validation and samples.

A resumed run redoes the steps after its checkpoint, which the interrupted run may have logged
already: `resume_at(step)` drops those lines from metrics.jsonl and diagnostics.jsonl, and makes
tensorboard hide the old events past the step (SummaryWriter's purge_step), so every step is
logged once, with the values of the run that carried on.
"""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import timedelta
from pathlib import Path

from megamoe.atomic_files import write_text_atomic


class RunLogger:
    def __init__(self, output_dir: str, total_steps: int, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.total_steps = total_steps
        self.writer = None
        self.metrics_file = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.tensorboard = out, tensorboard
        self.metrics_file = open(out / "metrics.jsonl", "a")
        self._purge_step = None
        self._last_time = time.perf_counter()
        self._last_step = None
        self._last_tokens = None
        self.flops_per_token = None  # set by `count_flops` on GPU: TFLOP/s and MFU on the progress line
        self.peak_flops = None

    def resume_at(self, step: int) -> None:
        """The run continues after (1-based) step `step`: forget what was logged for later steps."""
        if not self.enabled:
            return
        self.metrics_file.close()
        for name in ("metrics.jsonl", "diagnostics.jsonl"):
            _truncate_after(self.out / name, step)
        self.metrics_file = open(self.out / "metrics.jsonl", "a")
        self._purge_step = step + 1

    def _tensorboard(self):
        """The event writer, made at first use so that a resume can set its purge step first."""
        if self.writer is None and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.out / "tensorboard"), purge_step=self._purge_step)
        return self.writer

    def count_flops(self, flops_per_token: float, peak_flops: float | None) -> None:
        """Show TFLOP/s (model FLOPs per video token of a training step, train/throughput.py) and, with the
        device's peak FLOP/s, MFU on the progress line."""
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops

    def exclude_time(self, seconds: float) -> None:
        """Leave `seconds` (validation, samples) out of the rates of the next progress line."""
        if self.enabled:
            self._last_time += seconds

    def record_config(self, cfg, start_step: int) -> str:
        """Write the resolved config (the whole merged Config, with logging.val_every and sample_every
        the intervals the loop runs: config.py's val_interval and sample_interval, 0 where off) to
        output_dir/config.yaml, atomically, and return a line for the log (global rank 0 only;
        elsewhere nothing is written).

        The newest record (config.yaml, or the newest config.resume-*.yaml) is rewritten with the same
        content when this run's config equals it. Under a different one (a resume that extends
        train.steps, say), this run's goes to config.resume-<step>.yaml beside them, <step> the step it
        starts after: the run directory keeps every config that trained in it, each change once.
        """
        from megamoe.config import to_yaml

        if not self.enabled:
            return ""
        cfg = resolved_intervals(cfg)
        path = self.out / "config.yaml"
        newest = _newest_record(self.out)
        if newest is not None:
            path = newest if _read_record(newest) == cfg else self.out / f"config.resume-{start_step:08d}.yaml"
        write_text_atomic(path, to_yaml(cfg))
        return f"resolved config written to {path}" + (
            "" if newest in (None, path) else f" (differs from {newest.name})"
        )

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def log_step(
        self,
        step: int,
        scalars: dict[str, float],
        samples_per_step: int,
        data: dict[str, int] | None = None,
        val: dict[str, float] | None = None,
    ) -> None:
        """Record `scalars` for the (1-based) completed step and print the progress line.

        `data`: 'samples_seen', 'video_tokens' (read so far) and 'bad_<cause>' counts of the data loader
        (tensorboard `data/...`, and `| bad N` on the progress line when any sample was skipped).
        `val`: the validation loss of this step, {'loss': ..., 'loss_s0.1': ...} (tensorboard `val/...`,
        the JSON line's "val").
        """
        if not self.enabled:
            return
        now = time.perf_counter()
        steps_done = step - self._last_step if self._last_step is not None else None
        scalars = dict(scalars)
        data = data or {}
        tokens = data.get("video_tokens")
        if steps_done:
            seconds = now - self._last_time
            seconds_per_step = seconds / steps_done
            scalars["samples_per_s"] = samples_per_step / seconds_per_step
            eta = str(timedelta(seconds=int(seconds_per_step * (self.total_steps - step))))
            if tokens is not None and self._last_tokens is not None:
                scalars["tokens_per_s"] = (tokens - self._last_tokens) / seconds
                if self.flops_per_token is not None:
                    scalars["tflops"] = scalars["tokens_per_s"] * self.flops_per_token / 1e12
                    if self.peak_flops:
                        scalars["mfu"] = scalars["tflops"] * 1e12 / self.peak_flops
        else:
            eta = "?"
        self._last_time, self._last_step, self._last_tokens = now, step, tokens
        record = {"step": step, **scalars, **({"data": data} if data else {}), **({"val": val} if val else {})}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self._tensorboard() is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(f"train/{name}", value, step)
            for name, value in data.items():
                self.writer.add_scalar(f"data/{name}", value, step)
            for name, value in (val or {}).items():
                self.writer.add_scalar(f"val/{name}", value, step)
            self.writer.flush()
        print(
            f"step {step}/{self.total_steps} | {_progress(scalars, val)} | eta {eta}{_problems(scalars, data)}",
            flush=True,
        )

    def log_samples(self, step: int, grid, captions: list[str]) -> None:
        """The sample grid (uint8 [H, W, 3], one row per caption; train/validation.clip_grid) as tensorboard
        image `samples/grid`, and its captions, top row first, as text `samples/captions`."""
        if not self.enabled or self._tensorboard() is None:
            return
        self.writer.add_image("samples/grid", grid, step, dataformats="HWC")
        self.writer.add_text("samples/captions", "  \n".join(f"{i}. {c}" for i, c in enumerate(captions)), step)
        self.writer.flush()

    def log_diagnostics(self, report, step: int) -> None:
        """Routing diagnostics: tensorboard scalars + load heatmap, diagnostics.jsonl, warnings."""
        if not self.enabled:
            return
        from megamoe.moe.diagnostics import write_tensorboard

        if self._tensorboard() is not None:
            write_tensorboard(self.writer, report, step)
            self.writer.flush()
        with open(Path(self.metrics_file.name).with_name("diagnostics.jsonl"), "a") as f:
            f.write(report.to_json() + "\n")
        for warning in report.warnings:
            print(f"warning: step {step}: {warning}", flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.metrics_file is not None:
            self.metrics_file.close()


def resolved_intervals(cfg):
    """`cfg` with logging.val_every and sample_every set to the intervals the loop runs (0 = off)."""
    from megamoe.config import sample_interval, val_interval

    logging = dataclasses.replace(cfg.logging, val_every=val_interval(cfg), sample_every=sample_interval(cfg))
    return dataclasses.replace(cfg, logging=logging)


def _newest_record(out: Path) -> Path | None:
    """The config record written last: the newest config.resume-*.yaml, else config.yaml (None: neither)."""
    resumes = sorted(out.glob("config.resume-*.yaml"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    if resumes:
        return resumes[-1]
    return out / "config.yaml" if (out / "config.yaml").is_file() else None


def _read_record(path: Path):
    """A config record with its intervals resolved; None where it is unreadable or of another version."""
    from megamoe.config import ConfigError, from_yaml_text

    try:
        return resolved_intervals(from_yaml_text(path.read_text()))
    except (ConfigError, ValueError, OSError):
        return None


def _truncate_after(path: Path, step: int) -> None:
    """Keep the JSON lines of steps <= `step` (and drop a line cut short by a kill); atomic."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    write_text_atomic(path, "".join(kept))


def _progress(scalars: dict[str, float], val: dict[str, float] | None) -> str:
    """The progress line's figures, from loss to memory (see the module docstring)."""
    loss = f"loss {scalars['loss']:.4f}"
    if "loss_flow" in scalars and any(k.startswith("loss_") and k != "loss_flow" for k in scalars):
        loss += f" (flow {scalars['loss_flow']:.4f})"  # router losses are in the total
    parts = [loss]
    if val:
        parts.append(f"val {val['loss']:.4f}")
    parts += [f"lr {scalars['lr']:.2e}", f"grad_norm {scalars['grad_norm']:.3f}"]
    parts.append(f"{scalars['samples_per_s']:.1f} samples/s" if "samples_per_s" in scalars else "- samples/s")
    if "tokens_per_s" in scalars:
        parts.append(f"{_si(scalars['tokens_per_s'])} tokens/s")
    if "tflops" in scalars:
        parts.append(f"{scalars['tflops']:.1f} TFLOP/s")
    if "mfu" in scalars:
        parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
    if "max_memory_gib" in scalars:
        parts.append(f"mem {scalars['max_memory_gib']:.1f} GiB")
    return " | ".join(parts)


def _problems(scalars: dict[str, float], data: dict[str, int]) -> str:
    """' | bad N' when samples were skipped, ' | skipped_steps N' when optimizer steps were (NaN/inf)."""
    skipped = sum(n for name, n in data.items() if name.startswith("bad_"))
    out = f" | bad {skipped}" if skipped else ""
    nonfinite = scalars.get("skipped_steps", 0)
    return out + (f" | skipped_steps {nonfinite}" if nonfinite else "")


def _si(value: float) -> str:
    """12345.6 -> '12.3k'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"
