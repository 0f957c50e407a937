"""Validation of fit options, shared by every method (one wording for every error)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyroem.errors import SpecError

__all__ = ["check_integer", "with_defaults"]


def check_integer(name: str, value: Any, low: int) -> int:
    """``value`` if it is an integer ``>= low`` (not a bool).

    Raises:
        SpecError: naming the option, the bound and the value given.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SpecError(f"{name} must be an integer >= {low}; got {value!r}")
    return value


def with_defaults(
    method: str, options: Mapping[str, Any], defaults: Mapping[str, Any], hint: str = ""
) -> dict[str, Any]:
    """The method's options: ``defaults`` updated with ``options``.

    Args:
        method: how the method is named in the error (``"method='nuts'"``).
        options: the options the user gave.
        defaults: every option the method knows, with its default.
        hint: a remedy appended to the error.

    Raises:
        SpecError: an option the method does not know, naming it and listing the known ones.
    """
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise SpecError(
            f"unknown options for {method}: {unknown}; the options are {sorted(defaults)}"
            + (f" ({hint})" if hint else "")
        )
    return {**defaults, **options}
