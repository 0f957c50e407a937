r"""Exact E-step on Pyro programs against brute force over every latent assignment.

Each tiny program below comes with a reference written independently of Pyro's
enumeration: every assignment ``z`` of all its discrete latents is visited with
``itertools.product`` and scored with densities from ``scipy.stats``,

.. math::

    \log p(x | θ) = \operatorname{logsumexp}_z \log p(x, z | θ), \qquad
    P(z_i = v | x, θ) = \sum_{z : z_i = v} p(x, z | θ) / p(x | θ).

The exact E-step of ``ProgramModel`` must reproduce the log evidence, the log
joint (the log evidence plus the log prior densities of the sample-site
parameters; ``pyro.param`` sites have a flat prior) and every single-site
posterior marginal to 1e-10 in float64; where one latent's distribution depends
on another, the weight of its table in Q must be the pair's joint posterior; and
a fit must report the brute-force values at its own parameters. Each reference
is first held against Pyro's own ``TraceEnum_ELBO`` on the program conditioned
on θ, so a reference and its program are known to describe the same model.
Programs that MAP-EM cannot fit exactly must be refused with an error that
names the offending site.
"""

from __future__ import annotations

import functools
import itertools
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate
from pyro.poutine.runtime import InferDict
from scipy import stats
from scipy.special import logsumexp
from torch.distributions import constraints

import pyroem
from pyroem.estep.program import posterior
from pyroem.model.program import ProgramModel

TOL = 1e-10
PARALLEL: InferDict = {"enumerate": "parallel"}

Params = dict[str, torch.Tensor]
Assignment = dict[str, tuple[int, ...]]


@pytest.fixture(autouse=True)
def _float64() -> None:
    torch.set_default_dtype(torch.float64)


class Reference(NamedTuple):
    """Brute-force answers at one θ.

    Attributes:
        log_likelihood: ``log p(x | θ)``.
        log_prior: log prior density of the sample-site parameters at θ.
        marginals: per enumerated site, ``(*batch, num_values)``; rows of NaN are
            not compared (time steps past the end of a sequence).
        pairwise: per enumerated site whose distribution depends on another enumerated
            site (its parent), ``(parent, joint)`` with the joint posterior marginal
            ``(*batch, parent_values, values)``; NaN rows are not compared.
    """

    log_likelihood: float
    log_prior: float
    marginals: dict[str, np.ndarray]
    pairwise: Mapping[str, tuple[str, np.ndarray]] = MappingProxyType({})


@dataclass(frozen=True)
class Case:
    """A tiny program, its arguments, a value for every parameter site and its reference."""

    model: Callable[..., None]
    args: tuple[Any, ...]
    params: Params
    param_sites: frozenset[str]
    reference: Callable[[Params], Reference]


class Enumeration(NamedTuple):
    """What visiting every assignment gives: the log evidence and posterior marginals.

    Attributes:
        log_evidence: ``log Σ_z p(x, z)``.
        marginals: per site, ``(copies, values)``.
        pairwise: per child site of ``pairs``, the joint marginal with its parent,
            ``(copies, parent_values, child_values)``.
    """

    log_evidence: float
    marginals: dict[str, np.ndarray]
    pairwise: dict[str, np.ndarray]


def _brute_force(
    latents: dict[str, tuple[int, int]],
    log_joint: Callable[[Assignment], float],
    pairs: Mapping[str, str] = MappingProxyType({}),
) -> Enumeration:
    """Visit every assignment of ``latents`` (site -> (copies, values)).

    ``pairs`` maps a child site to its parent; copy ``i`` of the child is paired
    with copy ``i`` of the parent.
    """
    ranges = [range(values) for copies, values in latents.values() for _ in range(copies)]
    assignments = [_by_site(latents, flat) for flat in itertools.product(*ranges)]
    log_p = np.array([log_joint(assignment) for assignment in assignments])
    log_evidence = float(logsumexp(log_p))
    marginals = {site: np.zeros(shape) for site, shape in latents.items()}
    pairwise = {
        child: np.zeros((latents[child][0], latents[parent][1], latents[child][1]))
        for child, parent in pairs.items()
    }
    for assignment, weight in zip(assignments, np.exp(log_p - log_evidence), strict=True):
        for site, values in assignment.items():
            marginals[site][np.arange(len(values)), values] += weight
        for child, parent in pairs.items():
            copies = np.arange(len(assignment[child]))
            pairwise[child][copies, assignment[parent], assignment[child]] += weight
    return Enumeration(log_evidence, marginals, pairwise)


