"""Importing a library whose module bodies decorate functions with `torch.compile`, without loading
Inductor's compiler until one of those functions is called.

Every `@torch.compile` decoration loads Inductor (about a second of CPU, paid by every rank at every
start). megatron-core's package `__init__` decorates fusion kernels megamoe never calls, and DeepSpeed's
ZeRO checks import its Muon optimizer, whose kernels are decorated the same way, on the first
`deepspeed.initialize`. Inside `compile_deferred()` a decoration records what to compile and compiles
it at the first call instead; outside it `torch.compile` is torch's own.
"""

from __future__ import annotations

import contextlib
import functools

import torch


def _compile_on_first_call(real_compile):
    """A stand-in for `real_compile` (torch.compile) that compiles each function at its first call,
    once, with the options it was decorated with; both `@compile` and `@compile(...)` forms."""

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


@contextlib.contextmanager
def compile_deferred():
    """Within the block, `torch.compile` defers to the decorated function's first call; torch's own
    `torch.compile` is put back on exit, also when the block raises."""
    real_compile = torch.compile
    torch.compile = _compile_on_first_call(real_compile)
    try:
        yield
    finally:
        torch.compile = real_compile
