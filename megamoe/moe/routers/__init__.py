"""Routers by name. Importing this package imports every router module, which registers
its routers in `ROUTERS` (one module per family; see base.py for the interface)."""

from megamoe.moe.routers import (  # noqa: F401  (register)
    diffmoe,
    dynmole,
    expert_choice,
    expert_race,
    promoe,
    selective_sinkhorn,
    sinkhorn,
    timestep_band,
    token_choice,
)
from megamoe.moe.routers.base import (
    ROUTERS,
    Router,
    RouterOutput,
    RoutingContext,
    build_router,
    check_router_config,
    register_router,
)

__all__ = [
    "ROUTERS",
    "Router",
    "RouterOutput",
    "RoutingContext",
    "build_router",
    "check_router_config",
    "register_router",
]
