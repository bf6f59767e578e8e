"""benchmarks/moe_layer.py --quick and gpu_check's peers section on tiny CPU shapes: the scripts cannot
rot while nobody runs them. Nothing here asserts on a timing; the allocator check asserts only what
glibc reports about where a large block comes from."""

import importlib.util
import math
import os
import platform
import re
from pathlib import Path

import pytest
import torch

from tests.benchmark_runs import run_benchmark

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(8, 2, 1024), (32, 4, 256), (64, 8, 128)]


def expected_contenders() -> list[str]:
    names = ["dense", "megamoe", "deepspeed"]
    if importlib.util.find_spec("torchtitan") is not None:  # optional: see moe_layer.TORCHTITAN_INSTALL
        names += ["torchtitan", "torchtitan-fp32"]
    return names


def contenders_of(table: str) -> list[list[str]]:
    """Per shape, the contenders of its rows, in order (a shape's first row carries E, k and width)."""
    shapes, row = [], re.compile(r"^(?:\s*\d+\s+\d+\s+\d+|\s+)\s{2}(\S+)\s+\d")
    for line in table.splitlines():
        if re.match(r"^\s*\d+\s+\d+\s+\d+\s", line):
            shapes.append([])
        m = row.match(line)
        if m and shapes:
            shapes[-1].append(m.group(1))
    return shapes


@pytest.mark.slow
def test_moe_layer_quick_prints_both_allocator_tables_with_every_contender():
    result = run_benchmark("benchmarks/moe_layer.py", "--quick", "--allocator", "both", timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    out = result.stdout
    default, tuned = out.split("\nallocator tuned")
    tuned = "allocator tuned" + tuned
    assert default.startswith("allocator default") and "MALLOC_MMAP_MAX_=0" in tuned
    expected = expected_contenders()
    for table in (default, tuned):
        assert contenders_of(table) == [expected] * len(SHAPES), table
        verdicts = [line for line in table.splitlines() if "-> megamoe" in line]
        assert len(verdicts) == len(SHAPES) and all("target <=" in v and "beats peers" in v for v in verdicts)
        assert ("torchtitan: not measured" in table) == ("torchtitan" not in expected)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        # The tuned setting takes effect: glibc stops serving large blocks with mmap.
        assert "a 64 MiB block comes from mmap: yes" in default
        assert "a 64 MiB block comes from mmap: no" in tuned


def test_child_environment_sets_the_tuned_variables_and_removes_them_for_default(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import moe_layer

    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    default, tuned = moe_layer.child_env("default"), moe_layer.child_env("tuned")
    assert not any(k.startswith("MALLOC_") for k in default)
    assert {k: v for k, v in tuned.items() if k.startswith("MALLOC_")} == moe_layer.TUNED_ENV
    # mallopt(3)'s cap on MALLOC_MMAP_THRESHOLD_ (32 MiB, larger values ignored by older glibc) is avoided.
    assert "MALLOC_MMAP_THRESHOLD_" not in moe_layer.TUNED_ENV and moe_layer.TUNED_ENV["MALLOC_MMAP_MAX_"] == "0"
    assert [moe_layer.swiglu_hidden(w) for w in (1024, 256, 128, 8)] == [680, 168, 88, 8]


def test_gpu_check_peers_section_runs_every_contender_on_the_cpu(monkeypatch):
    """gpu_check's peers section, on its --cpu shapes, in this process (a world of one, gloo)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_check

    shapes = gpu_check.CPU
    environ = dict(os.environ)  # init_distributed sets RANK, WORLD_SIZE, MASTER_* for its world of one
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    try:
        rows = gpu_check.check_peers(torch.device("cpu"), torch.float32, shapes)
    finally:
        os.environ.clear()
        os.environ.update(environ)
    assert not torch.distributed.is_initialized()  # the section leaves no world behind

    assert [(r["experts"], r["top_k"], r["expert_width"]) for r in rows] == list(shapes.peer_cases)
    for row in rows:
        assert list(row["results"]) == expected_contenders()
        assert "CUDA" in row["missing"]["megatron"]  # megatron-core's MoELayer cannot run on the CPU
        for r in row["results"].values():
            assert "error" not in r, r
            assert math.isfinite(r["ms"]) and r["ms"] > 0 and r["saved_mb"] > 0 and r["peak_mb"] is None
        assert row["beats_peers"] in (True, False)

    table = "\n".join(gpu_check.peers_table(rows))
    assert table.count("megatron | not measured: megatron-core's MoELayer needs CUDA") == len(rows)
    assert all(f"| {name} |" in table for name in expected_contenders())
