r"""EM invariants on Pyro programs: monotone log joint, exact closed forms, one optimum.

Three properties of MAP-EM on any Pyro program:

1. every example program in ``models/`` fitted by ``pyroem.fit`` has a log joint
   :math:`\log p(x, θ_t)` that never decreases from one iteration to the next;
2. every closed-form M-step pyroem recognises is the exact maximiser of
   :math:`Q(θ; θ_t)` over its site, the other sites held fixed. The reference is an
   independent numerical maximiser (scipy's L-BFGS-B on the site's unconstrained
   value: ``torch.distributions.biject_to`` of its support, the Cholesky factor for a
   covariance matrix) of the same Q (``expected_log_joint`` at the E-step's weights),
   started from the current value. Every closed-form kind is covered, with a conjugate
   prior and as a ``pyro.param`` site (flat prior), and ``recognise`` must report the
   expected kind for every site, so a closed form that silently falls back to the
   gradient M-step fails; sites with no conjugate form must be reported as
   ``"gradient"``;
3. ``m_step="gradient"`` and ``m_step="auto"`` reach the same optimum.

Regression tests pin down defects found while building the engine: probes that
aliased (a scalar unit-interval site, ``1 − θ[i]``, ``θ[0] + θ[1]``), a
non-contiguous start, and covariance sites under the gradient M-step.
"""

from __future__ import annotations

import runpy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.poutine.runtime import InferDict
from scipy.optimize import minimize
from torch.distributions import biject_to, constraints, transform_to

import pyroem
from pyroem.datasets import load_discoveries, load_faithful, load_verbagg
from pyroem.engines.program_map import initial_values
from pyroem.estep.program import expected_log_joint, posterior
from pyroem.model.program import ProgramModel
from pyroem.mstep.recognised import closed_form_update, recognise

MODELS = Path(__file__).resolve().parents[2] / "models"


def _script(name: str) -> dict[str, Any]:
    """The globals of ``models/<name>``, without running its ``__main__`` block."""
    return runpy.run_path(str(MODELS / name), run_name="example")


GMM = _script("gmm.py")
POISSON = _script("poisson_mixture.py")
BERNOULLI = _script("bernoulli_mixture.py")
HMM = _script("hmm.py")
ROBUST = _script("robust_mixture.py")

PARALLEL: InferDict = {"enumerate": "parallel"}


@pytest.fixture(autouse=True)
def _float64() -> None:
    torch.set_default_dtype(torch.float64)


class Program(NamedTuple):
    """A Pyro program with its arguments."""

    model: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


# ----- 1. the example programs: monotone log joint ------------------------------------


def _faithful(num_data: int) -> torch.Tensor:
    return load_faithful().data[:num_data]


def _hmm_sequences() -> tuple[torch.Tensor, torch.Tensor]:
    truth = {
        "init_probs": torch.tensor([0.6, 0.4]),
        "transition_probs": torch.tensor([[0.9, 0.1], [0.2, 0.8]]),
        "locs": torch.tensor([[-1.0], [1.5]]),
        "variances": torch.tensor([[0.4], [0.6]]),
    }
    lengths = torch.tensor([20, 12, 16])
    sequences, _ = HMM["simulate_gaussian_hmm"](lengths, **truth, seed=0)
    return sequences, lengths


