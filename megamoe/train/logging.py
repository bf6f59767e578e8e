"""What rank 0 tells the user: a progress line, tensorboard scalars, and metrics.jsonl.

The same scalars go to all three, so a test (or a notebook) can read the JSON lines or the
tensorboard events and see what the console showed.

A resumed run redoes the steps after its checkpoint, which the interrupted run may have logged
already: `resume_at(step)` drops those lines from metrics.jsonl and diagnostics.jsonl, and makes
tensorboard hide the old events past the step (SummaryWriter's purge_step), so every step is
logged once, with the values of the run that carried on.
"""

from __future__ import annotations

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

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def log_step(
        self, step: int, scalars: dict[str, float], samples_per_step: int, data: dict[str, int] | None = None
    ) -> None:
        """Record `scalars` for the (1-based) completed step and print the progress line.

        `data`: 'samples_seen' and 'bad_<cause>' counts of the data loader (tensorboard `data/...`,
        and `| bad N` on the progress line when any sample was skipped).
        """
        if not self.enabled:
            return
        now = time.perf_counter()
        steps_done = step - self._last_step if self._last_step is not None else None
        scalars = dict(scalars)
        if steps_done:
            seconds_per_step = (now - self._last_time) / steps_done
            scalars["samples_per_s"] = samples_per_step / seconds_per_step
            eta = str(timedelta(seconds=int(seconds_per_step * (self.total_steps - step))))
        else:
            eta = "?"
        self._last_time, self._last_step = now, step
        data = data or {}
        self.metrics_file.write(json.dumps({"step": step, **scalars, **({"data": data} if data else {})}) + "\n")
        self.metrics_file.flush()
        if self._tensorboard() is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(f"train/{name}", value, step)
            for name, value in data.items():
                self.writer.add_scalar(f"data/{name}", value, step)
            self.writer.flush()
        speed = f"{scalars['samples_per_s']:.1f}" if "samples_per_s" in scalars else "-"
        skipped = sum(n for name, n in data.items() if name.startswith("bad_"))
        bad = f" | bad {skipped}" if skipped else ""
        nonfinite = scalars.get("skipped_steps", 0)  # optimizer steps skipped for a NaN/inf loss or grad norm
        bad += f" | skipped_steps {nonfinite}" if nonfinite else ""
        print(
            f"step {step}/{self.total_steps} | loss {scalars['loss']:.4f} | lr {scalars['lr']:.2e} | "
            f"grad_norm {scalars['grad_norm']:.3f} | {speed} samples/s | eta {eta}{bad}",
            flush=True,
        )

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
