r"""The map between a site's support and an unconstrained space, used by every engine.

:func:`unconstraining` is the one bijection per support: Pyro's ``biject_to`` (logit,
stick-breaking, log, ...), and for covariance matrices and their Cholesky factors the
log-Cholesky entries (:class:`PositiveDefiniteBijection`, :class:`LowerCholeskyBijection`).
:func:`constrain` maps unconstrained values back with their log-Jacobian. NUTS (full
Bayes and MCMC-EM's E-step), the gradient M-step and MAP in the unconstrained space
all read them.

An autoguide puts its density on the unconstrained space given by
``biject_to(site.support)``. Pyro registers no bijection for covariance matrices
(``positive_definite``): its ``transform_to`` reads a full ``D × D`` matrix, of
which only the lower triangle matters, and a guide over the unused entries would
have an ELBO unbounded above (their entropy grows without limit). Here a
covariance is reached from a vector of its ``D(D+1)/2`` Cholesky entries,

.. math:: u \mapsto L \mapsto Σ = L L^\top,\qquad L_{ii} = e^{u_{ii}},

a true bijection with log-Jacobian
:math:`D \log 2 + \sum_{i=0}^{D-1} (D - i + 1)\, u_{ii}` (0-based rows).

Only the program's own sample sites are touched, and only while an engine (SVI, NUTS)
runs them (:class:`BijectiveSupports`): the sites keep their names, values and
log-densities; only the ``support`` the guide reads changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger
from torch.distributions import biject_to, constraints, transform_to
from torch.distributions.transforms import Transform

from pyroem.errors import NotSupportedError

__all__ = [
    "BijectiveSupports",
    "LowerCholeskyBijection",
    "PositiveDefiniteBijection",
    "constrain",
    "needs_bijection",
    "unconstraining",
]


def _dimension(num_entries: int) -> int:
    """``D`` from the ``D(D+1)/2`` entries of a lower triangle."""
    dim = (math.isqrt(8 * num_entries + 1) - 1) // 2
    if dim * (dim + 1) // 2 != num_entries:
        raise ValueError(f"{num_entries} is not a triangular number D(D+1)/2")
    return dim


class LowerCholeskyBijection(Transform):
    """Vector ``(..., D(D+1)/2)`` → lower-triangular matrix ``(..., D, D)`` with a
    positive diagonal (its logarithm in the vector): a bijection onto ``lower_cholesky``."""

    domain = constraints.independent(constraints.real, 1)
    codomain: constraints.Constraint = constraints.lower_cholesky
    bijective = True

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        dim = _dimension(shape[-1])
        return torch.Size((*shape[:-1], dim, dim))

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        dim = shape[-1]
        return torch.Size((*shape[:-2], dim * (dim + 1) // 2))

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        dim = _dimension(x.shape[-1])
        rows, cols = torch.tril_indices(dim, dim, device=x.device)
        entries = torch.where(rows == cols, x.exp(), x)
        factor = x.new_zeros((*x.shape[:-1], dim, dim))
        factor[..., rows, cols] = entries
        return factor

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        dim = y.shape[-1]
        rows, cols = torch.tril_indices(dim, dim, device=y.device)
        entries = y[..., rows, cols]
        return torch.where(rows == cols, entries.log(), entries)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dim = _dimension(x.shape[-1])
        rows, cols = torch.tril_indices(dim, dim, device=x.device)
        return x[..., rows == cols].sum(-1)


class PositiveDefiniteBijection(LowerCholeskyBijection):
    """Vector ``(..., D(D+1)/2)`` → covariance matrix ``(..., D, D)`` through its
    Cholesky factor, with a log-diagonal: a bijection onto ``positive_definite``."""

    codomain = constraints.positive_definite

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        factor = super()._call(x)
        return factor @ factor.mT

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return super()._inverse(torch.linalg.cholesky(y))

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dim = _dimension(x.shape[-1])
        rows, cols = torch.tril_indices(dim, dim, device=x.device)
        diagonal = x[..., rows == cols]
        powers = torch.arange(dim + 1, 1, -1, dtype=x.dtype, device=x.device)
        return dim * math.log(2.0) + (powers * diagonal).sum(-1)


class _BijectivePositiveDefinite(type(constraints.positive_definite)):  # type: ignore[misc]
    """``positive_definite``, but with :class:`PositiveDefiniteBijection` registered."""


_POSITIVE_DEFINITE = _BijectivePositiveDefinite()


@biject_to.register(_BijectivePositiveDefinite)
@transform_to.register(_BijectivePositiveDefinite)
def _positive_definite_bijection(constraint: Any) -> Transform:
    return PositiveDefiniteBijection()


def needs_bijection(support: constraints.Constraint) -> bool:
    """Whether a support has no Pyro bijection but one from this module.

    Raises:
        NotImplementedError: neither Pyro nor this module can map the support.
    """
    try:
        biject_to(support)
    except NotImplementedError:
        if isinstance(support, type(constraints.positive_definite)):
            return True
        raise
    return False


def unconstraining(name: str, support: constraints.Constraint) -> Transform:
    """The bijection from site ``name``'s support onto an unconstrained space.

    Raises:
        NotSupportedError: the support has no bijection from an unconstrained space.
    """
    if isinstance(support, type(constraints.positive_definite)):
        return PositiveDefiniteBijection().inv
    if isinstance(support, type(constraints.lower_cholesky)):
        return LowerCholeskyBijection().inv
    try:
        return biject_to(support).inv
    except NotImplementedError as err:
        raise NotSupportedError(
            f"site {name!r} has support {support}, which has no bijection from an "
            "unconstrained space; reparametrise the site"
        ) from err


def constrain(
    transforms: Mapping[str, Transform],
    unconstrained: Mapping[str, torch.Tensor],
    num_dims: int = 0,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Unconstrained values mapped back by the inverses of ``transforms`` (site →
    :func:`unconstraining`), and ``log |d constrained / d unconstrained|`` summed over
    the sites and over all but the leading ``num_dims`` dimensions."""
    values: dict[str, torch.Tensor] = {}
    # A Python zero, not a tensor of the default dtype: the sum keeps the values' dtype.
    total: torch.Tensor | float = 0.0
    for name, value in unconstrained.items():
        forward = transforms[name].inv
        values[name] = forward(value)
        term = forward.log_abs_det_jacobian(value, values[name])
        total = total + term.reshape(*term.shape[:num_dims], -1).sum(-1)
    return values, torch.as_tensor(total)


