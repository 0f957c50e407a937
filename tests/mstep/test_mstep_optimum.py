r"""The closed-form M-step equals the numerical maximiser of the expected log joint.

For random data and random responsibilities ``R`` the expected complete-data log
joint

.. math::
    Q(θ) = \sum_{nk} R_{nk} [\log π_k + \log p(x_n | θ_k)] + \log \mathrm{Dir}(π | α) + \log p(θ)

is written here independently with ``torch.distributions`` densities (and
``pyroem.InverseWishart``, checked against SciPy in ``test_inverse_wishart.py``),
with every default prior resolved from its documentation. L-BFGS maximises it in
an unconstrained parameterisation from a start away from the closed form, and
pyroem's mixture M-step must reach at least the same ``Q`` at the same parameters.
"""

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributions as td
from reference_densities import component_log_prob, log_prior, weak_gaussian_prior
from scipy.optimize import minimize

import pyroem
from pyroem.model.mixture import MixtureParams
from pyroem.mstep.mixture import mixture_m_step

DTYPE = torch.float64
NUM_DATA, DIM, NUM_COMPONENTS, NUM_CATEGORIES = 60, 2, 3, 3
# Entries below, at and above 1; N_k + α_k − 1 > 0 for every component here.
WEIGHTS_PRIOR = [0.5, 1.0, 3.0]

CASES = {
    "gaussian-full": ("gaussian", "full"),
    "gaussian-diag": ("gaussian", "diag"),
    "gaussian-spherical": ("gaussian", "spherical"),
    "gaussian-tied": ("gaussian", "tied"),
    "poisson": ("poisson", None),
    "exponential": ("exponential", None),
    "bernoulli": ("bernoulli", None),
    "categorical": ("categorical", None),
}

_NIW_SCALE = [[1.5, 0.4], [0.4, 0.8]]
EXPLICIT_PRIORS = {
    "gaussian": pyroem.NormalInverseWishart(
        mean=[0.5, -1.0], mean_precision=0.5, dof=DIM + 3, scale=_NIW_SCALE
    ),
    "poisson": pyroem.Gamma(2.0, 0.5),
    "exponential": pyroem.Gamma(2.0, 0.5),
    "bernoulli": pyroem.Beta(2.0, 3.0),
    "categorical": pyroem.Dirichlet(1.5),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The problems here are tiny: thread hand-offs would cost more than the algebra."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----- data ---------------------------------------------------------------------


def _data(family: str, generator: torch.Generator) -> torch.Tensor:
    """Small random data in the family's support, ``(NUM_DATA, DIM)``."""
    shape = (NUM_DATA, DIM)
    if family == "gaussian":
        mixing = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=DTYPE)
        return torch.randn(shape, generator=generator, dtype=DTYPE) @ mixing * 2 + 3.0
    if family == "poisson":
        rates = 1 + 9 * torch.rand(shape, generator=generator, dtype=DTYPE)
        return torch.poisson(rates, generator=generator)
    if family == "exponential":
        return -torch.rand(shape, generator=generator, dtype=DTYPE).log() * 2.5
    if family == "bernoulli":
        return (torch.rand(shape, generator=generator, dtype=DTYPE) < 0.4).to(DTYPE)
    codes = torch.randint(NUM_CATEGORIES, shape, generator=generator).to(DTYPE)
    codes[:NUM_CATEGORIES] = torch.arange(NUM_CATEGORIES, dtype=DTYPE)[:, None]
    return codes


def _responsibilities(generator: torch.Generator) -> torch.Tensor:
    """Random soft responsibilities, rows on the simplex, ``(NUM_DATA, NUM_COMPONENTS)``."""
    raw = -torch.rand(NUM_DATA, NUM_COMPONENTS, generator=generator, dtype=DTYPE).log()
    return raw / raw.sum(1, keepdim=True)


# ----- the reference prior (defaults resolved from the documentation) -----------