def _discovery_sequence(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    counts = load_discoveries().data[:length, 0]
    return counts.unsqueeze(0), torch.tensor([length])


def _example(name: str) -> Program:
    """A small instance of every Pyro program in ``models/``."""
    if name == "gmm":
        data = _faithful(40)
        return Program(GMM["gaussian_mixture_model"], (data, 2), GMM["mclust_prior"](data, 2))
    if name == "poisson-mixture":
        data = load_discoveries().data
        return Program(POISSON["poisson_mixture_model"], (data, 2), POISSON["default_prior"](data))
    if name == "latent-class":
        data = load_verbagg().data[:60]
        return Program(BERNOULLI["latent_class_model"], (data, 2), BERNOULLI["default_prior"](data))
    if name.startswith("gaussian-hmm"):
        priors = name.rsplit("-", 1)[1]
        return Program(HMM["gaussian_hmm"], (*_hmm_sequences(), 2), {"priors": priors})
    if name.startswith("poisson-hmm"):
        priors = name.rsplit("-", 1)[1]
        return Program(HMM["poisson_hmm"], (*_discovery_sequence(25), 2), {"priors": priors})
    model = name.removesuffix("-mixture")
    data = ROBUST["contaminate"](_faithful(40), 3)
    return Program(ROBUST["PROGRAMS"][model], (data, 2), ROBUST["default_prior"](data, 2))


EXAMPLES = [
    "gmm",
    "poisson-mixture",
    "latent-class",
    "gaussian-hmm-flat",
    "gaussian-hmm-conjugate",
    "poisson-hmm-flat",
    "poisson-hmm-conjugate",
    "student-t-mixture",
    "normal-mixture",
]


@pytest.mark.parametrize("name", EXAMPLES)
def test_log_joint_never_decreases(name: str) -> None:
    """MAP-EM (closed forms and accepted gradient steps) never lowers ``log p(x, θ)``.

    Each entry of the history is a fresh float64 sum of hundreds of log densities and a
    contraction over the latents, so two evaluations at (nearly) the same θ can differ
    by rounding: ~1e-13 relative. ``1e-9 · |objective|`` allows for that and is still
    orders of magnitude below any real decrease.
    """
    example = _example(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(
            example.model,
            *example.args,
            method="map-em",
            model_kwargs=example.kwargs,
            seed=0,
            tol=1e-12,
            max_iter=25,
        )
    objective = np.asarray(fit.history.objective)
    assert len(objective) == fit.num_iterations + 1
    assert np.all(np.isfinite(objective))
    assert np.all(np.diff(objective) >= -1e-9 * np.abs(objective[1:]))
    assert objective[-1] > objective[0]


# ----- 2. closed forms are the exact maximisers of Q ----------------------------------


def _parameter(
    name: str,
    flat: bool,
    prior: dist.TorchDistribution,
    init: torch.Tensor,
    constraint: constraints.Constraint = constraints.real,
) -> torch.Tensor:
    """A sample site under ``prior``, or with ``flat`` a ``pyro.param`` starting at ``init``."""
    if flat:
        return pyro.param(name, init, constraint=constraint)
    return pyro.sample(name, prior)


def categorical_mixture(data: torch.Tensor, flat: bool) -> None:
    """Categorical observations, Dirichlet weights and Dirichlet rows of category probabilities."""
    num_components, num_categories = 3, 4
    weights = _parameter(
        "weights",
        flat,
        dist.Dirichlet(torch.tensor([2.0, 3.0, 1.5])),
        torch.tensor([0.5, 0.3, 0.2]),
        constraints.simplex,
    )
    with pyro.plate("components", num_components):
        ramp = torch.arange(1.0, num_categories * num_components + 1).reshape(num_components, -1)
        probs = _parameter(
            "probs",
            flat,
            dist.Dirichlet(torch.full((num_components, num_categories), 1.5)),
            ramp.sqrt() / ramp.sqrt().sum(-1, keepdim=True),
            constraints.simplex,
        )
    with pyro.plate("data", data.shape[0]):
        assignment = pyro.sample("assignment", dist.Categorical(weights), infer=PARALLEL)
        pyro.sample("obs", dist.Categorical(probs[assignment]), obs=data)


class CountData(NamedTuple):
    """Observations for :func:`count_mixture`, one row per data point."""

    binary: torch.Tensor  # (N, 3) in {0, 1}
    successes: torch.Tensor  # (N,) out of trials
    trials: torch.Tensor  # (N,)
    counts: torch.Tensor  # (N,) over exposure
    exposure: torch.Tensor  # (N,)
    durations: torch.Tensor  # (N,) with rate factor
    rate_factor: torch.Tensor  # (N,)


def count_mixture(data: CountData, flat: bool) -> None:
    """Each data point has a Bernoulli vector, a Binomial count, a Poisson count with an
    exposure (rate = exposure · rate) and an Exponential duration (rate = factor · rate),
    all depending on one shared component."""
    num_components = 2
    weights = _parameter(
        "weights",
        flat,
        dist.Dirichlet(torch.tensor([1.5, 2.5])),
        torch.tensor([0.4, 0.6]),
        constraints.simplex,
    )
    with pyro.plate("components", num_components):
        bernoulli_probs = _parameter(
            "bernoulli_probs",
            flat,
            dist.Beta(torch.tensor([2.0, 1.5, 3.0]), torch.tensor([2.5, 1.2, 2.0])).to_event(1),
            torch.tensor([[0.3, 0.4, 0.5], [0.6, 0.7, 0.5]]),
            constraints.unit_interval,
        )
        binomial_probs = _parameter(
            "binomial_probs",
            flat,
            dist.Beta(torch.tensor(1.5), torch.tensor(2.0)),
            torch.tensor([0.3, 0.6]),
            constraints.unit_interval,
        )
        poisson_rates = _parameter(
            "poisson_rates",
            flat,
            dist.Gamma(torch.tensor(2.0), torch.tensor(0.5)),
            torch.tensor([1.0, 4.0]),
            constraints.positive,
        )
        exponential_rates = _parameter(
            "exponential_rates",
            flat,
            dist.Gamma(torch.tensor(3.0), torch.tensor(1.0)),
            torch.tensor([0.5, 2.0]),
            constraints.positive,
        )
    with pyro.plate("data", data.counts.shape[0]):
        z = pyro.sample("assignment", dist.Categorical(weights), infer=PARALLEL)
        pyro.sample("binary", dist.Bernoulli(bernoulli_probs[z]).to_event(1), obs=data.binary)
        pyro.sample("successes", dist.Binomial(data.trials, binomial_probs[z]), obs=data.successes)
        pyro.sample("counts", dist.Poisson(data.exposure * poisson_rates[z]), obs=data.counts)
        pyro.sample(
            "durations",
            dist.Exponential(data.rate_factor * exponential_rates[z]),
            obs=data.durations,
        )


class NormalData(NamedTuple):
    """Observations for :func:`normal_mixture`."""

    first: torch.Tensor  # (N,): loc = locs[z] + offset, variance = factor · variances[z]
    offset: torch.Tensor
    variance_factor: torch.Tensor
    second: torch.Tensor  # (N,): loc = locs[z], precision = factor · precisions[z]
    precision_factor: torch.Tensor


def normal_mixture(data: NormalData, flat: bool) -> None:
    """Two observed Normal sites share the component means: one through a shift, with a
    scaled variance parameter; the other with a scaled precision parameter."""
    num_components = 2
    weights = _parameter(
        "weights",
        flat,
        dist.Dirichlet(torch.tensor([2.0, 2.0])),
        torch.tensor([0.5, 0.5]),
        constraints.simplex,
    )
    with pyro.plate("components", num_components):
        locs = _parameter(
            "locs", flat, dist.Normal(torch.tensor([0.0, 1.0]), 3.0), torch.tensor([-1.0, 2.0])
        )
        variances = _parameter(
            "variances",
            flat,
            dist.InverseGamma(torch.tensor(2.0), torch.tensor(1.0)),
            torch.tensor([1.0, 0.5]),
            constraints.positive,
        )
        precisions = _parameter(
            "precisions",
            flat,
            dist.Gamma(torch.tensor(3.0), torch.tensor(2.0)),
            torch.tensor([1.0, 2.0]),
            constraints.positive,
        )
    with pyro.plate("data", data.first.shape[0]):
        z = pyro.sample("assignment", dist.Categorical(weights), infer=PARALLEL)
        pyro.sample(
            "first",
            dist.Normal(locs[z] + data.offset, (data.variance_factor * variances[z]).sqrt()),
            obs=data.first,
        )
        pyro.sample(
            "second",
            dist.Normal(locs[z], (data.precision_factor * precisions[z]).rsqrt()),
            obs=data.second,
        )


def normal_inverse_gamma_mixture(data: torch.Tensor) -> None:
    """Normal-Inverse-Gamma priors: each variance also scales its mean's prior, so the
    variance's closed form includes the mean's prior as a second use."""
    num_components, mean_precision = 2, 0.5
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(num_components)))
    with pyro.plate("components", num_components):
        variances = pyro.sample("variances", dist.InverseGamma(torch.tensor(2.5), 1.5))
        locs = pyro.sample("locs", dist.Normal(0.0, (variances / mean_precision).sqrt()))
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("assignment", dist.Categorical(weights), infer=PARALLEL)
        pyro.sample("obs", dist.Normal(locs[z], variances[z].sqrt()), obs=data)