class _WithSupport(dist.TorchDistribution):
    """A distribution unchanged but for the ``support`` it reports."""

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {}

    def __init__(self, base: Any, support: constraints.Constraint) -> None:
        self.base = base
        self._support = support
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self) -> constraints.Constraint:
        return self._support

    @property
    def has_rsample(self) -> bool:  # type: ignore[override]
        return bool(self.base.has_rsample)

    def expand(self, batch_shape: Any, _instance: Any = None) -> _WithSupport:
        return _WithSupport(self.base.expand(batch_shape), self._support)

    def sample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = ()) -> torch.Tensor:
        return self.base.sample(sample_shape)

    def rsample(self, sample_shape: torch.Size | list[int] | tuple[int, ...] = ()) -> torch.Tensor:
        return self.base.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.base.log_prob(value)


class BijectiveSupports(Messenger):
    """Report a bijective ``positive_definite`` support at the named sample sites.

    Args:
        names: the sites whose support has no Pyro bijection (see :func:`needs_bijection`).
    """

    def __init__(self, names: set[str]) -> None:
        super().__init__()
        self.names = names

    def _pyro_sample(self, msg: Any) -> None:
        if msg["name"] in self.names and not isinstance(msg["fn"], _WithSupport):
            msg["fn"] = _WithSupport(msg["fn"], _POSITIVE_DEFINITE)
