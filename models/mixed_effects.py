"""A linear mixed-effects model as a Pyro program, fitted by MCMC-EM with pyroem.

Run it from the repository root (with pyroem installed)::

    python models/mixed_effects.py

The data are lme4's ``sleepstudy``: the mean reaction time of 18 subjects on each of
days 0-9 of sleep deprivation. The model is lme4's
``Reaction ~ Days + (Days | Subject)`` — a random intercept and slope per subject:

    b_g ~ MultivariateNormal(0, Σ_b)                       (random effects of subject g)
    y_gj ~ Normal(β_0 + β_1 d_gj + b_g0 + b_g1 d_gj, σ²)   (reaction on day d_gj)

with θ = (β, Σ_b, σ²) as ``pyro.param`` sites — maximum likelihood, as
``lme4::lmer(..., REML = FALSE)`` and ``statsmodels``' ``MixedLM.fit(reml=False)``
compute it. The random effects ``b`` are the latent variables: MCMC-EM draws them by
NUTS given the current θ (they sit in a plate of subjects, which holds no
observation, so the fit names them with ``latents=["random_effects"]``), and the
M-step updates Σ_b and σ² in closed form from the draws and β by L-BFGS on the
Monte Carlo Q.

The program measures days from their mean (4.5): with days 0-9 the posterior of a
subject's intercept and slope is strongly correlated, which NUTS with a diagonal mass
matrix crosses slowly; centred, they are nearly independent. The fit is the same
maximum-likelihood fit in other coordinates, and :func:`to_original_scale` maps it
back: β_0 = α_0 − 4.5 α_1, and Σ_b = A Σ_u Aᵀ with A = [[1, −4.5], [0, 1]].

The script prints the estimates on the original scale, the time taken, the marginal
log-likelihood estimated by importance sampling next to its exact value (computed
here by hand: y_g ~ Normal(X_g β, Z_g Σ_b Z_gᵀ + σ² I) for each subject), and checks
that the objective pyroem reports for the last iteration is the average log joint of
its draws, recomputed here by hand from ``fit.draws``.
"""

from __future__ import annotations

import time
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

import pyroem
from pyroem.datasets import load_sleepstudy


def sleepstudy() -> dict[str, Any]:
    """The data as tensors: ``reaction`` and ``days`` ``(180,)``, ``subject`` codes
    ``(180,)``, ``num_subjects``, the subjects' ``names`` and the ``centre`` of days."""
    data = load_sleepstudy()
    days = data.data[:, 1]
    assert data.target is not None and data.target_names is not None
    return {
        "reaction": data.data[:, 0],
        "days": days,
        "subject": data.target,
        "num_subjects": len(data.target_names),
        "names": data.target_names,
        "centre": float(days.mean()),
    }


def starting_values(
    reaction: torch.Tensor, days: torch.Tensor, subject: torch.Tensor, num_subjects: int
) -> dict[str, torch.Tensor]:
    """θ from one least-squares line per subject (``days`` as the model sees them).

    β is the mean of the subjects' intercepts and slopes, Σ_b their covariance, σ² the
    mean variance of the residuals about each subject's line.
    """
    design = torch.stack([torch.ones_like(days), days], dim=-1)
    lines, residuals = [], []
    for g in range(num_subjects):
        rows = subject == g
        solution = torch.linalg.lstsq(design[rows], reaction[rows].unsqueeze(-1)).solution
        lines.append(solution.squeeze(-1))
        residuals.append(reaction[rows] - design[rows] @ solution.squeeze(-1))
    coefficients = torch.stack(lines)
    residual = torch.cat(residuals)
    return {
        "fixed_effects": coefficients.mean(0),
        "random_effects_covariance": torch.cov(coefficients.T),
        "residual_variance": residual.square().sum() / (len(residual) - 2 * num_subjects),
    }


def mixed_effects_model(
    reaction: torch.Tensor,
    days: torch.Tensor,
    subject: torch.Tensor,
    num_subjects: int,
    init: dict[str, torch.Tensor],
) -> None:
    """Random intercept and slope per subject, as a Pyro program.

    Written to broadcast over a leading dimension of the random effects (``b[...,
    subject, :]``), so MCMC-EM can evaluate all its draws at once.

    Args:
        reaction: reaction times ``(N,)``.
        days: days of deprivation ``(N,)`` (centred by the caller).
        subject: subject code of each row ``(N,)``.
        num_subjects: number of subjects ``G``.
        init: starting values of the three parameters.
    """
    fixed = pyro.param("fixed_effects", init["fixed_effects"])
    covariance = pyro.param(
        "random_effects_covariance",
        init["random_effects_covariance"],
        constraint=constraints.positive_definite,
    )
    variance = pyro.param(
        "residual_variance", init["residual_variance"], constraint=constraints.positive
    )
    with pyro.plate("subjects", num_subjects):
        effects = pyro.sample(
            "random_effects",
            dist.MultivariateNormal(torch.zeros(2, dtype=days.dtype), covariance_matrix=covariance),
        )
    with pyro.plate("observations", len(reaction)):
        own = effects[..., subject, :]
        mean = fixed[0] + own[..., 0] + (fixed[1] + own[..., 1]) * days
        pyro.sample("reaction", dist.Normal(mean, variance.sqrt()), obs=reaction)