class VectorData(NamedTuple):
    """Observations for :func:`mvn_mixture`: ``x_n ~ MVN(means[z] + shift_n, c_n · Σ[z])``."""

    values: torch.Tensor  # (N, 2)
    shift: torch.Tensor  # (N, 2)
    covariance_factor: torch.Tensor  # (N,)


def mvn_mixture(data: VectorData, priors: str) -> None:
    """Full-covariance Gaussians with shifted means and scaled covariances.

    ``priors``: ``"mvn"`` (MultivariateNormal prior on the means, Inverse-Wishart on the
    covariances), ``"diagonal"`` (independent Normal prior on each mean coordinate) or
    ``"flat"`` (``pyro.param`` sites).
    """
    num_components, dim = 2, 2
    flat = priors == "flat"
    weights = _parameter(
        "weights",
        flat,
        dist.Dirichlet(torch.tensor([2.0, 2.0])),
        torch.tensor([0.5, 0.5]),
        constraints.simplex,
    )
    prior_mean = torch.tensor([0.5, -0.5])
    mean_prior: dist.TorchDistribution
    if priors == "diagonal":
        mean_prior = dist.Normal(prior_mean, torch.tensor([2.0, 3.0])).to_event(1)
    else:
        mean_prior = dist.MultivariateNormal(
            prior_mean, covariance_matrix=torch.tensor([[4.0, 1.0], [1.0, 2.0]])
        )
    with pyro.plate("components", num_components):
        means = _parameter(
            "means", flat, mean_prior, torch.tensor([[-1.0, 0.0], [1.0, 1.0]]), constraints.real
        )
        covariances = _parameter(
            "covariances",
            flat,
            pyroem.InverseWishart(torch.tensor(dim + 2.0), torch.tensor([[1.0, 0.2], [0.2, 0.5]])),
            torch.eye(dim).expand(num_components, dim, dim).clone(),
            constraints.positive_definite,
        )
    with pyro.plate("data", data.values.shape[0]):
        z = pyro.sample("assignment", dist.Categorical(weights), infer=PARALLEL)
        covariance = data.covariance_factor[:, None, None] * covariances[z]
        pyro.sample(
            "obs",
            dist.MultivariateNormal(means[z] + data.shift, covariance_matrix=covariance),
            obs=data.values,
        )


