"""What a fit is a fit of, told from its model rather than its class.

The modules that read a fit of any method (the ArviZ export, alignment) sit below the
fit classes, which call them; they ask these questions instead of importing the classes.
"""

from __future__ import annotations

from typing import Any

from pyroem.program.model import ProgramModel
from pyroem.spec.mixture import Mixture

__all__ = ["is_mixture_fit", "is_program_fit"]


def is_mixture_fit(fit: Any) -> bool:
    """Whether ``fit`` is a fit of a :class:`~pyroem.Mixture` (a :class:`~pyroem.FitResult`)."""
    return isinstance(getattr(fit, "spec", None), Mixture)


def is_program_fit(fit: Any) -> bool:
    """Whether ``fit`` is a fit of a Pyro program (a :class:`~pyroem.ProgramFit`)."""
    return isinstance(getattr(fit, "program", None), ProgramModel)
