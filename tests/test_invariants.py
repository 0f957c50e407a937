r"""The EM invariants, swept over every engine × model case of one table.

``CASES`` is the one table of small model cases: ``Mixture`` specs of every family
and four Pyro programs (a GMM with an enumerated assignment, an HMM under
``pyro.markov``, a Student-t mixture whose ``pyro.param`` has no closed form so the
gradient M-step runs). Each case names the engines that apply to it; the sweep is
``(engine, case)`` over that table, and a combination the table does not list is not
generated. The invariants:

1. **Monotone objective** (deterministic engines: MAP-EM, streamed MAP-EM, CAVI): the
   history never decreases beyond floating-point rounding.
2. **Tight bound after an exact E-step**: MAP-EM's (in memory and streamed) reported
   log-likelihood (Mixture) or log joint (program) at the fitted parameters equals an
   independent computation
   (NumPy/SciPy log-sum-exp of the mixture density; Pyro's ``-TraceEnum_ELBO`` with a
   guide that samples nothing); CAVI's ELBO on a one-component conjugate model, where
   the variational family holds the exact posterior, equals the exact log evidence.
3. **Closed form = gradient optimum**: the gradient of the independent log joint at
   MAP-EM's fitted parameters vanishes (along the constraint's tangent space).

The noisy engines get only what is sound for them: SVI's final ELBO is not below its
starting ELBO by more than its Monte Carlo noise; MCMC-EM's parameter trace is finite
and, started at MAP-EM's optimum, its final log-likelihood stays at or below that
optimum and within the cost of its Monte Carlo noise; stepwise EM, started there too,
stays within its last step size of it. A gradient M-step started at MAP-EM's
closed-form optimum of a program finds no higher log joint.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate
from scipy import special, stats
from torch.distributions import biject_to, constraints

import pyroem

DTYPE = torch.float64

#: Relative round-off slack for "never decreases": one EM step sums O(N·K·D) float64
#: terms, each exact to ~1e-16 relative; the unperturbed runs here stall at steps of
#: at most ~5e-16 relative, while an M-step that misses its maximum by a 1e-4 relative
#: jitter of the weights already lowers the objective by ~3e-9 to 2e-8 relative.
MONOTONE_RTOL = 1e-10
#: The reported objective against an independent evaluation of the same density.
BOUND_RTOL = 1e-9
#: |∂ log p / ∂θ| · (1 + |θ|) relative to |log p|: at MAP-EM's tol=1e-12 stop it is
#: measured at ≤ 5e-12 (Mixtures) and ≤ 6e-8 (programs); moving the fitted locations or
#: rates by 1e-4 relative raises it above 1e-5.
GRADIENT_RTOL = 1e-5


# ----- the model programs ---------------------------------------------------------------

NUM_COMPONENTS = 2


def gmm_program(x: torch.Tensor) -> None:
    """A 1-D Gaussian mixture, the assignment enumerated; weights and locations MAP."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.full((NUM_COMPONENTS,), 2.0)))
    with pyro.plate("components", NUM_COMPONENTS):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)


def hmm_program(y: torch.Tensor) -> None:
    """A two-state HMM with Gaussian emissions, the chain under ``pyro.markov``."""
    transition = pyro.sample(
        "transition",
        dist.Dirichlet(torch.full((NUM_COMPONENTS, NUM_COMPONENTS), 2.0)).to_event(1),
    )
    with pyro.plate("states", NUM_COMPONENTS):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    state = 0
    for t in pyro.markov(range(len(y))):
        state = pyro.sample(
            f"z_{t}", dist.Categorical(transition[state]), infer={"enumerate": "parallel"}
        )
        pyro.sample(f"y_{t}", dist.Normal(locs[state], 1.0), obs=y[t])