def _normal_data(num_data: int) -> NormalData:
    generator = torch.Generator().manual_seed(1)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(num_data, generator=generator)

    group = torch.rand(num_data, generator=generator) < 0.4
    centre = torch.where(group, -1.5, 2.0)
    noise = torch.randn(2, num_data, generator=generator)
    offset, variance_factor, precision_factor = uniform(-1, 1), uniform(0.5, 2), uniform(0.5, 2)
    return NormalData(
        first=centre + offset + 0.8 * variance_factor.sqrt() * noise[0],
        offset=offset,
        variance_factor=variance_factor,
        second=centre + 0.6 * noise[1] / precision_factor.sqrt(),
        precision_factor=precision_factor,
    )


def _count_data(num_data: int) -> CountData:
    generator = torch.Generator().manual_seed(2)
    group = torch.rand(num_data, generator=generator) < 0.5
    probs = torch.where(
        group[:, None], torch.tensor([0.2, 0.5, 0.7]), torch.tensor([0.8, 0.4, 0.3])
    )
    trials = torch.randint(1, 8, (num_data,), generator=generator).double()
    exposure = 0.5 + 2 * torch.rand(num_data, generator=generator)
    rate_factor = 0.5 + torch.rand(num_data, generator=generator)
    return CountData(
        binary=torch.bernoulli(probs, generator=generator),
        successes=torch.binomial(trials, torch.where(group, 0.3, 0.7), generator=generator),
        trials=trials,
        counts=torch.poisson(exposure * torch.where(group, 1.5, 5.0), generator=generator),
        exposure=exposure,
        durations=torch.distributions.Exponential(rate_factor * torch.where(group, 0.7, 3.0))
        .sample()
        .clamp(min=1e-3),
        rate_factor=rate_factor,
    )


