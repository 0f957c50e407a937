"""MAP-EM on a ``pyro.markov`` HMM runs the program's loop only a few steps per E-step.

Once the first trace and a second complete run show every step of the chain to be
the same distribution (``pyroem.estep.compiled.Replication``), an E-step runs the
program only as far as the first site of every stack of tables and computes the rest
in batched tensor code. The tests count the loop steps the program's own Python
executes, and hold the fits to independent references:

- a Gaussian HMM (maximum likelihood, ``pyro.param`` sites, two sequences of different
  lengths, masked padding): after the first two E-steps, each iteration runs at most
  three steps of the loop (the full program runs all of them); the log likelihood
  after every iteration equals hmmlearn's Baum-Welch from the same start, the fitted
  parameters and state marginals hmmlearn's, the final log likelihood Pyro's
  ``TraceEnum_ELBO``; and every number equals the fit that reruns the whole program;
- programs whose steps are not replicas — a drift in time that is zero at the start,
  or a shift of the last step only that is zero at the start (equal steps on the first
  trace, told apart by the complete probe run), a time-varying covariate (told apart
  on the first trace) — run the whole program every time and give the numbers of that
  path;
- a program that catches exceptions inside its loop is stopped all the same, and the
  Pyro handler stack is left empty;
- the setup runs the whole program twice (sorting the sites on the first, enumerated
  trace, and the first closed-form probe, counted by the program itself); the other
  probes run the loop's first steps.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hmmlearn.hmm import GaussianHMM
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from pyro.poutine.runtime import _PYRO_STACK
from torch.distributions import constraints

import pyroem
from tests.engines.test_pyro_examples import capture_history, pyro_log_joint, survival_by_period

compiled_module = importlib.import_module("pyroem.estep.compiled")

NUM_STATES = 3
LENGTHS = torch.tensor([70, 52])
START = {
    "init_probs": torch.tensor([0.4, 0.35, 0.25], dtype=torch.float64),
    "transition_probs": torch.tensor(
        [[0.6, 0.2, 0.2], [0.25, 0.5, 0.25], [0.3, 0.3, 0.4]], dtype=torch.float64
    ),
    "locs": torch.tensor([-1.0, 0.2, 1.0], dtype=torch.float64),
    "variances": torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64),
}
NUM_ITERATIONS = 10


@pytest.fixture(autouse=True)
def _float64() -> None:
    torch.set_default_dtype(torch.float64)


def _sequences() -> torch.Tensor:
    """Two sequences from a three-state Gaussian HMM, zero-padded to 70 steps."""
    generator = torch.Generator().manual_seed(3)
    transition = torch.tensor([[0.9, 0.07, 0.03], [0.1, 0.8, 0.1], [0.05, 0.15, 0.8]])
    locs, scales = torch.tensor([-2.0, 0.0, 2.5]), torch.tensor([0.7, 0.5, 1.0])
    out = torch.zeros(len(LENGTHS), int(LENGTHS.max()), dtype=torch.float64)
    for s, length in enumerate(LENGTHS.tolist()):
        state = 0
        for t in range(length):
            state = int(torch.multinomial(transition[state], 1, generator=generator))
            out[s, t] = locs[state] + scales[state] * torch.randn((), generator=generator)
    return out


class Counter:
    """Counts the loop steps a program executes, and its complete runs."""

    def __init__(self) -> None:
        self.steps = 0
        self.runs = 0


def counted_hmm(
    counter: Counter, drift: bool = False, covariate: bool = False, late: bool = False
) -> Callable:
    """A Gaussian HMM over padded sequences with ``pyro.param`` parameters, counting
    its loop steps and its complete runs (``counter.runs``); ``drift`` adds
    ``drift · t`` to the means (a parameter, 0 at the start), ``covariate`` adds a fixed
    ``0.01 · t``, ``late`` adds ``drift`` to the means of the last step only."""

    def model(sequences: torch.Tensor, lengths: torch.Tensor) -> None:
        num_sequences, max_length = sequences.shape
        init_probs = pyro.param(
            "init_probs", lambda: START["init_probs"].clone(), constraint=constraints.simplex
        )
        transition_probs = pyro.param(
            "transition_probs",
            lambda: START["transition_probs"].clone(),
            constraint=constraints.simplex,
        )
        locs = pyro.param("locs", lambda: START["locs"].clone())
        variances = pyro.param(
            "variances", lambda: START["variances"].clone(), constraint=constraints.positive
        )
        slope = pyro.param("drift", torch.tensor(0.0)) if drift or late else None
        with pyro.plate("sequences", num_sequences):
            state = None
            for t in pyro.markov(range(max_length)):
                counter.steps += 1
                probs = init_probs if state is None else transition_probs[state]
                loc = locs[state] if state is not None else None
                with poutine.mask(mask=t < lengths):
                    state = pyro.sample(
                        f"state_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"}
                    )
                    loc = locs[state]
                    if drift:
                        loc = loc + slope * t
                    if late and t == max_length - 1:
                        loc = loc + slope
                    if covariate:
                        loc = loc + 0.01 * t
                    pyro.sample(
                        f"obs_{t}", dist.Normal(loc, variances[state].sqrt()), obs=sequences[:, t]
                    )
        counter.runs += 1

    return model


def _fit(
    model: Callable,
    sequences: torch.Tensor,
    steps: list[int],
    counter: Counter,
    iterations: int = NUM_ITERATIONS,
) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        return pyroem.fit(
            model,
            sequences,
            LENGTHS,
            method="map-em",
            max_iter=iterations,
            tol=0.0,
            seed=0,
            callback=lambda _: steps.append(counter.steps),
        )


def _fit_both(
    monkeypatch: pytest.MonkeyPatch, iterations: int = NUM_ITERATIONS, **options: bool
) -> tuple[Any, list[int], Any, list[int], torch.Tensor]:
    """The fit with replication on, and with it off; the loop steps counted after every
    iteration of each."""
    sequences = _sequences()
    fits = []
    for replicated in (True, False):
        monkeypatch.setattr(compiled_module, "_REPLICATED", replicated)
        counter, steps = Counter(), []
        model = counted_hmm(counter, **options)
        fits.append((_fit(model, sequences, steps, counter, iterations), steps))
    (fast, fast_steps), (full, full_steps) = fits
    return fast, fast_steps, full, full_steps, sequences


def _same_fit(actual: Any, expected: Any) -> None:
    np.testing.assert_allclose(actual.history.objective, expected.history.objective, rtol=1e-12)
    for name, value in expected.params.items():
        torch.testing.assert_close(actual.params[name], value, rtol=1e-10, atol=1e-12)
    for name, value in expected.marginals.items():
        torch.testing.assert_close(actual.marginals[name], value, rtol=1e-10, atol=1e-12)


def _concatenated(sequences: torch.Tensor) -> np.ndarray:
    mask = np.arange(sequences.shape[1]) < LENGTHS.numpy()[:, None]
    return sequences.numpy()[mask][:, None]


def test_replicated_chain_runs_few_steps_and_matches_hmmlearn_and_pyro(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fast, fast_steps, full, full_steps, sequences = _fit_both(monkeypatch)
    max_length = int(LENGTHS.max())
    # Iterations 3.. run only the first steps of the loop; the full path runs all.
    per_iteration = np.diff(fast_steps)[2:]
    assert per_iteration.max() <= 3, per_iteration
    assert np.all(np.diff(full_steps) == max_length)
    assert not _PYRO_STACK
    _same_fit(fast, full)

    X = _concatenated(sequences)
    reference = _hmmlearn_fit(sequences, NUM_ITERATIONS)
    expected = [*reference.monitor_.history, reference.score(X, LENGTHS.numpy())]
    assert expected[-1] - expected[0] > 10.0  # EM moved
    np.testing.assert_allclose(fast.history.log_likelihood, expected, rtol=1e-9, atol=0)
    np.testing.assert_allclose(fast.params["locs"].numpy(), reference.means_[:, 0], rtol=1e-7)
    np.testing.assert_allclose(
        fast.params["transition_probs"].numpy(), reference.transmat_, rtol=1e-7, atol=1e-10
    )
    marginals = torch.stack([fast.marginals[f"state_{t}"] for t in range(max_length)], dim=1)
    observed = torch.arange(max_length) < LENGTHS.unsqueeze(-1)
    np.testing.assert_allclose(
        marginals[observed].numpy(), reference.predict_proba(X, LENGTHS.numpy()), atol=1e-9
    )

    # Pyro's own TraceEnum_ELBO at the fitted parameters: the log likelihood.
    model = counted_hmm(Counter())
    with pyro.get_param_store().scope():
        fixed = poutine.substitute(model, data=fast.params)
        elbo = TraceEnum_ELBO(max_plate_nesting=1)
        log_likelihood = -elbo.loss(fixed, lambda *_, **__: None, sequences, LENGTHS)
    assert fast.log_likelihood() == pytest.approx(log_likelihood, rel=1e-9)


def _hmmlearn_fit(sequences: torch.Tensor, iterations: int) -> GaussianHMM:
    """hmmlearn's Baum-Welch from ``START``, ``iterations`` iterations, no priors."""
    reference = GaussianHMM(
        NUM_STATES,
        covariance_type="diag",
        init_params="",
        n_iter=iterations,
        tol=-np.inf,
        min_covar=0.0,
        means_weight=0.0,
        covars_prior=0.0,
        covars_weight=1.0,
    )
    reference.startprob_ = START["init_probs"].numpy().copy()
    reference.transmat_ = START["transition_probs"].numpy().copy()
    reference.means_ = START["locs"].numpy()[:, None].copy()
    reference.covars_ = START["variances"].numpy()[:, None].copy()
    reference.fit(_concatenated(sequences), LENGTHS.numpy())
    return reference


