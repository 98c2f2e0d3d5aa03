"""Argument checks shared across the package; each error names the argument and what it must be."""

from __future__ import annotations

from typing import Any


def is_int(value: Any) -> bool:
    """An int given as such, not a bool (YAML's true)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number given as such: int or float, not bool (YAML's true) nor a string."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any) -> None:
    """``value`` is an int >= 1 (not a bool, float or string)."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")


def check_number(name: str, value: Any, *, low: float | None = None) -> None:
    """``value`` is a real number, and at least ``low`` when given."""
    if not is_number(value):
        raise ValueError(f"{name} must be a number; got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}; got {value!r}")