def _vector_data(num_data: int) -> VectorData:
    generator = torch.Generator().manual_seed(3)
    group = torch.rand(num_data, generator=generator) < 0.5
    centre = torch.where(group[:, None], torch.tensor([-2.0, 1.0]), torch.tensor([2.0, -1.0]))
    shift = torch.randn(num_data, 2, generator=generator)
    factor = 0.5 + torch.rand(num_data, generator=generator)
    noise = torch.randn(num_data, 2, generator=generator) @ torch.tensor([[1.0, 0.0], [0.5, 0.7]])
    return VectorData(centre + shift + factor.sqrt()[:, None] * noise, shift, factor)


FLAT_KINDS = {
    "categorical": {"weights": "flat-categorical", "probs": "flat-categorical"},
    "counts": {
        "weights": "flat-categorical",
        "bernoulli_probs": "flat-bernoulli",
        "binomial_probs": "flat-binomial",
        "poisson_rates": "flat-poisson",
        "exponential_rates": "flat-exponential",
    },
    "normal": {
        "weights": "flat-categorical",
        "locs": "flat-normal-mean",
        "variances": "flat-normal-variance",
        "precisions": "flat-normal-precision",
    },
    "mvn": {
        "weights": "flat-categorical",
        "means": "flat-mvn-mean",
        "covariances": "flat-mvn-covariance",
    },
}

CLOSED_FORM_CASES: dict[str, dict[str, str]] = {
    "categorical": {"weights": "dirichlet-categorical", "probs": "dirichlet-categorical"},
    "counts": {
        "weights": "dirichlet-categorical",
        "bernoulli_probs": "beta-bernoulli",
        "binomial_probs": "beta-binomial",
        "poisson_rates": "gamma-poisson",
        "exponential_rates": "gamma-exponential",
    },
    "normal": {
        "weights": "dirichlet-categorical",
        "locs": "normal-normal-mean",
        "variances": "inverse-gamma-normal-variance",
        "precisions": "gamma-normal-precision",
    },
    "normal-inverse-gamma": {
        "weights": "dirichlet-categorical",
        "variances": "inverse-gamma-normal-variance",
        "locs": "normal-normal-mean",
    },
    "mvn": {
        "weights": "dirichlet-categorical",
        "means": "normal-mvn-mean",
        "covariances": "inverse-wishart-mvn-covariance",
    },
    "mvn-diagonal-prior": {
        "weights": "dirichlet-categorical",
        "means": "normal-mvn-mean",
        "covariances": "inverse-wishart-mvn-covariance",
    },
    **{f"{name}-flat": kinds for name, kinds in FLAT_KINDS.items()},
    # The example programs in models/: every site's kind and every closed form.
    "gmm": {
        "weights": "dirichlet-categorical",
        "covariances": "inverse-wishart-mvn-covariance",
        "means": "normal-mvn-mean",
    },
    "poisson-mixture": {"weights": "dirichlet-categorical", "rates": "gamma-poisson"},
    "latent-class": {"weights": "dirichlet-categorical", "probs": "beta-bernoulli"},
    "gaussian-hmm-flat": {
        "init_probs": "flat-categorical",
        "transition_probs": "flat-categorical",
        "locs": "flat-normal-mean",
        "variances": "flat-normal-variance",
    },
    "gaussian-hmm-conjugate": {
        "init_probs": "dirichlet-categorical",
        "transition_probs": "dirichlet-categorical",
        "variances": "inverse-gamma-normal-variance",
        "locs": "normal-normal-mean",
    },
    "poisson-hmm-flat": {
        "init_probs": "flat-categorical",
        "transition_probs": "flat-categorical",
        "rates": "flat-poisson",
    },
    "poisson-hmm-conjugate": {
        "init_probs": "dirichlet-categorical",
        "transition_probs": "dirichlet-categorical",
        "rates": "gamma-poisson",
    },
}


