"""benchmarks/gpu_check.py --cpu: every section of the one-shot GPU check runs on tiny CPU shapes, so the
script cannot rot while no GPU is at hand; its loss-agreement check passes the genuine runs and fails a
perturbed loss."""

import json
import math
from pathlib import Path

import pytest

from tests.benchmark_runs import run_benchmark

REPO = Path(__file__).resolve().parents[1]


def numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


@pytest.mark.slow
def test_cpu_mode_writes_every_section_and_its_loss_check_can_fail(tmp_path, monkeypatch):
    result = run_benchmark("benchmarks/gpu_check.py", "--cpu", "--out", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    table = (tmp_path / "gpu_check.md").read_text()

    assert {"train", "experts", "moe_layer", "peers", "block", "memory"} <= report.keys()
    assert report["experts"]["passed"] and set(report["experts"]["relative_errors"]) == {"grouped_mm", "loop"}
    assert [(r["experts"], r["top_k"]) for r in report["moe_layer"]] == [(8, 2), (32, 4)]
    assert [(r["experts"], r["top_k"]) for r in report["peers"]] == [(8, 2), (32, 4), (64, 8)]
    assert all({"dense", "megamoe", "deepspeed"} <= r["results"].keys() for r in report["peers"])
    assert sorted((r["block"], r["tokens"]) for r in report["block"]) == [
        ("dense", 128),
        ("dense", 256),
        ("moe", 128),
        ("moe", 256),
    ]
    values = list(numbers(report))
    assert values and all(math.isfinite(v) for v in values)
    assert all(r["tflops"] > 0 and r["mfu"] > 0 for r in report["block"])
    assert report["memory"]["measured_bytes"] > 0 and report["memory"]["planned_bytes"] > 0
    assert "| MoE layer |" in table and "| MoE peers |" in table and "| 5B block |" in table and "**memory**" in table
    assert report["video_modules_imported"] == []  # neither av nor decord

    # The loss check: the genuine runs pass; a loss moved past the tolerance fails.
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from gpu_check import LOSS_RTOL, loss_agreement

    train = report["train"]
    losses, reference = train["losses"], train["reference_fp32_cpu"]
    assert len(losses) == len(reference) == train["steps"] and len(set(reference)) == len(reference)  # it trained
    assert train["passed"] and loss_agreement(losses, reference, "fp32")["passed"]
    for precision, rtol in LOSS_RTOL.items():
        for step in range(len(losses)):
            perturbed = list(losses)
            perturbed[step] *= 1 + 2 * rtol
            assert not loss_agreement(perturbed, reference, precision)["passed"], (precision, step)
        assert not loss_agreement(losses[:-1], reference, precision)["passed"]  # a step missing
