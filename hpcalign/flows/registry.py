"""`algorithm:` names a flow: a built-in one, or a user's by import path.

    algorithm: grpo                       # hpcalign.flows.grpo:GRPOFlow
    algorithm: mypkg.flows:MyFlow         # a Flow subclass, or a function returning a Flow
    flow: {alpha: 0.5}                    # keyword arguments of MyFlow(...)

The module must be importable on every rank (installed, or on PYTHONPATH: mpiexec and
srun pass the environment on). Offline `dpo` is not a flow of the trainer role: it has
a root config of its own (config/dpo.py) and runs in one process (flows/dpo.py).
"""

from __future__ import annotations

import importlib
from typing import Any

from hpcalign.errors import UserError

MODEL_NAMES = ("policy", "reference")  # the models the trainer builds for a flow that names them
BUILTIN_FLOWS = {"grpo": "hpcalign.flows.grpo:GRPOFlow",
                 "online_dpo": "hpcalign.flows.online_dpo:OnlineDPOFlow",
                 "ppo": "hpcalign.flows.ppo:PPOFlow"}


def is_flow_name(value: str) -> bool:
    """A built-in name or the shape of an import path ('module:attribute')."""
    if value in BUILTIN_FLOWS:
        return True
    module, sep, attr = value.partition(":")
    return bool(sep and module and attr and all(p.isidentifier() for p in module.split("."))
                and all(p.isidentifier() for p in attr.split(".")))


def _import(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure of user code is the user's to fix
        raise UserError(f"algorithm={spec!r}: cannot import module '{module_name}' "
                        f"({type(err).__name__}: {err}); is it on PYTHONPATH?") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"algorithm={spec!r}: module '{module_name}' has no attribute "
                            f"'{attr}'")
        obj = getattr(obj, part)
    return obj


def resolve_flow(algorithm: str, args: dict[str, Any] | None = None) -> Any:
    """The flow object (an `hpcalign.flows.Flow`) `algorithm` names, built with `args`
    (the config's `flow:`)."""
    from hpcalign.flows.api import Flow

    spec = BUILTIN_FLOWS.get(algorithm, algorithm)
    if not is_flow_name(spec):
        raise UserError(f"algorithm={algorithm!r}: expected one of "
                        f"{', '.join(BUILTIN_FLOWS)} or an import path 'module:Flow'")
    factory = _import(spec)
    if not callable(factory):
        raise UserError(f"algorithm={algorithm!r}: {spec} is a {type(factory).__name__}, "
                        "not a Flow class or a function returning one")
    try:
        flow = factory(**(args or {}))
    except TypeError as err:
        raise UserError(f"flow={args or {}!r}: {spec} does not take these arguments "
                        f"({err})") from err
    if not isinstance(flow, Flow):
        raise UserError(f"algorithm={algorithm!r}: {spec}(...) returned a "
                        f"{type(flow).__name__}, not an hpcalign.flows.Flow")
    unknown = [m for m in flow.models if m not in MODEL_NAMES]
    if "policy" not in flow.models or unknown:
        raise UserError(f"algorithm={algorithm!r}: {type(flow).__name__}.models="
                        f"{tuple(flow.models)!r} must name 'policy' and only models the "
                        f"trainer builds ({', '.join(MODEL_NAMES)}); build others in setup()")
    return flow