def _closed_form_program(name: str) -> Program:
    if name in EXAMPLES:
        return _example(name)
    flat = name.endswith("-flat")
    base = name.removesuffix("-flat")
    if base == "categorical":
        generator = torch.Generator().manual_seed(0)
        group = torch.randint(0, 3, (50,), generator=generator)
        shifted = (group + torch.randint(0, 2, (50,), generator=generator)) % 4
        return Program(categorical_mixture, (shifted.double(), flat), {})
    if base == "counts":
        return Program(count_mixture, (_count_data(40), flat), {})
    if base == "normal":
        return Program(normal_mixture, (_normal_data(40), flat), {})
    if base == "normal-inverse-gamma":
        return Program(normal_inverse_gamma_mixture, (_normal_data(40).second,), {})
    priors = {"mvn": "mvn", "mvn-diagonal-prior": "diagonal"}[base] if not flat else "flat"
    return Program(mvn_mixture, (_vector_data(40), priors), {})


def _maximise_q(
    program: ProgramModel,
    values: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor],
    name: str,
) -> torch.Tensor:
    """Maximise Q over site ``name`` alone: L-BFGS-B on its unconstrained value, from the
    current value, to a gradient of 1e-11 (the closed forms agree to ~1e-8 or better)."""
    constraint = program.params[name].constraint
    # torch registers no bijection onto covariance matrices; the Cholesky parameterisation
    # (its strict upper triangle unused) reaches all of them.
    if constraint is constraints.positive_definite:
        transform = transform_to(constraint)
    else:
        transform = biject_to(constraint)
    start = transform.inv(values[name]).detach()

    def negative_q(flat: np.ndarray) -> tuple[float, np.ndarray]:
        unconstrained = torch.as_tensor(flat).reshape(start.shape).requires_grad_()
        q = expected_log_joint(program, {**values, name: transform(unconstrained)}, weights)
        (gradient,) = torch.autograd.grad(q, unconstrained)
        return -float(q.detach()), -gradient.reshape(-1).numpy()

    result = minimize(
        negative_q,
        start.reshape(-1).numpy(),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 20_000, "maxfun": 40_000, "ftol": 0.0, "gtol": 1e-11, "maxcor": 50},
    )
    return transform(torch.as_tensor(result.x).reshape(start.shape)).detach()


