r"""A recognised mixture program's EM iterations run without running the program.

:class:`pyroem.estep.recognised_mixture.MixtureKernel` takes the E-step's tables
from the recognised parameter forms, and runs the program only to check itself at its
1st, 2nd, 4th, … E-step and at the last. Held against independent references:

- the Gaussian mixture program (multivariate with ``to_event(1)``, and univariate)
  fitted for 40 iterations runs the whole program at most a handful of times after its
  first iteration (once per iteration without the kernel), and its history and
  parameters are the declarative ``pyroem.Mixture``'s from the same start (1e-9), its
  log joint Pyro's ``-TraceEnum_ELBO`` at the fitted values (1e-9);
- the same program under ``poutine.mask`` or ``poutine.scale``, where the kernel
  refuses: the program runs every iteration, and the fit is the declarative one on the
  unmasked points (the mask) or on all of them (a common scale multiplies the log
  likelihood and leaves the maximum where it was);
- a program whose distributions leave the recognised form after some runs, or at the
  last run only: the check notices (the last one by fitting again), and the fit's log
  likelihood is Pyro's at the fitted values.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from torch.distributions import constraints

import pyroem

NUM_COMPONENTS = 3
ITERATIONS = 40


@pytest.fixture(autouse=True)
def _float64() -> Any:
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def _data(dim: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    centres = torch.tensor([[-3.0, 0.0], [0.0, 2.5], [3.0, -1.0]])[:, :dim]
    labels = torch.randint(NUM_COMPONENTS, (150,), generator=generator)
    scales = torch.tensor([0.6, 1.0, 0.8])[labels, None]
    return centres[labels] + scales * torch.randn(150, dim, generator=generator)


def _start(dim: int) -> dict[str, torch.Tensor]:
    return {
        "weights": torch.tensor([0.3, 0.3, 0.4]),
        "locs": torch.tensor([[-2.0, 0.5], [0.5, 1.5], [2.0, 0.0]])[:, :dim],
        "variances": torch.tensor([[1.0, 1.2], [0.8, 1.0], [1.5, 1.1]])[:, :dim],
    }


class _Counted:
    """A mixture program that counts its complete runs; ``dim=1`` draws a univariate
    ``Normal`` per point, else ``Normal(...).to_event(1)``. ``mask``/``scale`` wrap the
    data plate; ``shift_after`` moves every location by 0.5 from that run on (the
    program leaves the form it was recognised in)."""

    def __init__(
        self,
        dim: int,
        mask: torch.Tensor | None = None,
        scale: float | None = None,
        shift_after: int | None = None,
    ) -> None:
        self.start = _start(dim)
        self.dim, self.mask, self.scale, self.shift_after = dim, mask, scale, shift_after
        self.runs = 0

    def __call__(self, data: torch.Tensor) -> None:
        start = self.start
        weights = pyro.param(
            "weights", lambda: start["weights"].clone(), constraint=constraints.simplex
        )
        locs = pyro.param("locs", lambda: start["locs"].clone())
        variances = pyro.param(
            "variances", lambda: start["variances"].clone(), constraint=constraints.positive
        )
        shift = 0.5 if self.shift_after is not None and self.runs >= self.shift_after else 0.0
        masked = nullcontext() if self.mask is None else poutine.mask(mask=self.mask)
        scaled = nullcontext() if self.scale is None else poutine.scale(scale=self.scale)
        with pyro.plate("data", data.shape[0]), masked, scaled:
            z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
            if self.dim == 1:
                family = dist.Normal(locs[z, 0] + shift, variances[z, 0].sqrt())
                pyro.sample("obs", family, obs=data[:, 0])
            else:
                family = dist.Normal(locs[z] + shift, variances[z].sqrt())
                pyro.sample("obs", family.to_event(1), obs=data)
        self.runs += 1


def _fit(program: Callable[..., None], data: torch.Tensor, **options: Any) -> tuple[Any, int]:
    """The fit, and the program's complete runs after its first iteration."""
    runs_at_first: list[int] = []

    def callback(_: Any) -> None:
        if not runs_at_first:
            runs_at_first.append(program.runs)  # type: ignore[attr-defined]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(
            program,
            data,
            method="map-em",
            max_iter=ITERATIONS,
            tol=0.0,
            callback=callback,
            **options,
        )
    return fit, program.runs - runs_at_first[0]  # type: ignore[attr-defined]


