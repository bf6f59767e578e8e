"""megatron-core's `parallel_state`, the one part of megatron-core megamoe uses (its process groups),
imported at a cost that matches that use.

Importing it runs megatron-core's package `__init__`, which decorates fusion kernels megamoe never
calls with `torch.compile`, and each such decoration loads Inductor's compiler. So during the import
`torch.compile` defers its work to the decorated function's first call: those kernels still compile
if anything ever calls them (megatron's `jit_fuser`, chosen during the import, keeps the deferring
form), and torch.compile is put back for everything else. Measured on a CPU process that imports
megamoe's parallel code and DeepSpeed and takes one AdamW step: 3.5 s of CPU instead of 4.9 s, paid
by every rank at every start. The import's warnings that Transformer Engine and Apex are missing are
silenced: megamoe uses neither through megatron-core.
"""

from __future__ import annotations

import functools
import warnings

import torch


def _compile_on_first_call(real_compile):
    def compile(model=None, **options):
        if model is None:  # used as @torch.compile(...)
            return lambda fn: compile(fn, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = real_compile(model, **options)
            return compiled(*args, **kwargs)

        return call

    return compile


def _import_parallel_state():
    real_compile = torch.compile
    torch.compile = _compile_on_first_call(real_compile)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
            from megatron.core import parallel_state
    finally:
        torch.compile = real_compile
    return parallel_state


parallel_state = _import_parallel_state()
