"""Importing megatron-core through megamoe.parallel defers `torch.compile` to the first call of what
it decorates (see megamoe/parallel/megatron_state.py): the compiler is not loaded at start, torch.compile
is put back, and a deferred function still compiles, once, when called."""

from __future__ import annotations

import subprocess
import sys

import torch

from megamoe.parallel.megatron_state import _compile_on_first_call


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


def test_a_real_deferred_compile_gives_the_eager_result():
    deferred = _compile_on_first_call(torch.compile)

    @deferred(backend="eager")
    def f(x):
        return torch.sin(x) * 2

    x = torch.linspace(0, 1, 5)
    assert torch.equal(f(x), torch.sin(x) * 2)
