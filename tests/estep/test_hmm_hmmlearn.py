"""Hidden Markov models written as Pyro programs, fitted by pyroem, agree with hmmlearn.

hmmlearn is an independent implementation (forward-backward in C, closed-form
Baum-Welch M-steps). The programs are those of ``models/hmm.py``: a ``pyro.plate``
over sequences, a ``pyro.markov`` loop over time, ``poutine.mask`` over the padding
of shorter sequences. The tests check, in float64:

- each program's log likelihood, computed by Pyro's ``TraceEnum_ELBO`` and by
  pyroem's E-step, equals hmmlearn's ``score`` at the same parameters;
- pyroem's posterior state marginals equal hmmlearn's ``predict_proba``;
- from the same start, pyroem's EM (``pyro.param`` sites: maximum likelihood) and
  hmmlearn's Baum-Welch (priors switched off) give the same log likelihood after
  every iteration and the same parameters at the end, and the objective never
  decreases;
- the same holds for MAP-EM under the conjugate priors and hmmlearn's MAP under the
  same priors (hmmlearn's Dirichlet, Normal-mean and covariance priors, mapped onto
  ``gaussian_prior``'s hyperparameters), and for a Poisson HMM on the discoveries.
"""

from __future__ import annotations

import runpy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hmmlearn.hmm import GaussianHMM, PoissonHMM

import pyroem
from pyroem.estep.program import posterior
from pyroem.model.program import ProgramModel

HMM = runpy.run_path(str(Path(__file__).resolve().parents[2] / "models" / "hmm.py"), run_name="hmm")
NUM_STATES = 3
LENGTHS = torch.tensor([40, 25, 33, 18])
TRUTH = {
    "init_probs": torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
    "transition_probs": torch.tensor(
        [[0.90, 0.07, 0.03], [0.10, 0.80, 0.10], [0.05, 0.15, 0.80]], dtype=torch.float64
    ),
    "locs": torch.tensor([[-2.0, 1.0], [0.0, 0.0], [2.5, -1.0]], dtype=torch.float64),
    "variances": torch.tensor([[0.5, 1.0], [0.3, 0.2], [1.0, 0.5]], dtype=torch.float64),
}
# A start away from the truth, so that EM has some way to go.
START = {
    "init_probs": torch.tensor([0.4, 0.35, 0.25], dtype=torch.float64),
    "transition_probs": torch.tensor(
        [[0.6, 0.2, 0.2], [0.25, 0.5, 0.25], [0.3, 0.3, 0.4]], dtype=torch.float64
    ),
    "locs": torch.tensor([[-1.0, 0.5], [0.2, 0.2], [1.0, 0.0]], dtype=torch.float64),
    "variances": torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]], dtype=torch.float64),
}
NUM_ITERATIONS = 12


@pytest.fixture(scope="module")
def sequences() -> torch.Tensor:
    """Four two-dimensional sequences of lengths 40, 25, 33 and 18, zero-padded."""
    simulated, _ = HMM["simulate_gaussian_hmm"](LENGTHS, **TRUTH, seed=1)
    return simulated


def _concatenated(sequences: torch.Tensor, lengths: torch.Tensor) -> np.ndarray:
    """The observed steps, sequence after sequence: hmmlearn's ``X``, ``(sum(lengths), D)``."""
    mask = np.arange(sequences.shape[1]) < lengths.numpy()[:, None]
    return sequences.numpy()[mask]


def _select(params: dict[str, torch.Tensor], dim: int) -> dict[str, torch.Tensor]:
    """The parameters of the first ``dim`` features."""
    return {
        name: value[:, :dim] if name in ("locs", "variances") else value
        for name, value in params.items()
    }


def _gaussian_reference(params: dict[str, torch.Tensor], **options: Any) -> GaussianHMM:
    """hmmlearn's diagonal Gaussian HMM at ``params``; by default its M-step is the plain
    MLE (no prior on the means or the variances, no variance floor, Dirichlet(1) rows)."""
    settings = {
        "min_covar": 0.0,
        "startprob_prior": 1.0,
        "transmat_prior": 1.0,
        "means_prior": 0.0,
        "means_weight": 0.0,
        "covars_prior": 0.0,
        "covars_weight": 1.0,  # enters as max(covars_weight - 1, 0): no pseudo-count
        "tol": -np.inf,  # run every iteration asked for
        **options,
    }
    reference = GaussianHMM(NUM_STATES, covariance_type="diag", init_params="", **settings)
    reference.startprob_ = params["init_probs"].numpy().copy()
    reference.transmat_ = params["transition_probs"].numpy().copy()
    reference.means_ = params["locs"].numpy().copy()
    reference.covars_ = params["variances"].numpy().copy()
    return reference


def _reference_params(reference: GaussianHMM) -> dict[str, np.ndarray]:
    """hmmlearn's parameters under the program's site names."""
    return {
        "init_probs": reference.startprob_,
        "transition_probs": reference.transmat_,
        "locs": reference.means_,
        "variances": np.diagonal(reference.covars_, axis1=1, axis2=2),
    }


