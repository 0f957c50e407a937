"""Mixture densities written independently of pyroem, with ``torch.distributions``.

The references that ``test_monotone`` and ``test_mstep_optimum`` hold pyroem's
objective and M-steps against: the log prior of the component parameters as the
documentation declares it, and the component log-likelihood table.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributions as td
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import pyroem

DTYPE = torch.float64


def weak_gaussian_prior(
    covariance_type: str, data: torch.Tensor, num_components: int
) -> dict[str, Any]:
    """``NormalInverseWishart.weak()`` (``prior="default"``) resolved as documented.

    r: each column's median gap between distinct sorted values; the covariance prior
    (``dof = D + 2``) is weighted to be worth 0.1 observations of variance r², and the
    means' prior at the data mean worth ``0.01·min_d (r_d / range_d)²`` observations.
    """
    dim = data.shape[1]
    values = data.numpy()
    gaps = [np.diff(np.unique(column)) for column in values.T]
    resolution = np.array([np.median(gap[gap > 0]) for gap in gaps])
    spread = values.max(0) - values.min(0)
    dof = dim + 2.0
    # ν plus the powers of |Σ| of the Inverse-Wishart and the means' prior.
    pseudo = {
        "full": dof + dim + 2,
        "diag": dof + 3,
        "spherical": (dof + 2 + dim) / dim,
        "tied": dof + dim + 1 + num_components,
    }[covariance_type]
    weight = 0.1 / pseudo
    return {
        "mean": data.mean(0),
        "kappa": 0.01 * float(np.min((resolution / spread) ** 2)) / weight,
        "dof": dof,
        "scale": torch.diag(torch.as_tensor(resolution**2, dtype=data.dtype)) * 0.1 / weight,
        "weight": weight,
    }


def log_prior(
    family: str, covariance_type: str | None, prior: dict[str, Any], params: dict[str, Any]
) -> torch.Tensor:
    """``log p(θ)`` of the components as the documentation declares it, from torch densities."""
    if family == "gaussian" and prior.get("weight", 1.0) != 1.0:
        # A weighted prior: its log density counts ``weight`` times.
        unweighted = {**prior, "weight": 1.0}
        return prior["weight"] * log_prior(family, covariance_type, unweighted, params)
    if family == "gaussian":
        means, covariances = params["means"], params["covariances"]
        kappa, dof, scale = prior["kappa"], prior["dof"], prior["scale"]
        if covariance_type in ("full", "tied"):
            total = pyroem.InverseWishart(dof, scale).log_prob(covariances).sum()
            if kappa > 0:
                mean_prior = td.MultivariateNormal(prior["mean"], covariances / kappa)
                total = total + mean_prior.log_prob(means).sum()
            return total
        if covariance_type == "diag":
            variances, rate = covariances, torch.diagonal(scale) / 2
        else:
            variances = covariances[:, None].expand_as(means)
            rate = torch.diagonal(scale).mean() / 2
        total = td.InverseGamma(torch.tensor(dof / 2, dtype=DTYPE), rate).log_prob(covariances)
        total = total.sum()
        if kappa > 0:
            total = (
                total + td.Normal(prior["mean"], (variances / kappa).sqrt()).log_prob(means).sum()
            )
        return total
    if family in ("poisson", "exponential"):
        concentration = torch.as_tensor(prior["concentration"], dtype=DTYPE)
        rate = torch.as_tensor(prior["rate"], dtype=DTYPE)
        return td.Gamma(concentration, rate).log_prob(params["rates"]).sum()
    if family == "bernoulli":
        ones = torch.as_tensor(prior["concentration1"], dtype=DTYPE)
        zeros = torch.as_tensor(prior["concentration0"], dtype=DTYPE)
        return td.Beta(ones, zeros).log_prob(params["probs"]).sum()
    return td.Dirichlet(prior["concentration"]).log_prob(params["probs"]).sum()


def component_log_prob(
    family: str, covariance_type: str | None, data: torch.Tensor, params: dict[str, Any]
) -> torch.Tensor:
    """``log p(x_n | θ_k)``, ``(num_data, K)``, from torch densities."""
    points = data[:, None, :]
    if family == "gaussian":
        means, covariances = params["means"], params["covariances"]
        if covariance_type in ("full", "tied"):
            return td.MultivariateNormal(means, covariances).log_prob(points)
        variances = covariances if covariance_type == "diag" else covariances[:, None]
        return td.Normal(means, variances.sqrt()).log_prob(points).sum(-1)
    if family == "poisson":
        return td.Poisson(params["rates"]).log_prob(points).sum(-1)
    if family == "exponential":
        return td.Exponential(params["rates"]).log_prob(points).sum(-1)
    if family == "bernoulli":
        return td.Bernoulli(probs=params["probs"]).log_prob(points).sum(-1)
    return td.Categorical(probs=params["probs"]).log_prob(points.long()).sum(-1)


def gaussian_mixture_pointwise(data: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """``log p(x_n | θ)`` of a full-covariance Gaussian mixture by SciPy, ``(num_data,)``."""
    terms = np.stack(
        [
            np.log(w) + multivariate_normal(m, c).logpdf(data)
            for w, m, c in zip(
                params["weights"].numpy(),
                params["means"].numpy(),
                params["covariances"].numpy(),
                strict=True,
            )
        ],
        axis=1,
    )
    return logsumexp(terms, axis=1)