def _by_site(latents: dict[str, tuple[int, int]], assignment: tuple[int, ...]) -> Assignment:
    """Split a flat assignment into one tuple of values per site."""
    split: Assignment = {}
    start = 0
    for site, (copies, _) in latents.items():
        split[site] = assignment[start : start + copies]
        start += copies
    return split


def _numpy(params: Params) -> dict[str, np.ndarray]:
    return {name: value.detach().numpy() for name, value in params.items()}


def _tensor(array: npt.ArrayLike) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array, dtype=np.float64))


# ----- a Gaussian mixture --------------------------------------------------------------
def gaussian_mixture(data: torch.Tensor) -> None:
    weights = pyro.sample("weights", dist.Dirichlet(torch.full((3,), 2.0)))
    locs = pyro.sample("locs", dist.Normal(0.0, 5.0).expand([3]).to_event(1))
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("z", dist.Categorical(weights), infer=PARALLEL)
        pyro.sample("x", dist.Normal(locs[z], 1.0), obs=data)


def _gaussian_mixture_case() -> Case:
    rng = np.random.default_rng(1)
    data = np.array([-2.1, -1.7, 0.3, 2.4, 3.0])

    def reference(params: Params) -> Reference:
        p = _numpy(params)
        log_table = np.log(p["weights"]) + stats.norm(p["locs"], 1.0).logpdf(data[:, None])
        log_evidence, marginals, _ = _brute_force(
            {"z": log_table.shape},
            lambda z: sum(log_table[n, k] for n, k in enumerate(z["z"])),
        )
        log_prior = (
            stats.dirichlet(np.full(3, 2.0)).logpdf(p["weights"])
            + stats.norm(0.0, 5.0).logpdf(p["locs"]).sum()
        )
        return Reference(log_evidence, log_prior, marginals)

    params = {
        "weights": _tensor(rng.dirichlet(np.full(3, 3.0))),
        "locs": _tensor([-2.0, 0.5, 2.5]),
    }
    return Case(gaussian_mixture, (_tensor(data),), params, frozenset(), reference)


# ----- two discrete latents per datum, the second depending on the first ---------------
def dependent_mixture(data: torch.Tensor) -> None:
    weights = pyro.sample("weights", dist.Dirichlet(torch.full((2,), 1.5)))
    transition = pyro.param(
        "transition", torch.full((2, 3), 1.0 / 3.0), constraint=constraints.simplex
    )
    means = pyro.sample("means", dist.Normal(0.0, 3.0).expand([2, 3]).to_event(2))
    with pyro.plate("data", data.shape[0]):
        z1 = pyro.sample("z1", dist.Categorical(weights), infer=PARALLEL)
        z2 = pyro.sample("z2", dist.Categorical(transition[z1]), infer=PARALLEL)
        pyro.sample("x", dist.Normal(means[z1, z2], 1.0), obs=data)


def _dependent_mixture_case() -> Case:
    rng = np.random.default_rng(2)
    data = np.array([-1.2, 0.4, 1.9, 3.3])

    def reference(params: Params) -> Reference:
        p = _numpy(params)
        log_x = stats.norm(p["means"], 1.0).logpdf(data[:, None, None])  # (N, K1, K2)
        log_pairs = np.log(p["weights"])[:, None] + np.log(p["transition"]) + log_x

        def log_joint(z: Assignment) -> float:
            return sum(
                log_pairs[n, k1, k2]
                for n, (k1, k2) in enumerate(zip(z["z1"], z["z2"], strict=True))
            )

        log_evidence, marginals, pairwise = _brute_force(
            {"z1": (len(data), 2), "z2": (len(data), 3)}, log_joint, pairs={"z2": "z1"}
        )
        log_prior = (
            stats.dirichlet(np.full(2, 1.5)).logpdf(p["weights"])
            + stats.norm(0.0, 3.0).logpdf(p["means"]).sum()
        )
        return Reference(log_evidence, log_prior, marginals, {"z2": ("z1", pairwise["z2"])})

    params = {
        "weights": _tensor([0.35, 0.65]),
        "transition": _tensor(rng.dirichlet(np.ones(3), size=2)),
        "means": _tensor(rng.normal(1.0, 2.0, (2, 3))),
    }
    return Case(dependent_mixture, (_tensor(data),), params, frozenset({"transition"}), reference)


