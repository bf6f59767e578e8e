"""The one place megamoe talks to the accelerator runtime.

Every other module asks here which device and backend to use, so the same code runs on
CPU with gloo (tests, laptops) and on CUDA with NCCL (clusters).
"""

from __future__ import annotations

import os

import torch


def resolve_device(requested: str = "auto") -> torch.device:
    """'auto' picks CUDA when present; the CUDA device index is the local rank under torchrun."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; set train.device=cpu or auto")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for CPU tensors."""
    return "nccl" if device.type == "cuda" else "gloo"


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so that wall-clock timings mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rng_states(device: torch.device) -> dict:
    """Global RNG states worth restoring on resume."""
    states = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["torch_cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in states:
        torch.cuda.set_rng_state(states["torch_cuda"], device)


def device_name(device: torch.device) -> str:
    """The accelerator's product name ('NVIDIA H100 80GB HBM3'), or 'cpu'."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for `peak_memory_allocated` (CUDA only; a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_allocated(device: torch.device) -> int | None:
    """Bytes of tensors allocated at the peak since the last reset (torch.cuda.max_memory_allocated);
    None on the CPU, where torch keeps no such count."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