def student_program(x: torch.Tensor) -> None:
    """A Student-t mixture: the shared ``scale`` param has no closed-form update."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.full((NUM_COMPONENTS,), 2.0)))
    with pyro.plate("components", NUM_COMPONENTS):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.StudentT(4.0, locs[z], scale), obs=x)


def _two_clusters(num_data: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.rand(num_data, generator=generator) < 0.4
    noise = torch.randn(num_data, generator=generator, dtype=DTYPE)
    return torch.where(labels, -2.0, 2.0).to(DTYPE) + noise


def _hmm_data(length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    state, values = 0, []
    for _ in range(length):
        if torch.rand((), generator=generator) < 0.2:
            state = 1 - state
        values.append(3.0 * state - 1.5 + float(torch.randn((), generator=generator)))
    return torch.tensor(values, dtype=DTYPE)


def _exact_poisson_log_evidence(data: np.ndarray, concentration: float, rate: float) -> float:
    """``log ∫ Π_n Poisson(x_n | λ) Gamma(λ | a, b) dλ`` per column, summed."""
    total, num_data = data.sum(0), len(data)
    per_column = (
        concentration * np.log(rate)
        - special.gammaln(concentration)
        + special.gammaln(concentration + total)
        - (concentration + total) * np.log(rate + num_data)
        - special.gammaln(data + 1).sum(0)
    )
    return float(per_column.sum())


def _exact_bernoulli_log_evidence(data: np.ndarray, ones: float, zeros: float) -> float:
    """``log ∫ Π_n Bernoulli(x_n | p) Beta(p | a, b) dp`` per column, summed."""
    successes = data.sum(0)
    failures = len(data) - successes
    per_column = special.betaln(ones + successes, zeros + failures) - special.betaln(ones, zeros)
    return float(per_column.sum())


def _exact_categorical_log_evidence(
    data: np.ndarray, concentration: float, num_categories: int
) -> float:
    """``log ∫ Π_n Categorical(x_n | π) Dirichlet(π | α) dπ`` per column, summed."""
    counts = np.stack([(data == c).sum(0) for c in range(num_categories)], -1)
    total = num_categories * concentration
    per_column = (
        special.gammaln(total)
        - special.gammaln(total + len(data))
        + (special.gammaln(concentration + counts) - special.gammaln(concentration)).sum(-1)
    )
    return float(per_column.sum())


# ----- the table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One model case: a Mixture spec (``spec``) or a Pyro program (``program``)."""

    name: str
    engines: tuple[str, ...]
    data: Callable[[], torch.Tensor]
    spec: Callable[[], pyroem.Mixture] | None = None
    program: Callable[..., None] | None = None
    family: str = ""
    covariance_type: str | None = None
    #: The exact log evidence ``log p(x)``, where the variational family holds the
    #: exact posterior (one component, conjugate prior).
    log_evidence: Callable[[np.ndarray], float] | None = None


def _mixture_data(
    spec: Callable[[], pyroem.Mixture], num_data: int, dim: int, seed: int = 1
) -> Callable:
    return lambda: spec().simulate(num_data, seed=seed, dim=dim)[0].to(DTYPE)


def _flat(family: str, num_components: int, **options: Any) -> Callable[[], pyroem.Mixture]:
    return lambda: pyroem.Mixture(num_components, family, prior=None, **options)


#: Engines: "map-em", "streamed" (MAP-EM over a .npy file), "cavi" (vb-em on a Mixture),
#: "svi" (vb-em on a program), "mcmc-em", "stepwise".
MIXTURE_ENGINES = ("map-em", "streamed", "mcmc-em", "stepwise")

