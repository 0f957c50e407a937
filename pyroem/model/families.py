"""Component families of a mixture: exponential-family kernels and conjugate priors.

A family is declared by the user (``Gaussian(covariance_type="full")``), then
*bound* to a data set (``family.bind(data, num_components)``), which fixes the
dimension and resolves default priors from the data. A bound family provides
pure-torch kernels, all vectorised over components and applied to data chunks:

- ``prepare(x)``: per-chunk preprocessing done once per fit (centering, one-hot);
- ``log_prob_fn(params)(prepared)``: component log-densities, ``(n, K)``;
- ``statistics(prepared, resp)``: summable expected sufficient statistics;
- ``m_step(stats)``: the closed-form conjugate mode (see :mod:`pyroem.mstep.conjugate`);
- ``log_prior(params)``: ``log p(θ)`` exactly as the Pyro program declares it.

Only :meth:`Family.pyro_params` has Pyro effects: it writes the parameter sites
of the Pyro program :meth:`pyroem.Mixture.model` returns.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from pyroem.errors import (
    DataError,
    NotSupportedError,
    PyroEMError,
    SingularCovarianceError,
    SpecError,
)
from pyroem.estep.diagonal_normal import diagonal_normal_moments, diagonal_normal_table
from pyroem.estep.gaussian_features import (
    feature_block_rows,
    feature_coefficients,
    feature_count,
    feature_log_prob,
    feature_loss,
    feature_loss_floor,
    feature_moment_statistics,
    feature_shifts,
    feature_statistics,
    feature_weights,
    features_pay,
    max_feature_loss,
    moment_losses,
    wrapped_feature_rows,
)
from pyroem.estep.gaussian_small import SmallGaussian, small_kernels, takes_small_kernel
from pyroem.model.distributions import InverseWishart
from pyroem.model.priors import Beta, Dirichlet, Gamma, NormalInverseWishart, prior_from_config
from pyroem.mstep.conjugate import (
    NIWPrior,
    beta_mode,
    dirichlet_mode,
    gamma_mode,
    niw_exponent,
    niw_mode,
    weighted_mean,
)

__all__ = [
    "Bernoulli",
    "Categorical",
    "EStepKernels",
    "Exponential",
    "Family",
    "Gaussian",
    "Poisson",
    "make_family",
]

COVARIANCE_TYPES = ("full", "diag", "spherical", "tied")
LogProbFn = Callable[[torch.Tensor], torch.Tensor]


class EStepKernels(NamedTuple):
    """The E-step's two kernels for fixed parameters, in ``(K, n)`` layout.

    ``log_prob(prepared)`` returns the component log-densities ``(K, n)`` and a
    cache of its intermediate results; ``statistics(prepared, cache, resp)`` turns
    responsibilities ``(K, n)`` into the chunk's statistics, reusing the cache.
    """

    log_prob: Callable[[torch.Tensor], tuple[torch.Tensor, Any]]
    statistics: Callable[[torch.Tensor, Any, torch.Tensor], Any]
    # Optional: ``fused(prepared, log_weights (K, 1), row_weights, responsibilities)``
    # → ``(statistics, log-likelihood)`` of the chunk in one pass, with
    # ``responsibilities(log_joint, row_weights) → (resp, log p(x_n) (1, n))`` the
    # E-step's normalisation, so that it can run block by block in cache: called on the
    # chunk's rows in order, blocks covering the chunk (a chunk run again starts again
    # from its first row), so that the E-step can keep each row's log p(x_n) and label.
    fused: Callable[..., tuple[Any, torch.Tensor]] | None = None


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    """log(x), with log(0) replaced by the log of the smallest normal float.

    Keeps matrix products finite where a parameter sits exactly on its boundary
    (a zero rate or probability, legitimate maximum-likelihood values): a datum
    that the boundary forbids then gets a log-density of about -708 per unit
    instead of -inf, and ``0 * log(0)`` stays 0.
    """
    return x.clamp(min=torch.finfo(x.dtype).tiny).log()


def _as_tensor(value: Any, like: torch.Tensor, what: str) -> torch.Tensor:
    try:
        out = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    except (TypeError, ValueError) as err:
        raise SpecError(f"{what} must be numeric; got {value!r}") from err
    if not bool(torch.isfinite(out).all()):
        raise SpecError(f"{what} must be finite; got {value!r}")
    return out


def _check_symmetric(matrices: torch.Tensor, what: str) -> None:
    """Raise :class:`SpecError` if ``(..., D, D)`` matrices are not symmetric (to rounding)."""
    gap = (matrices - matrices.transpose(-1, -2)).abs().amax()
    scale = matrices.abs().amax().clamp(min=torch.finfo(matrices.dtype).tiny)
    # sqrt(eps): far above the rounding of a computed covariance, far below a typo.
    if not bool(gap <= math.sqrt(torch.finfo(matrices.dtype).eps) * scale):
        raise SpecError(
            f"{what} must be symmetric (a covariance matrix); the largest |A - A.T| is "
            f"{float(gap):.3g}; pass (A + A.T) / 2 or a valid covariance"
        )


def _per_dim(value: Any, like: torch.Tensor, dim: int, what: str) -> torch.Tensor:
    """A scalar or a length-``dim`` vector, broadcast to ``(dim,)``."""
    out = _as_tensor(value, like, what)
    if out.ndim > 1 or (out.ndim == 1 and out.shape[0] != dim):
        raise SpecError(f"{what} must be a scalar or have shape ({dim},); got {tuple(out.shape)}")
    return out.expand(dim).clone()


def _select(params: Any, index: torch.Tensor, shared: tuple[str, ...]) -> Any:
    """Pick components ``index`` from every per-component field (leading axis)."""
    return type(params)(
        **{
            name: value if name in shared else value[index]
            for name, value in params._asdict().items()
        }
    )


def _short(value: Any) -> str:
    """A number or tensor in 4 significant digits (nested lists for tensors)."""
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:
            return _short(float(value))
        return "[" + ", ".join(_short(item) for item in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return repr(value)


def _same_fields(prior: Any, named: Any) -> bool:
    """Whether ``prior`` declares exactly the fields of ``named`` (``None``, numbers or
    strings there; an array field of ``prior`` never matches)."""
    return all(
        type(getattr(prior, field.name)) is type(getattr(named, field.name))
        and getattr(prior, field.name) == getattr(named, field.name)
        for field in dataclasses.fields(named)
    )


def resolved_repr(prior_type: type, resolved: Any) -> str:
    """``Name(field=value, ...)`` of a resolved prior (a named tuple, or one tensor for a
    prior of one field), values in 4 significant digits."""
    if hasattr(resolved, "_asdict"):
        values = resolved._asdict()
    else:
        values = {dataclasses.fields(prior_type)[0].name: resolved}
    fields = ", ".join(f"{key}={_short(value)}" for key, value in values.items())
    return f"{prior_type.__name__}({fields})"


def _plain_values(value: Any) -> Any:
    return value.tolist() if isinstance(value, torch.Tensor) else value


def _cholesky_and_singular(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky factors of ``(..., D, D)`` matrices and a ``(...)`` mask of singular ones.

    A pivot ``L_ii² ≤ 64·eps·A_ii`` counts as singular even where the factorisation
    went through: that conditional variance is rounding noise, the columns are collinear.
    """
    chol, info = torch.linalg.cholesky_ex(matrices)
    pivots = chol.diagonal(dim1=-2, dim2=-1).square()
    floor = 64 * torch.finfo(matrices.dtype).eps * matrices.diagonal(dim1=-2, dim2=-1)
    return chol, (info != 0) | ~(pivots > floor).all(-1)


def _check_finite_params(params: NamedTuple, counts: torch.Tensor, family: str) -> None:
    for name, value in params._asdict().items():
        if not bool(torch.isfinite(value).all()):
            bad = int(counts.argmin())
            raise PyroEMError(
                f"the {family} M-step produced non-finite {name} (smallest component {bad} "
                f"holds {float(counts[bad]):.3g} points); fit with a prior (prior='default') "
                "or fewer components"
            )


