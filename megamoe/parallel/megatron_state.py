"""megatron-core's `parallel_state`, the one part of megatron-core megamoe uses (its process groups),
imported at a cost that matches that use.

Importing it runs megatron-core's package `__init__`, which decorates fusion kernels megamoe never
calls with `torch.compile`, and each such decoration loads Inductor's compiler. So the import runs
under `compile_deferred` (megamoe/deferred_compile.py): those kernels still compile if anything ever
calls them (megatron's `jit_fuser`, chosen during the import, keeps the deferring form), and
torch.compile is put back for everything else. Measured on a CPU process that imports
megamoe's parallel code and DeepSpeed and takes one AdamW step: 3.5 s of CPU instead of 4.9 s, paid
by every rank at every start. The import's warnings that Transformer Engine and Apex are missing are
silenced: megamoe uses neither through megatron-core.
"""

from __future__ import annotations

import warnings

from megamoe.deferred_compile import compile_deferred


def _import_parallel_state():
    with compile_deferred(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        from megatron.core import parallel_state
    return parallel_state


parallel_state = _import_parallel_state()