# ----- a factorial model: two independent discrete latents per datum -------------------
def factorial(data: torch.Tensor) -> None:
    mix_a = pyro.sample("mix_a", dist.Dirichlet(torch.full((2,), 2.0)))
    mix_b = pyro.param("mix_b", torch.full((3,), 1.0 / 3.0), constraint=constraints.simplex)
    effect_a = pyro.sample("effect_a", dist.Normal(0.0, 2.0).expand([2]).to_event(1))
    effect_b = pyro.sample("effect_b", dist.Normal(0.0, 2.0).expand([3]).to_event(1))
    noise = pyro.param("noise", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("data", data.shape[0]):
        a = pyro.sample("a", dist.Categorical(mix_a), infer=PARALLEL)
        b = pyro.sample("b", dist.Categorical(mix_b), infer=PARALLEL)
        pyro.sample("x", dist.Normal(effect_a[a] + effect_b[b], noise), obs=data)


def _factorial_case() -> Case:
    rng = np.random.default_rng(3)
    data = np.array([-2.5, -0.3, 0.8, 2.2])

    def reference(params: Params) -> Reference:
        p = _numpy(params)
        means = p["effect_a"][:, None] + p["effect_b"]  # (K_a, K_b)
        log_x = stats.norm(means, p["noise"]).logpdf(data[:, None, None])
        log_pairs = np.log(p["mix_a"])[:, None] + np.log(p["mix_b"]) + log_x

        def log_joint(z: Assignment) -> float:
            return sum(
                log_pairs[n, ka, kb] for n, (ka, kb) in enumerate(zip(z["a"], z["b"], strict=True))
            )

        log_evidence, marginals, _ = _brute_force(
            {"a": (len(data), 2), "b": (len(data), 3)}, log_joint
        )
        log_prior = (
            stats.dirichlet(np.full(2, 2.0)).logpdf(p["mix_a"])
            + stats.norm(0.0, 2.0).logpdf(p["effect_a"]).sum()
            + stats.norm(0.0, 2.0).logpdf(p["effect_b"]).sum()
        )
        return Reference(log_evidence, log_prior, marginals)

    params = {
        "mix_a": _tensor([0.4, 0.6]),
        "mix_b": _tensor(rng.dirichlet(np.full(3, 2.0))),
        "effect_a": _tensor([-1.0, 1.2]),
        "effect_b": _tensor(rng.normal(0.0, 1.0, 3)),
        "noise": _tensor(0.7),
    }
    return Case(factorial, (_tensor(data),), params, frozenset({"mix_b", "noise"}), reference)


# ----- a Bernoulli switch feeding a Poisson likelihood ---------------------------------
def bernoulli_switch_poisson(counts: torch.Tensor) -> None:
    p_on = pyro.sample("p_on", dist.Beta(2.0, 3.0))
    rates = pyro.sample("rates", dist.Gamma(2.0, 0.5).expand([2]).to_event(1))
    with pyro.plate("data", counts.shape[0]):
        on = pyro.sample("on", dist.Bernoulli(p_on), infer=PARALLEL)
        pyro.sample("counts", dist.Poisson(rates[on.long()]), obs=counts)


def _bernoulli_switch_poisson_case() -> Case:
    counts = np.array([0.0, 1.0, 7.0, 2.0, 9.0, 4.0])

    def reference(params: Params) -> Reference:
        p = _numpy(params)
        log_switch = np.log([1.0 - p["p_on"], p["p_on"]])
        log_table = log_switch + stats.poisson(p["rates"]).logpmf(counts[:, None])
        log_evidence, marginals, _ = _brute_force(
            {"on": log_table.shape},
            lambda z: sum(log_table[n, k] for n, k in enumerate(z["on"])),
        )
        log_prior = (
            stats.beta(2.0, 3.0).logpdf(p["p_on"])
            + stats.gamma(2.0, scale=1.0 / 0.5).logpdf(p["rates"]).sum()
        )
        return Reference(log_evidence, log_prior, marginals)

    params = {"p_on": _tensor(0.3), "rates": _tensor([1.5, 6.0])}
    return Case(bernoulli_switch_poisson, (_tensor(counts),), params, frozenset(), reference)


# ----- an HMM over sequences of different lengths ---------------------------------------
def hmm(sequences: torch.Tensor, lengths: torch.Tensor) -> None:
    num_states = 3
    init_probs = pyro.sample("init_probs", dist.Dirichlet(torch.full((num_states,), 1.5)))
    trans = pyro.sample(
        "trans", dist.Dirichlet(torch.full((num_states, num_states), 2.0)).to_event(1)
    )
    locs = pyro.sample("locs", dist.Normal(0.0, 5.0).expand([num_states]).to_event(1))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("sequences", sequences.shape[0], dim=-1):
        state = None
        for t in pyro.markov(range(sequences.shape[1])):
            with poutine.mask(mask=t < lengths):
                probs = init_probs if state is None else trans[state]
                state = pyro.sample(f"x_{t}", dist.Categorical(probs), infer=PARALLEL)
                pyro.sample(f"y_{t}", dist.Normal(locs[state], scale), obs=sequences[:, t])


def _hmm_case() -> Case:
    rng = np.random.default_rng(5)
    lengths = np.array([6, 3, 5])
    num_steps, num_states = int(lengths.max()), 3
    # Entries past a sequence's end hold junk that a correct mask ignores.
    sequences = np.where(
        np.arange(num_steps) < lengths[:, None], rng.normal(0.0, 2.0, (3, num_steps)), 40.0
    )

    def reference(params: Params) -> Reference:
        p = _numpy(params)
        log_init, log_trans = np.log(p["init_probs"]), np.log(p["trans"])
        log_emit = stats.norm(p["locs"], p["scale"]).logpdf(sequences[..., None])  # (S, T, K)
        num_sequences = len(lengths)
        marginals = {
            f"x_{t}": np.full((num_sequences, num_states), np.nan) for t in range(num_steps)
        }
        pairwise = {
            f"x_{t}": (f"x_{t - 1}", np.full((num_sequences, num_states, num_states), np.nan))
            for t in range(1, num_steps)
        }
        log_evidence = 0.0
        for s, length in enumerate(lengths):

            def log_joint(z: Assignment, s: int = s, length: int = length) -> float:
                path = [z[f"x_{t}"][0] for t in range(length)]
                return (
                    log_init[path[0]]
                    + sum(log_trans[i, j] for i, j in itertools.pairwise(path))
                    + sum(log_emit[s, t, k] for t, k in enumerate(path))
                )

            latents = {f"x_{t}": (1, num_states) for t in range(length)}
            parents = {f"x_{t}": f"x_{t - 1}" for t in range(1, length)}
            enumeration = _brute_force(latents, log_joint, parents)
            log_evidence += enumeration.log_evidence
            for site, marginal in enumeration.marginals.items():
                marginals[site][s] = marginal[0]
            for site, joint in enumeration.pairwise.items():
                pairwise[site][1][s] = joint[0]
        log_prior = (
            stats.dirichlet(np.full(num_states, 1.5)).logpdf(p["init_probs"])
            + sum(stats.dirichlet(np.full(num_states, 2.0)).logpdf(row) for row in p["trans"])
            + stats.norm(0.0, 5.0).logpdf(p["locs"]).sum()
        )
        return Reference(log_evidence, log_prior, marginals, pairwise)

    params = {
        "init_probs": _tensor(rng.dirichlet(np.full(num_states, 2.0))),
        "trans": _tensor(rng.dirichlet(np.full(num_states, 2.0), size=num_states)),
        "locs": _tensor([-2.0, 0.0, 2.5]),
        "scale": _tensor(1.3),
    }
    args = (_tensor(sequences), torch.as_tensor(lengths))
    return Case(hmm, args, params, frozenset({"scale"}), reference)


# ----- enumeration asked for only by the config_enumerate decorator ---------------------
@config_enumerate
def decorated_poisson_mixture(counts: torch.Tensor) -> None:
    weights = pyro.param("weights", torch.full((3,), 1.0 / 3.0), constraint=constraints.simplex)
    rates = pyro.sample("rates", dist.Gamma(3.0, 1.0).expand([3]).to_event(1))
    with pyro.plate("data", counts.shape[0]):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("counts", dist.Poisson(rates[z]), obs=counts)


def _decorated_poisson_mixture_case() -> Case:
    counts = np.array([0.0, 2.0, 3.0, 8.0, 12.0])

    def reference(params: Params) -> Reference:
        p = _numpy(params)
        log_table = np.log(p["weights"]) + stats.poisson(p["rates"]).logpmf(counts[:, None])
        log_evidence, marginals, _ = _brute_force(
            {"z": log_table.shape},
            lambda z: sum(log_table[n, k] for n, k in enumerate(z["z"])),
        )
        log_prior = stats.gamma(3.0, scale=1.0).logpdf(p["rates"]).sum()
        return Reference(log_evidence, log_prior, marginals)

    params = {"weights": _tensor([0.5, 0.3, 0.2]), "rates": _tensor([0.8, 3.5, 10.0])}
    return Case(
        decorated_poisson_mixture, (_tensor(counts),), params, frozenset({"weights"}), reference
    )


# ----- a discrete latent not marked for enumeration at all ------------------------------
def unmarked_bernoulli_mixture(data: torch.Tensor) -> None:
    weights = pyro.sample("weights", dist.Dirichlet(torch.full((3,), 2.0)))
    probs = pyro.sample("probs", dist.Beta(2.0, 2.0).expand([3, data.shape[1]]).to_event(2))
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("x", dist.Bernoulli(probs[z]).to_event(1), obs=data)


def _unmarked_bernoulli_mixture_case() -> Case:
    rng = np.random.default_rng(7)
    data = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=float)

    def reference(params: Params) -> Reference:
        p = _numpy(params)
        log_x = stats.bernoulli(p["probs"]).logpmf(data[:, None, :]).sum(-1)  # (N, K)
        log_table = np.log(p["weights"]) + log_x
        log_evidence, marginals, _ = _brute_force(
            {"z": log_table.shape},
            lambda z: sum(log_table[n, k] for n, k in enumerate(z["z"])),
        )
        log_prior = (
            stats.dirichlet(np.full(3, 2.0)).logpdf(p["weights"])
            + stats.beta(2.0, 2.0).logpdf(p["probs"]).sum()
        )
        return Reference(log_evidence, log_prior, marginals)

    params = {
        "weights": _tensor([0.2, 0.5, 0.3]),
        "probs": _tensor(rng.uniform(0.1, 0.9, (3, 3))),
    }
    return Case(unmarked_bernoulli_mixture, (_tensor(data),), params, frozenset(), reference)


