"""Parameter initialisation as a pure function of (seed, parameter name, global position).

A model built on the meta device holds no values. `materialize` allocates each parameter
directly on its device and draws the values of the elements it holds: element i (the flat
index in the FULL, unsharded tensor) of parameter `name` is a function of (seed, name, i)
only. So a rank that holds one tensor-parallel block or a few experts draws exactly its
share, and the blocks of all ranks put together equal the one-process model bit for bit,
whatever the layout.

The random bits come from Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random
numbers: as easy as 1, 2, 3", SC 2011), the counter-based generator behind cuRAND and torch's
CUDA generator: counter = the element's flat index, key = a hash of (seed, name). It is
written with int64 torch ops that never overflow, so it runs on any device and gives the
same bits on each. Uniform values are then exact on every device; normal ones go through
float64 log/cos (Box-Muller): equal wherever an element falls in a chunk (tests/model/test_init.py
checks), but CPU and CUDA may differ in the last float32 bit.

What each parameter is drawn from (`Init`) is declared per module type: every nn.Linear gets
Xavier-uniform weights and zero bias, norms ones and zeros, and a module overrides that for
its own (or its children's) parameters with a `parameter_inits()` method returning
{relative name: Init}; the outermost module's word wins. `inits_of(model)` collects them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key schedule (golden ratio, sqrt(3) - 1)
_TWO_PI = 2 * math.pi


@dataclass(frozen=True)
class Init:
    """How a parameter's values are drawn.

    kind: 'constant' (every value = scale), 'uniform' (U(-scale, scale)) or 'normal' (N(0, scale^2)).
    """

    kind: str
    scale: float

    @staticmethod
    def constant(value: float) -> Init:
        return Init("constant", float(value))

    @staticmethod
    def normal(std: float) -> Init:
        return Init("normal", float(std))

    @staticmethod
    def xavier_uniform(fan_in: int, fan_out: int) -> Init:
        """Glorot & Bengio (2010): U(-a, a) with a = sqrt(6 / (fan_in + fan_out)), as nn.init.xavier_uniform_."""
        return Init("uniform", math.sqrt(6.0 / (fan_in + fan_out)))

    @torch.no_grad()
    def fill_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Draw `tensor` in place from torch's global RNG (modules built on their own, not by `materialize`)."""
        if tensor.is_meta:  # nothing to draw (and torch's meta normal_ imports the compiler: seconds)
            return tensor
        if self.kind == "constant":
            return tensor.fill_(self.scale)
        if self.kind == "uniform":
            return tensor.uniform_(-self.scale, self.scale)
        return tensor.normal_(0.0, self.scale)

    def sample(self, key: tuple[int, int], index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The values at flat positions `index` (int64, non-decreasing) of the parameter keyed `key`.

        Position i takes word i % 4 of Philox block i // 4; each block is computed once per call.
        """
        if self.kind == "constant":
            return torch.full(index.shape, self.scale, dtype=dtype, device=index.device)
        blocks, which = torch.unique_consecutive(index >> 2, return_inverse=True)
        zero = torch.zeros_like(blocks)
        words = torch.stack(philox4x32((blocks & _MASK32, blocks >> 32, zero, zero), key), 1).double()
        if self.kind == "uniform":
            values = (words * 2.0**-31 - 1.0) * self.scale  # 2 u - 1 with u = word / 2^32 in [0, 1): exact
        else:  # Box-Muller: words (0, 1) give normals 0 and 1, words (2, 3) normals 2 and 3
            u1 = (words[:, 0::2] + 1.0) * 2.0**-32  # (0, 1]: the log stays finite
            theta = words[:, 1::2] * (_TWO_PI * 2.0**-32)
            radius = torch.sqrt(-2.0 * torch.log(u1)) * self.scale
            values = torch.stack((radius * torch.cos(theta), radius * torch.sin(theta)), 2).view(-1, 4)
        return values.view(-1)[which * 4 + (index & 3)].to(dtype)


ZEROS, ONES = Init.constant(0.0), Init.constant(1.0)


def default_inits(module: nn.Module) -> dict[str, Init]:
    """The rule for a module's own parameters by its type (those of types without a rule: none)."""
    if isinstance(module, nn.Linear):
        return {"weight": Init.xavier_uniform(module.in_features, module.out_features), "bias": ZEROS}
    if isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
        return {"weight": ONES, "bias": ZEROS}
    return {}


def inits_of(model: nn.Module) -> dict[str, Init]:
    """{parameter name: Init} for every parameter of `model`, read on the unsharded model (the
    fans of a tensor-parallel linear are those of the full layer). Raises ValueError naming any
    parameter without a rule."""
    rules: dict[str, Init] = {}
    for prefix, module in model.named_modules():  # parents before children: the outermost override wins
        dot = f"{prefix}." if prefix else ""
        for name, init in module.parameter_inits().items() if hasattr(module, "parameter_inits") else ():
            rules.setdefault(dot + name, init)
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, init in default_inits(module).items():
            rules.setdefault(dot + name, init)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(rules))
    if missing:
        raise ValueError(
            f"no initialisation rule for parameter(s) {missing[:3]}: give their module a "
            f"parameter_inits() method (see megamoe/model/init.py)"
        )
    return {name: rules[name] for name in params}