def _reference_prior(
    family: str, prior: Any, data: torch.Tensor, covariance_type: str | None = None
) -> dict[str, Any] | None:
    """The prior's numbers: explicit ones as given, defaults as documented."""
    if prior is None:
        return None
    mean = data.mean(0)
    if family == "gaussian" and prior == "default":
        assert covariance_type is not None
        return weak_gaussian_prior(covariance_type, data, NUM_COMPONENTS)
    if family == "gaussian":
        niw = pyroem.NormalInverseWishart() if prior == "mclust" else prior
        if niw.scale is None:
            scale = torch.cov(data.T) / NUM_COMPONENTS ** (2 / DIM)
        else:
            scale = torch.tensor(niw.scale, dtype=DTYPE)
        return {
            "mean": mean if niw.mean is None else torch.tensor(niw.mean, dtype=DTYPE),
            "kappa": niw.mean_precision,
            "dof": DIM + 2.0 if niw.dof is None else float(niw.dof),
            "scale": scale,
        }
    if family in ("poisson", "exponential"):
        if prior == "default" and family == "poisson":
            return {"concentration": 1 + 0.1 * mean, "rate": torch.full_like(mean, 0.1)}
        if prior == "default":
            return {"concentration": torch.full_like(mean, 1.1), "rate": 0.1 * mean}
        return {"concentration": prior.concentration, "rate": prior.rate}
    if family == "bernoulli":
        if prior == "default":
            return {"concentration1": 1.1, "concentration0": 1.1}
        return {"concentration1": prior.concentration1, "concentration0": prior.concentration0}
    concentration = 1.1 if prior == "default" else prior.concentration
    return {"concentration": torch.as_tensor(concentration, dtype=DTYPE).expand(NUM_CATEGORIES)}


def _expected_log_joint(
    case: str,
    data: torch.Tensor,
    resp: torch.Tensor,
    weights_prior: torch.Tensor,
    prior: dict[str, Any] | None,
    params: dict[str, Any],
) -> torch.Tensor:
    """``Q(θ) = Σ_nk R_nk [log π_k + log p(x_n|θ_k)] + log Dir(π|α) + log p(θ)``."""
    family, covariance_type = CASES[case]
    log_joint = params["weights"].log() + component_log_prob(family, covariance_type, data, params)
    total = (resp * log_joint).sum() + td.Dirichlet(weights_prior).log_prob(params["weights"])
    if prior is not None:
        total = total + log_prior(family, covariance_type, prior, params)
    return total


# ----- unconstrained parameterisation and the numerical optimum ------------------


def _simplex(free: torch.Tensor) -> torch.Tensor:
    """Softmax of ``free`` with a zero logit appended (last dim grows by one)."""
    return torch.cat([free, free.new_zeros((*free.shape[:-1], 1))], -1).softmax(-1)


def _spd(free: torch.Tensor, dim: int) -> torch.Tensor:
    """``L Lᵀ`` from a Cholesky factor with log-diagonal, ``free`` ``(..., dim(dim+1)/2)``."""
    rows, cols = torch.tril_indices(dim, dim)
    flat = free.new_zeros((*free.shape[:-1], dim * dim))
    lower = flat.index_copy(-1, rows * dim + cols, free).unflatten(-1, (dim, dim))
    diagonal = lower.diagonal(dim1=-2, dim2=-1)
    lower = lower - torch.diag_embed(diagonal) + torch.diag_embed(diagonal.exp())
    return lower @ lower.mT