CASES: dict[str, Callable[[], Case]] = {
    "gaussian-mixture": _gaussian_mixture_case,
    "dependent-mixture": _dependent_mixture_case,
    "factorial": _factorial_case,
    "bernoulli-poisson": _bernoulli_switch_poisson_case,
    "hmm-ragged": _hmm_case,
    "config-enumerate": _decorated_poisson_mixture_case,
    "unmarked": _unmarked_bernoulli_mixture_case,
}


@functools.cache
def _case_and_reference(name: str) -> tuple[Case, Reference]:
    case = CASES[name]()
    return case, case.reference(case.params)


def _nothing(*args: Any, **kwargs: Any) -> None:
    """A guide with no sample sites: the ELBO is then the log joint itself."""


def _pyro_log_joint(case: Case, params: Params) -> float:
    """``log p(x, θ)`` by Pyro's ``TraceEnum_ELBO`` on the program conditioned on θ."""
    samples = {name: value for name, value in params.items() if name not in case.param_sites}
    fixed = {name: value for name, value in params.items() if name in case.param_sites}
    conditioned = poutine.substitute(poutine.condition(case.model, data=samples), data=fixed)
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    return -elbo.loss(config_enumerate(conditioned), _nothing, *case.args)


def _compared(expected: np.ndarray) -> np.ndarray:
    """Rows of a reference marginal that are compared (not NaN)."""
    return ~np.isnan(expected).any(-1)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_matches_pyro_trace_enum_elbo(name: str) -> None:
    case, reference = _case_and_reference(name)
    pyro_log_joint = _pyro_log_joint(case, case.params)
    assert abs(pyro_log_joint - (reference.log_likelihood + reference.log_prior)) < TOL
    for marginal in reference.marginals.values():
        rows = _compared(marginal)
        np.testing.assert_allclose(marginal[rows].sum(-1), 1.0, rtol=0, atol=TOL)