def _fit(model: Any, *args: Any, **options: Any) -> Any:
    """``pyroem.fit`` with the warning for stopping at ``max_iter`` silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        return pyroem.fit(model, *args, **options)


@pytest.mark.parametrize("dim", [1, 2])
def test_gaussian_hmm_log_likelihood_equals_hmmlearn_score(
    sequences: torch.Tensor, dim: int
) -> None:
    data = sequences[..., :dim]
    params = _select(TRUTH, dim)
    expected = _gaussian_reference(params).score(_concatenated(data, LENGTHS), LENGTHS.numpy())
    args = (data, LENGTHS, NUM_STATES)
    pyro_value = HMM["log_joint"](HMM["gaussian_hmm"], params, *args)
    assert pyro_value == pytest.approx(expected, rel=1e-12)
    engine = posterior(ProgramModel(HMM["gaussian_hmm"], args, {"priors": "flat"}), params)
    assert float(engine.log_likelihood) == pytest.approx(expected, rel=1e-12)


def test_conjugate_log_joint_is_log_likelihood_plus_log_prior(sequences: torch.Tensor) -> None:
    """With priors, pyroem's log joint is hmmlearn's log likelihood plus the log prior
    computed here by hand from the hyperparameters."""
    args = (sequences, LENGTHS, NUM_STATES)
    prior = HMM["gaussian_prior"](*args)
    variances, locs = TRUTH["variances"], TRUTH["locs"]
    dirichlet = torch.distributions.Dirichlet(prior["dirichlet_concentration"].expand(NUM_STATES))
    log_prior = (
        dirichlet.log_prob(TRUTH["init_probs"])
        + dirichlet.log_prob(TRUTH["transition_probs"]).sum()
        + torch.distributions.InverseGamma(prior["variance_concentration"], prior["variance_rate"])
        .log_prob(variances)
        .sum()
        + torch.distributions.Normal(
            prior["prior_mean"], (variances / prior["mean_precision"]).sqrt()
        )
        .log_prob(locs)
        .sum()
    )
    score = _gaussian_reference(TRUTH).score(_concatenated(sequences, LENGTHS), LENGTHS.numpy())
    program = ProgramModel(HMM["gaussian_hmm"], args, {"priors": "conjugate"})
    engine = posterior(program, TRUTH)
    assert float(engine.log_likelihood) == pytest.approx(score, rel=1e-12)
    assert float(engine.log_joint) == pytest.approx(score + float(log_prior), rel=1e-12)


@pytest.mark.parametrize("params", ["truth", "start"])
def test_posterior_marginals_equal_hmmlearn_predict_proba(
    sequences: torch.Tensor, params: str
) -> None:
    values = TRUTH if params == "truth" else START
    args = (sequences, LENGTHS, NUM_STATES)
    engine = posterior(ProgramModel(HMM["gaussian_hmm"], args, {"priors": "flat"}), values)
    marginals = torch.stack(
        [engine.marginals[f"state_{t}"] for t in range(sequences.shape[1])], dim=1
    )
    assert marginals.shape == (len(LENGTHS), sequences.shape[1], NUM_STATES)
    observed = HMM["observed_mask"](LENGTHS, sequences.shape[1])
    expected = _gaussian_reference(values).predict_proba(
        _concatenated(sequences, LENGTHS), LENGTHS.numpy()
    )
    np.testing.assert_allclose(marginals[observed].numpy(), expected, rtol=1e-8, atol=1e-12)


def _hmmlearn_priors(priors: str, sequences: torch.Tensor) -> dict[str, Any]:
    """hmmlearn's settings for the program's priors.

    ``"flat"``: none (plain MLE). ``"conjugate"``: hmmlearn's diagonal-covariance MAP is
    the joint mode of a Normal-Inverse-Gamma prior, with ``means_weight`` the mean
    precision, ``covars_prior = 2·rate`` and ``covars_weight = 2·concentration + 4``;
    ``startprob_prior`` and ``transmat_prior`` are the Dirichlet concentrations.
    """
    if priors == "flat":
        return {}
    prior = HMM["gaussian_prior"](sequences, LENGTHS, NUM_STATES)
    return {
        "startprob_prior": float(prior["dirichlet_concentration"]),
        "transmat_prior": float(prior["dirichlet_concentration"]),
        "means_prior": prior["prior_mean"].numpy(),
        "means_weight": float(prior["mean_precision"]),
        "covars_prior": 2 * prior["variance_rate"].numpy(),
        "covars_weight": 2 * float(prior["variance_concentration"]) + 4,
    }


@pytest.mark.parametrize("priors", ["flat", "conjugate"])
def test_gaussian_hmm_em_matches_hmmlearn_iteration_by_iteration(
    sequences: torch.Tensor, priors: str
) -> None:
    """From the same start, the same log likelihood after every one of 12 iterations and
    the same parameters after the last: maximum likelihood with ``pyro.param`` sites, MAP
    with the conjugate priors."""
    fit = _fit(
        HMM["gaussian_hmm"],
        sequences,
        LENGTHS,
        NUM_STATES,
        model_kwargs={"priors": priors},
        init=START,
        max_iter=NUM_ITERATIONS,
        tol=0.0,
    )
    assert fit.num_iterations == NUM_ITERATIONS
    assert set(fit.m_step_kinds) == set(START)
    assert "gradient" not in fit.m_step_kinds.values()

    X = _concatenated(sequences, LENGTHS)
    reference = _gaussian_reference(
        START, n_iter=NUM_ITERATIONS, **_hmmlearn_priors(priors, sequences)
    )
    reference.fit(X, LENGTHS.numpy())
    # hmmlearn records log p(X | θ_t) before each M-step, t = 0..n_iter-1; score gives θ_n.
    expected = [*reference.monitor_.history, reference.score(X, LENGTHS.numpy())]
    assert len(expected) == NUM_ITERATIONS + 1
    assert expected[-1] - expected[0] > 10.0  # EM moved: the comparison is not trivial
    np.testing.assert_allclose(fit.history.log_likelihood, expected, rtol=1e-8, atol=0)
    for name, value in _reference_params(reference).items():
        np.testing.assert_allclose(fit.params[name].numpy(), value, rtol=1e-6, atol=1e-9)

    # The fit's marginals come from the E-step at its final parameters.
    marginals = torch.stack([fit.marginals[f"state_{t}"] for t in range(sequences.shape[1])], dim=1)
    observed = HMM["observed_mask"](LENGTHS, sequences.shape[1])
    np.testing.assert_allclose(
        marginals[observed].numpy(),
        reference.predict_proba(X, LENGTHS.numpy()),
        rtol=1e-6,
        atol=1e-9,
    )

    objective = np.asarray(fit.history.objective)
    assert np.all(np.diff(objective) >= -1e-12 * np.abs(objective[1:]))
    if priors == "flat":
        np.testing.assert_allclose(objective, expected, rtol=1e-8, atol=0)


POISSON_START = {
    "init_probs": torch.tensor([0.5, 0.5], dtype=torch.float64),
    "transition_probs": torch.tensor([[0.7, 0.3], [0.4, 0.6]], dtype=torch.float64),
    "rates": torch.tensor([[2.0], [3.5]], dtype=torch.float64),
}


def _discoveries() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The discoveries series cut into two sequences, 1860-1914 and 1915-1959, padded."""
    counts = pyroem.datasets.load_discoveries().data[:, 0]
    lengths = torch.tensor([55, 45])
    padded = torch.zeros(2, 55, dtype=torch.float64)
    padded[0] = counts[:55]
    padded[1, :45] = counts[55:]
    return padded, lengths, counts.numpy().astype(np.int64)[:, None]


