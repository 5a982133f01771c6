"""Shared base for config sections: unknown keys are errors, values are validated once."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section. Extra keys are refused (typos must not be ignored silently)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