class Family(ABC):
    """A component family: its likelihood, conjugate prior and closed-form M-step.

    Subclasses fix ``name`` (the string users pass as ``family=``) and
    ``param_names`` (the keys of ``fit.params``, besides ``"weights"``).
    """

    name: ClassVar[str]
    prior_type: ClassVar[type]
    shared_params: tuple[str, ...] = ()

    def __init__(self, prior: Any = "default") -> None:
        if isinstance(prior, str):
            prior = self._named_prior(prior)
        if prior is not None and not isinstance(prior, self.prior_type):
            raise SpecError(
                f"the {self.name} family takes a {self.prior_type.__name__} prior; "
                f"got {type(prior).__name__}"
            )
        self.prior: Any = prior
        self.shift: torch.Tensor | None = None
        self.dim: int | None = None
        self.resolved: Any = None

    def _named_prior(self, name: str) -> Any:
        """The prior called ``name`` (``"default"``: the family's weak default)."""
        if name != "default":
            raise SpecError(f"prior must be 'default', None or a prior object; got {name!r}")
        return self.prior_type()

    def proper_default(self) -> Family:
        """This family, with a proper prior where its default is improper (the methods
        that need a normalised posterior, vb-em and NUTS, use this)."""
        return self

    # ----- declaration -------------------------------------------------
    def __repr__(self) -> str:
        return f"{type(self).__name__}(prior={self.prior_repr()})"

    def prior_repr(self) -> str:
        """The prior as shown: bound to data, the resolved numbers the fit uses; unbound,
        the declaration, saying where its ``None`` fields come from."""
        if self.prior is None:
            return "None"
        if self.resolved is not None:
            return resolved_repr(self.prior_type, self.resolved)
        return self._unbound_prior_repr()

    def _unbound_prior_repr(self) -> str:
        """An unbound prior: its fields, and a note if some come from the data."""
        text = repr(self.prior)
        if any(getattr(self.prior, field.name) is None for field in dataclasses.fields(self.prior)):
            text += " (None fields: the family's default, resolved from the data when fitted)"
        return text

    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable description (family name, options, prior)."""
        return {
            "family": self.name,
            "prior": None if self.prior is None else self.prior.to_config(),
        }

    @property
    def is_bound(self) -> bool:
        return self.dim is not None

    def bind(self, data: torch.Tensor, num_components: int) -> Family:
        """A copy of this family fixed to ``data``'s dimension, with priors resolved.

        Args:
            data: the training data, shape ``(num_data, dim)``, already validated.
            num_components: ``K`` (some default priors scale with it).
        """
        self.validate(data)
        bound = copy.copy(self)
        bound.dim = data.shape[1]
        bound._bind_data(data)
        bound.resolved = None if self.prior is None else bound._resolve_prior(data, num_components)
        return bound

    def _bind_data(self, data: torch.Tensor) -> None:  # noqa: B027 (optional hook)
        """Hook: remember data-derived constants (e.g. a centering shift)."""

    def explicit(self) -> Family:
        """An unbound copy whose prior spells out the resolved numbers.

        Binding it to any data of the same dimension gives this bound family's
        prior exactly, which is how fits are saved and loaded.
        """
        twin = copy.copy(self)
        twin.dim = None
        twin.resolved = None
        if self.resolved is not None:
            twin.prior = self._explicit_prior()
        return twin

    def _explicit_prior(self) -> Any:
        """The resolved prior as a prior object with every field given."""
        return self.prior_type(*(_plain_values(value) for value in self.resolved))

    def rebind(self, dim: int, shift: torch.Tensor | None, dtype: torch.dtype) -> Family:
        """Bind an :meth:`explicit` family without data (the prior needs only the shape)."""
        placeholder = torch.zeros((2, dim), dtype=dtype)
        bound = copy.copy(self)
        bound.dim = dim
        bound._bind_data(placeholder)
        if shift is not None:
            bound.shift = shift.to(dtype)
        bound.resolved = None if self.prior is None else bound._resolve_prior(placeholder, 1)
        return bound

    @abstractmethod
    def validate(self, data: torch.Tensor) -> None:
        """Raise :class:`DataError` if ``data`` is outside the family's support."""

    @abstractmethod
    def _resolve_prior(self, data: torch.Tensor, num_components: int) -> Any:
        """Concrete prior tensors from the declared prior and the data."""

    # ----- kernels (pure torch) -------------------------------------------
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Per-chunk preprocessing, done once per fit."""
        return x

    def chunk_row_bytes(
        self, num_components: int, dim: int, element_size: int, fused: bool = True
    ) -> int:
        """Bytes a row of a chunk takes in the largest per-chunk temporary (the E-step
        cuts chunks by it): here a ``(K, D, rows)`` one. ``fused``: the chunk goes through
        :meth:`estep_kernels`; ``False``: through :meth:`statistics` or the missing-data
        kernels."""
        return num_components * max(dim, 1) * element_size

    @abstractmethod
    def log_prob_fn(self, params: Any) -> LogProbFn:
        """Closure mapping a prepared chunk to component log-densities ``(n, K)``."""

    @abstractmethod
    def statistics(self, prepared: torch.Tensor, resp: torch.Tensor) -> Any:
        """Expected sufficient statistics of a chunk (a NamedTuple with ``counts`` first)."""

    def estep_kernels(
        self, params: Any, workspace: dict[str, torch.Tensor] | None = None
    ) -> EStepKernels:
        """:meth:`log_prob_fn` and :meth:`statistics` in the E-step's ``(K, n)`` layout.

        A family may override it to share work between the two (no cache here), and
        keep its temporaries in ``workspace`` (the caller's, reused from chunk to chunk
        and from one E-step to the next, so large buffers are not allocated anew).
        """
        log_prob = self.log_prob_fn(params)

        def densities(prepared: torch.Tensor) -> tuple[torch.Tensor, None]:
            return log_prob(prepared).T.contiguous(), None

        def statistics(prepared: torch.Tensor, cache: Any, resp: torch.Tensor) -> Any:
            return self.statistics(prepared, resp.T)

        return EStepKernels(densities, statistics)

    # ----- missing data (NaN entries, marginalised) -----------------------------
    missing_by_pattern: ClassVar[bool] = False
    """Whether rows with missing entries are grouped by their missingness pattern
    (``observed`` below is then a ``(D,)`` bool pattern; otherwise ``None``, and the
    kernels take rows of any pattern)."""

    def prepare_missing(self, x: torch.Tensor, observed: torch.Tensor | None) -> torch.Tensor:
        """Preprocess rows ``x`` ``(n, D)`` that hold NaN for :meth:`missing_kernels`."""
        raise NotSupportedError(f"the {self.name} family does not support missing values")

    def missing_kernels(self, params: Any, observed: torch.Tensor | None) -> EStepKernels:
        """The E-step's kernels for rows with missing entries, in :meth:`estep_kernels`'
        layout: each row's log-density of its observed entries, and statistics in which
        a missing entry counts for nothing (for its own family's M-step)."""
        raise NotSupportedError(f"the {self.name} family does not support missing values")

    def impute(self, params: Any, data: torch.Tensor, resp: torch.Tensor) -> torch.Tensor:
        """``data`` ``(n, D)`` with each NaN replaced by its conditional mean given the
        row's observed entries, ``Σ_k r_nk E[x_d | k]`` (``resp`` ``(n, K)``)."""
        means = self._component_means(params)
        expected = resp @ means
        return torch.where(torch.isnan(data), expected, data)

    def _component_means(self, params: Any) -> torch.Tensor:
        """Each component's mean ``(K, D)``."""
        raise NotSupportedError(f"the {self.name} family does not support missing values")

    @abstractmethod
    def m_step(self, stats: Any) -> Any:
        """The closed-form maximiser of ``Q + log p(θ)``."""

    @abstractmethod
    def log_prior(self, params: Any) -> torch.Tensor:
        """``log p(θ)`` as the Pyro program declares it (0 for flat priors)."""

    @abstractmethod
    def num_parameters(self, num_components: int) -> int:
        """Free parameters of the components (not the weights)."""

    # ----- parameters ---------------------------------------------------
    @property
    @abstractmethod
    def params_type(self) -> Any:
        """NamedTuple type of the component parameters."""

    def select(self, params: Any, index: torch.Tensor) -> Any:
        """Keep components ``index`` (works on parameters and statistics alike)."""
        return _select(params, index, self.shared_params)

    def to_user(self, params: Any) -> dict[str, torch.Tensor]:
        """User-facing dictionary of component parameters."""
        return dict(params._asdict())

    def from_user(self, values: dict[str, Any], num_components: int, like: torch.Tensor) -> Any:
        """Parameters from a user dictionary (e.g. ``init_params``), validated."""
        fields = {}
        for name in self.params_type._fields:
            if name not in values:
                raise SpecError(
                    f"init_params needs {list(self.params_type._fields)} (plus 'weights'); "
                    f"missing {name!r}"
                )
            # A copy: validation may normalise in place, and the caller's arrays stay untouched.
            fields[name] = _as_tensor(values[name], like, f"init_params[{name!r}]").clone()
        params = self.params_type(**fields)
        self._check_user_params(params, num_components)
        return params

    @abstractmethod
    def _check_user_params(self, params: Any, num_components: int) -> None:
        """Raise :class:`SpecError` if user-given parameters have wrong shape or support."""

    @abstractmethod
    def component_distribution(self, params: Any) -> dist.TorchDistribution:
        """The component likelihood, batch ``params``' leading shape, event ``(dim,)``."""

    @abstractmethod
    def pyro_params(self, num_components: int, init: Any) -> Any:
        """Write the parameter sites of the Pyro program; return their values."""

    @abstractmethod
    def default_truth(self, num_components: int, dim: int, generator: torch.Generator) -> Any:
        """Well-separated parameters for :meth:`pyroem.Mixture.simulate`."""

    def _require_bound(self) -> int:
        if self.dim is None:
            raise SpecError(f"{self!r} is not bound to data; call family.bind(data, K) first")
        return self.dim


# ---------------------------------------------------------------------------
# Gaussian
# ---------------------------------------------------------------------------


class GaussianParams(NamedTuple):
    """Means ``(K, D)``; covariances: full ``(K, D, D)``, diag ``(K, D)``,
    spherical ``(K,)``, tied ``(D, D)``."""

    means: torch.Tensor
    covariances: torch.Tensor


class GaussianStats(NamedTuple):
    """Per-component statistics about the data mean: counts ``(K,)``, sum_x ``(K, D)``
    and the scatter of each component about its own weighted mean
    ``Σ_n r_nk (x_n − m_k)(x_n − m_k)ᵀ`` (``m_k = sum_x / counts``): full and tied
    ``(K, D, D)``, diag and spherical its diagonal ``(K, D)``.

    Scatter about each component's own mean is exact whatever the distance between
    components; chunks are combined by :meth:`merge` (Chan, Golub & LeVeque's
    pairwise update), not by adding raw second moments, which would cancel.
    """

    counts: torch.Tensor
    sum_x: torch.Tensor
    scatter: torch.Tensor

    def merge(self, other: GaussianStats) -> GaussianStats:
        """Statistics of the union of two disjoint sets of data."""
        counts = self.counts + other.counts
        delta = weighted_mean(other.sum_x, other.counts) - weighted_mean(self.sum_x, self.counts)
        # n_a n_b / (n_a + n_b); 0 where either side is empty.
        factor = self.counts * other.counts / counts.clamp(min=torch.finfo(counts.dtype).tiny)
        if self.scatter.ndim == 3:
            correction = delta[:, :, None] * delta[:, None, :]
        else:
            correction = delta.square()
        scatter = self.scatter + other.scatter
        scatter = scatter + factor.reshape(-1, *[1] * (scatter.ndim - 1)) * correction
        return GaussianStats(counts, self.sum_x + other.sum_x, scatter)


WHITEN_BLOCK_BYTES = 2 * 2**20
"""Bytes of a ``(K, D, width)`` block of deviations in the whitening kernel: small
enough to stay in cache between the subtraction, the product and the reductions."""


def _deviation_blocks(
    rows: torch.Tensor, centres: torch.Tensor, scratch: Callable[..., torch.Tensor]
) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(columns, x − μ_k (K, D, width))`` over column blocks of ``rows`` ``(D, n)``,
    each block's deviations written into the same ``scratch`` buffer."""
    count, dim = centres.shape[0], rows.shape[0]
    size = rows.shape[1]
    width = max(64, WHITEN_BLOCK_BYTES // max(count * dim * rows.element_size(), 1))
    for start in range(0, size, width):
        block = slice(start, min(start + width, size))
        shape = (count, dim, block.stop - block.start)
        deviations = scratch("deviations", shape, rows)
        yield block, torch.sub(rows[None, :, block], centres, out=deviations)


def _moment_statistics(
    means: torch.Tensor, counts: torch.Tensor, first: torch.Tensor, second: torch.Tensor
) -> GaussianStats:
    """Statistics from moments about the means ``μ_k`` ``(K, D)``: ``first = Σ r d``
    ``(K, D)`` and ``second = Σ r d²`` ``(K, D)`` or ``Σ r d dᵀ`` ``(K, D, D)``
    (``d = x − μ_k``), by the corrected two-pass formula ``S = second − first firstᵀ / N``."""
    offsets = first / counts.clamp(min=torch.finfo(counts.dtype).tiny)[:, None]
    if second.ndim == 2:
        scatter = (second - first * offsets).clamp_(min=0)
    else:
        scatter = second - first[:, :, None] * offsets[:, None, :]
        scatter = 0.5 * (scatter + scatter.mT)
    return GaussianStats(counts, counts[:, None] * means + first, scatter)


class _Conditionals(NamedTuple):
    """The components given the coordinates ``observed`` of a missingness pattern:
    ``observed`` ``(p,)`` and ``missing`` ``(q,)`` indices; ``centres`` ``(K, p, 1)`` the
    observed means; ``whiten`` ``(K, p, p)`` ``L⁻¹`` of ``Σ_oo = L Lᵀ`` (full, tied) or
    ``scales`` ``(K, p, 1)`` ``1/σ`` (diag, spherical); ``const`` ``(K, 1)`` the
    log-normaliser of ``N(x_o | μ_o, Σ_oo)``; ``regression`` ``(K, q, p)``
    ``Σ_mo Σ_oo⁻¹`` (``None`` for diagonal covariances, where it is zero);
    ``covariance`` the conditional covariance of the missing coordinates,
    ``Σ_mm − Σ_mo Σ_oo⁻¹ Σ_om`` ``(K, q, q)``, or its diagonal ``(K, q)``."""

    observed: torch.Tensor
    missing: torch.Tensor
    centres: torch.Tensor
    whiten: torch.Tensor
    const: torch.Tensor
    regression: torch.Tensor | None
    covariance: torch.Tensor


def _resolution(data: torch.Tensor) -> torch.Tensor:
    """Each column's resolution ``(D,)``: the median gap between its distinct sorted values.

    It is at least ``64·eps·|x|max·√(20(N+1))``, which keeps the prior's share of a
    variance, ``0.1·r²/(N_k + 0.1)``, twice above the collapse test of
    :meth:`Gaussian._check_variances` (a constant column has no gap and gets this floor).
    """
    finfo = torch.finfo(data.dtype)
    num = data.shape[0]
    magnitude = data.abs().amax(0)
    magnitude = torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude))
    floor = 64 * finfo.eps * math.sqrt(20 * (num + 1)) * magnitude
    out = floor.clone()
    for column in range(data.shape[1]):
        gaps = torch.diff(torch.sort(data[:, column]).values)
        gaps = gaps[gaps > 0]
        if gaps.numel() > 0:
            out[column] = torch.maximum(gaps.median(), floor[column])
    return out


