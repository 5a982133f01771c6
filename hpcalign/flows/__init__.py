"""Algorithms as flows over named models (flows/api.py); offline DPO (flows/dpo.py).

    from hpcalign.flows import Flow, FlowResult, Experience, Step

Names resolve lazily: the config schema imports `flows.registry` without torch.
"""

from __future__ import annotations

from typing import Any

_API = ("Experience", "Flow", "FlowContext", "FlowResult", "Step", "check_schedule",
        "schedule_digest")
__all__ = [*_API, "BUILTIN_FLOWS", "resolve_flow"]


def __getattr__(name: str) -> Any:
    if name in _API:
        from hpcalign.flows import api

        return getattr(api, name)
    if name in ("BUILTIN_FLOWS", "resolve_flow"):
        from hpcalign.flows import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'hpcalign.flows' has no attribute {name!r}")
