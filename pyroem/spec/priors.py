"""Conjugate priors of the component parameters, as users declare them.

A prior field left as ``None`` is filled from the data when a model is fitted
(the weak default of each family, documented on the family); a number is used
as given. Every prior is the density the Pyro program declares, so MAP-EM
maximises exactly ``log p(x, θ)`` of that program.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from pyroem.errors import SpecError

__all__ = ["Beta", "Dirichlet", "Gamma", "NormalInverseWishart"]


def _plain(value: Any) -> Any:
    """Array-likes to nested lists, so priors serialise as JSON."""
    if value is None or isinstance(value, int | float):
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    return list(value)


def _check_numbers(prior: Any) -> None:
    """Raise :class:`SpecError` if a field of ``prior`` is neither ``None`` nor finite numbers."""
    for field in fields(prior):
        value = getattr(prior, field.name)
        if value is None:
            continue
        try:
            array = np.asarray(value.tolist() if hasattr(value, "tolist") else value, dtype=float)
        except (TypeError, ValueError):
            array = None
        if array is None or isinstance(value, bool) or not np.isfinite(array).all():
            raise SpecError(
                f"{type(prior).__name__}({field.name}=...) must be a finite number or array "
                f"of numbers (or None for the data-scaled default); got {value!r}"
            )


@dataclass(frozen=True)
class NormalInverseWishart:
    r"""Normal–Inverse-Wishart prior on a Gaussian component's mean and covariance.

    ``Σ_k ~ InverseWishart(dof, scale)`` and ``μ_k | Σ_k ~ Normal(mean, Σ_k / mean_precision)``.
    For ``covariance_type="diag"`` each variance is ``InverseGamma(dof/2, scale_dd/2)``
    (the one-dimensional Inverse-Wishart) and for ``"spherical"`` the single variance is
    ``InverseGamma(dof/2, mean(diag(scale))/2)``; for ``"tied"`` one covariance is shared.

    Defaults (``None``) follow Fraley & Raftery (2007), *Bayesian regularization for
    normal mixture estimation*: ``mean`` = data mean, ``dof = dim + 2`` and
    ``scale`` = empirical covariance / ``num_components ** (2 / dim)``; ``mean_precision``
    defaults to 0.01. ``mean_precision=0`` puts a flat prior on the means.

    Args:
        mean: prior mean ``μ0``, shape ``(dim,)``.
        mean_precision: ``κ0 ≥ 0``, pseudo-observations behind ``μ0``.
        dof: ``ν0 > dim - 1``.
        scale: ``Ψ0``: a float (times identity), a vector (diagonal) or a ``(dim, dim)`` matrix.
    """

    mean: Any = None
    mean_precision: float = 0.01
    dof: float | None = None
    scale: Any = None

    def __post_init__(self) -> None:
        _check_numbers(self)

    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable description."""
        return {
            "type": "NormalInverseWishart",
            "mean": _plain(self.mean),
            "mean_precision": self.mean_precision,
            "dof": self.dof,
            "scale": _plain(self.scale),
        }


@dataclass(frozen=True)
class Gamma:
    """Gamma(concentration, rate) prior on a positive rate (Poisson or Exponential).

    MAP needs ``concentration ≥ 1``: below 1 the density is infinite at rate 0 and the
    log joint has no maximum. ``None`` fields take the family's weak default.
    """

    concentration: Any = None
    rate: Any = None

    def __post_init__(self) -> None:
        _check_numbers(self)

    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable description."""
        return {
            "type": "Gamma",
            "concentration": _plain(self.concentration),
            "rate": _plain(self.rate),
        }


@dataclass(frozen=True)
class Beta:
    """Beta(concentration1, concentration0) prior on a Bernoulli probability.

    ``concentration1`` counts prior successes, ``concentration0`` failures (Pyro's
    names). MAP needs both ``≥ 1``.
    """

    concentration1: Any = 1.1
    concentration0: Any = 1.1

    def __post_init__(self) -> None:
        _check_numbers(self)

    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable description."""
        return {
            "type": "Beta",
            "concentration1": _plain(self.concentration1),
            "concentration0": _plain(self.concentration0),
        }


@dataclass(frozen=True)
class Dirichlet:
    """Dirichlet(concentration) prior on category probabilities.

    A scalar applies to every category. MAP needs ``concentration ≥ 1``.
    """

    concentration: Any = 1.1

    def __post_init__(self) -> None:
        _check_numbers(self)

    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable description."""
        return {"type": "Dirichlet", "concentration": _plain(self.concentration)}


def prior_from_config(config: dict[str, Any] | None) -> Any:
    """Inverse of ``to_config``."""
    if config is None:
        return None
    kinds = {
        "NormalInverseWishart": NormalInverseWishart,
        "Gamma": Gamma,
        "Beta": Beta,
        "Dirichlet": Dirichlet,
    }
    fields = dict(config)
    return kinds[fields.pop("type")](**fields)
