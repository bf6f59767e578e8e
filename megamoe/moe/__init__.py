"""Mixture-of-Experts feed-forward layers: routers/, dispatch.py, experts.py, layer.py, losses.py."""

from megamoe.moe.layer import (
    MoEFeedForward,
    collect_aux,
    moe_layer_indices,
    moe_layers,
    routers_after_step,
    routers_discard_step,
)

__all__ = [
    "MoEFeedForward",
    "collect_aux",
    "moe_layer_indices",
    "moe_layers",
    "routers_after_step",
    "routers_discard_step",
]
