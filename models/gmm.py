"""Gaussian mixtures on bundled real data: Old Faithful and Fisher's iris.

Run it from the repository root (with pyroem installed)::

    python models/gmm.py

It shows, for the Old Faithful geyser:

1. the declarative spec, ``pyroem.Mixture(2, "gaussian", covariance_type="full",
   prior="mclust")``;
2. the same model written out by hand as a plain Pyro program
   (:func:`gaussian_mixture_model`), which you can copy and edit;
3. the MAP-EM fit, and a check that the hand-written program's log joint
   ``log p(x, θ)`` (computed by Pyro's ``TraceEnum_ELBO`` with the assignments
   summed out, at the fitted parameters) equals ``fit.log_joint()``.

Then it chooses a model for iris by BIC over 1-5 components and the four
covariance structures, and compares the chosen clusters with the species.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

import pyroem
from pyroem.datasets import load_faithful, load_iris

COVARIANCE_TYPES = ("full", "diag", "spherical", "tied")


def mclust_prior(data: torch.Tensor, num_components: int) -> dict[str, Any]:
    """The data-scaled Normal-Inverse-Wishart prior ``prior="mclust"`` stands for.

    Fraley & Raftery (2007): prior mean at the data mean with ``mean_precision = 0.01``
    pseudo-observations, ``dof = dim + 2`` and ``scale`` the data covariance divided by
    ``num_components ** (2 / dim)``.
    """
    dim = data.shape[1]
    return {
        "prior_mean": data.mean(0),
        "mean_precision": 0.01,
        "dof": dim + 2.0,
        "scale": torch.cov(data.T) / num_components ** (2.0 / dim),
    }


def gaussian_mixture_model(
    data: torch.Tensor,
    num_components: int,
    prior_mean: torch.Tensor,
    mean_precision: float,
    dof: float,
    scale: torch.Tensor,
) -> torch.Tensor:
    """A mixture of full-covariance Gaussians with conjugate priors, as a Pyro program.

    π ~ Dirichlet(1), Σ_k ~ InverseWishart(dof, scale), μ_k | Σ_k ~ Normal(prior_mean,
    Σ_k / mean_precision), z_n ~ Categorical(π), x_n ~ Normal(μ_{z_n}, Σ_{z_n}).

    Args:
        data: observations, ``(num_data, dim)``.
        num_components: ``K``.
        prior_mean: ``(dim,)``.
        mean_precision: pseudo-observations behind ``prior_mean``.
        dof: Inverse-Wishart degrees of freedom (``> dim - 1``).
        scale: Inverse-Wishart scale matrix, ``(dim, dim)``.

    Returns:
        The assignments ``z``, ``(num_data,)``.
    """
    concentration = torch.ones(num_components, dtype=data.dtype)
    weights = pyro.sample("weights", dist.Dirichlet(concentration))
    with pyro.plate("components", num_components):
        # Pyro has no Inverse-Wishart; pyroem provides one.
        covariances = pyro.sample("covariances", pyroem.InverseWishart(dof, scale))
        means = pyro.sample(
            "means",
            dist.MultivariateNormal(prior_mean, covariance_matrix=covariances / mean_precision),
        )
    with pyro.plate("data", data.shape[0]):
        # Marked for parallel enumeration: TraceEnum_ELBO (and NUTS) sum z out exactly.
        assignment = pyro.sample(
            "assignment", dist.Categorical(weights), infer={"enumerate": "parallel"}
        )
        pyro.sample(
            "obs",
            dist.MultivariateNormal(means[assignment], covariance_matrix=covariances[assignment]),
            obs=data,
        )
    return assignment


def log_joint(
    model: Callable[..., Any], params: dict[str, torch.Tensor], *args: Any, **kwargs: Any
) -> float:
    """``log p(x, θ)`` of a Pyro program at ``params``, discrete latents summed out.

    The parameter sites are conditioned on ``params``, so with an empty guide the
    ELBO is the log joint itself.
    """
    conditioned = poutine.condition(model, data=params)
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    return -elbo.loss(conditioned, lambda *_, **__: None, *args, **kwargs)


def relative_difference(value: float, reference: float) -> float:
    """``|value − reference| / |reference|``."""
    return abs(value - reference) / abs(reference)


def fit_faithful() -> dict[str, float]:
    """Fit two full-covariance Gaussians to Old Faithful and check the Pyro program."""
    faithful = load_faithful()
    data = faithful.data
    spec = pyroem.Mixture(2, "gaussian", covariance_type="full", prior="mclust")
    print("Declarative spec:", spec)
    fit = pyroem.fit(spec, data, n_init=5, seed=0)
    print(fit.summary())

    hand_written = log_joint(gaussian_mixture_model, fit.params, data, 2, **mclust_prior(data, 2))
    print(
        f"\nHand-written Pyro program, log joint at the fitted parameters: {hand_written:.10f}\n"
        f"pyroem fit.log_joint():                                     {fit.log_joint():.10f}\n"
        f"relative difference: {relative_difference(hand_written, fit.log_joint()):.2e}"
    )

    params = fit.params
    order = torch.argsort(params["means"][:, 0])
    short, long = (int(k) for k in order)
    duration, waiting = params["means"][:, 0], params["means"][:, 1]
    correlation = (
        params["covariances"][:, 0, 1]
        / (params["covariances"][:, 0, 0] * params["covariances"][:, 1, 1]).sqrt()
    )
    print("\nInterpretation:")
    for k, kind in ((short, "short"), (long, "long")):
        print(
            f"  {100 * float(params['weights'][k]):.0f}% of eruptions are {kind}: about "
            f"{float(duration[k]):.1f} min, then about {float(waiting[k]):.0f} min to the next."
        )
    overall = torch.corrcoef(data.T)[0, 1]
    print(
        "  Within each kind, duration and waiting time correlate at "
        f"r = {float(correlation[short]):.2f} and {float(correlation[long]):.2f}, far less than "
        f"across all eruptions (r = {float(overall):.2f}): most of that correlation is the "
        "difference between the two kinds."
    )
    return {"hand_written": hand_written, "pyroem": fit.log_joint()}


def select_iris() -> tuple[str, int, pyroem.FitResult]:
    """BIC over 1-5 components and the four covariance types; print the table."""
    iris = load_iris()
    fits: dict[tuple[str, int], pyroem.FitResult] = {}
    for covariance_type in COVARIANCE_TYPES:
        for num_components in range(1, 6):
            spec = pyroem.Mixture(num_components, "gaussian", covariance_type=covariance_type)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
                fits[covariance_type, num_components] = pyroem.fit(
                    spec, iris.data, n_init=3, seed=0
                )
    print("\nIris: BIC (lower is better)")
    print("  K " + "".join(f"{name:>11}" for name in COVARIANCE_TYPES))
    for num_components in range(1, 6):
        cells = "".join(f"{fits[kind, num_components].bic():11.1f}" for kind in COVARIANCE_TYPES)
        print(f"  {num_components} {cells}")
    best = min(fits, key=lambda key: fits[key].bic())
    best_fit = fits[best]
    print(f"Best by BIC: {best[1]} components, covariance_type={best[0]!r}")

    names = iris.target_names or ()
    labels = best_fit.labels
    print("  cluster  " + "".join(f"{name:>12}" for name in names))
    for k in range(best_fit.num_components):
        counts = [int(((labels == k) & (iris.target == s)).sum()) for s in range(len(names))]
        print(f"  {k:>7}  " + "".join(f"{c:12d}" for c in counts))
    groups = []
    for k in range(best_fit.num_components):
        present = [s for s in range(len(names)) if bool(((labels == k) & (iris.target == s)).any())]
        groups.append(" + ".join(names[s] for s in present) or "no flowers")
    print(f"  Clusters: {'; '.join(groups)}.")
    if any("+" in group for group in groups):
        print(
            "  Species whose measurements overlap share a cluster: the data do not give BIC\n"
            "  enough evidence to split them without the labels."
        )
    return best[0], best[1], best_fit


def main() -> dict[str, Any]:
    """Run both examples; return the log-joint check and the iris choice."""
    check = fit_faithful()
    covariance_type, num_components, _ = select_iris()
    return {
        "checks": {"faithful": check},
        "iris": {"covariance_type": covariance_type, "num_components": num_components},
    }


if __name__ == "__main__":
    main()