@pytest.mark.parametrize("name", sorted(CASES))
def test_posterior_matches_brute_force(name: str) -> None:
    case, reference = _case_and_reference(name)
    program = ProgramModel(case.model, case.args, {})
    assert set(program.params) == set(case.params)
    post = posterior(program, case.params)

    assert post.log_likelihood.dtype == torch.float64
    assert abs(float(post.log_likelihood) - reference.log_likelihood) < TOL
    expected_log_joint = reference.log_likelihood + reference.log_prior
    assert abs(float(post.log_joint) - expected_log_joint) < TOL

    assert set(post.marginals) == set(reference.marginals)
    for site, expected in reference.marginals.items():
        actual = post.marginals[site].detach().numpy()
        assert actual.shape == expected.shape, site
        rows = _compared(expected)
        np.testing.assert_allclose(actual[rows], expected[rows], rtol=0, atol=TOL, err_msg=site)


@pytest.mark.parametrize("name", sorted(CASES))
def test_marginals_are_distributions(name: str) -> None:
    case, reference = _case_and_reference(name)
    post = posterior(ProgramModel(case.model, case.args, {}), case.params)
    for site, marginal in post.marginals.items():
        rows = torch.as_tensor(_compared(reference.marginals[site]))
        assert bool((marginal >= 0).all()), site
        torch.testing.assert_close(
            marginal[rows].sum(-1), torch.ones(int(rows.sum())), rtol=0, atol=TOL
        )