def _declarative(data: torch.Tensor, dim: int) -> Any:
    start = _start(dim)
    spec = pyroem.Mixture(NUM_COMPONENTS, pyroem.Gaussian("diag", prior=None))
    init = {"weights": start["weights"], "means": start["locs"], "covariances": start["variances"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        return pyroem.fit(spec, data, init=init, max_iter=ITERATIONS, tol=0.0)


def _pyro_log_likelihood(program: Callable[..., None], fit: Any, data: torch.Tensor) -> float:
    """Pyro's ``-TraceEnum_ELBO`` of the program at the fitted values."""
    with pyro.get_param_store().scope():
        store = pyro.get_param_store()
        for name, value in fit.params.items():
            store[name] = torch.as_tensor(value).clone()
        return -TraceEnum_ELBO(max_plate_nesting=1).loss(program, lambda *_: None, data)


def _assert_declarative(fit: Any, other: Any, scale: float = 1.0) -> None:
    history = np.asarray(fit.history.log_likelihood) / scale
    assert history[-1] - history[0] > 5.0  # EM moved
    np.testing.assert_allclose(history, other.history.log_likelihood, rtol=1e-9, atol=0)
    for name, theirs in (("weights", "weights"), ("locs", "means"), ("variances", "covariances")):
        np.testing.assert_allclose(fit.params[name], other.params[theirs], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dim", [1, 2])
def test_mixture_program_iterates_without_running_the_program(dim: int) -> None:
    data = _data(dim)
    program = _Counted(dim)
    fit, later_runs = _fit(program, data)
    # Checks at the 1st, 2nd, 4th, 8th, 16th and 32nd E-step, and the last one's.
    assert later_runs <= 8 < ITERATIONS - 1
    _assert_declarative(fit, _declarative(data, dim))
    expected = _pyro_log_likelihood(program, fit, data)
    assert fit.log_likelihood() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("wrap", ["mask", "scale"])
def test_masked_or_scaled_mixture_program_runs_every_iteration(wrap: str) -> None:
    data = _data(2)
    if wrap == "mask":
        mask = torch.rand(data.shape[0], generator=torch.Generator().manual_seed(4)) > 0.25
        program = _Counted(2, mask=mask)
        kept, scale = data[mask], 1.0
    else:
        program = _Counted(2, scale=3.0)
        kept, scale = data, 3.0
    fit, later_runs = _fit(program, data)
    assert later_runs >= ITERATIONS - 1
    # The scale multiplies the log likelihood.
    _assert_declarative(fit, _declarative(kept, 2), scale)


def test_program_leaving_the_recognised_form_is_caught_by_the_check() -> None:
    data = _data(2)
    # Recognition and the first checks see the program in its recognised form; from
    # its 8th run on (7 runs before it: setup and checks) every location is shifted,
    # which the kernel alone would not see.
    program = _Counted(2, shift_after=7)
    fit, later_runs = _fit(program, data)
    # A check found the difference: from there on the program ran at every E-step.
    assert later_runs > 20
    expected = _pyro_log_likelihood(program, fit, data)
    assert fit.log_likelihood() == pytest.approx(expected, rel=1e-9)


def test_program_leaving_the_form_at_the_last_check_is_fitted_again() -> None:
    data = _data(2)
    unchanged = _Counted(2)
    _fit(unchanged, data)
    # Only the last run, the check of the last E-step, sees the shifted program: the fit
    # is made again with the program run at every E-step.
    program = _Counted(2, shift_after=unchanged.runs - 1)
    fit, later_runs = _fit(program, data)
    assert later_runs > ITERATIONS
    expected = _pyro_log_likelihood(program, fit, data)
    assert fit.log_likelihood() == pytest.approx(expected, rel=1e-9)


def _map_mixture(data: torch.Tensor) -> None:
    """The mixture with conjugate priors on its parameters (MAP)."""
    _map_mixture.runs += 1  # type: ignore[attr-defined]
    weights = pyro.sample("weights", dist.Dirichlet(torch.full((NUM_COMPONENTS,), 2.0)))
    with pyro.plate("components", NUM_COMPONENTS):
        locs = pyro.sample("locs", dist.Normal(torch.zeros(2), 3.0).to_event(1))
        variances = pyro.sample(
            "variances", dist.InverseGamma(torch.full((2,), 2.0), torch.ones(2)).to_event(1)
        )
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(locs[z], variances[z].sqrt()).to_event(1), obs=data)


def _numpy_map_sweeps(x: np.ndarray, start: dict[str, np.ndarray], sweeps: int) -> list[dict]:
    """MAP-ECM for :func:`_map_mixture` written out in NumPy: responsibilities, then the
    conjugate modes of the locations, the variances (about the new locations) and the
    weights, in that order."""
    weights, locs, variances = start["weights"], start["locs"], start["variances"]
    out = []
    for _ in range(sweeps):
        log = (
            np.log(weights)
            - 0.5 * np.log(2 * np.pi * variances).sum(-1)
            - 0.5 * (((x[:, None, :] - locs) ** 2) / variances).sum(-1)
        )
        top = log.max(1, keepdims=True)
        resp = np.exp(log - top)
        resp /= resp.sum(1, keepdims=True)
        counts = resp.sum(0)
        locs = (resp.T @ x / variances) / (counts[:, None] / variances + 1 / 9.0)
        squares = np.einsum("nk,nkd->kd", resp, (x[:, None, :] - locs) ** 2)
        variances = (1.0 + squares / 2) / (2.0 + 1 + counts[:, None] / 2)
        weights = (counts + 1.0) / (counts + 1.0).sum()
        out.append({"weights": weights, "locs": locs, "variances": variances})
    return out


def test_map_mixture_program_iterates_without_running_the_program() -> None:
    data = _data(2)
    start = _start(2)
    _map_mixture.runs = 0  # type: ignore[attr-defined]
    fit, later_runs = _fit(_map_mixture, data, init=start)
    assert later_runs <= 8 < ITERATIONS - 1
    x = data.numpy()
    expected = _numpy_map_sweeps(x, {k: v.numpy() for k, v in start.items()}, ITERATIONS)[-1]
    for name, value in expected.items():
        np.testing.assert_allclose(fit.params[name], value, rtol=1e-9, atol=1e-12)
    with pyro.get_param_store().scope():
        conditioned = poutine.condition(_map_mixture, data=dict(fit.params.items()))
        elbo = TraceEnum_ELBO(max_plate_nesting=1)
        log_joint = -elbo.loss(conditioned, lambda *_: None, data)
    assert fit.log_joint() == pytest.approx(log_joint, rel=1e-9)
