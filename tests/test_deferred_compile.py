"""megatron-core's import (megamoe/parallel/megatron_state.py) and DeepSpeed's Muon import (on the first
`deepspeed.initialize`) run with `torch.compile` deferred to the first call of what they decorate
(megamoe/deferred_compile.py): the compiler is not loaded by a training run that compiles nothing,
torch.compile is put back, and a deferred function still compiles, once, when called."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from megamoe.deferred_compile import _compile_on_first_call

REPO = Path(__file__).resolve().parents[1]


def test_a_deferred_function_compiles_once_at_its_first_call_in_both_decorator_forms():
    compiled = []

    def real_compile(fn, **options):
        compiled.append(options)
        return lambda *args: ("compiled", fn(*args))

    deferred = _compile_on_first_call(real_compile)

    @deferred
    def plain(x):
        return x + 1

    @deferred(dynamic=True)
    def with_options(x):
        return x * 2

    assert compiled == [] and plain.__name__ == "plain"  # decorating compiles nothing
    assert plain(1) == ("compiled", 2) and plain(2) == ("compiled", 3)
    assert with_options(3) == ("compiled", 6)
    assert compiled == [{}, {"dynamic": True}]  # once per function, with its options


def test_importing_megamoe_parallel_leaves_the_compiler_unloaded_and_torch_compile_restored():
    probe = (
        "import sys, torch; real = torch.compile; import megamoe.parallel.parallelize, warnings; "
        "print('torch._inductor.compile_fx' in sys.modules, torch.compile is real)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"], out


def test_a_training_run_never_loads_the_compiler(tmp_path):
    """The launcher in a fresh process, two steps and a checkpoint: DeepSpeed's engine included."""
    args = [
        "--config",
        "configs/tiny.yaml",
        f"train.output_dir={tmp_path}",
        "train.steps=2",
        "checkpoint.every_steps=2",
        "model.dim=32",
        "model.ffn_dim=64",
        "model.num_layers=1",
    ]
    probe = (
        "import sys, torch; real = torch.compile; from launcher.pretrain import main; "
        f"code = main({args!r}); print(code, 'torch._inductor.compile_fx' in sys.modules, torch.compile is real)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-3:] == ["0", "False", "True"], done.stdout[-2000:]


def test_a_real_deferred_compile_gives_the_eager_result():
    deferred = _compile_on_first_call(torch.compile)

    @deferred(backend="eager")
    def f(x):
        return torch.sin(x) * 2

    x = torch.linspace(0, 1, 5)
    assert torch.equal(f(x), torch.sin(x) * 2)