def _unconstrained_shapes(case: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the free parameters of ``case`` (weights first)."""
    family, covariance_type = CASES[case]
    k, d = NUM_COMPONENTS, DIM
    shapes: dict[str, tuple[int, ...]] = {"weights": (k - 1,)}
    if family == "gaussian":
        shapes["means"] = (k, d)
        shapes["covariances"] = {
            "full": (k, d * (d + 1) // 2),
            "tied": (d * (d + 1) // 2,),
            "diag": (k, d),
            "spherical": (k,),
        }[covariance_type]
    elif family in ("poisson", "exponential"):
        shapes["rates"] = (k, d)
    elif family == "bernoulli":
        shapes["probs"] = (k, d)
    else:
        shapes["probs"] = (k, d, NUM_CATEGORIES - 1)
    return shapes


def _constrain(case: str, free: torch.Tensor) -> dict[str, torch.Tensor]:
    """Map the flat free vector to constrained parameters in ``fit.params`` form."""
    family, covariance_type = CASES[case]
    values = {}
    offset = 0
    for name, shape in _unconstrained_shapes(case).items():
        size = math.prod(shape)
        values[name] = free[offset : offset + size].reshape(shape)
        offset += size
    params = {"weights": _simplex(values["weights"])}
    if family == "gaussian":
        params["means"] = values["means"]
        if covariance_type in ("full", "tied"):
            params["covariances"] = _spd(values["covariances"], DIM)
        else:
            params["covariances"] = values["covariances"].exp()
    elif family in ("poisson", "exponential"):
        params["rates"] = values["rates"].exp()
    elif family == "bernoulli":
        params["probs"] = values["probs"].sigmoid()
    else:
        params["probs"] = _simplex(values["probs"])
    return params


def _numerical_optimum(objective: Any, case: str, generator: torch.Generator) -> torch.Tensor:
    """Maximise ``objective(params)`` with L-BFGS over the unconstrained parameters."""
    size = sum(math.prod(shape) for shape in _unconstrained_shapes(case).values())
    start = 0.3 * torch.randn(size, generator=generator, dtype=DTYPE)

    def negative(free: np.ndarray) -> tuple[float, np.ndarray]:
        point = torch.from_numpy(free).requires_grad_()
        value = -objective(_constrain(case, point)) / NUM_DATA
        (gradient,) = torch.autograd.grad(value, point)
        return value.item(), gradient.numpy()

    result = minimize(
        negative,
        start.numpy(),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 50_000, "maxfun": 100_000, "maxcor": 30, "ftol": 1e-15, "gtol": 1e-10},
    )
    gradient_norm = float(np.abs(negative(result.x)[1]).max())
    assert gradient_norm < 1e-7, (result.message, gradient_norm)
    return torch.from_numpy(result.x)


def _closed_form(
    case: str, data: torch.Tensor, resp: torch.Tensor, weights_prior: Any, prior: Any
) -> dict[str, torch.Tensor]:
    """pyroem's mixture M-step from the statistics of ``resp``."""
    family_name, covariance_type = CASES[case]
    spec = pyroem.Mixture(
        NUM_COMPONENTS,
        family=family_name,
        covariance_type=covariance_type,
        weights_prior=weights_prior,
        prior=prior,
    )
    family = spec.bind(data)
    stats = family.statistics(family.prepare(data), resp)
    uniform = torch.full((NUM_COMPONENTS,), 1 / NUM_COMPONENTS, dtype=DTYPE)
    current = MixtureParams(uniform, None, torch.arange(NUM_COMPONENTS))
    updated = mixture_m_step(family, spec.weights_prior, stats, current)
    assert updated.active.tolist() == list(range(NUM_COMPONENTS))
    return {"weights": updated.weights, **family.to_user(updated.components)}


def _check_optimum(case: str, prior: Any, weights_prior: Any, seed: int) -> None:
    family, covariance_type = CASES[case]
    generator = torch.Generator().manual_seed(seed)
    data = _data(family, generator)
    resp = _responsibilities(generator)
    reference_prior = _reference_prior(family, prior, data, covariance_type)
    alpha = torch.as_tensor(weights_prior, dtype=DTYPE).expand(NUM_COMPONENTS)

    def objective(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return _expected_log_joint(case, data, resp, alpha, reference_prior, params)

    numerical = _constrain(case, _numerical_optimum(objective, case, generator))
    closed = _closed_form(case, data, resp, weights_prior, prior)
    assert closed.keys() == numerical.keys()
    q_closed, q_numerical = float(objective(closed)), float(objective(numerical))
    assert q_closed >= q_numerical - 1e-10 * (1 + abs(q_numerical)), (q_closed, q_numerical)
    for name, value in closed.items():
        torch.testing.assert_close(value, numerical[name].detach(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("prior_kind", ["default", "explicit", "flat"])
@pytest.mark.parametrize("case", list(CASES))
def test_closed_form_is_the_optimum(case: str, prior_kind: str) -> None:
    family, _ = CASES[case]
    prior = {"default": "default", "explicit": EXPLICIT_PRIORS[family], "flat": None}[prior_kind]
    _check_optimum(case, prior, WEIGHTS_PRIOR, seed=1)


@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical", "tied"])
def test_closed_form_is_the_optimum_under_the_mclust_prior(covariance_type: str) -> None:
    _check_optimum(f"gaussian-{covariance_type}", "mclust", WEIGHTS_PRIOR, seed=1)


@pytest.mark.parametrize("weights_prior", [0.6, 1.0, 2.5])
def test_weights_mode_for_scalar_weights_prior(weights_prior: float) -> None:
    _check_optimum("gaussian-diag", "mclust", weights_prior, seed=2)


@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical", "tied"])
def test_flat_prior_on_means(covariance_type: str) -> None:
    """``mean_precision=0`` leaves the means flat and only the covariances regularised."""
    prior = pyroem.NormalInverseWishart(mean_precision=0.0, dof=DIM + 1.5, scale=_NIW_SCALE)
    _check_optimum(f"gaussian-{covariance_type}", prior, 1.0, seed=3)


def test_flat_weights_keep_a_nearly_empty_component() -> None:
    """With ``α = 1`` the weights are the proportions ``N_k / N`` exactly, however small
    ``N_k``: a live component is never rounded away."""
    generator = torch.Generator().manual_seed(5)
    data = _data("poisson", generator)
    resp = _responsibilities(generator)
    resp[:, 2] = 1e-19
    resp = resp / resp.sum(1, keepdim=True)
    closed = _closed_form("poisson", data, resp, 1.0, "default")
    torch.testing.assert_close(closed["weights"], resp.sum(0) / NUM_DATA, rtol=1e-12, atol=0)


def test_collapsed_component_is_removed() -> None:
    """With ``α_k < 1`` a component that holds almost no data has ``N_k + α_k − 1 < 0``:
    the log joint is unbounded at ``π_k = 0``, so the component is removed and EM goes on."""
    generator = torch.Generator().manual_seed(4)
    left = torch.randn(80, DIM, generator=generator, dtype=DTYPE) - 3
    right = torch.randn(70, DIM, generator=generator, dtype=DTYPE) + 3
    data = torch.cat([left, right])
    eye = torch.eye(DIM, dtype=DTYPE)
    init = {
        "weights": torch.tensor([0.45, 0.45, 0.10], dtype=DTYPE),
        "means": torch.tensor([[-1.0, 0.0], [1.0, 0.0], [40.0, -40.0]], dtype=DTYPE),
        "covariances": torch.stack([eye, eye, eye]),
    }
    spec = pyroem.Mixture(3, family="gaussian", covariance_type="full", weights_prior=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pyroem.ConvergenceWarning)
        with pytest.warns(pyroem.CollapsedComponentWarning, match=r"component\(s\) \[2\]"):
            fit = pyroem.fit(spec, data, init=init, tol=1e-10)
    assert fit.removed_components == [2]
    assert fit.num_components == 2
    weights = fit.params["weights"]
    assert weights.shape == (2,)
    assert math.isclose(float(weights.sum()), 1.0, rel_tol=1e-12)
    assert fit.params["means"].shape == (2, DIM)
    assert fit.predict_proba(data).shape == (data.shape[0], 2)
    assert fit.converged and fit.num_iterations > 3
    objective = fit.history.objective
    assert np.isfinite(objective).all()
    # From θ_1 on EM runs on the two remaining components: monotone again.
    assert (np.diff(objective[1:]) >= -1e-9 * (1 + np.abs(objective[1:-1]))).all()
    centres = fit.params["means"][fit.params["means"][:, 0].argsort()]
    torch.testing.assert_close(
        centres, torch.stack([left.mean(0), right.mean(0)]), atol=0.05, rtol=0
    )