def _poisson_reference(params: dict[str, torch.Tensor], **options: Any) -> PoissonHMM:
    """hmmlearn's Poisson HMM at ``params``, with its priors switched off (plain MLE)."""
    reference = PoissonHMM(2, init_params="", tol=-np.inf, **options)
    reference.startprob_ = params["init_probs"].numpy().copy()
    reference.transmat_ = params["transition_probs"].numpy().copy()
    reference.lambdas_ = params["rates"].numpy().copy()
    return reference


@pytest.mark.parametrize("priors", ["flat", "conjugate"])
def test_poisson_hmm_log_likelihood_equals_hmmlearn_score(priors: str) -> None:
    padded, lengths, counts = _discoveries()
    expected = _poisson_reference(POISSON_START).score(counts, lengths.numpy())
    args = (padded, lengths, 2)
    pyro_value = HMM["log_joint"](HMM["poisson_hmm"], POISSON_START, *args, priors="flat")
    assert pyro_value == pytest.approx(expected, rel=1e-12)
    program = ProgramModel(HMM["poisson_hmm"], args, {"priors": priors})
    assert float(posterior(program, POISSON_START).log_likelihood) == pytest.approx(
        expected, rel=1e-12
    )


def test_poisson_hmm_em_matches_hmmlearn_iteration_by_iteration() -> None:
    padded, lengths, counts = _discoveries()
    fit = _fit(
        HMM["poisson_hmm"],
        padded,
        lengths,
        2,
        model_kwargs={"priors": "flat"},
        init=POISSON_START,
        max_iter=NUM_ITERATIONS,
        tol=0.0,
    )
    assert fit.num_iterations == NUM_ITERATIONS
    reference = _poisson_reference(POISSON_START, n_iter=NUM_ITERATIONS)
    reference.fit(counts, lengths.numpy())
    expected = [*reference.monitor_.history, reference.score(counts, lengths.numpy())]
    assert expected[-1] - expected[0] > 1.0
    np.testing.assert_allclose(fit.history.log_likelihood, expected, rtol=1e-8, atol=0)
    np.testing.assert_allclose(fit.params["init_probs"].numpy(), reference.startprob_, rtol=1e-6)
    np.testing.assert_allclose(
        fit.params["transition_probs"].numpy(), reference.transmat_, rtol=1e-6
    )
    np.testing.assert_allclose(fit.params["rates"].numpy(), reference.lambdas_, rtol=1e-6)