def _hmmlearn_history(sequences: torch.Tensor, iterations: int) -> list[float]:
    """hmmlearn's log likelihood before every iteration and after the last."""
    reference = _hmmlearn_fit(sequences, iterations)
    return [*reference.monitor_.history, reference.score(_concatenated(sequences), LENGTHS.numpy())]


def test_setup_runs_the_whole_program_twice() -> None:
    # Sorting the sites on the first (enumerated) trace, and the first closed-form probe,
    # which also checks the steps repeat at other values; the other probes and the first
    # iteration run the loop's first steps only.
    counter, steps = Counter(), []
    runs: list[int] = []
    sequences = _sequences()

    def callback(_: Any) -> None:
        steps.append(counter.steps)
        runs.append(counter.runs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(
            counted_hmm(counter),
            sequences,
            LENGTHS,
            method="map-em",
            max_iter=3,
            tol=0.0,
            seed=0,
            callback=callback,
        )
    max_length = int(LENGTHS.max())
    assert runs == [2, 2, 2], runs
    assert steps[0] <= 2 * max_length + 12, steps
    # Every block still found in closed form from the probed first steps.
    assert "gradient" not in fit.m_step_kinds.values(), fit.m_step_kinds
    expected = _hmmlearn_history(sequences, 3)
    np.testing.assert_allclose(fit.history.log_likelihood, expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("option", ["drift", "covariate", "late"])
def test_steps_that_differ_run_the_whole_program(
    monkeypatch: pytest.MonkeyPatch, option: str
) -> None:
    # Few iterations: the drift gets gradient M-steps, each running the program often.
    fast, fast_steps, full, full_steps, _ = _fit_both(monkeypatch, 3, **{option: True})
    max_length = int(LENGTHS.max())
    # Whole runs only (several per iteration where a gradient M-step moves the drift).
    assert np.all(np.diff(fast_steps) % max_length == 0)
    assert fast_steps == full_steps
    _same_fit(fast, full)
    # The decision, read on the first trace: replicas (drift 0 there) or not.
    monkeypatch.setattr(compiled_module, "_REPLICATED", True)
    program = pyroem.model.program.ProgramModel(
        counted_hmm(Counter(), **{option: True}), (_sequences(), LENGTHS)
    )
    values = {name: value.detach() for name, value in program.param_inits.items()}
    layout = compiled_module.CompiledProgram(program, program.trace(values))
    replication = layout.replication
    if option in ("drift", "late"):
        assert replication is not None and not replication.failed
        moved = {**values, "drift": torch.tensor(0.5)}
        assert layout.runner.run(moved) is not None
        assert replication.failed and not replication.active
    else:
        assert replication is None


def test_program_that_catches_exceptions_is_stopped_after_its_prefix() -> None:
    counter = Counter()
    inner = counted_hmm(counter)
    caught = []

    def model(sequences: torch.Tensor, lengths: torch.Tensor) -> None:
        try:
            inner(sequences, lengths)
        except Exception as err:  # a careless program
            caught.append(err)

    sequences = _sequences()
    steps: list[int] = []
    fit = _fit(model, sequences, steps, counter)
    assert not caught
    assert not _PYRO_STACK
    assert np.diff(steps)[2:].max() <= 3
    reference = _fit(counted_hmm(Counter()), sequences, [], Counter())
    _same_fit(fit, reference)


def test_steps_reading_equal_parameters_are_not_taken_for_repeats() -> None:
    # Pyro's cjs model_2 form: a survival probability phi_t per period. Started with every
    # phi_t equal, the loop's steps have equal distributions on the first trace and at any
    # value where the phi_t agree, yet they read different parameters: the chain must not
    # be run from its first steps. The fit is checked against Pyro's own log joint.
    torch.set_default_dtype(torch.float64)
    history = capture_history(4)
    start = {"rho": torch.tensor(0.5), **{f"phi_{t}": torch.tensor(0.5) for t in (1, 2, 3)}}
    for max_iter in (1, 50):
        fit = pyroem.fit(survival_by_period, history, init=dict(start), max_iter=max_iter)
        values = {name: value.detach().clone() for name, value in fit.params.items()}
        expected = float(pyro_log_joint(survival_by_period, values, 1, history))
        assert fit.log_joint() == pytest.approx(expected, rel=1e-9)
        assert fit.history.objective[-1] == pytest.approx(expected, rel=1e-9)
