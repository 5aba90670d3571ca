"""What every config section is built from: a strict pydantic model and the error type.

Method modules define their own sections on :class:`StrictModel` (``algorithm.<method>``); they import
this module, never :mod:`fedmoe.config` (which assembles the whole tree from the method registry).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A user-fixable problem in a run configuration."""


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{key}': remove it or check its spelling")
        elif e["type"] == "value_error":  # our own checks: the message names the keys
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  - {msg}" if key == "<root>" else f"  - {key}: {msg} (got {e.get('input')!r})")
        else:
            lines.append(f"  - {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


__all__ = ["ConfigError", "StrictModel", "format_errors"]