@pytest.mark.parametrize("name", ["dependent-mixture", "hmm-ragged"])
def test_factor_weights_are_pairwise_marginals(name: str) -> None:
    """The weight of a child's table ``log p(child | parent)`` in Q is their joint posterior."""
    case, reference = _case_and_reference(name)
    assert reference.pairwise
    post = posterior(ProgramModel(case.model, case.args, {}), case.params)
    for site, (parent, expected) in reference.pairwise.items():
        enum_dims = [post.trace.nodes[s]["infer"]["_enumerate_dim"] for s in (parent, site)]
        weight = post.weights[site].movedim(enum_dims, (-2, -1))
        actual = weight.reshape(expected.shape).detach().numpy()
        rows = ~np.isnan(expected).any((-2, -1))
        np.testing.assert_allclose(actual[rows], expected[rows], rtol=0, atol=TOL, err_msg=site)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fit_reports_brute_force_at_its_parameters(name: str) -> None:
    case, _ = _case_and_reference(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(case.model, *case.args, method="map-em", init=case.params, max_iter=3)
    assert set(fit.params) == set(case.params)
    reference = case.reference({site: value.detach() for site, value in fit.params.items()})
    assert abs(fit.log_likelihood() - reference.log_likelihood) < TOL
    assert abs(fit.log_joint() - (reference.log_likelihood + reference.log_prior)) < TOL
    for site, expected in reference.marginals.items():
        rows = _compared(expected)
        actual = fit.marginals[site].detach().numpy()
        np.testing.assert_allclose(actual[rows], expected[rows], rtol=0, atol=TOL, err_msg=site)


# ----- programs MAP-EM cannot fit exactly -----------------------------------------------
def continuous_local_latent(data: torch.Tensor) -> None:
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    with pyro.plate("data", data.shape[0]):
        local_shift = pyro.sample("local_shift", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(local_shift, 1.0), obs=data)


def poisson_latent_count(data: torch.Tensor) -> None:
    rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
    with pyro.plate("data", data.shape[0]):
        hidden_count = pyro.sample("hidden_count", dist.Poisson(rate))
        pyro.sample("x", dist.Normal(hidden_count, 1.0), obs=data)


def sequential_enumeration(data: torch.Tensor) -> None:
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2)))
    locs = pyro.sample("locs", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
    with pyro.plate("data", data.shape[0]):
        choice = pyro.sample(
            "sequential_choice", dist.Categorical(weights), infer={"enumerate": "sequential"}
        )
        pyro.sample("x", dist.Normal(locs[choice], 1.0), obs=data)


def test_continuous_local_latent_is_refused_with_mcmc_em_suggested() -> None:
    data = torch.tensor([0.3, -1.0, 2.2])
    with pytest.raises(pyroem.NotSupportedError, match="local_shift") as error:
        pyroem.fit(continuous_local_latent, data, method="map-em")
    assert "mcmc-em" in str(error.value)


@pytest.mark.parametrize(
    ("model", "site", "error"),
    [
        (poisson_latent_count, "hidden_count", pyroem.NotSupportedError),
        (sequential_enumeration, "sequential_choice", pyroem.PyroEMError),
    ],
    ids=["unenumerable-poisson", "sequential"],
)
def test_discrete_latent_that_cannot_be_enumerated_is_refused(
    model: Callable[[torch.Tensor], None], site: str, error: type[Exception]
) -> None:
    data = torch.tensor([0.3, 1.0, 2.2])
    with pytest.raises(error, match=re.escape(site)):
        pyroem.fit(model, data, method="map-em")
