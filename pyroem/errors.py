"""The exceptions and warnings pyroem raises.

Every error pyroem raises on purpose derives from :class:`PyroEMError`; the
ones about bad input also derive from :class:`ValueError` or :class:`TypeError`
so generic ``except ValueError`` handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "CollapsedComponentWarning",
    "ConvergenceWarning",
    "DataError",
    "FitFileError",
    "MCMCWarning",
    "NotSupportedError",
    "PyroEMError",
    "SingularCovarianceError",
    "SpecError",
]


class PyroEMError(Exception):
    """Root of every error raised by pyroem."""


class DataError(PyroEMError, ValueError):
    """The data cannot be used with the model (shape, NaN/inf, support)."""


class SpecError(PyroEMError, ValueError):
    """A model specification or fit option is invalid."""


class FitFileError(PyroEMError, ValueError):
    """A saved fit cannot be loaded: not a pyroem archive, damaged, or inconsistent."""


class NotSupportedError(PyroEMError, NotImplementedError):
    """The model or method is valid but pyroem cannot fit it (yet)."""


class SingularCovarianceError(PyroEMError, ValueError):
    """A fitted covariance matrix is not positive definite."""


class ConvergenceWarning(UserWarning):
    """EM stopped at ``max_iter`` before the objective converged."""


class CollapsedComponentWarning(UserWarning):
    """A mixing weight hit the simplex boundary and its component was removed."""


class MCMCWarning(UserWarning):
    """Markov chains look unreliable: R-hat too high, ESS too low, or divergences."""
