"""Mixture-of-Experts feed-forward layers: routers/, dispatch.py, experts.py, layer.py, losses.py.

The layer API is re-exported lazily: layer.py imports the model's `FeedForward`, and the
model imports `megamoe.moe.routers.base` (which runs this file first), so an eager import
here would be circular.
"""

__all__ = ["MoEFeedForward", "collect_aux", "moe_layer_indices", "moe_layers", "routers_after_step",
           "routers_discard_step"]


def __getattr__(name):
    if name in __all__:
        from megamoe.moe import layer

        return getattr(layer, name)
    raise AttributeError(f"module 'megamoe.moe' has no attribute '{name}'")
