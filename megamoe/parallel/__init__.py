"""Parallelism: process groups (topology), tensor/sequence, context and expert parallelism, applied in
one place (parallelize).

megamoe uses megatron-core only for `parallel_state` (its process groups). Importing it runs
megatron-core's package `__init__`, which decorates fusion kernels megamoe never calls with
`torch.compile`, and each such decoration loads Inductor's compiler. So while megatron-core is
imported here, first, `torch.compile` defers its work to the decorated function's first call: those
kernels still compile if anything ever calls them (megatron's `jit_fuser`, chosen during the import,
keeps the deferring form), and torch.compile is put back for everything else. Measured on a CPU
process that imports megamoe's parallel code and DeepSpeed and takes one AdamW step: 3.5 s of CPU
instead of 4.9 s, paid by every rank at every start (and by each rank a distributed test starts).
"""

from __future__ import annotations

import functools

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


def _import_megatron_core() -> None:
    real_compile = torch.compile
    torch.compile = _compile_on_first_call(real_compile)
    try:
        import megatron.core  # noqa: F401
    finally:
        torch.compile = real_compile


_import_megatron_core()