def _closed_forms_against_optimiser(program: Program, kinds: dict[str, str] | None) -> None:
    """Check the recognised kinds (when given) and every recognised closed form."""
    model = ProgramModel(program.model, program.args, program.kwargs)
    values = initial_values(model, None, seed=0)
    found = recognise(model, values)
    reported = {name: "gradient" if block is None else block.kind for name, block in found.items()}
    if kinds is not None:
        assert reported == {name: kinds.get(name, "gradient") for name in model.params}
    post = posterior(model, values)
    for name, block in found.items():
        if block is None:
            continue
        closed = closed_form_update(model, block, post.trace, post.weights)
        optimum = _maximise_q(model, values, post.weights, name)
        q_closed = float(expected_log_joint(model, {**values, name: closed}, post.weights))
        q_optimum = float(expected_log_joint(model, {**values, name: optimum}, post.weights))
        assert q_closed >= q_optimum - 1e-9 * abs(q_optimum), name
        torch.testing.assert_close(closed, optimum, rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.parametrize("name", list(CLOSED_FORM_CASES))
def test_closed_form_is_the_maximiser_of_q(name: str) -> None:
    _closed_forms_against_optimiser(_closed_form_program(name), CLOSED_FORM_CASES[name])


def gamma_prior_on_std(data: torch.Tensor) -> None:
    """A Gamma prior on a Normal's standard deviation: conjugate only for the precision."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2)))
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(0.0, 3.0))
        scales = pyro.sample("scales", dist.Gamma(torch.tensor(2.0), 2.0))
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("assignment", dist.Categorical(weights), infer=PARALLEL)
        pyro.sample("obs", dist.Normal(locs[z], scales[z]), obs=data)


def log_link_poisson(data: torch.Tensor) -> None:
    """Poisson rates through ``exp`` of a real parameter, and a LogNormal-prior rate."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2)))
    with pyro.plate("components", 2):
        log_rates = pyro.sample("log_rates", dist.Normal(0.0, 2.0))
        rates = pyro.sample("rates", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("assignment", dist.Categorical(weights), infer=PARALLEL)
        pyro.sample("log_link", dist.Poisson(log_rates[z].exp()), obs=data)
        pyro.sample("lognormal_prior", dist.Poisson(rates[z]), obs=data)


def flat_std(data: torch.Tensor) -> None:
    """A ``pyro.param`` standard deviation (maximum likelihood), not a variance."""
    weights = pyro.param("weights", torch.tensor([0.5, 0.5]), constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    scales = pyro.param("scales", torch.tensor([1.0, 2.0]), constraint=constraints.positive)
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("assignment", dist.Categorical(weights), infer=PARALLEL)
        pyro.sample("obs", dist.Normal(locs[z], scales[z]), obs=data)


NON_CONJUGATE = {
    "gamma-prior-on-std": (
        gamma_prior_on_std,
        {"weights": "dirichlet-categorical", "locs": "normal-normal-mean"},
    ),
    "log-link-and-lognormal-prior": (log_link_poisson, {"weights": "dirichlet-categorical"}),
    "flat-std": (flat_std, {"weights": "flat-categorical", "locs": "flat-normal-mean"}),
}


@pytest.mark.parametrize("name", list(NON_CONJUGATE))
def test_non_conjugate_sites_get_the_gradient_m_step(name: str) -> None:
    model, kinds = NON_CONJUGATE[name]
    counts = name.startswith("log")
    data = torch.poisson(torch.full((30,), 3.0)) if counts else _normal_data(30).second
    _closed_forms_against_optimiser(Program(model, (data,), {}), kinds)


def test_student_t_mixture_sites_get_the_gradient_m_step() -> None:
    """Student-t locations, scales and degrees of freedom have no closed form; the
    Dirichlet weights keep theirs."""
    example = _example("student-t-mixture")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(
            example.model, *example.args, model_kwargs=example.kwargs, seed=0, max_iter=2
        )
    assert isinstance(fit, pyroem.ProgramFit)
    assert fit.m_step_kinds == {
        "weights": "dirichlet-categorical",
        "locs": "gradient",
        "scales": "gradient",
        "df": "gradient",
    }


def scalar_beta_bernoulli(data: torch.Tensor) -> None:
    """One success probability for every observation."""
    probs = pyro.sample("probs", dist.Beta(torch.tensor(2.0), 3.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.Bernoulli(probs), obs=data)


def middle_entry_alone(data: torch.Tensor) -> None:
    """Three probabilities, each read by its own observed site."""
    probs = pyro.sample("probs", dist.Beta(torch.tensor([2.0, 2.0, 2.0]), 3.0).to_event(1))
    for i in range(3):
        with pyro.plate(f"data_{i}", data.shape[0]):
            pyro.sample(f"obs_{i}", dist.Bernoulli(probs[i]), obs=data)


def complementary_probability(data: torch.Tensor) -> None:
    """One site reads ``1 − probs[0]`` (not a recognised form), another ``probs[1]``."""
    probs = pyro.sample("probs", dist.Beta(torch.tensor([2.0, 3.0]), 2.0).to_event(1))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("failures", dist.Bernoulli(1 - probs[0]), obs=data)
        pyro.sample("successes", dist.Bernoulli(probs[1]), obs=data)


def sum_of_entries(data: torch.Tensor) -> None:
    """One site's mean is ``effects[0] + effects[1]`` (not a recognised form), another's
    is ``effects[2]``."""
    effects = pyro.sample("effects", dist.Normal(torch.zeros(3), 10.0).to_event(1))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("both", dist.Normal(effects[0] + effects[1], 1.0), obs=data)
        pyro.sample("third", dist.Normal(effects[2], 1.0), obs=data + 3)


def test_scalar_beta_bernoulli_is_recognised() -> None:
    data = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    _closed_forms_against_optimiser(
        Program(scalar_beta_bernoulli, (data,), {}), {"probs": "beta-bernoulli"}
    )


ALIASED = {
    "middle-entry-alone": middle_entry_alone,
    "complementary-probability": complementary_probability,
    "sum-of-entries": sum_of_entries,
}


@pytest.mark.parametrize("name", list(ALIASED))
def test_uses_outside_the_recognised_forms_get_no_wrong_closed_form(name: str) -> None:
    """Whatever recognise decides, a closed form it takes must maximise Q."""
    data = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    _closed_forms_against_optimiser(Program(ALIASED[name], (data,), {}), None)


def test_gradient_m_step_moves_a_non_contiguous_start() -> None:
    example = _example("student-t-mixture")
    start = {"locs": torch.tensor([[2.0, 4.5], [55.0, 80.0]]).T}
    assert not start["locs"].is_contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(
            example.model,
            *example.args,
            model_kwargs=example.kwargs,
            init=start,
            seed=0,
            max_iter=2,
        )
    assert not torch.equal(fit.params["locs"], start["locs"])


def test_gradient_m_step_on_a_covariance_site() -> None:
    example = _example("gmm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(
            example.model,
            *example.args,
            model_kwargs=example.kwargs,
            seed=0,
            max_iter=3,
            m_step="gradient",
        )
    objective = np.asarray(fit.history.objective)
    assert np.all(np.diff(objective) >= -1e-9 * np.abs(objective[1:]))


# ----- 3. the gradient M-step reaches the closed forms' optimum --------------------------


def test_gradient_and_closed_form_m_steps_reach_the_same_optimum() -> None:
    """On a well-separated two-component normal mixture, from one start, forcing the
    gradient M-step everywhere and using the closed forms converge to one MAP (up to the
    components' labels)."""
    generator = torch.Generator().manual_seed(4)
    data = torch.cat(
        [
            torch.randn(30, 2, generator=generator) * torch.tensor([0.5, 1.0]),
            torch.randn(20, 2, generator=generator) * 0.7 + torch.tensor([4.0, -3.0]),
        ]
    )
    model = ROBUST["normal_mixture_model"]
    hyper = ROBUST["default_prior"](data, 2)
    start = ROBUST["initial_params"](data, 2, "normal")
    fits = {
        m_step: pyroem.fit(
            model, data, 2, model_kwargs=hyper, init=start, tol=1e-13, max_iter=300, m_step=m_step
        )
        for m_step in ("auto", "gradient")
    }
    auto, gradient = fits["auto"], fits["gradient"]
    assert isinstance(auto, pyroem.ProgramFit) and isinstance(gradient, pyroem.ProgramFit)
    assert set(auto.m_step_kinds.values()) == {
        "dirichlet-categorical",
        "normal-normal-mean",
        "inverse-gamma-normal-variance",
    }
    assert set(gradient.m_step_kinds.values()) == {"gradient"}
    assert auto.converged and gradient.converged
    assert gradient.log_joint() == pytest.approx(auto.log_joint(), rel=1e-6, abs=0)
    # Quasi-Newton steps on the log joint may reach the same MAP with the labels swapped.
    order = min(
        ([0, 1], [1, 0]),
        key=lambda order: float((gradient.params["locs"][order] - auto.params["locs"]).abs().sum()),
    )
    for name, value in auto.params.items():
        torch.testing.assert_close(
            gradient.params[name][order], value, rtol=1e-5, atol=1e-7, msg=name
        )