CASES: list[Case] = [
    *(
        Case(
            f"gaussian-{ct}",
            MIXTURE_ENGINES,
            _mixture_data(_flat("gaussian", 2, covariance_type=ct), 100, 2),
            spec=_flat("gaussian", 2, covariance_type=ct),
            family="gaussian",
            covariance_type=ct,
        )
        for ct in ("full", "diag", "spherical", "tied")
    ),
    Case(
        "poisson",
        MIXTURE_ENGINES,
        _mixture_data(_flat("poisson", 2), 120, 3),
        spec=_flat("poisson", 2),
        family="poisson",
    ),
    Case(
        "bernoulli",
        MIXTURE_ENGINES,
        # A seed whose maximum is interior (seed 1 gives a one-point component at p = 0/1).
        _mixture_data(_flat("bernoulli", 2), 150, 4, seed=3),
        spec=_flat("bernoulli", 2),
        family="bernoulli",
    ),
    Case(
        "categorical",
        MIXTURE_ENGINES,
        _mixture_data(_flat("categorical", 3, num_categories=3), 150, 2),
        spec=_flat("categorical", 3, num_categories=3),
        family="categorical",
    ),
    # CAVI needs a conjugate prior: the default ones.
    *(
        Case(
            f"gaussian-{ct}-default-prior",
            ("cavi",),
            _mixture_data(lambda ct=ct: pyroem.Mixture(2, covariance_type=ct), 80, 2),
            spec=lambda ct=ct: pyroem.Mixture(2, covariance_type=ct),
            family="gaussian",
            covariance_type=ct,
        )
        for ct in ("full", "diag", "spherical", "tied")
    ),
    *(
        Case(
            f"{family.name}-one-component",
            ("cavi",),
            _mixture_data(lambda family=family: pyroem.Mixture(1, family), 60, 3),
            spec=lambda family=family: pyroem.Mixture(1, family),
            family=family.name,
            log_evidence=evidence,
        )
        for family, evidence in (
            (
                pyroem.Poisson(prior=pyroem.Gamma(2.0, 0.5)),
                lambda x: _exact_poisson_log_evidence(x, 2.0, 0.5),
            ),
            (
                pyroem.Bernoulli(prior=pyroem.Beta(2.0, 3.0)),
                lambda x: _exact_bernoulli_log_evidence(x, 2.0, 3.0),
            ),
            (
                pyroem.Categorical(num_categories=3, prior=pyroem.Dirichlet(1.5)),
                lambda x: _exact_categorical_log_evidence(x, 1.5, 3),
            ),
        )
    ),
    Case(
        "gmm-program",
        ("map-em", "svi", "mcmc-em"),
        lambda: _two_clusters(80, 0),
        program=gmm_program,
    ),
    Case(
        "hmm-program", ("map-em", "svi", "mcmc-em"), lambda: _hmm_data(30, 0), program=hmm_program
    ),
    Case(
        "student-program",
        ("map-em", "svi", "mcmc-em"),
        lambda: _two_clusters(80, 1),
        program=student_program,
    ),
]
CASES_BY_NAME = {case.name: case for case in CASES}


def _sweep(*engines: str) -> list[Any]:
    return [
        pytest.param(engine, case.name, id=f"{engine}-{case.name}")
        for case in CASES
        for engine in engines
        if engine in case.engines
    ]


