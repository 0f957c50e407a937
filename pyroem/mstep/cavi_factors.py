r"""Conjugate variational factors ``q(θ_k)`` of the declarative mixture families.

Given responsibilities ``r_nk`` (the factor ``q(z)``), the optimal ``q(θ)`` of
mean-field VB is the conjugate posterior under fractional counts,

.. math:: q^*(θ) ∝ p(θ) \prod_{n,k} p(x_n | θ_k)^{r_{nk}},

and its normaliser is the "weighted marginal likelihood"
:math:`\log Z(r) = \log \int p(θ) \prod_{n,k} p(x_n | θ_k)^{r_{nk}} dθ`. With
``q(θ) = q^*(θ)`` the θ-part of the ELBO, :math:`E_q[\log p(x | z, θ)] + E_q[\log p(θ)]
- E_q[\log q(θ)]`, equals :math:`\log Z(r)` exactly. Each class here gives, for one
family: the update ``statistics -> posterior``, ``log Z``, the expected log-density
:math:`E_q[\log p(x_n | θ_k)]` used by the E-step (together with the log-density at
the posterior mean of ``θ``), the posterior means, draws, and the parameters in
user form. Pure torch, no Pyro effects.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from pyroem.errors import SpecError
from pyroem.model.distributions import InverseWishart
from pyroem.model.families import (
    Bernoulli,
    BernoulliParams,
    Categorical,
    CategoricalParams,
    CategoricalStats,
    Exponential,
    ExponentialParams,
    Family,
    Gaussian,
    GaussianParams,
    GaussianStats,
    Poisson,
    PoissonParams,
    RateStats,
)
from pyroem.mstep import conjugate

__all__ = [
    "BetaPosterior",
    "ConjugateFactor",
    "DirichletPosterior",
    "ExpectedLogDensity",
    "GammaPosterior",
    "conjugate_factor",
    "log_multivariate_beta",
]

# (prepared chunk) -> (E_q log p(x_n | θ_k), log p(x_n | E_q θ_k)), each (n, K), both
# without the per-datum constant ``ConjugateFactor.data_constant`` accounts for.
ExpectedLogDensity = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def log_multivariate_beta(concentration: torch.Tensor) -> torch.Tensor:
    """``log B(α) = Σ_c log Γ(α_c) − log Γ(Σ_c α_c)`` over the last axis."""
    return torch.lgamma(concentration).sum(-1) - torch.lgamma(concentration.sum(-1))


def _bound_dim(family: Family) -> int:
    """The data dimension of a bound family."""
    if family.dim is None:
        raise SpecError(f"{family!r} is not bound to data; call family.bind(data, K) first")
    return family.dim


def _log_det(chol: torch.Tensor) -> torch.Tensor:
    """``log |A|`` from the Cholesky factor of ``A``, ``(...)``."""
    return 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)


class ConjugateFactor(ABC):
    """The conjugate factor ``q(θ)`` of one bound family (see the module docstring)."""

    def __init__(self, family: Family) -> None:
        self.family = family

    @abstractmethod
    def update(self, stats: Any) -> Any:
        """The optimal ``q(θ)`` given expected sufficient statistics (the family's)."""

    @abstractmethod
    def log_normaliser(self, posterior: Any, stats: Any) -> torch.Tensor:
        r""":math:`\log Z(r)`, without :attr:`data_constant`, for ``posterior = update(stats)``."""

    @abstractmethod
    def expected_log_density(
        self, posterior: Any, expected_log_weights: torch.Tensor, log_mean_weights: torch.Tensor
    ) -> ExpectedLogDensity:
        """Closure giving ``E_q[log π_k] + E_q log p(x_n | θ_k)`` and
        ``log E_q[π_k] + log p(x_n | E_q θ_k)`` for a prepared chunk, each ``(n, K)``.

        Args:
            posterior: ``q(θ)``.
            expected_log_weights: ``E_q[log π]`` ``(K,)``.
            log_mean_weights: ``log E_q[π]`` ``(K,)``.
        """

    def statistics(self, prepared: torch.Tensor, resp: torch.Tensor) -> Any:
        """The family's expected sufficient statistics of a prepared chunk."""
        return self.family.statistics(prepared, resp)

    @abstractmethod
    def expected_params(self, posterior: Any) -> Any:
        """``E_q[θ]`` as the family's parameter NamedTuple."""

    @abstractmethod
    def sample(self, posterior: Any, num_draws: int) -> dict[str, torch.Tensor]:
        """Draws from ``q(θ)`` in user form, each ``(num_draws, *shape)`` (global RNG)."""

    @abstractmethod
    def to_user(self, posterior: Any) -> dict[str, torch.Tensor]:
        """The parameters of ``q(θ)``, named like the fields of the prior object."""

    def data_constant(
        self, prepared: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``Σ_n w_n log h(x_n)`` of a chunk (``w_n = 1`` without ``weights`` ``(n,)``):
        the base measure the kernels leave out."""
        return prepared.new_zeros(())


# ---------------------------------------------------------------------------
# Gaussian: Normal–Inverse-Wishart (full, tied) or Normal–Inverse-Gamma (diag, spherical)
# ---------------------------------------------------------------------------


def _add_to_diagonal(scatter: torch.Tensor, amount: torch.Tensor, kind: str) -> torch.Tensor:
    """``scatter`` (``(K, D, D)``, or its diagonals ``(K, D)``) with ``amount`` ``(K,)``
    added to each component's diagonal."""
    if scatter.ndim == 3:
        eye = torch.eye(scatter.shape[-1], dtype=scatter.dtype, device=scatter.device)
        return scatter + amount[:, None, None] * eye
    return scatter + amount[:, None]


class _GaussianFactor(ConjugateFactor):
    """Normal–Inverse-Wishart posterior of every covariance type."""

    family: Gaussian

    def __init__(self, family: Gaussian) -> None:
        super().__init__(family)
        prior = family.resolved
        dim = _bound_dim(family)
        self.kind = family.covariance_type
        self.dim = dim
        if family.shift is None:
            raise SpecError(f"{family!r} is not bound to data; call family.bind(data, K) first")
        self.shift = family.shift
        self.kappa0 = float(prior.mean_precision)
        self.nu0 = float(prior.dof)
        self.reg_covar = family.reg_covar
        if self.kappa0 <= 0:
            raise SpecError(
                "vb-em needs a proper prior: the NormalInverseWishart prior has "
                "mean_precision=0 (a flat prior on the means, which has no posterior "
                "distribution); use prior='default' or a positive mean_precision"
            )
        # Σ-dimension of the Inverse-Wishart: D for full/tied, 1 for each diag/spherical
        # variance. q(Σ_k) is proper and E_q[Λ], E_q[log |Λ|] are finite for ν > p − 1,
        # which the family's ν0 > D − 1 ensures; E_q[Σ] = Ψ/(ν − p − 1) needs ν > p + 1.
        self.matrix = self.kind in ("full", "tied")
        self.iw_dim = conjugate.niw_dim(self.kind, dim)
        # The reported covariances: E_q[Σ] = Ψ/(ν − p − 1) when the prior makes it finite
        # for every component (ν0 > p + 1), else E_q[Λ]⁻¹ = Ψ/ν (scikit-learn's
        # covariances_), which every proper q has.
        self.covariance_dof_offset = self.iw_dim + 1 if self.nu0 > self.iw_dim + 1 else 0
        self.prior = conjugate.NIWPrior(prior.mean - self.shift, self.kappa0, self.nu0, prior.scale)
        scale0 = conjugate.niw_prior_scale(prior.scale, self.kind)
        self.log_det_scale0 = (
            _log_det(torch.linalg.cholesky(scale0)) if self.matrix else scale0.log()
        )

    def update(self, stats: GaussianStats) -> conjugate.NIWPosterior:
        scatter = stats.scatter
        if self.reg_covar:
            # As scikit-learn's BayesianGaussianMixture: reg_covar on the diagonal of each
            # component's covariance estimate, i.e. N_k·reg_covar on its scatter's diagonal.
            scatter = _add_to_diagonal(scatter, self.reg_covar * stats.counts, self.kind)
        return conjugate.niw_posterior(self.prior, stats.counts, stats.sum_x, scatter, self.kind)

    def _log_det_scale(self, posterior: conjugate.NIWPosterior) -> torch.Tensor:
        """``log |Ψ|`` per Inverse-Wishart factor: full ``(K,)``, tied ``()``, diag
        ``(K, D)``, spherical ``(K,)``."""
        if self.matrix:
            return _log_det(torch.linalg.cholesky(posterior.scale))
        return posterior.scale.log()

    def log_normaliser(
        self, posterior: conjugate.NIWPosterior, stats: GaussianStats
    ) -> torch.Tensor:
        # log Z = −N D/2 log π + D/2 Σ_k log(κ0/κ_k) + Σ_factors [ν0/2 log|Ψ0| − ν/2 log|Ψ|
        #         + log Γ_p(ν/2) − log Γ_p(ν0/2)]   (p = Inverse-Wishart dimension)
        dim, p = self.dim, self.iw_dim
        counts = stats.counts
        total = -0.5 * dim * math.log(math.pi) * counts.sum()
        total = total + 0.5 * dim * (math.log(self.kappa0) - posterior.mean_precision.log()).sum()
        dof = self._per_variance(posterior.dof)
        per_factor = (
            0.5 * self.nu0 * self.log_det_scale0
            - 0.5 * dof * self._log_det_scale(posterior)
            + torch.mvlgamma(0.5 * dof, p=p)
            - torch.mvlgamma(torch.as_tensor(0.5 * self.nu0, dtype=counts.dtype), p=p)
        )
        return total + per_factor.sum()

    def _per_variance(self, dof: torch.Tensor) -> torch.Tensor:
        """``dof`` broadcastable against the scale: ``(K, 1)`` for diag, else as is."""
        return dof[:, None] if self.kind == "diag" else dof

    def expected_log_density(
        self,
        posterior: conjugate.NIWPosterior,
        expected_log_weights: torch.Tensor,
        log_mean_weights: torch.Tensor,
    ) -> ExpectedLogDensity:
        # With W = Ψ/ν (so W⁻¹ = E_q[Λ]) and L = log N(x | m, W), the expected log-density is
        #   E_q log N(x | μ, Σ) = L + ½(E_q log|Λ| + log|W|) − D/(2κ)
        # and the density at the reported covariance c W (c = ν/(ν − p − 1) for E_q[Σ],
        # 1 for E_q[Λ]⁻¹) is an affine map of L:
        #   log N(x | m, cW) = L/c + (1 − 1/c)·(−D/2 log 2π − ½ log|W|) − D/2 log c.
        dim, p = self.dim, self.iw_dim
        dof, kappa = posterior.dof, posterior.mean_precision
        covariance = conjugate.niw_divide(posterior.scale, dof, self.kind)
        kernel = self.family.log_prob_fn(GaussianParams(posterior.mean + self.shift, covariance))
        # E log|Λ| + log|W| per Inverse-Wishart factor (log|W| = log|Ψ| − p log ν).
        per_factor = conjugate.wishart_expected_log_det(dof, p) - p * dof.log()
        extra = 0.5 * (dim // p) * per_factor - 0.5 * dim / kappa + expected_log_weights
        log_det_scale = self._log_det_scale(posterior)
        if self.kind == "diag":
            log_det_scale = log_det_scale.sum(-1)
        elif self.kind == "spherical":
            log_det_scale = dim * log_det_scale
        log_det_w = log_det_scale - dim * dof.log()
        ratio = dof / (dof - self.covariance_dof_offset)
        constant = -0.5 * dim * math.log(2 * math.pi) - 0.5 * log_det_w
        inverse = ratio.reciprocal().expand_as(kappa)
        offset = (1 - inverse) * constant - 0.5 * dim * ratio.log() + log_mean_weights

        def gaussian(prepared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            log_w = kernel(prepared)
            return log_w + extra, torch.addcmul(offset, log_w, inverse)

        return gaussian

    def expected_params(self, posterior: conjugate.NIWPosterior) -> GaussianParams:
        dof = posterior.dof - self.covariance_dof_offset
        expected = conjugate.niw_divide(posterior.scale, dof, self.kind)
        return GaussianParams(posterior.mean + self.shift, expected)

    def sample(self, posterior: conjugate.NIWPosterior, num_draws: int) -> dict[str, torch.Tensor]:
        mean, kappa, dof, scale = posterior
        if self.matrix:
            covariances = InverseWishart(dof, scale).rsample((num_draws,))
            chol = torch.linalg.cholesky(covariances)
            if self.kind == "tied":
                chol = chol[:, None]
            noise = torch.randn((num_draws, *mean.shape), dtype=mean.dtype, device=mean.device)
            offsets = (chol @ noise[..., None])[..., 0] / kappa.sqrt()[:, None]
            return {"means": mean + self.shift + offsets, "covariances": covariances}
        precision = torch.distributions.Gamma(0.5 * self._per_variance(dof), 0.5 * scale)
        covariances = precision.sample((num_draws,)).reciprocal()
        variances = covariances if self.kind == "diag" else covariances[..., None]
        noise = torch.randn((num_draws, *mean.shape), dtype=mean.dtype, device=mean.device)
        offsets = noise * (variances / kappa[:, None]).sqrt()
        return {"means": mean + self.shift + offsets, "covariances": covariances}

    def to_user(self, posterior: conjugate.NIWPosterior) -> dict[str, torch.Tensor]:
        return {
            "mean": posterior.mean + self.shift,
            "mean_precision": posterior.mean_precision,
            "dof": posterior.dof,
            "scale": posterior.scale,
        }


# ---------------------------------------------------------------------------
# Families with one (K, D) parameter: Gamma–Poisson, Gamma–Exponential, Beta–Bernoulli
# ---------------------------------------------------------------------------


class GammaPosterior(NamedTuple):
    """``q(λ_kd) = Gamma(concentration_kd, rate_kd)``, each ``(K, D)``."""

    concentration: torch.Tensor
    rate: torch.Tensor


class BetaPosterior(NamedTuple):
    """``q(p_kd) = Beta(concentration1_kd, concentration0_kd)``, each ``(K, D)``."""

    concentration1: torch.Tensor
    concentration0: torch.Tensor


class DirichletPosterior(NamedTuple):
    """``q(p_kd·) = Dirichlet(concentration_kd·)``, ``(K, D, C)``."""

    concentration: torch.Tensor


def _linear_kernel(
    expected: torch.Tensor,
    expected_base: torch.Tensor,
    plug_in: torch.Tensor,
    plug_in_base: torch.Tensor,
) -> ExpectedLogDensity:
    """Both log-densities as ``prepared @ W + b``.

    Args:
        expected: ``(K, F)`` weights of ``E_q log p``; ``expected_base`` ``(K,)``
            (``E_q[log π]`` included).
        plug_in: ``(K, F)`` weights of ``log p`` at ``E_q θ``; ``plug_in_base`` ``(K,)``
            (``log E_q[π]`` included).
    """
    expected_t = expected.T.contiguous()
    plug_in_t = plug_in.T.contiguous()

    def linear(prepared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.addmm(expected_base, prepared, expected_t),
            torch.addmm(plug_in_base, prepared, plug_in_t),
        )

    return linear


def _log_gamma_normaliser(
    concentration0: torch.Tensor,
    rate0: torch.Tensor,
    concentration: torch.Tensor,
    rate: torch.Tensor,
) -> torch.Tensor:
    """``Σ [a0 log b0 − log Γ(a0) − a log b + log Γ(a)]`` (prior over posterior normaliser)."""
    prior = concentration0 * rate0.log() - torch.lgamma(concentration0)
    post = concentration * rate.log() - torch.lgamma(concentration)
    return (prior - post).sum()


class _GammaFactor(ConjugateFactor):
    """Gamma posterior of Poisson or Exponential rates."""

    def __init__(self, family: Poisson | Exponential) -> None:
        super().__init__(family)
        self.poisson = isinstance(family, Poisson)
        self.concentration0 = family.resolved.concentration
        self.rate0 = family.resolved.rate

    def update(self, stats: RateStats) -> GammaPosterior:
        counts = stats.counts[:, None]
        shape, rate = (stats.sum_x, counts) if self.poisson else (counts, stats.sum_x)
        return GammaPosterior(
            *conjugate.gamma_posterior(shape, rate, self.concentration0, self.rate0)
        )

    def log_normaliser(self, posterior: GammaPosterior, stats: RateStats) -> torch.Tensor:
        return _log_gamma_normaliser(
            self.concentration0, self.rate0, posterior.concentration, posterior.rate
        )

    def expected_log_density(
        self,
        posterior: GammaPosterior,
        expected_log_weights: torch.Tensor,
        log_mean_weights: torch.Tensor,
    ) -> ExpectedLogDensity:
        concentration, rate = posterior
        mean = concentration / rate
        expected_log = conjugate.gamma_expected_log(concentration, rate)
        if self.poisson:
            # x log λ − λ (the −log x! is the data constant)
            total = -mean.sum(-1)
            return _linear_kernel(
                expected_log,
                total + expected_log_weights,
                mean.log(),
                total + log_mean_weights,
            )
        # log λ − λ x
        return _linear_kernel(
            -mean,
            expected_log.sum(-1) + expected_log_weights,
            -mean,
            mean.log().sum(-1) + log_mean_weights,
        )

    def expected_params(self, posterior: GammaPosterior) -> Any:
        rates = posterior.concentration / posterior.rate
        return PoissonParams(rates) if self.poisson else ExponentialParams(rates)

    def sample(self, posterior: GammaPosterior, num_draws: int) -> dict[str, torch.Tensor]:
        gamma = torch.distributions.Gamma(posterior.concentration, posterior.rate)
        return {"rates": gamma.sample((num_draws,))}

    def to_user(self, posterior: GammaPosterior) -> dict[str, torch.Tensor]:
        return dict(posterior._asdict())

    def data_constant(
        self, prepared: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.poisson:
            return prepared.new_zeros(())
        rows = -torch.lgamma(prepared + 1).reshape(prepared.shape[0], -1).sum(-1)
        return rows.sum() if weights is None else torch.dot(rows, weights)


class _BetaFactor(ConjugateFactor):
    """Beta posterior of Bernoulli probabilities."""

    def __init__(self, family: Bernoulli) -> None:
        super().__init__(family)
        self.concentration1 = family.resolved.concentration1
        self.concentration0 = family.resolved.concentration0

    def update(self, stats: RateStats) -> BetaPosterior:
        trials = stats.counts[:, None]
        return BetaPosterior(
            *conjugate.beta_posterior(stats.sum_x, trials, self.concentration1, self.concentration0)
        )

    def log_normaliser(self, posterior: BetaPosterior, stats: RateStats) -> torch.Tensor:
        prior = torch.stack(torch.broadcast_tensors(self.concentration1, self.concentration0), -1)
        post = torch.stack(list(posterior), -1)
        return (log_multivariate_beta(post) - log_multivariate_beta(prior)).sum()

    def expected_log_density(
        self,
        posterior: BetaPosterior,
        expected_log_weights: torch.Tensor,
        log_mean_weights: torch.Tensor,
    ) -> ExpectedLogDensity:
        ones, zeros = posterior
        log_p, log_q = conjugate.dirichlet_expected_log(torch.stack([ones, zeros], -1)).unbind(-1)
        mean = ones / (ones + zeros)
        plug_p, plug_q = mean.log(), torch.log1p(-mean)
        return _linear_kernel(
            log_p - log_q,
            log_q.sum(-1) + expected_log_weights,
            plug_p - plug_q,
            plug_q.sum(-1) + log_mean_weights,
        )

    def expected_params(self, posterior: BetaPosterior) -> BernoulliParams:
        ones, zeros = posterior
        return BernoulliParams(ones / (ones + zeros))

    def sample(self, posterior: BetaPosterior, num_draws: int) -> dict[str, torch.Tensor]:
        beta = torch.distributions.Beta(*posterior)
        return {"probs": beta.sample((num_draws,))}

    def to_user(self, posterior: BetaPosterior) -> dict[str, torch.Tensor]:
        return dict(posterior._asdict())


class _DirichletFactor(ConjugateFactor):
    """Dirichlet posterior of categorical probabilities."""

    def __init__(self, family: Categorical) -> None:
        super().__init__(family)
        self.dim = _bound_dim(family)
        self.concentration0 = family.resolved  # (C,)

    def update(self, stats: CategoricalStats) -> DirichletPosterior:
        counts = stats.sum_onehot.view(stats.counts.shape[0], self.dim, -1)
        return DirichletPosterior(self.concentration0 + counts)

    def log_normaliser(
        self, posterior: DirichletPosterior, stats: CategoricalStats
    ) -> torch.Tensor:
        prior = log_multivariate_beta(self.concentration0)
        return (log_multivariate_beta(posterior.concentration) - prior).sum()

    def expected_log_density(
        self,
        posterior: DirichletPosterior,
        expected_log_weights: torch.Tensor,
        log_mean_weights: torch.Tensor,
    ) -> ExpectedLogDensity:
        concentration = posterior.concentration
        num_components = concentration.shape[0]
        totals = concentration.sum(-1, keepdim=True)
        expected_log = conjugate.dirichlet_expected_log(concentration)
        plug_in = (concentration / totals).log()
        return _linear_kernel(
            expected_log.reshape(num_components, -1),
            expected_log_weights,
            plug_in.reshape(num_components, -1),
            log_mean_weights,
        )

    def expected_params(self, posterior: DirichletPosterior) -> CategoricalParams:
        concentration = posterior.concentration
        return CategoricalParams(concentration / concentration.sum(-1, keepdim=True))

    def sample(self, posterior: DirichletPosterior, num_draws: int) -> dict[str, torch.Tensor]:
        dirichlet = torch.distributions.Dirichlet(posterior.concentration)
        return {"probs": dirichlet.sample((num_draws,))}

    def to_user(self, posterior: DirichletPosterior) -> dict[str, torch.Tensor]:
        return {"concentration": posterior.concentration}


def conjugate_factor(family: Family) -> ConjugateFactor:
    """The conjugate factor of a bound family with a proper prior.

    Raises:
        SpecError: the family has a flat prior (``prior=None``), which has no posterior.
    """
    if family.resolved is None:
        raise SpecError(
            f"vb-em needs a proper prior, but the {family.name} family has prior=None (flat), "
            "which has no posterior distribution; use prior='default' or an explicit prior "
            "object"
        )
    if isinstance(family, Gaussian):
        return _GaussianFactor(family)
    if isinstance(family, Poisson | Exponential):
        return _GammaFactor(family)
    if isinstance(family, Bernoulli):
        return _BetaFactor(family)
    if isinstance(family, Categorical):
        return _DirichletFactor(family)
    raise SpecError(f"vb-em has no conjugate update for the {family.name} family")