class Gaussian(Family):
    """Gaussian components with ``covariance_type`` full, diag, spherical or tied.

    Parameters (``fit.params``): ``means`` ``(K, D)`` and ``covariances`` shaped as in
    scikit-learn: full ``(K, D, D)``, diag ``(K, D)``, spherical ``(K,)``, tied ``(D, D)``.
    Prior: :class:`~pyroem.model.priors.NormalInverseWishart` (``prior=None``: maximum
    likelihood). Each component's scatter is accumulated about its own weighted mean
    (see :class:`GaussianStats`), so covariances are exact to the dtype's precision
    however far apart the components sit.

    ``reg_covar`` (default 0) is added to the diagonal of every covariance after each
    M-step, as scikit-learn's ``GaussianMixture(reg_covar=...)`` does: a floor that keeps
    a component on few points from becoming singular. With ``reg_covar > 0`` the M-step
    is no longer the exact maximiser, so the objective need not increase strictly.
    """

    name = "gaussian"
    prior_type = NormalInverseWishart

    def __init__(
        self, covariance_type: str = "full", prior: Any = "default", reg_covar: float = 0.0
    ) -> None:
        if covariance_type not in COVARIANCE_TYPES:
            raise SpecError(
                f"covariance_type must be one of {COVARIANCE_TYPES}; got {covariance_type!r}"
            )
        if not (isinstance(reg_covar, (int, float)) and 0 <= reg_covar < math.inf):
            raise SpecError(f"reg_covar must be a finite number >= 0; got {reg_covar!r}")
        super().__init__(prior)
        self.covariance_type = covariance_type
        self.reg_covar = float(reg_covar)
        if covariance_type == "tied":
            self.shared_params = ("covariances",)

    def __repr__(self) -> str:
        reg = f", reg_covar={self.reg_covar!r}" if self.reg_covar else ""
        return f"Gaussian(covariance_type={self.covariance_type!r}, prior={self.prior_repr()}{reg})"

    def _unbound_prior_repr(self) -> str:
        prior = self.prior
        if _same_fields(prior, NormalInverseWishart.weak()):
            return (
                "'default' (weak: covariances' prior worth 0.1 observations of "
                "diag(resolution²), means' prior at the data mean worth "
                "0.01·min(resolution/range)² observations; numbers from the data when fitted)"
            )
        if _same_fields(prior, NormalInverseWishart()):
            return (
                "'mclust' (Fraley-Raftery: mean = data mean, mean_precision=0.01, "
                "dof = dim + 2, scale = cov(data) / K^(2/dim); numbers from the data when fitted)"
            )
        return super()._unbound_prior_repr()

    def _named_prior(self, name: str) -> Any:
        if name == "default":
            return NormalInverseWishart.weak()
        if name == "mclust":
            return NormalInverseWishart()
        raise SpecError(
            f"prior must be 'default', 'mclust', None or a NormalInverseWishart; got {name!r}"
        )

    def proper_default(self) -> Family:
        """With ``prior="default"`` (flat on the means, weight below any proper prior),
        a copy with mclust's proper prior; otherwise this family."""
        prior = self.prior
        weak = (
            isinstance(prior, NormalInverseWishart)
            and isinstance(prior.scale, str)
            and prior.mean_precision is None
            and prior.weight is None
        )
        if not weak or self.is_bound:
            return self
        twin = copy.copy(self)
        twin.prior = NormalInverseWishart()
        return twin

    def to_config(self) -> dict[str, Any]:
        config = {**super().to_config(), "covariance_type": self.covariance_type}
        if self.reg_covar:
            config["reg_covar"] = self.reg_covar
        return config

    @property
    def params_type(self) -> type:
        return GaussianParams

    def validate(self, data: torch.Tensor) -> None:
        """Any finite real data whose squares and variances the dtype can hold.

        Covariances are sums of squares: values beyond ``sqrt(max / N)`` overflow
        them, and a column whose spread is below ``sqrt(tiny / eps)`` has a variance
        lost to underflow (neither is collinearity)."""
        finfo = torch.finfo(data.dtype)
        # Column extremes, not |data|: no copy of the data (aminmax over rows is slower).
        lowest, highest = data.amin(0), data.amax(0)
        largest = float(torch.maximum(-lowest, highest).max())
        if largest > math.sqrt(finfo.max / data.numel()):
            raise DataError(
                f"data values reach {largest:.3g}; their squares overflow {data.dtype} "
                f"(a Gaussian fit of {data.shape[0]} points needs |x| below "
                f"{math.sqrt(finfo.max / data.numel()):.3g}): rescale the data, e.g. "
                "divide it by its standard deviation, before fitting"
            )
        spread = highest - lowest
        tiny = (spread > 0) & (spread < math.sqrt(finfo.tiny / finfo.eps))
        if bool(tiny.any()):
            column = int(torch.nonzero(tiny)[0])
            raise DataError(
                f"column {column} of the data spans only {float(spread[column]):.3g}; its "
                f"variance underflows {data.dtype}: rescale the data, e.g. divide it by "
                "its standard deviation, before fitting"
            )

    def _bind_data(self, data: torch.Tensor) -> None:
        # No shift: kernels and statistics work on x − μ_k, so the data are used as
        # given (a shift would round away the digits of points far from it).
        self.shift = torch.zeros_like(data[0])

    @property
    def _center(self) -> torch.Tensor:
        """The origin statistics are taken about (zero, or a saved fit's shift)."""
        if self.shift is None:
            raise SpecError(f"{self!r} is not bound to data; call family.bind(data, K) first")
        return self.shift

    def _resolve_prior(self, data: torch.Tensor, num_components: int) -> NIWPrior:
        prior: NormalInverseWishart = self.prior
        dim = data.shape[1]
        mean = data.mean(0) if prior.mean is None else _per_dim(prior.mean, data, dim, "prior mean")
        kappa = 1.0 if prior.mean_precision is None else float(prior.mean_precision)
        if not kappa >= 0:
            raise SpecError(f"prior mean_precision must be >= 0; got {prior.mean_precision}")
        dof = float(dim + 2 if prior.dof is None else prior.dof)
        if not dof > dim - 1:
            raise SpecError(f"prior dof must exceed dim - 1 = {dim - 1}; got {dof}")
        # The prior's pseudo-counts on each covariance: ν plus the powers of |Σ| that the
        # Inverse-Wishart and the mean priors add (per coordinate for spherical).
        pseudo = dof + niw_exponent(self.covariance_type, dim, num_components, kappa > 0)
        if self.covariance_type == "spherical":
            pseudo /= dim
        if prior.weight is None:
            weight = 0.1 / pseudo
        else:
            weight = float(prior.weight)
            if not (math.isfinite(weight) and weight > 0):
                raise SpecError(f"prior weight must be positive and finite; got {prior.weight!r}")
        if prior.mean_precision is None:
            # Worth 0.01·(resolution / range)² observations of the mean: enough to give a
            # component without data the data mean, too little to move any other.
            spread = data.amax(0) - data.amin(0)
            ratios = (_resolution(data) / spread)[spread > 0]
            share = float(ratios.square().min()) if ratios.numel() > 0 else 1.0
            kappa = 0.01 * min(share, 1.0) / weight
        if isinstance(prior.scale, str):
            if prior.scale != "resolution":
                raise SpecError(
                    f"prior scale must be a number, an array or 'resolution'; got {prior.scale!r}"
                )
            # Worth 0.1 observations of variance resolution² per column: τΨ = 0.1·diag(r²).
            scale = torch.diag(_resolution(data).square()) * (0.1 / weight)
        elif prior.scale is None:
            if data.shape[0] < 2:
                raise SpecError("the mclust prior scale needs two data points; pass scale=")
            empirical = torch.atleast_2d(torch.cov(data.T))
            scale = empirical / num_components ** (2.0 / dim)
        else:
            raw = _as_tensor(prior.scale, data, "prior scale")
            if raw.ndim == 0:
                scale = raw * torch.eye(dim, dtype=data.dtype, device=data.device)
            elif raw.ndim == 1 and raw.shape[0] == dim:
                scale = torch.diag(raw)
            elif raw.shape == (dim, dim):
                _check_symmetric(raw, "prior scale")
                scale = raw
            else:
                raise SpecError(
                    f"prior scale must be a float, shape ({dim},) or ({dim}, {dim}); "
                    f"got {tuple(raw.shape)}"
                )
        if bool(_cholesky_and_singular(scale)[1]):
            raise SpecError(
                "prior scale must be positive definite (constant or collinear data columns make "
                "the mclust scale singular: drop them, pass scale=, or use prior='default')"
            )
        return NIWPrior(mean, kappa, dof, scale, weight)

    # ----- kernels ------------------------------------------------------
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        # The kernels only read the prepared rows: about a zero centre (every fresh fit)
        # they are the data themselves, not a second copy of them.
        center = self._center
        return x if not bool(center.any()) else x - center

    def chunk_row_bytes(
        self, num_components: int, dim: int, element_size: int, fused: bool = True
    ) -> int:
        """Full and tied covariances with more than :data:`SMALL_MAX_DIM` dimensions (or
        the features' ``K``) run each chunk block by block, holding only ``(K, rows)`` and
        ``(D + shifts, rows)`` arrays for the whole chunk (the transposed chunk, the chunk
        about its centre wrapped around, the log-densities): larger chunks, less overhead
        per chunk (1e6×16×16, float64, one thread: an E-step 1.19 s at 4,096 rows, 0.95 s
        at 16,384 and more). Diagonal covariances keep a ``(K, 2D, rows)`` table per chunk,
        and the small-dimension kernel cuts its own blocks: the ``(K, D, rows)`` rule."""
        diagonal = self.covariance_type in ("diag", "spherical")
        if not fused or diagonal or takes_small_kernel(num_components, dim, diagonal):
            return super().chunk_row_bytes(num_components, dim, element_size)
        wrapped = dim + feature_shifts(dim) - 1 if features_pay(num_components, dim) else dim
        return max(num_components, wrapped) * element_size

    def _variances(self, params: GaussianParams) -> torch.Tensor:
        """Per-dimension variances ``(K, D)`` for diag/spherical."""
        dim = self._require_bound()
        if self.covariance_type == "spherical":
            return params.covariances[:, None].expand(-1, dim)
        return params.covariances

    def _cholesky(self, covariances: torch.Tensor) -> torch.Tensor:
        chol, singular = _cholesky_and_singular(covariances)
        if bool(singular.any()):
            bad = int(torch.nonzero(singular.reshape(-1))[0])
            raise SingularCovarianceError(
                f"covariance of component {bad} is not positive definite (singular); "
                "use a prior (prior='default', or NormalInverseWishart(scale=...)), fewer "
                "components, or more data"
            )
        return chol

    def log_prob_fn(self, params: GaussianParams) -> LogProbFn:
        dim = self._require_bound()
        means = params.means - self._center
        log_2pi = math.log(2 * math.pi)
        # Every kernel whitens x − μ_k itself, never expands it into x² − 2xμ + μ² nor
        # whitens x and μ apart: either cancels when the data sit far from the origin.
        # (K, D, n) layout: the sums run over the middle axis, with n contiguous.
        centres = means[:, :, None]
        if self.covariance_type in ("diag", "spherical"):
            scales = self._variances(params).rsqrt()[:, :, None]  # (K, D, 1)
            const = -0.5 * dim * log_2pi + scales.log().sum((1, 2))

            def diagonal(prepared: torch.Tensor) -> torch.Tensor:
                white = (prepared.T[None] - centres).mul_(scales)
                return white.square_().sum(1).T.mul(-0.5).add_(const)

            return diagonal

        eye = torch.eye(dim, dtype=means.dtype, device=means.device)
        chol = self._cholesky(params.covariances)
        # whiten: L⁻¹, so |L⁻¹(x − μ)|² is the Mahalanobis distance.
        whiten = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
        const = -0.5 * dim * log_2pi - chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        if self.covariance_type == "tied":
            whiten = whiten.expand(means.shape[0], dim, dim)

        def matrix(prepared: torch.Tensor) -> torch.Tensor:
            white = torch.bmm(whiten, prepared.T[None] - centres)  # (K, D, n)
            return white.square_().sum(1).T.mul(-0.5).add_(const)

        return matrix

    def statistics(self, prepared: torch.Tensor, resp: torch.Tensor) -> GaussianStats:
        counts = resp.sum(0)
        sum_x = resp.T @ prepared
        # Corrected two-pass scatter (Chan, Golub & LeVeque): deviations from the chunk's
        # weighted mean m_k, minus the rounding left in Σ r (x − m_k); never raw moments.
        deviations = prepared[None] - weighted_mean(sum_x, counts)[:, None]  # (K, n, D)
        resp_t = resp.T[:, None, :]  # (K, 1, n)
        residual = torch.bmm(resp_t, deviations)  # (K, 1, D), zero up to rounding
        safe = counts.clamp(min=torch.finfo(counts.dtype).tiny)[:, None, None]
        if self.covariance_type in ("diag", "spherical"):
            scatter = torch.bmm(resp_t, deviations.square()) - residual.square() / safe
            return GaussianStats(counts, sum_x, scatter[:, 0])
        weighted = deviations * resp.T[:, :, None]
        scatter = weighted.mT @ deviations - residual.mT * residual / safe
        return GaussianStats(counts, sum_x, 0.5 * (scatter + scatter.mT))

    def estep_kernels(
        self, params: GaussianParams, workspace: dict[str, torch.Tensor] | None = None
    ) -> EStepKernels:
        """Log-densities and statistics sharing the deviations ``x − μ_k`` ``(K, D, n)``.

        The statistics are moments about the current means ``μ_k``, shifted to each
        component's weighted mean by the corrected two-pass formula
        ``S = Σ r d dᵀ − (Σ r d)(Σ r d)ᵀ / N`` (``d = x − μ_k``, an exact difference
        where ``x`` and ``μ_k`` are close). It loses only ``eps·|m_k − μ_k|²/σ²``
        relative, nothing once the means settle (and chunks are merged exactly), so
        the statistics are as exact as :meth:`statistics`' at a fraction of its cost.
        """
        dim = self._require_bound()
        means = params.means - self._center
        num_components = means.shape[0]
        centres = means[:, :, None]
        log_2pi = math.log(2 * math.pi)

        def scratch(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
            """An uninitialised ``shape`` tensor, from ``workspace`` where there is one."""
            if workspace is None:
                return like.new_empty(shape)
            size = math.prod(shape)
            held = workspace.get(name)
            if held is None or held.numel() < size or held.dtype != like.dtype:
                held = workspace[name] = like.new_empty(size)
            return held[:size].view(shape)

        def transposed(prepared: torch.Tensor) -> torch.Tensor:
            """The chunk as ``(D, n)``, contiguous: subtracting the means from it runs
            several times faster than from the strided ``prepared.T`` view."""
            rows = scratch("rows", (dim, prepared.shape[0]), prepared)
            return rows.copy_(prepared.T)

        def finish(counts: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> Any:
            return _moment_statistics(means, counts, first, second)

        if takes_small_kernel(num_components, dim, self.covariance_type in ("diag", "spherical")):
            return self._small_kernels(params, means, scratch)

        if self.covariance_type in ("diag", "spherical"):
            variances = self._variances(params)  # (K, D)

            def diagonal(prepared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                shape = (num_components, 2 * dim, prepared.shape[0])
                buffer = scratch("buffer", shape, prepared)
                table = diagonal_normal_table(transposed(prepared), means, variances, buffer)
                return table, buffer

            def diagonal_statistics(
                prepared: torch.Tensor, buffer: torch.Tensor, resp: torch.Tensor
            ) -> GaussianStats:
                return finish(resp.sum(1), *diagonal_normal_moments(buffer, resp))

            return EStepKernels(diagonal, diagonal_statistics)

        eye = torch.eye(dim, dtype=means.dtype, device=means.device)
        chol = self._cholesky(params.covariances)
        whiten = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
        const = (-0.5 * dim * log_2pi - chol.diagonal(dim1=-2, dim2=-1).log().sum(-1))[..., None]
        # A contiguous batch: a transposed or expanded (stride 0) one makes bmm copy or loop.
        whiten = whiten.expand(num_components, dim, dim).contiguous()
        # One constant per component (tied covariances share one).
        const = const.reshape(-1, 1).expand(num_components, 1).contiguous()
        # The quadratic-feature kernel where a chunk's rounding bound allows it (it halves
        # the flops), whitening x − μ_k elsewhere (exact wherever the data sit).
        weights = feature_weights(means, whiten, const.reshape(-1).expand(num_components))
        max_loss = max_feature_loss(means.dtype) if features_pay(num_components, dim) else -1.0
        kept_features = feature_count(dim)
        wrapped = dim + feature_shifts(dim) - 1  # rows of a chunk wrapped around

        def whitened(
            rows: torch.Tensor, index: torch.Tensor | None
        ) -> tuple[torch.Tensor, torch.Tensor]:
            """Log-densities of the components ``index`` (None: all), and the rows
            their statistics whiten again (see :func:`whitened_statistics`)."""
            parts = (whiten, centres, const)
            if index is not None:
                parts = tuple(part[index] for part in parts)  # type: ignore[assignment]
            count, size = parts[0].shape[0], rows.shape[1]
            out = scratch("whitened", (count, size), rows)
            # Column blocks whose (K, D, width) temporaries stay in cache.
            for block, deviations in _deviation_blocks(rows, parts[1], scratch):
                width = block.stop - block.start
                shape = (count, dim, width)
                white = torch.bmm(parts[0], deviations, out=scratch("white", shape, rows))
                torch.sum(white.square_(), 1, out=out[:, block])
            return out.mul_(-0.5).add_(parts[2]), rows

        def whitened_statistics(
            rows: torch.Tensor, resp: torch.Tensor, index: torch.Tensor | None
        ) -> GaussianStats:
            """Moments about ``μ_k`` block by block, the deviations formed again in
            cache rather than kept from the log-densities as a ``(K, D, n)`` tensor."""
            centres_k = centres if index is None else centres[index]
            count = centres_k.shape[0]
            second = rows.new_zeros(count, dim, dim)
            first = rows.new_zeros(count, dim)
            for block, deviations in _deviation_blocks(rows, centres_k, scratch):
                weighted = scratch("white", deviations.shape, rows)
                torch.mul(deviations, resp[:, None, block], out=weighted)
                second.baddbmm_(weighted, deviations.mT)  # (K, D, D)
                first.add_(weighted.sum(2))
            return _moment_statistics(centres_k[:, :, 0], resp.sum(1), first, second)

        # tr Σ_k: with |μ_k − c|², the mean |y_n|² of a component's rows (what its moments
        # cancel by, see :func:`moment_losses`, checked once the chunk is done).
        spreads = chol.square().sum((-2, -1)).expand(num_components)

        def plan(prepared: torch.Tensor, moments: bool = False) -> tuple[torch.Tensor, Any]:
            """The chunk as ``(D, n)`` and, where the features pay, ``(centred, centre,
            failing components or None, checked components or None, centred wrapped
            around (D + shifts − 1, n))``; ``None`` where it is whitened.

            ``moments``: the failing components whose moments are predicted to keep the
            features' accuracy are *checked* (a subset of the failing ones): whitened for
            their log-densities, their moments read from the features' product where
            :func:`moment_losses` confirms them once the responsibilities are known."""
            rows = transposed(prepared)
            if max_loss < 0:
                return rows, None
            centre = rows.mean(1)
            # The bound from below, from each coordinate's range: a chunk where fewer
            # than half the components can pass (most chunks in float32) is never centred.
            floor = feature_loss_floor(weights, rows, centre)
            if 2 * int((floor <= max_loss).sum()) < num_components:
                return rows, None
            # Wrapped around (its first rows again after its D, see wrapped_feature_rows)
            # once per chunk, so that no block copies itself to build its features.
            extended = scratch("centred", (wrapped, rows.shape[1]), rows)
            centred = torch.sub(rows, centre[:, None], out=extended[:dim])
            extended[dim:].copy_(extended[: wrapped - dim])
            # Per component: each takes the features only where its own bound allows.
            loss = feature_loss(weights, centred, centre)
            fast = loss <= max_loss
            passing = int(fast.sum())
            # The features' products cost about half of whitening every component
            # (K = D = 16, float64: 2.1 against 4.1 ms a 4,096-row chunk), so they pay
            # while at least half the components pass.
            if 2 * passing < num_components:
                return rows, None
            checked = None
            if moments and passing < num_components:
                # Failing components whose moments are predicted to keep the features'
                # accuracy (a row at mean distance from the centre, |μ_k − c|² + tr Σ_k,
                # within the bound) are whitened for their log-densities only.
                offsets = (weights.means - centre).square().sum(1)
                predicted = weights.largest * (offsets + spreads) <= max_loss
                near = ~fast & predicted
                if bool(near.any()):
                    checked = torch.nonzero(near)[:, 0]
            bad = None if passing == num_components else torch.nonzero(~fast)[:, 0]
            return rows, (centred, centre, bad, checked, extended)

        def matrix(prepared: torch.Tensor) -> tuple[torch.Tensor, Any]:
            rows, features = plan(prepared)
            if features is None:
                return whitened(rows, None)
            centred, centre, bad = features[:3]
            joint = scratch("joint", (num_components, rows.shape[1]), rows)
            # Every component in the one product (a subset of rows runs the product no
            # faster), the failing ones' rows then replaced by their whitened values.
            joint = feature_log_prob(weights, centred, centre, joint)
            if bad is not None:
                joint[bad] = whitened(rows, bad)[0]
            return joint, (bad, centred, centre, rows)

        def fused(
            prepared: torch.Tensor,
            log_weights: torch.Tensor,
            row_weights: torch.Tensor | None,
            responsibilities: Callable[..., tuple[torch.Tensor, torch.Tensor]],
        ) -> tuple[GaussianStats, torch.Tensor]:
            """Statistics and log-likelihood of a chunk, block by block: each block's
            features and whitened components' deviations built once and read, still in
            cache, by the log-densities, the normalisation and the moments.

            Checked components (see ``plan``) keep their features' moments only where
            :func:`moment_losses` confirms them; otherwise the chunk runs again with
            their moments whitened too."""
            rows, features = plan(prepared, moments=True)
            stats, total, moments = sweep(
                rows, features, log_weights, row_weights, responsibilities
            )
            if features is None or features[3] is None:
                return stats, total
            checked = features[3]
            kept = moment_losses(weights, moments)[checked] <= max_loss
            if bool(kept.all()):
                return stats, total
            features = (*features[:3], checked[kept] if bool(kept.any()) else None, features[4])
            return sweep(rows, features, log_weights, row_weights, responsibilities)[:2]

        def sweep(
            rows: torch.Tensor,
            features: Any,
            log_weights: torch.Tensor,
            row_weights: torch.Tensor | None,
            responsibilities: Callable[..., tuple[torch.Tensor, torch.Tensor]],
        ) -> tuple[GaussianStats, torch.Tensor, torch.Tensor]:
            """One pass of :func:`fused` over the chunk ``rows`` ``(D, n)`` as planned
            (``features`` None: every component whitened), and the features' moments
            ``(K, P)`` (``(K, 0)`` without features)."""
            size = rows.shape[1]
            total = rows.new_zeros(())
            # The components whitened: all (no features), the failing ones, or none;
            # those whose moments are whitened too first (all but the checked ones).
            every = features is None
            bad = None if every else features[2]
            if bad is not None and features[3] is not None:
                checked = features[3]
                bad = torch.cat([bad[~torch.isin(bad, checked)], checked])
            failing = num_components if every else 0 if bad is None else bad.shape[0]
            scattered = failing if every or features[3] is None else failing - features[3].shape[0]
            parts = (whiten, centres, const)
            if bad is not None:
                parts = tuple(part[bad] for part in parts)  # type: ignore[assignment]
            first = rows.new_zeros(scattered, dim)
            second = rows.new_zeros(scattered, dim, dim)
            apart = None if bad is None else bad[:scattered]  # their moments whitened
            moments = rows.new_zeros(num_components, 0 if every else kept_features)
            if every:
                counts = rows.new_zeros(num_components)
                row_bytes = num_components * dim * rows.element_size()
                width = max(64, WHITEN_BLOCK_BYTES // row_bytes)
            else:
                centre, extended = features[1], features[4]
                coefficients = feature_coefficients(weights, centre)
                width = feature_block_rows(kept_features, rows.element_size())
            width = min(width, size)
            # Flat buffers, viewed block by block (a short last block included).
            buffers = [
                scratch(name, (length * width,), rows)
                for name, length in (
                    ("block", 0 if every else kept_features),
                    ("joint", num_components),
                    ("deviations", failing * dim),
                    ("white", failing * dim),
                )
            ]
            for start in range(0, size, width):
                block = slice(start, min(start + width, size))
                count = block.stop - block.start
                joint = buffers[1][: num_components * count].view(num_components, count)
                if not every:
                    phi = buffers[0][: kept_features * count].view(kept_features, count)
                    features_block = wrapped_feature_rows(extended[:, block], dim, phi)
                    torch.mm(coefficients, features_block, out=joint)
                if failing:
                    shape = (failing, dim, count)
                    deviations = buffers[2][: failing * dim * count].view(shape)
                    torch.sub(rows[None, :, block], parts[1], out=deviations)
                    white = buffers[3][: failing * dim * count].view(shape)
                    torch.bmm(parts[0], deviations, out=white)
                    if every:
                        torch.sum(white.square_(), 1, out=joint)
                        joint.mul_(-0.5).add_(parts[2])
                    else:
                        joint[bad] = white.square_().sum(1).mul_(-0.5).add_(parts[2])
                weights_block = None if row_weights is None else row_weights[block]
                resp, log_norm = responsibilities(joint.add_(log_weights), weights_block)
                total += log_norm.sum()
                if not every:
                    moments.addmm_(resp, phi.T)
                if scattered:
                    part = resp if apart is None else resp[apart]
                    if scattered < failing:
                        deviations = deviations[:scattered]
                    weighted = torch.mul(deviations, part[:, None, :], out=white[:scattered])
                    second.baddbmm_(weighted, deviations.mT)
                    first.add_(weighted.sum(2))
                    if every:
                        counts.add_(part.sum(1))
            centres_k = parts[1][:scattered, :, 0]
            if every:
                return _moment_statistics(centres_k, counts, first, second), total, moments
            stats = GaussianStats(*feature_moment_statistics(weights, moments, centre))
            if apart is not None and scattered:
                slow = _moment_statistics(centres_k, stats.counts[apart], first, second)
                for joined, replaced in zip(stats, slow, strict=True):
                    joined[apart] = replaced
            return stats, total, moments

        def matrix_statistics(prepared: torch.Tensor, cache: Any, resp: torch.Tensor) -> Any:
            if not isinstance(cache, tuple):
                return whitened_statistics(cache, resp, None)
            bad, centred, centre, rows = cache
            stats = GaussianStats(*feature_statistics(weights, centred, centre, resp))
            if bad is None:
                return stats
            slow = whitened_statistics(rows, resp[bad], bad)
            for joined, replaced in zip(stats, slow, strict=True):
                joined[bad] = replaced
            return stats

        return EStepKernels(matrix, matrix_statistics, fused)

    def _small_kernels(
        self, params: GaussianParams, means: torch.Tensor, scratch: Callable[..., torch.Tensor]
    ) -> EStepKernels:
        """:mod:`pyroem.estep.gaussian_small`'s kernels (``D ≤ 4``), about the means
        ``(K, D)`` (already about the centre)."""
        num_components, dim = means.shape
        log_2pi = math.log(2 * math.pi)
        lower = None
        if self.covariance_type in ("diag", "spherical"):
            variances = self._variances(params)
            diagonal = variances.rsqrt()
            const = -0.5 * (dim * log_2pi + variances.log().sum(-1))
        else:
            chol = self._cholesky(params.covariances)
            eye = torch.eye(dim, dtype=means.dtype, device=means.device)
            whiten = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
            lower = whiten.expand(num_components, dim, dim)
            diagonal = lower.diagonal(dim1=-2, dim2=-1).contiguous()
            log_det = chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            const = (-0.5 * dim * log_2pi - log_det).expand(num_components).contiguous()
        components = SmallGaussian(means, diagonal, lower, const)
        log_prob, moments, fused_moments = small_kernels(components, scratch)

        def statistics(prepared: torch.Tensor, cache: Any, resp: torch.Tensor) -> GaussianStats:
            return _moment_statistics(means, *moments(prepared, cache, resp))

        def fused(*args: Any) -> tuple[GaussianStats, torch.Tensor]:
            chunk_moments, log_likelihood = fused_moments(*args)
            return _moment_statistics(means, *chunk_moments), log_likelihood

        return EStepKernels(log_prob, statistics, fused)

    # ----- missing data -------------------------------------------------------
    missing_by_pattern = True

    def prepare_missing(self, x: torch.Tensor, observed: torch.Tensor | None) -> torch.Tensor:
        """Rows sharing the missingness pattern ``observed`` ``(D,)`` bool: their observed
        coordinates ``(n, p)``, about the family's centre."""
        if observed is None:
            raise PyroEMError("the gaussian family groups rows by missingness pattern")
        return x[:, observed] - self._center[observed]

    def _conditionals(self, params: GaussianParams, observed: torch.Tensor) -> _Conditionals:
        """Marginal and conditional Gaussians of the pattern ``observed`` ``(D,)`` bool."""
        dim = self._require_bound()
        means = params.means - self._center
        num_components = means.shape[0]
        seen = torch.nonzero(observed).reshape(-1)
        unseen = torch.nonzero(~observed).reshape(-1)
        centres = means[:, seen, None]
        log_2pi = math.log(2 * math.pi)
        if self.covariance_type in ("diag", "spherical"):
            variances = self._variances(params)
            seen_variances = variances[:, seen]
            const = -0.5 * (seen.numel() * log_2pi + seen_variances.log().sum(-1))
            scales = seen_variances.rsqrt()[:, :, None]
            return _Conditionals(
                seen, unseen, centres, scales, const[:, None], None, variances[:, unseen]
            )
        covariances = params.covariances.expand(num_components, dim, dim)
        rows = covariances[:, seen]
        chol = self._cholesky(rows[:, :, seen])
        eye = torch.eye(seen.numel(), dtype=means.dtype, device=means.device)
        whiten = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
        const = -0.5 * seen.numel() * log_2pi - chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        half = torch.bmm(whiten, rows[:, :, unseen])  # L⁻¹ Σ_om, (K, p, q)
        regression = torch.bmm(half.mT, whiten)  # Σ_mo L⁻ᵀ L⁻¹ = Σ_mo Σ_oo⁻¹
        conditional = covariances[:, unseen][:, :, unseen] - torch.bmm(half.mT, half)
        conditional = 0.5 * (conditional + conditional.mT)
        return _Conditionals(seen, unseen, centres, whiten, const[:, None], regression, conditional)

    def _observed_deviations(
        self, parts: _Conditionals, prepared: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log N(x_o | μ_o, Σ_oo) (K, n), x_o − μ_o (K, p, n))`` of a pattern's rows."""
        deviations = prepared.T[None] - parts.centres
        if parts.regression is None:
            white = deviations * parts.whiten
        else:
            white = torch.bmm(parts.whiten, deviations)
        return white.square_().sum(1).mul_(-0.5).add_(parts.const), deviations

    def missing_kernels(
        self, params: GaussianParams, observed: torch.Tensor | None
    ) -> EStepKernels:
        r"""The E-step's kernels for rows missing the coordinates outside ``observed``.

        The log-density is the marginal ``log N(x_o | μ_o, Σ_oo)``. The statistics are
        the expected complete-data ones (Ghahramani & Jordan, 1994): each missing block
        is replaced by its conditional mean ``x̂_m = μ_m + Σ_mo Σ_oo⁻¹ (x_o − μ_o)`` and
        its second moment gains the conditional covariance
        ``Σ_mm − Σ_mo Σ_oo⁻¹ Σ_om``, so the M-step maximises the observed-data objective's
        EM bound exactly. The moments are taken about ``μ_k`` and shifted by the same
        corrected two-pass formula as :meth:`estep_kernels`.
        """
        if observed is None:
            raise PyroEMError("the gaussian family groups rows by missingness pattern")
        dim = self._require_bound()
        parts = self._conditionals(params, observed)
        means = params.means - self._center
        diagonal = parts.regression is None
        block = (slice(None), parts.missing[:, None], parts.missing)

        def log_prob(prepared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self._observed_deviations(parts, prepared)

        def statistics(
            prepared: torch.Tensor, deviations: torch.Tensor, resp: torch.Tensor
        ) -> GaussianStats:
            counts = resp.sum(1)
            if diagonal:
                # The missing coordinates' deviations are zero: their first moments are
                # zero, their second the conditional variances.
                moments = torch.bmm(
                    resp[:, None, :], torch.cat([deviations, deviations.square()], 1).mT
                )[:, 0]
                first = means.new_zeros(means.shape)
                second = means.new_zeros(means.shape)
                first[:, parts.observed] = moments[:, : parts.observed.numel()]
                second[:, parts.observed] = moments[:, parts.observed.numel() :]
                second[:, parts.missing] = counts[:, None] * parts.covariance
                return _moment_statistics(means, counts, first, second)
            full = deviations.new_empty(means.shape[0], dim, prepared.shape[0])
            full[:, parts.observed] = deviations
            if parts.regression is not None:
                full[:, parts.missing] = torch.bmm(parts.regression, deviations)
            first = torch.bmm(resp[:, None, :], full.mT)[:, 0]
            second = torch.bmm(full * resp[:, None, :], full.mT)
            second[block] += counts[:, None, None] * parts.covariance
            return _moment_statistics(means, counts, first, second)

        return EStepKernels(log_prob, statistics)

    def impute(
        self, params: GaussianParams, data: torch.Tensor, resp: torch.Tensor
    ) -> torch.Tensor:
        """``data`` with each missing entry replaced by ``Σ_k r_nk E[x_m | x_o, k]``.

        Args:
            params: component parameters.
            data: ``(n, D)`` with NaN where missing.
            resp: responsibilities ``(n, K)`` given the observed entries.
        """
        missing = torch.isnan(data)
        out = data.clone()
        incomplete = torch.nonzero(missing.any(1)).reshape(-1)
        patterns, inverse = torch.unique(~missing[incomplete], dim=0, return_inverse=True)
        means = params.means - self._center
        for index, observed in enumerate(patterns):
            rows = incomplete[inverse == index]
            parts = self._conditionals(params, observed)
            expected = means[:, parts.missing, None]  # (K, q, 1)
            if parts.regression is not None:
                prepared = self.prepare_missing(data[rows], observed)
                deviations = prepared.T[None] - parts.centres
                expected = expected + torch.bmm(parts.regression, deviations)
            else:
                expected = expected.expand(-1, -1, rows.numel())
            filled = torch.einsum("nk,kqn->nq", resp[rows], expected)
            out[rows[:, None], parts.missing] = filled + self._center[parts.missing]
        return out

    def m_step(self, stats: GaussianStats) -> GaussianParams:
        dim = self._require_bound()
        counts = stats.counts
        if self.reg_covar:
            # As scikit-learn: a component no data reaches keeps finite means.
            counts = counts + 10 * torch.finfo(counts.dtype).eps
        prior: NIWPrior | None = self.resolved
        if prior is not None:  # in centred coordinates
            prior = prior._replace(mean=prior.mean - self._center)
        means, covariances = niw_mode(
            prior, counts, stats.sum_x, stats.scatter, self.covariance_type
        )
        matrix = self.covariance_type in ("full", "tied")
        eye = torch.eye(dim, dtype=covariances.dtype, device=covariances.device)
        covariances = covariances + self.reg_covar * (eye if matrix else 1.0)
        params = GaussianParams(means + self._center, covariances)
        if matrix:  # a non-finite matrix is reported as such, before its variances
            _check_finite_params(params, counts, self.name)
        magnitude = self._magnitude(stats)
        if self.covariance_type == "tied":
            magnitude = ((counts[:, None] * magnitude).sum(0) / counts.sum())[None]
        elif self.covariance_type == "spherical":
            magnitude = magnitude.amax(-1, keepdim=True)
        variances = covariances.diagonal(0, -2, -1) if matrix else covariances
        self._check_variances(variances.reshape(magnitude.shape), magnitude, counts)
        if matrix:
            self._cholesky(covariances)
        else:
            _check_finite_params(params, counts, self.name)
        return params

    def _magnitude(self, stats: GaussianStats) -> torch.Tensor:
        """Mean square of each component's data in the user's coordinates, ``(K, D)``."""
        counts = stats.counts.clamp(min=torch.finfo(stats.counts.dtype).tiny)
        spread = stats.scatter if stats.scatter.ndim == 2 else stats.scatter.diagonal(0, -2, -1)
        means = weighted_mean(stats.sum_x, stats.counts) + self._center
        return means.square() + spread / counts[:, None]

    def _check_variances(
        self, variances: torch.Tensor, magnitude: torch.Tensor, counts: torch.Tensor
    ) -> None:
        """Raise where a variance ``(K, D)`` is zero up to rounding.

        The data themselves are exact only to ``eps·|x|``, so a standard deviation
        within 64 such units of a component's root mean square ``magnitude`` (its
        data's typical size, ``(K, D)``) is rounding noise (a component on repeated
        points), not a spread.
        """
        # An empty component's variance is 0/0, NaN, and fails the test below.
        floor = (64 * torch.finfo(variances.dtype).eps) ** 2 * magnitude.nan_to_num(nan=0.0)
        bad = ~(variances > floor)
        if bool(bad.any()):
            component, dim = (int(i) for i in torch.nonzero(bad)[0])
            owner = (
                "the shared (tied) covariance"
                if self.covariance_type == "tied"
                else f"component {component} (it holds {float(counts[component]):.3g} points)"
            )
            raise SingularCovarianceError(
                f"variance {dim} of {owner} collapsed to {float(variances[component, dim]):.3g}; "
                "use a prior (prior='default'), fewer components, or more data"
            )

    def log_prior(self, params: GaussianParams) -> torch.Tensor:
        prior: NIWPrior | None = self.resolved
        if prior is None:
            return params.means.new_zeros(())
        return prior.weight * self._log_prior_density(params, prior)

    def _log_prior_density(self, params: GaussianParams, prior: NIWPrior) -> torch.Tensor:
        """The Normal–Inverse-Wishart log density, before its weight."""
        total = params.means.new_zeros(())
        if self.covariance_type in ("full", "tied"):
            total = (
                total + InverseWishart(prior.dof, prior.scale).log_prob(params.covariances).sum()
            )
            if prior.mean_precision > 0:
                cov = params.covariances / prior.mean_precision
                mean_prior = dist.MultivariateNormal(prior.mean, covariance_matrix=cov)
                total = total + mean_prior.log_prob(params.means).sum()
            return total
        if self.covariance_type == "diag":
            rate = 0.5 * torch.diagonal(prior.scale)
        else:
            rate = 0.5 * torch.diagonal(prior.scale).mean()
        variance_prior = dist.InverseGamma(0.5 * prior.dof * torch.ones_like(rate), rate)
        total = total + variance_prior.log_prob(params.covariances).sum()
        if prior.mean_precision > 0:
            std = (self._variances(params) / prior.mean_precision).sqrt()
            total = total + dist.Normal(prior.mean, std).log_prob(params.means).sum()
        return total

    def num_parameters(self, num_components: int) -> int:
        dim = self._require_bound()
        per_cov = {
            "full": num_components * dim * (dim + 1) // 2,
            "diag": num_components * dim,
            "spherical": num_components,
            "tied": dim * (dim + 1) // 2,
        }[self.covariance_type]
        return num_components * dim + per_cov

    def _check_user_params(self, params: GaussianParams, num_components: int) -> None:
        dim = self._require_bound()
        expected = {
            "full": (num_components, dim, dim),
            "diag": (num_components, dim),
            "spherical": (num_components,),
            "tied": (dim, dim),
        }[self.covariance_type]
        if tuple(params.means.shape) != (num_components, dim):
            raise SpecError(
                f"init means must have shape ({num_components}, {dim}); "
                f"got {tuple(params.means.shape)}"
            )
        if tuple(params.covariances.shape) != expected:
            raise SpecError(
                f"init covariances ({self.covariance_type}) must have shape {expected}; "
                f"got {tuple(params.covariances.shape)}"
            )
        if self.covariance_type in ("full", "tied"):
            _check_symmetric(params.covariances, "init covariances")
            self._cholesky(params.covariances)
        elif not bool((params.covariances > 0).all()):
            raise SpecError("init covariances must be positive")

    def component_distribution(self, params: GaussianParams) -> dist.TorchDistribution:
        if self.covariance_type in ("full", "tied"):
            return dist.MultivariateNormal(params.means, covariance_matrix=params.covariances)
        std = params.covariances.sqrt()
        if self.covariance_type == "spherical":
            std = std[..., None].expand_as(params.means)
        return dist.Normal(params.means, std).to_event(1)

    def pyro_params(self, num_components: int, init: GaussianParams) -> GaussianParams:
        self._require_bound()
        prior: NIWPrior | None = self.resolved
        positive = constraints.positive
        if prior is None:
            cov_constraint = (
                constraints.positive_definite
                if self.covariance_type in ("full", "tied")
                else positive
            )
            covariances = pyro.param("covariances", init.covariances, constraint=cov_constraint)
            means = pyro.param("means", init.means)
            return GaussianParams(means, covariances)
        if prior.weight != 1.0:
            # A weighted prior: its log density counts ``weight`` times (see the prior).
            with pyro.poutine.scale(scale=prior.weight):
                return self._prior_sites(num_components, init, prior)
        return self._prior_sites(num_components, init, prior)

    def _prior_sites(
        self, num_components: int, init: GaussianParams, prior: NIWPrior
    ) -> GaussianParams:
        dim = self._require_bound()
        ones = torch.ones((), dtype=prior.scale.dtype, device=prior.scale.device)
        if self.covariance_type == "tied":
            covariances = pyro.sample("covariances", InverseWishart(prior.dof, prior.scale))
        with pyro.plate("components", num_components):
            if self.covariance_type == "full":
                covariances = pyro.sample("covariances", InverseWishart(prior.dof, prior.scale))
            elif self.covariance_type == "diag":
                rate = 0.5 * torch.diagonal(prior.scale)
                covariances = pyro.sample(
                    "covariances", dist.InverseGamma(0.5 * prior.dof * ones, rate).to_event(1)
                )
            elif self.covariance_type == "spherical":
                rate = 0.5 * torch.diagonal(prior.scale).mean()
                covariances = pyro.sample(
                    "covariances", dist.InverseGamma(0.5 * prior.dof * ones, rate)
                )
            if prior.mean_precision == 0:
                means = pyro.param("means", init.means)
            elif self.covariance_type in ("full", "tied"):
                cov = covariances / prior.mean_precision
                means = pyro.sample(
                    "means", dist.MultivariateNormal(prior.mean, covariance_matrix=cov)
                )
            else:
                variances = covariances if self.covariance_type == "diag" else covariances[:, None]
                std = (variances / prior.mean_precision).sqrt().expand(num_components, dim)
                means = pyro.sample("means", dist.Normal(prior.mean, std).to_event(1))
        return GaussianParams(means, covariances)

    def default_truth(
        self, num_components: int, dim: int, generator: torch.Generator
    ) -> GaussianParams:
        dtype = torch.float64
        means = 4.0 * torch.randn(num_components, dim, generator=generator, dtype=dtype)

        def spd(num: int) -> torch.Tensor:
            basis = torch.linalg.qr(torch.randn(num, dim, dim, generator=generator, dtype=dtype))[0]
            scales = 0.5 + torch.rand(num, dim, generator=generator, dtype=dtype)
            return basis @ torch.diag_embed(scales) @ basis.mT

        covariances = {
            "full": lambda: spd(num_components),
            "tied": lambda: spd(1)[0],
            "diag": lambda: 0.5 + torch.rand(num_components, dim, generator=generator, dtype=dtype),
            "spherical": lambda: 0.5 + torch.rand(num_components, generator=generator, dtype=dtype),
        }[self.covariance_type]()
        return GaussianParams(means, covariances)


# ---------------------------------------------------------------------------
# Families with one (K, D) parameter: Poisson, Exponential, Bernoulli
# ---------------------------------------------------------------------------


class RateStats(NamedTuple):
    """counts ``(K,)``; sum_x ``(K, D)`` (``Σ_n w_nk x_n``)."""

    counts: torch.Tensor
    sum_x: torch.Tensor


def _require_integers(data: torch.Tensor, family: str, remedy: str) -> None:
    bad = (data < 0) | (data != data.round())
    if bool(bad.any()):
        row, col = (int(i) for i in torch.nonzero(bad)[0])
        raise DataError(
            f"the {family} family needs non-negative integer counts; row {row} column {col} "
            f"holds {float(data[row, col])!r}; {remedy}"
        )


class MaskedRateStats(NamedTuple):
    """:class:`RateStats` of rows with missing entries, plus ``observed`` ``(K, D)``:
    ``Σ_n w_nk o_nd``, the expected number of observed entries of each coordinate
    (``o_nd = 1`` where ``x_nd`` is observed)."""

    counts: torch.Tensor
    sum_x: torch.Tensor
    observed: torch.Tensor


class _VectorFamily(Family):
    """Shared plumbing for families whose parameter is one ``(K, D)`` tensor."""

    param_name: ClassVar[str]

    def statistics(self, prepared: torch.Tensor, resp: torch.Tensor) -> RateStats:
        return RateStats(resp.sum(0), resp.T @ prepared)

    # The conjugate mode from ``Σ w x``, ``Σ w`` (each ``(K, D)``) and the prior's parameters.
    _mode: Callable[..., torch.Tensor]

    def m_step(self, stats: RateStats) -> Any:
        counts = self._totals(stats).expand_as(stats.sum_x)
        prior = (None, None) if self.resolved is None else self.resolved
        params = self.params_type(self._mode(stats.sum_x, counts, *prior))
        _check_finite_params(params, stats.counts, self.name)
        return params

    @staticmethod
    def _totals(stats: RateStats | MaskedRateStats) -> torch.Tensor:
        """Observations behind each entry of ``sum_x``: ``(K, 1)``, or ``(K, D)``
        per coordinate where entries are missing."""
        if isinstance(stats, MaskedRateStats):
            return stats.observed
        return stats.counts[:, None]

    def prepare_missing(self, x: torch.Tensor, observed: torch.Tensor | None) -> torch.Tensor:
        """``[x with NaN set to 0, o]`` ``(n, 2D)``, ``o`` the 0/1 mask of observed entries."""
        seen = ~torch.isnan(x)
        return torch.cat([x.nan_to_num(nan=0.0), seen.to(x.dtype)], 1)

    @abstractmethod
    def _masked_log_prob(self, params: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(x, o) ↦ Σ_d o_nd log p(x_nd | θ_kd)`` ``(n, K)``: the observed entries'
        log-density (``x`` zero where missing)."""

    def missing_kernels(self, params: Any, observed: torch.Tensor | None) -> EStepKernels:
        """A missing entry drops out of its row's log-density and statistics: the
        M-step divides each coordinate's sum by its own expected count of observations."""
        dim = self._require_bound()
        masked = self._masked_log_prob(params)

        def log_prob(prepared: torch.Tensor) -> tuple[torch.Tensor, None]:
            return masked(prepared[:, :dim], prepared[:, dim:]).T.contiguous(), None

        def statistics(prepared: torch.Tensor, cache: Any, resp: torch.Tensor) -> Any:
            sums = resp @ prepared
            return MaskedRateStats(resp.sum(1), sums[:, :dim], sums[:, dim:])

        return EStepKernels(log_prob, statistics)

    def num_parameters(self, num_components: int) -> int:
        return num_components * self._require_bound()

    def _check_user_params(self, params: Any, num_components: int) -> None:
        dim = self._require_bound()
        value = params[0]
        if tuple(value.shape) != (num_components, dim):
            raise SpecError(
                f"init {self.param_name} must have shape ({num_components}, {dim}); "
                f"got {tuple(value.shape)}"
            )
        self._check_support(value)

    @abstractmethod
    def _check_support(self, value: torch.Tensor) -> None:
        """Raise :class:`SpecError` if user parameters are outside their support."""

    @abstractmethod
    def _prior_distribution(self) -> dist.TorchDistribution:
        """The resolved prior over one component's parameter, event ``(D,)``."""

    def log_prior(self, params: Any) -> torch.Tensor:
        if self.resolved is None:
            return params[0].new_zeros(())
        return self._prior_distribution().log_prob(params[0]).sum()

    def pyro_params(self, num_components: int, init: Any) -> Any:
        if self.resolved is None:
            value = pyro.param(self.param_name, init[0], constraint=self._constraint())
            return self.params_type(value)
        with pyro.plate("components", num_components):
            value = pyro.sample(self.param_name, self._prior_distribution())
        return self.params_type(value)

    def _constraint(self) -> constraints.Constraint:
        return constraints.positive


class PoissonParams(NamedTuple):
    """Rates ``(K, D)``: independent Poisson counts per dimension."""

    rates: torch.Tensor


class ResolvedGamma(NamedTuple):
    concentration: torch.Tensor  # (D,)
    rate: torch.Tensor  # (D,)


def _resolve_gamma(
    prior: Gamma,
    data: torch.Tensor,
    default_concentration: torch.Tensor,
    default_rate: torch.Tensor,
) -> ResolvedGamma:
    dim = data.shape[1]
    concentration = (
        default_concentration
        if prior.concentration is None
        else _per_dim(prior.concentration, data, dim, "Gamma prior concentration")
    )
    rate = (
        default_rate if prior.rate is None else _per_dim(prior.rate, data, dim, "Gamma prior rate")
    )
    if not bool((concentration >= 1).all()):
        raise SpecError(
            "Gamma prior concentration must be >= 1 for MAP-EM (below 1 the density is "
            f"infinite at rate 0 and the log joint has no maximum); got {concentration.tolist()}"
        )
    if not bool((rate > 0).all()):
        raise SpecError(f"Gamma prior rate must be > 0; got {rate.tolist()}")
    return ResolvedGamma(concentration, rate)


class Poisson(_VectorFamily):
    """Independent Poisson counts per dimension; ``fit.params["rates"]`` is ``(K, D)``.

    Prior: :class:`~pyroem.model.priors.Gamma` on each rate. The default puts 0.1
    pseudo-observations at the data mean of each dimension
    (``concentration = 1 + 0.1·mean``, ``rate = 0.1``), so a rate is never exactly 0.
    """

    name = "poisson"
    prior_type = Gamma
    param_name = "rates"

    @property
    def params_type(self) -> type:
        return PoissonParams

    def validate(self, data: torch.Tensor) -> None:
        _require_integers(data, self.name, "pass counts, or use family='gaussian'")

    def _resolve_prior(self, data: torch.Tensor, num_components: int) -> ResolvedGamma:
        mean = data.mean(0)
        return _resolve_gamma(self.prior, data, 1 + 0.1 * mean, torch.full_like(mean, 0.1))

    def _prior_distribution(self) -> dist.TorchDistribution:
        return dist.Gamma(self.resolved.concentration, self.resolved.rate).to_event(1)

    def log_prob_fn(self, params: PoissonParams) -> LogProbFn:
        log_rates = _safe_log(params.rates).T
        total = params.rates.sum(-1)

        def poisson(prepared: torch.Tensor) -> torch.Tensor:
            log_norm = torch.lgamma(prepared + 1).sum(-1, keepdim=True)
            return prepared @ log_rates - total - log_norm

        return poisson

    _mode = staticmethod(gamma_mode)

    def _masked_log_prob(self, params: PoissonParams) -> Any:
        log_rates = _safe_log(params.rates).T

        def poisson(x: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
            log_norm = torch.lgamma(x + 1).sum(-1, keepdim=True)
            return x @ log_rates - seen @ params.rates.T - log_norm

        return poisson

    def _component_means(self, params: PoissonParams) -> torch.Tensor:
        return params.rates

    def _check_support(self, value: torch.Tensor) -> None:
        if not bool((value >= 0).all()):
            raise SpecError("init rates must be non-negative")

    def component_distribution(self, params: PoissonParams) -> dist.TorchDistribution:
        return dist.Poisson(params.rates).to_event(1)

    def default_truth(self, num_components: int, dim: int, generator: torch.Generator) -> Any:
        dtype = torch.float64
        return PoissonParams(
            1 + 19 * torch.rand(num_components, dim, generator=generator, dtype=dtype)
        )


class ExponentialParams(NamedTuple):
    """Rates ``(K, D)`` (inverse means): independent Exponential per dimension."""

    rates: torch.Tensor


class Exponential(_VectorFamily):
    """Independent Exponential waiting times per dimension; ``params["rates"]`` ``(K, D)``.

    Prior: :class:`~pyroem.model.priors.Gamma` on each rate. The default puts 0.1
    pseudo-observations at the data mean (``concentration = 1.1``, ``rate = 0.1·mean``).
    """

    name = "exponential"
    prior_type = Gamma
    param_name = "rates"

    @property
    def params_type(self) -> type:
        return ExponentialParams

    def validate(self, data: torch.Tensor) -> None:
        if bool((data < 0).any()):
            row, col = (int(i) for i in torch.nonzero(data < 0)[0])
            raise DataError(
                f"the exponential family needs non-negative data; row {row} column {col} holds "
                f"{float(data[row, col])!r}; shift the data or use family='gaussian'"
            )
        zero = (data == 0).all(0)
        if bool(zero.any()):
            column = int(torch.nonzero(zero)[0])
            raise DataError(
                f"column {column} of the exponential data is all zero: its rate would be "
                "infinite (a prior does not help: its default scale comes from the data's "
                "mean); drop the column or fit it with another family"
            )

    def _resolve_prior(self, data: torch.Tensor, num_components: int) -> ResolvedGamma:
        mean = data.mean(0).clamp(min=torch.finfo(data.dtype).tiny)
        return _resolve_gamma(self.prior, data, torch.full_like(mean, 1.1), 0.1 * mean)

    def _prior_distribution(self) -> dist.TorchDistribution:
        return dist.Gamma(self.resolved.concentration, self.resolved.rate).to_event(1)

    def log_prob_fn(self, params: ExponentialParams) -> LogProbFn:
        rates_t = params.rates.T
        log_rates = params.rates.log().sum(-1)

        def exponential(prepared: torch.Tensor) -> torch.Tensor:
            return log_rates - prepared @ rates_t

        return exponential

    def _masked_log_prob(self, params: ExponentialParams) -> Any:
        log_rates = params.rates.log().T

        def exponential(x: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
            return seen @ log_rates - x @ params.rates.T

        return exponential

    def _component_means(self, params: ExponentialParams) -> torch.Tensor:
        return params.rates.reciprocal()

    @staticmethod
    def _mode(sum_x: torch.Tensor, counts: torch.Tensor, *prior: Any) -> torch.Tensor:
        return gamma_mode(counts, sum_x, *prior)

    def m_step(self, stats: RateStats) -> ExponentialParams:
        params: ExponentialParams = super().m_step(stats)
        if not bool((params.rates > 0).all()):
            raise PyroEMError(
                "an exponential component lost all its data (rate 0); use prior='default' "
                "or fewer components"
            )
        return params

    def _check_support(self, value: torch.Tensor) -> None:
        if not bool((value > 0).all()):
            raise SpecError("init rates must be positive")

    def component_distribution(self, params: ExponentialParams) -> dist.TorchDistribution:
        return dist.Exponential(params.rates).to_event(1)

    def default_truth(self, num_components: int, dim: int, generator: torch.Generator) -> Any:
        dtype = torch.float64
        log_rates = 3 * torch.rand(num_components, dim, generator=generator, dtype=dtype) - 1.5
        return ExponentialParams(log_rates.exp())


class BernoulliParams(NamedTuple):
    """Probabilities of a 1, ``(K, D)``."""

    probs: torch.Tensor


class ResolvedBeta(NamedTuple):
    concentration1: torch.Tensor  # (D,)
    concentration0: torch.Tensor  # (D,)


class Bernoulli(_VectorFamily):
    """Independent binary features (latent class analysis); ``params["probs"]`` ``(K, D)``.

    Prior: :class:`~pyroem.model.priors.Beta`; the default ``Beta(1.1, 1.1)`` keeps every
    probability strictly inside (0, 1), so no new datum gets probability zero.
    """

    name = "bernoulli"
    prior_type = Beta
    param_name = "probs"

    @property
    def params_type(self) -> type:
        return BernoulliParams

    def validate(self, data: torch.Tensor) -> None:
        bad = (data != 0) & (data != 1)
        if bool(bad.any()):
            row, col = (int(i) for i in torch.nonzero(bad)[0])
            raise DataError(
                f"the bernoulli family needs binary 0/1 data; row {row} column {col} holds "
                f"{float(data[row, col])!r}; binarise the data or use family='categorical'"
            )

    def _resolve_prior(self, data: torch.Tensor, num_components: int) -> ResolvedBeta:
        dim = data.shape[1]
        prior: Beta = self.prior
        ones = _per_dim(prior.concentration1, data, dim, "Beta prior concentration1")
        zeros = _per_dim(prior.concentration0, data, dim, "Beta prior concentration0")
        if not bool((ones >= 1).all() and (zeros >= 1).all()):
            raise SpecError(
                "Beta prior concentrations must be >= 1 for MAP-EM (below 1 the log joint is "
                "unbounded at probability 0 or 1)"
            )
        return ResolvedBeta(ones, zeros)

    def _prior_distribution(self) -> dist.TorchDistribution:
        return dist.Beta(self.resolved.concentration1, self.resolved.concentration0).to_event(1)

    def log_prob_fn(self, params: BernoulliParams) -> LogProbFn:
        log_p = _safe_log(params.probs)
        log_q = _safe_log(1 - params.probs)
        logits_t = (log_p - log_q).T
        base = log_q.sum(-1)

        def bernoulli(prepared: torch.Tensor) -> torch.Tensor:
            return torch.addmm(base, prepared, logits_t)

        return bernoulli

    _mode = staticmethod(beta_mode)

    def _masked_log_prob(self, params: BernoulliParams) -> Any:
        log_p = _safe_log(params.probs)
        log_q = _safe_log(1 - params.probs)
        logits_t = (log_p - log_q).T

        def bernoulli(x: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
            return x @ logits_t + seen @ log_q.T

        return bernoulli

    def _component_means(self, params: BernoulliParams) -> torch.Tensor:
        return params.probs

    def _check_support(self, value: torch.Tensor) -> None:
        if not bool(((value >= 0) & (value <= 1)).all()):
            raise SpecError("init probs must lie in [0, 1]")

    def _constraint(self) -> constraints.Constraint:
        return constraints.unit_interval

    def component_distribution(self, params: BernoulliParams) -> dist.TorchDistribution:
        return dist.Bernoulli(probs=params.probs).to_event(1)

    def default_truth(self, num_components: int, dim: int, generator: torch.Generator) -> Any:
        dtype = torch.float64
        probs = 0.05 + 0.9 * (
            torch.rand(num_components, dim, generator=generator, dtype=dtype) > 0.5
        )
        return BernoulliParams(probs.to(dtype))


# ---------------------------------------------------------------------------
# Categorical
# ---------------------------------------------------------------------------


class CategoricalParams(NamedTuple):
    """Probabilities ``(K, D, C)`` of each of ``C`` categories for each of ``D`` features."""

    probs: torch.Tensor


class CategoricalStats(NamedTuple):
    """counts ``(K,)``; sum_onehot ``(K, D·C)`` (expected category counts)."""

    counts: torch.Tensor
    sum_onehot: torch.Tensor


class MaskedCategoricalStats(NamedTuple):
    """:class:`CategoricalStats` of rows with missing entries: each feature's expected
    number of observations is the sum of its category counts."""

    counts: torch.Tensor
    sum_onehot: torch.Tensor


class Categorical(Family):
    """``D`` independent categorical features with codes ``0 … C-1``; ``params["probs"]``
    is ``(K, D, C)``.

    ``num_categories`` defaults to ``max(data) + 1``. Prior:
    :class:`~pyroem.model.priors.Dirichlet` on each feature's probabilities; the default
    ``Dirichlet(1.1)`` keeps every probability positive.
    """

    name = "categorical"
    prior_type = Dirichlet

    def __init__(self, num_categories: int | None = None, prior: Any = "default") -> None:
        if num_categories is not None and (
            not isinstance(num_categories, int) or num_categories < 2
        ):
            raise SpecError(f"num_categories must be an integer >= 2; got {num_categories!r}")
        super().__init__(prior)
        self.num_categories = num_categories

    def __repr__(self) -> str:
        return f"Categorical(num_categories={self.num_categories!r}, prior={self.prior_repr()})"

    def to_config(self) -> dict[str, Any]:
        return {**super().to_config(), "num_categories": self.num_categories}

    @property
    def params_type(self) -> type:
        return CategoricalParams

    def validate(self, data: torch.Tensor) -> None:
        _require_integers(data, self.name, "code categories as integers 0, 1, ..., C-1")
        if self.num_categories is not None and bool((data >= self.num_categories).any()):
            row, col = (int(i) for i in torch.nonzero(data >= self.num_categories)[0])
            raise DataError(
                f"row {row} column {col} holds category {int(data[row, col])} but "
                f"num_categories={self.num_categories}; raise num_categories or recode the data"
            )

    def _bind_data(self, data: torch.Tensor) -> None:
        if self.num_categories is None:
            self.num_categories = max(int(data.max()) + 1, 2)

    def _resolve_prior(self, data: torch.Tensor, num_components: int) -> torch.Tensor:
        prior: Dirichlet = self.prior
        num_categories = self._categories()
        concentration = _as_tensor(prior.concentration, data, "Dirichlet prior concentration")
        if concentration.ndim > 1 or (
            concentration.ndim == 1 and concentration.shape[0] != num_categories
        ):
            raise SpecError(
                f"Dirichlet prior concentration must be a scalar or have shape "
                f"({num_categories},); got {tuple(concentration.shape)}"
            )
        if not bool((concentration >= 1).all()):
            raise SpecError(
                "Dirichlet prior concentration must be >= 1 for MAP-EM (below 1 the log joint "
                "is unbounded at probability 0)"
            )
        return concentration.expand(num_categories).clone()

    def _explicit_prior(self) -> Dirichlet:
        return Dirichlet(self.resolved.tolist())

    def _categories(self) -> int:
        if self.num_categories is None:
            raise SpecError("num_categories is unknown; bind the family to data first")
        return self.num_categories

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        onehot = torch.nn.functional.one_hot(x.long(), self._categories())
        return onehot.reshape(x.shape[0], -1).to(x.dtype)

    def log_prob_fn(self, params: CategoricalParams) -> LogProbFn:
        log_probs_t = _safe_log(params.probs).reshape(params.probs.shape[0], -1).T

        def categorical(prepared: torch.Tensor) -> torch.Tensor:
            return prepared @ log_probs_t

        return categorical

    def statistics(self, prepared: torch.Tensor, resp: torch.Tensor) -> CategoricalStats:
        return CategoricalStats(resp.sum(0), resp.T @ prepared)

    def prepare_missing(self, x: torch.Tensor, observed: torch.Tensor | None) -> torch.Tensor:
        """The one-hot codes of :meth:`prepare`, all zero for a missing entry."""
        seen = ~torch.isnan(x)
        onehot = torch.nn.functional.one_hot(x.nan_to_num(nan=0.0).long(), self._categories())
        onehot = onehot * seen[:, :, None]
        return onehot.reshape(x.shape[0], -1).to(x.dtype)

    def missing_kernels(self, params: CategoricalParams, observed: torch.Tensor | None) -> Any:
        """A missing entry's one-hot code is zero, so it drops out of the log-density and
        of the category counts; the M-step normalises each feature by its own counts."""
        log_probs = _safe_log(params.probs).reshape(params.probs.shape[0], -1)

        def log_prob(prepared: torch.Tensor) -> tuple[torch.Tensor, None]:
            return (log_probs @ prepared.T).contiguous(), None

        def statistics(prepared: torch.Tensor, cache: Any, resp: torch.Tensor) -> Any:
            return MaskedCategoricalStats(resp.sum(1), resp @ prepared)

        return EStepKernels(log_prob, statistics)

    def impute(self, params: CategoricalParams, data: torch.Tensor, resp: torch.Tensor) -> Any:
        """``data`` with each missing code replaced by its most probable category given
        the row's observed entries (argmax over ``c`` of ``Σ_k r_nk p_kdc``)."""
        predictive = torch.einsum("nk,kdc->ndc", resp, params.probs)
        return torch.where(torch.isnan(data), predictive.argmax(-1).to(data.dtype), data)

    def m_step(self, stats: CategoricalStats) -> CategoricalParams:
        dim = self._require_bound()
        counts = stats.sum_onehot.view(-1, dim, self._categories())
        params = CategoricalParams(dirichlet_mode(counts, self.resolved))
        _check_finite_params(params, stats.counts, self.name)
        return params

    def log_prior(self, params: CategoricalParams) -> torch.Tensor:
        if self.resolved is None:
            return params.probs.new_zeros(())
        return dist.Dirichlet(self.resolved).log_prob(params.probs).sum()

    def num_parameters(self, num_components: int) -> int:
        return num_components * self._require_bound() * (self._categories() - 1)

    def _check_user_params(self, params: CategoricalParams, num_components: int) -> None:
        shape = (num_components, self._require_bound(), self._categories())
        if tuple(params.probs.shape) != shape:
            raise SpecError(f"init probs must have shape {shape}; got {tuple(params.probs.shape)}")
        sums = params.probs.sum(-1)
        if not bool((params.probs >= 0).all()) or not torch.allclose(sums, torch.ones_like(sums)):
            raise SpecError("init probs must be non-negative and sum to 1 over categories")
        params.probs.div_(sums[..., None])  # exactly normalised, as Pyro's Categorical is

    def component_distribution(self, params: CategoricalParams) -> dist.TorchDistribution:
        return dist.Categorical(probs=params.probs).to_event(1)

    def pyro_params(self, num_components: int, init: CategoricalParams) -> CategoricalParams:
        dim = self._require_bound()
        if self.resolved is None:
            probs = pyro.param("probs", init.probs, constraint=constraints.simplex)
            return CategoricalParams(probs)
        with pyro.plate("components", num_components):
            prior = dist.Dirichlet(self.resolved).expand([dim]).to_event(1)
            probs = pyro.sample("probs", prior)
        return CategoricalParams(probs)

    def default_truth(self, num_components: int, dim: int, generator: torch.Generator) -> Any:
        dtype = torch.float64
        shape = (num_components, dim, self.num_categories or 3)
        gamma = -torch.rand(shape, generator=generator, dtype=dtype).log()
        scores = gamma**3
        return CategoricalParams(scores / scores.sum(-1, keepdim=True))


FAMILIES: dict[str, type[Family]] = {
    cls.name: cls for cls in (Gaussian, Poisson, Bernoulli, Categorical, Exponential)
}


def make_family(
    family: str | Family,
    *,
    covariance_type: str | None = None,
    num_categories: int | None = None,
    prior: Any = "default",
) -> Family:
    """A family object from a name (``"gaussian"``, ``"poisson"``, …).

    Args:
        family: a family name (case-insensitive) or a :class:`Family` instance.
        covariance_type: gaussian only (default ``"full"``).
        num_categories: categorical only (default: inferred from the data).
        prior: ``"default"``, ``None`` (flat) or a prior object.
    """
    if isinstance(family, Family):
        if covariance_type is not None or num_categories is not None or prior != "default":
            raise SpecError(
                "covariance_type, num_categories and prior go on the family object when one "
                f"is given; got {family!r}"
            )
        return family
    if not isinstance(family, str) or family.lower() not in FAMILIES:
        raise SpecError(f"unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    cls = FAMILIES[family.lower()]
    if cls is Gaussian:
        return Gaussian(covariance_type or "full", prior=prior)
    if covariance_type is not None:
        raise SpecError(f"covariance_type applies to the gaussian family only, not {family!r}")
    if cls is Categorical:
        return Categorical(num_categories, prior=prior)
    if num_categories is not None:
        raise SpecError(f"num_categories applies to the categorical family only, not {family!r}")
    return cls(prior=prior)


def family_from_config(config: dict[str, Any]) -> Family:
    """Inverse of :meth:`Family.to_config`."""
    fields = dict(config)
    cls = FAMILIES[fields.pop("family")]
    prior = prior_from_config(fields.pop("prior"))
    return cls(prior=prior, **fields)
