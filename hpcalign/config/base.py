"""Shared base for config sections: unknown keys are errors, values are validated once."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _numeric(annotation: Any) -> bool:
    """int, float, or an optional one (not bool: a bool field takes bools)."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(args) and all(a in (int, float) for a in args)
    return False


class Section(BaseModel):
    """A config section. Extra keys are refused (typos must not be ignored silently).

    Numbers must be finite (NaN and inf are refused: no count, rate or timeout means them),
    and a boolean is not a number (pydantic would read `steps: true` as 1 step).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None and _numeric(
                cls.model_fields[info.field_name].annotation):
            raise ValueError("a boolean is not a number")
        return value