def to_original_scale(params: dict[str, torch.Tensor], centre: float) -> dict[str, torch.Tensor]:
    """Estimates for days measured from day 0 instead of from ``centre``."""
    shift = torch.tensor([[1.0, -centre], [0.0, 1.0]], dtype=torch.float64)
    fixed = params["fixed_effects"]
    return {
        "fixed_effects": torch.stack([fixed[0] - centre * fixed[1], fixed[1]]),
        "random_effects_covariance": shift @ params["random_effects_covariance"] @ shift.T,
        "residual_variance": params["residual_variance"],
    }


def marginal_log_likelihood(params: dict[str, torch.Tensor], data: dict[str, Any]) -> float:
    """``log p(y | θ)``, random effects integrated out exactly (original scale θ)."""
    total = 0.0
    for g in range(data["num_subjects"]):
        rows = data["subject"] == g
        design = torch.stack([torch.ones(int(rows.sum())), data["days"][rows]], dim=-1)
        covariance = design @ params["random_effects_covariance"] @ design.T
        covariance = covariance + params["residual_variance"] * torch.eye(len(design))
        law = dist.MultivariateNormal(design @ params["fixed_effects"], covariance)
        total += float(law.log_prob(data["reaction"][rows]))
    return total


def average_log_joint(
    params: dict[str, torch.Tensor], effects: torch.Tensor, data: dict[str, Any]
) -> float:
    """``(1/S) Σ_s log p(y, b_s; θ)`` over draws ``b_s`` ``(S, G, 2)`` (centred days)."""
    prior = dist.MultivariateNormal(
        torch.zeros(2), covariance_matrix=params["random_effects_covariance"]
    )
    days = data["days"] - data["centre"]
    own = effects[:, data["subject"], :]
    mean = (
        params["fixed_effects"][0] + own[..., 0] + (params["fixed_effects"][1] + own[..., 1]) * days
    )
    noise = dist.Normal(mean, params["residual_variance"].sqrt())
    per_draw = prior.log_prob(effects).sum(-1) + noise.log_prob(data["reaction"]).sum(-1)
    return float(per_draw.mean())


def fit(data: dict[str, Any], seed: int = 0, **options: Any) -> Any:
    """Fit the model to ``data`` by MCMC-EM (SAEM unless ``options`` say otherwise)."""
    days = data["days"] - data["centre"]
    init = starting_values(data["reaction"], days, data["subject"], data["num_subjects"])
    settings = {"schedule": "saem", "num_samples": 40, "jit_compile": True, **options}
    return pyroem.fit(
        mixed_effects_model,
        data["reaction"],
        days,
        data["subject"],
        data["num_subjects"],
        init,
        method="mcmc-em",
        latents=["random_effects"],
        seed=seed,
        **settings,
    )


def main() -> dict[str, Any]:
    """Fit sleepstudy, print the estimates and the checks, return them."""
    torch.set_default_dtype(torch.float64)
    # Tensors this small run fastest on one thread (several only contend).
    torch.set_num_threads(1)
    data = sleepstudy()
    start = time.perf_counter()
    result = fit(data)
    seconds = time.perf_counter() - start
    estimates = to_original_scale(result.params, data["centre"])
    exact = marginal_log_likelihood(estimates, data)
    effects = result.draws["random_effects"].flatten(0, 1)
    by_hand = average_log_joint(result.params, effects, data)
    fixed, covariance = estimates["fixed_effects"], estimates["random_effects_covariance"]
    sd = covariance.diagonal().sqrt()
    print(
        f"MCMC-EM ({result.schedule}) on sleepstudy: {result.num_iterations} iterations, "
        f"converged={result.converged}, {seconds:.1f} s"
    )
    print(f"  fixed effects       intercept {float(fixed[0]):8.3f}   slope {float(fixed[1]):7.3f}")
    print(
        f"  random effects sd   intercept {float(sd[0]):8.3f}   slope {float(sd[1]):7.3f}   "
        f"correlation {float(covariance[0, 1] / (sd[0] * sd[1])):6.3f}"
    )
    print(f"  residual sd         {float(estimates['residual_variance'].sqrt()):8.3f}")
    print(
        f"  log-likelihood      {result.log_likelihood():.3f} ± {result.log_likelihood_se:.3f} "
        f"(importance sampling); exact at these estimates {exact:.3f}"
    )
    worst = result.final_diagnostics
    print(
        f"  last E-step         R-hat {worst.max_rhat:.3f}, bulk ESS {worst.min_ess_bulk:.0f}, "
        f"divergences {worst.num_divergences}"
    )
    print(
        "Interpretation: reaction time starts near "
        f"{float(fixed[0]):.0f} ms and grows by about {float(fixed[1]):.1f} ms per day of "
        f"sleep deprivation; subjects differ by about {float(sd[0]):.0f} ms in their "
        f"starting point and {float(sd[1]):.1f} ms/day in their slope."
    )
    return {
        "estimates": estimates,
        "seconds": seconds,
        "fit": result,
        "exact_log_likelihood": exact,
        "checks": {
            "average log joint of the last draws": {
                "hand_written": by_hand,
                "pyroem": float(result.history.objective[-1]),
            }
        },
    }


if __name__ == "__main__":
    main()