@torch.no_grad()
def reset_parameters(model: nn.Module) -> None:
    """Draw every parameter of `model` from its Init with torch's global RNG (for a module built on its own)."""
    params = dict(model.named_parameters())
    for name, init in inits_of(model).items():
        init.fill_(params[name])


def parameter_key(seed: int, name: str) -> tuple[int, int]:
    """Philox key of one parameter: 64 bits of BLAKE2b over (seed, name)."""
    digest = hashlib.blake2b(f"{int(seed)}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    # (high, low) 32-bit halves of a * m for a < 2^32: multiplying by the 16-bit halves of m
    # keeps every intermediate below 2^49, so int64 never overflows on any device.
    q = a * (m & 0xFFFF)
    t = a * (m >> 16) + (q >> 16)
    return t >> 16, ((t & 0xFFFF) << 16) | (q & 0xFFFF)


def philox4x32(counter: tuple, key: tuple[int, int], rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Philox4x32-`rounds` of a counter of four 32-bit words (int64 tensors, or ints) under a
    64-bit key (two 32-bit ints) -> four 32-bit words (int64 tensors of the counter's shape)."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


# The location of a parameter's block in its full tensor: (dim, block index, number of blocks):
# the full tensor is `count` equal blocks along `dim` and this parameter is block `index`.
Locate = Callable[[nn.Parameter], tuple[int, int, int] | None]


def _chunk_elements(device: torch.device) -> int:
    # About 20 int64 temporaries per element are alive at once: 2.5 MB at 2^14 elements keeps host
    # memory at the parameters' size (measured: 2^16 adds 10 MB, no faster on the CPU); large
    # chunks keep an accelerator's kernels busy.
    return 1 << 14 if device.type == "cpu" else 1 << 24


@torch.no_grad()
def draw_(tensor: torch.Tensor, init: Init, seed: int, name: str, where: tuple[int, int, int] | None) -> None:
    """Fill `tensor` (this rank's block of parameter `name`, located by `where`, or the whole
    tensor when None) with the values of the full tensor at its global positions."""
    if init.kind == "constant":
        tensor.fill_(init.scale)
        return
    local = tuple(tensor.shape)
    full, offset = list(local), [0] * len(local)
    if where is not None:
        dim, index, count = where
        full[dim], offset[dim] = local[dim] * count, local[dim] * index
    key, flat = parameter_key(seed, name), tensor.view(-1)
    step = _chunk_elements(tensor.device)
    for start in range(0, flat.numel(), step):
        rest = torch.arange(start, min(start + step, flat.numel()), dtype=torch.int64, device=tensor.device)
        if where is None:
            index = rest
        else:  # unravel the local position, shift by the block's offset, ravel in the full shape
            index, stride = torch.zeros_like(rest), 1
            for size, full_size, off in zip(reversed(local), reversed(full), reversed(offset)):
                index += (rest % size + off) * stride
                rest, stride = rest // size, stride * full_size
        flat[start : start + index.numel()] = init.sample(key, index, tensor.dtype)


@torch.no_grad()
def materialize(
    model: nn.Module,
    inits: dict[str, Init],
    device: str | torch.device,
    seed: int,
    locate: Locate | None = None,
    initialize: bool | Callable[[str], bool] = True,
) -> nn.Module:
    """Give a meta-device `model` real storage on `device`, in place, and initialise it.

    inits: `inits_of` the unsharded model. locate: where each (possibly sharded) parameter sits
    in its full tensor (None: nothing is sharded). Parameters keep their attributes (sharding
    tags) but are new objects: call this before anything holds them (hooks, optimizers).
    initialize: True draws every parameter; False leaves them uninitialised (to load into); a
    predicate on the parameter name draws those it accepts. Buffers are always computed, by
    each buffer-holding module's `reset_buffers()`.
    """
    device = torch.device(device)
    wanted = initialize if callable(initialize) else (lambda _name: initialize)
    done: dict[int, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in done:  # a tied parameter is materialised once
                full_name = dot + name
                tensor = torch.empty(param.shape, dtype=param.dtype, device=device)
                if wanted(full_name):
                    draw_(tensor, inits[full_name], seed, full_name, locate(param) if locate else None)
                new = nn.Parameter(tensor, requires_grad=param.requires_grad)
                new.__dict__.update(param.__dict__)  # tensor_model_parallel, partition_dim, allreduce, ...
                done[id(param)] = new
            module._parameters[name] = done[id(param)]
        metas = [name for name, buf in module._buffers.items() if buf is not None and buf.is_meta]
        if metas and not hasattr(module, "reset_buffers"):
            raise TypeError(
                f"{type(module).__name__} ('{prefix}') holds buffers {metas} but no reset_buffers() "
                f"to compute them after a meta-device build; add one"
            )
        for name in metas:
            meta = module._buffers[name]
            module._buffers[name] = torch.empty(meta.shape, dtype=meta.dtype, device=device)
        if metas:
            module.reset_buffers()
    return model