def _quiet_fit(*args: Any, **options: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pyroem.fit(*args, **options)


def _fit(engine: str, case: Case, tmp_path: Path) -> Any:
    torch.set_default_dtype(DTYPE)
    data = case.data()
    model = case.spec() if case.spec is not None else case.program
    exact = {"seed": 0, "tol": 1e-12, "max_iter": 3000}
    if engine == "map-em":
        return _quiet_fit(model, data, **exact)
    if engine == "streamed":
        path = tmp_path / "data.npy"
        np.save(path, data.numpy())
        return _quiet_fit(model, str(path), chunk_size=32, **exact)
    if engine == "cavi":
        return _quiet_fit(model, data, method="vb-em", **exact)
    raise AssertionError(f"no plain fit for engine {engine}")


def _is_monotone(objective: np.ndarray) -> bool:
    slack = MONOTONE_RTOL * np.abs(objective[:-1])
    return bool((np.diff(objective) >= -slack).all())


# ----- 1. monotone objective ------------------------------------------------------------


@pytest.mark.parametrize(("engine", "name"), _sweep("map-em", "streamed", "cavi"))
def test_objective_never_decreases(engine: str, name: str, tmp_path: Path) -> None:
    fit = _fit(engine, CASES_BY_NAME[name], tmp_path)
    objective = np.asarray(fit.history.objective, dtype=float)
    assert len(objective) >= 2 and np.isfinite(objective).all()
    assert _is_monotone(objective), np.diff(objective).min()


# ----- 2. tight bound after an exact E-step ---------------------------------------------


def _scipy_component_log_prob(case: Case, data: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """``log p(x_n | θ_k)``, ``(num_data, K)``, by SciPy."""
    p = {name: value.detach().numpy() for name, value in params.items()}
    num_components = len(p["weights"])
    columns = []
    for k in range(num_components):
        if case.family == "gaussian":
            covariances = p["covariances"]
            if case.covariance_type == "full":
                covariance = covariances[k]
            elif case.covariance_type == "tied":
                covariance = covariances
            elif case.covariance_type == "diag":
                covariance = np.diag(covariances[k])
            else:
                covariance = covariances[k] * np.eye(data.shape[1])
            columns.append(stats.multivariate_normal(p["means"][k], covariance).logpdf(data))
        elif case.family == "poisson":
            columns.append(stats.poisson(p["rates"][k]).logpmf(data).sum(-1))
        elif case.family == "bernoulli":
            columns.append(stats.bernoulli(p["probs"][k]).logpmf(data).sum(-1))
        else:
            probs = p["probs"][k]  # (D, C)
            index = data.astype(int)
            with np.errstate(divide="ignore"):  # a category a component never emits
                columns.append(np.log(np.take_along_axis(probs.T, index, 0)).sum(-1))
    return np.stack(columns, -1)


def _empty_guide(*args: Any) -> None:
    """A guide that samples nothing: every latent is observed or enumerated."""


def pyro_log_joint(program: Callable[..., None], values: dict[str, torch.Tensor], *args: Any):
    """``log p(x, θ)`` by Pyro's own enumeration: ``-TraceEnum_ELBO`` loss at ``θ``."""
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    enumerated = config_enumerate(program, default="parallel")
    conditioned = poutine.condition(poutine.substitute(enumerated, data=values), data=values)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*did not find params")
        if not any(value.requires_grad for value in values.values()):
            return torch.tensor(-elbo.loss(conditioned, _empty_guide, *args))
        return -elbo.differentiable_loss(conditioned, _empty_guide, *args)


@pytest.mark.parametrize(("engine", "name"), _sweep("map-em", "streamed"))
def test_bound_is_tight_after_an_exact_e_step(engine: str, name: str, tmp_path: Path) -> None:
    """The objective MAP-EM reports at its final parameters is the exact one."""
    case = CASES_BY_NAME[name]
    fit = _fit(engine, case, tmp_path)
    data = case.data()
    if case.spec is not None:
        table = _scipy_component_log_prob(case, data.numpy(), fit.params)
        log_weights = np.log(fit.params["weights"].numpy())
        expected = float(special.logsumexp(table + log_weights, axis=-1).sum())
        assert fit.log_likelihood() == pytest.approx(expected, rel=BOUND_RTOL)
        # No component prior; the weights' Dirichlet(1) has density Γ(K) on the simplex.
        weights_prior = stats.dirichlet(np.ones(len(log_weights))).logpdf(np.exp(log_weights))
        expected = expected + float(weights_prior)
        assert fit.log_joint() == pytest.approx(expected, rel=BOUND_RTOL)
    else:
        expected = float(pyro_log_joint(case.program, dict(fit.params), data))
        assert fit.log_joint() == pytest.approx(expected, rel=BOUND_RTOL)
    assert float(fit.history.objective[-1]) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize(
    ("engine", "name"), [p for p in _sweep("cavi") if CASES_BY_NAME[p.values[1]].log_evidence]
)
def test_cavi_elbo_is_the_log_evidence_when_q_can_be_exact(
    engine: str, name: str, tmp_path: Path
) -> None:
    """One component, conjugate prior: q(θ) is the exact posterior, so the
    ELBO = log p(x) − KL(q‖p(θ|x)) = log p(x)."""
    case = CASES_BY_NAME[name]
    assert case.log_evidence is not None
    fit = _fit(engine, case, tmp_path)
    expected = case.log_evidence(case.data().numpy())
    assert float(fit.history.objective[-1]) == pytest.approx(expected, rel=BOUND_RTOL)


# ----- 3. closed form = gradient optimum ------------------------------------------------


def _mixture_log_likelihood(case: Case, data: torch.Tensor, params: dict[str, torch.Tensor]):
    """The mixture log-likelihood from torch densities (differentiable in ``params``)."""
    points = data[:, None, :]
    if case.family == "gaussian":
        means, covariances = params["means"], params["covariances"]
        if case.covariance_type in ("full", "tied"):
            sym = (covariances + covariances.transpose(-1, -2)) / 2
            table = torch.distributions.MultivariateNormal(means, sym).log_prob(points)
        else:
            variances = covariances if case.covariance_type == "diag" else covariances[:, None]
            table = torch.distributions.Normal(means, variances.sqrt()).log_prob(points).sum(-1)
    elif case.family == "poisson":
        table = torch.distributions.Poisson(params["rates"]).log_prob(points).sum(-1)
    elif case.family == "bernoulli":
        table = torch.distributions.Bernoulli(probs=params["probs"]).log_prob(points).sum(-1)
    else:
        table = torch.distributions.Categorical(probs=params["probs"]).log_prob(points.long())
        table = table.sum(-1)
    return torch.logsumexp(table + params["weights"].log(), -1).sum()


def _mixture_gradient(case: Case, data: torch.Tensor, params: dict[str, torch.Tensor]):
    """Gradient along the constraints: simplex rows lose their mean (the tangent space);
    probabilities at the boundary (a valid maximum there) are left out."""
    leaves = {name: value.detach().clone().requires_grad_() for name, value in params.items()}
    _mixture_log_likelihood(case, data, leaves).backward()
    out = {}
    for name, leaf in leaves.items():
        grad, value = leaf.grad, leaf.detach()
        if name in ("weights", "probs"):
            live = (value > 1e-8) & (value < 1 - 1e-8)
            grad = torch.where(live, grad, 0.0)
            if name == "weights" or case.family == "categorical":
                # Lagrange condition: equal partial derivatives over the live entries.
                mean = grad.sum(-1, keepdim=True) / live.sum(-1, keepdim=True).clamp(min=1)
                grad = torch.where(live, grad - mean, 0.0)
        out[name] = grad * (1 + value.abs())
    return out


def _program_gradient(case: Case, data: torch.Tensor, fit: Any) -> dict[str, torch.Tensor]:
    """Gradient of Pyro's log joint in each parameter's unconstrained coordinates (zero at
    an interior optimum of the constrained objective, by the chain rule)."""
    assert fit.options["space"] == "constrained"
    trace = poutine.trace(config_enumerate(case.program, default="parallel")).get_trace(data)
    transforms = {}
    for name in fit.params:
        site = trace.nodes[name]
        support = site["fn"].support if site["type"] == "sample" else site["kwargs"]["constraint"]
        transforms[name] = biject_to(support)
    leaves = {
        name: transforms[name].inv(value.detach()).requires_grad_()
        for name, value in fit.params.items()
    }
    values = {name: transforms[name](u) for name, u in leaves.items()}
    pyro.clear_param_store()
    pyro_log_joint(case.program, values, data).backward()
    return {name: u.grad for name, u in leaves.items()}


@pytest.mark.parametrize(("engine", "name"), _sweep("map-em", "streamed"))
def test_closed_form_is_the_gradient_optimum(engine: str, name: str, tmp_path: Path) -> None:
    case = CASES_BY_NAME[name]
    fit = _fit(engine, case, tmp_path)
    data = case.data()
    if case.spec is not None:
        gradient = _mixture_gradient(case, data, fit.params)
    else:
        gradient = _program_gradient(case, data, fit)
    scale = abs(fit.log_joint())
    for param, grad in gradient.items():
        assert float(grad.abs().max()) <= GRADIENT_RTOL * scale, (param, grad)


# ----- the noisy engines: only what is sound --------------------------------------------


@pytest.mark.parametrize(("engine", "name"), _sweep("svi"))
def test_svi_improves_beyond_its_monte_carlo_noise(engine: str, name: str) -> None:
    """SVI's ELBO is a one-draw estimate: single steps may go down, so monotonicity is not
    checked, and from a good start the gain can be smaller than the noise. Sound: the
    mean of the last window is not below the ELBO at the start (one draw, with the
    window's spread as its noise) by more than three standard errors of the difference."""
    torch.set_default_dtype(DTYPE)
    case = CASES_BY_NAME[name]
    fit = _quiet_fit(
        case.program, case.data(), method="vb-em", seed=0, max_iter=300, learning_rate=0.05
    )
    objective = np.asarray(fit.history.objective, dtype=float)
    assert np.isfinite(objective).all()
    window = 30
    last = objective[-window:]
    standard_error = math.sqrt(last.var(ddof=1) * (1 + 1 / window))
    assert last.mean() - objective[0] >= -3 * standard_error


@pytest.mark.parametrize(("engine", "name"), _sweep("mcmc-em"))
def test_mcmc_em_stays_at_the_map_em_optimum(engine: str, name: str, tmp_path: Path) -> None:
    """Started at MAP-EM's optimum, SAEM's trace is finite and its final log joint cannot
    exceed that local maximum (beyond round-off, plus three of its reported standard
    errors); its Monte Carlo M-step moves the parameters by O(1/√(S·N)), which costs
    O(p/S) in log joint for p free parameters and S draws per iteration: below p."""
    case = CASES_BY_NAME[name]
    reference = _fit("map-em", case, tmp_path)
    model = case.spec() if case.spec is not None else case.program
    fit = _quiet_fit(
        model,
        case.data(),
        method="mcmc-em",
        seed=0,
        init=dict(reference.params),
        max_iter=5,
        num_samples=50,
    )
    assert np.isfinite(np.asarray(fit.history.objective, dtype=float)).all()
    for value in fit.params.values():
        assert bool(torch.isfinite(value).all())
    best = reference.log_joint()
    slack = 1e-9 * abs(best) + 3 * fit.log_likelihood_se
    assert fit.log_joint() <= best + slack
    num_free = sum(value.numel() for value in reference.params.values())
    assert fit.log_joint() >= best - num_free


STEPWISE = {"batch_size": 25, "passes": 50, "kappa": 0.7}


@pytest.mark.parametrize(("engine", "name"), _sweep("stepwise"))
def test_stepwise_stays_within_its_step_size_of_batch(
    engine: str, name: str, tmp_path: Path
) -> None:
    """Stepwise EM's objective is a minibatch estimate, so it is not checked for
    monotonicity. Started at the batch maximum, it cannot climb above that local maximum
    (beyond round-off), and its last step size γ_T = (T + 2)^(−κ) bounds how far its
    averaged statistics sit from the batch ones: the log-likelihood it loses is below
    γ_T per free parameter."""
    case = CASES_BY_NAME[name]
    reference = _fit("map-em", case, tmp_path)
    data = case.data()
    fit = _quiet_fit(
        case.spec(), data, stepwise=True, init=reference.params, seed=0, tol=1e-12, **STEPWISE
    )
    updates = STEPWISE["passes"] * math.ceil(len(data) / STEPWISE["batch_size"])
    last_step = (updates + 2) ** -STEPWISE["kappa"]
    best = reference.log_likelihood()
    assert fit.log_likelihood() <= best + 1e-9 * abs(best)
    assert best - fit.log_likelihood() <= reference.num_parameters * last_step


@pytest.mark.parametrize(("engine", "name"), [p for p in _sweep("map-em") if "program" in p.id])
def test_gradient_m_step_cannot_improve_the_closed_form_optimum(
    engine: str, name: str, tmp_path: Path
) -> None:
    """The same program fitted with ``m_step="gradient"`` from MAP-EM's fitted point: an
    optimiser of Pyro's log joint finds no higher value (1e-8 relative: what the
    closed-form run's tol=1e-12 stopping leaves, with room for the optimiser's rounding)."""
    case = CASES_BY_NAME[name]
    closed_form = _fit(engine, case, tmp_path)
    gradient = _quiet_fit(
        case.program,
        case.data(),
        m_step="gradient",
        init=dict(closed_form.params),
        seed=0,
        tol=1e-12,
        max_iter=50,
    )
    assert gradient.options["m_step"] == "gradient"
    best = closed_form.log_joint()
    assert gradient.log_joint() - best <= 1e-8 * abs(best)
