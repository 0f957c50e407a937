"""Stepwise EM on Pyro programs whose data plate subsamples reaches the batch EM optimum
(scikit-learn's for a Gaussian mixture, hmmlearn's for an HMM over sequences), reports
the exact objective over all the data after each pass, and refuses what it cannot fit."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from hmmlearn.hmm import GaussianHMM
from scipy.special import logsumexp
from scipy.stats import norm
from sklearn.mixture import GaussianMixture
from torch.distributions import constraints

import pyroem
from pyroem.engines.stepwise import step_size
from pyroem.errors import NotSupportedError, SpecError
from tests.engines.test_pyro_examples import pyro_log_joint

KAPPA = 0.7


def mixture(data: torch.Tensor, batch: int | None = None) -> None:
    """A three-component Gaussian mixture with maximum-likelihood parameters, its data
    plate subsampled ``batch`` points at a time."""
    weights = pyro.param("weights", torch.ones(3) / 3, constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-3.0, 1.0, 3.0]))
    variances = pyro.param("variances", torch.ones(3), constraint=constraints.positive)
    with pyro.plate("data", len(data), subsample_size=batch) as index:
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("x", dist.Normal(locs[z], variances[z].sqrt()), obs=data[index])


def _mixture_data(num: int) -> torch.Tensor:
    rng = np.random.default_rng(3)
    labels = rng.choice(3, size=num, p=[0.3, 0.3, 0.4])
    return torch.tensor(np.array([-6.0, 0.0, 6.0])[labels] + rng.normal(size=num))


def _mixture_log_likelihood(data: np.ndarray, params: dict[str, torch.Tensor]) -> float:
    """log p(x | θ) by SciPy."""
    weights, locs, variances = (params[name].numpy() for name in ("weights", "locs", "variances"))
    terms = np.log(weights) + norm.logpdf(data[:, None], locs, np.sqrt(variances))
    return float(logsumexp(terms, axis=1).sum())


def full_plate_mixture(data: torch.Tensor) -> None:
    """:func:`mixture` with a plate that does not subsample, its data indexed by it."""
    weights = pyro.param("weights", torch.ones(3) / 3, constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-3.0, 1.0, 3.0]))
    variances = pyro.param("variances", torch.ones(3), constraint=constraints.positive)
    with pyro.plate("data", len(data)) as index:
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("x", dist.Normal(locs[z], variances[z].sqrt()), obs=data[index])


def unindexed_mixture(data: torch.Tensor) -> None:
    """:func:`full_plate_mixture` observing all the data whatever the plate's indices."""
    weights = pyro.param("weights", torch.ones(3) / 3, constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-3.0, 1.0, 3.0]))
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("x", dist.Normal(locs[z], 1.0), obs=data)


@pytest.mark.parametrize("route", ["subsample_size", "batch_size"])
def test_mixture_program_stepwise_reaches_scikit_learn_optimum(route: str) -> None:
    r"""Three passes (b = 100 of N = 4050 points, κ = 0.7) reach scikit-learn's batch EM
    optimum within the noise the schedule leaves; every pass's objective is the exact
    log-likelihood over all N points (the last subsample of each pass is short: 50).
    The program's plate subsamples (``subsample_size``), or pyroem minibatches a plate
    that does not (``batch_size``).

    The tolerance is that of tests/engines/test_stepwise.py, derived there: the running
    statistics near the optimum are an AR(1) recursion with stationary variance
    (γ_t / 2) Var ξ; the reported average of the iterates of passes 2 and 3 has
    γ_t ≤ γ_{t0}, t0 = N / b; 5 standard deviations of the minibatch noise of a mean
    (σ² / (b π_k)), a weight (π_k (1 − π_k) / b) and a variance (2σ⁴ / (b π_k)) at
    π_min = 0.3, σ = 1.
    """
    torch.set_default_dtype(torch.float64)
    data = _mixture_data(4050)
    batch = 100
    if route == "subsample_size":
        fit = pyroem.fit(
            mixture, data, model_kwargs={"batch": batch}, seed=0, stepwise=True, passes=3
        )
    else:
        fit = pyroem.fit(
            full_plate_mixture, data, seed=0, stepwise=True, batch_size=batch, passes=3
        )
    assert fit.options["stepwise"] and fit.options["subsampled_plate"] == "data"
    assert fit.options["batch_size"] == batch
    gmm = GaussianMixture(3, reg_covar=0.0, tol=1e-12, max_iter=1000, random_state=0)
    gmm.fit(data.numpy()[:, None])
    theirs = np.argsort(gmm.means_[:, 0])
    ours = np.argsort(fit.params["locs"].numpy())

    gamma = step_size(len(data) // batch, KAPPA)
    pi_min = 0.3
    mean_tol = 5 * math.sqrt(gamma / 2 / (batch * pi_min))
    weight_tol = 5 * math.sqrt(gamma / 2 * pi_min * (1 - pi_min) / batch)
    variance_tol = 5 * math.sqrt(gamma / 2 * 2 / (batch * pi_min))
    np.testing.assert_allclose(
        fit.params["locs"].numpy()[ours], gmm.means_[theirs, 0], rtol=0, atol=mean_tol
    )
    np.testing.assert_allclose(
        fit.params["weights"].numpy()[ours], gmm.weights_[theirs], rtol=0, atol=weight_tol
    )
    np.testing.assert_allclose(
        fit.params["variances"].numpy()[ours],
        gmm.covariances_[theirs, 0, 0],
        rtol=0,
        atol=variance_tol,
    )
    # One exact objective per pass, after the start's.
    objective = fit.history.objective
    assert len(objective) == 4
    expected = _mixture_log_likelihood(data.numpy(), fit.params)
    assert objective[-1] == pytest.approx(expected, rel=1e-10)
    assert fit.log_likelihood() == pytest.approx(expected, rel=1e-10)
    best = _mixture_log_likelihood(
        data.numpy(),
        {
            "weights": torch.tensor(gmm.weights_),
            "locs": torch.tensor(gmm.means_[:, 0]),
            "variances": torch.tensor(gmm.covariances_[:, 0, 0]),
        },
    )
    assert expected <= best + 1e-9
    # The posterior marginals cover every point, in the data's order.
    labels = ours.argsort()[fit.marginals["z"].argmax(-1).numpy()]
    expected_labels = theirs.argsort()[gmm.predict(data.numpy()[:, None])]
    assert np.mean(labels == expected_labels) > 0.99


START = {
    "init_probs": torch.tensor([0.5, 0.5], dtype=torch.float64),
    "transition_probs": torch.tensor([[0.6, 0.4], [0.4, 0.6]], dtype=torch.float64),
    "locs": torch.tensor([-1.0, 1.0], dtype=torch.float64),
    "variances": torch.tensor([2.0, 2.0], dtype=torch.float64),
}


def hmm(sequences: torch.Tensor, batch: int | None = None) -> None:
    """A two-state Gaussian HMM over equally long sequences, the sequences plate
    subsampled ``batch`` sequences at a time."""
    start = {name: value.clone() for name, value in START.items()}
    init = pyro.param("init_probs", start["init_probs"], constraint=constraints.simplex)
    transitions = pyro.param(
        "transition_probs", start["transition_probs"], constraint=constraints.simplex
    )
    locs = pyro.param("locs", start["locs"])
    variances = pyro.param("variances", start["variances"], constraint=constraints.positive)
    with pyro.plate("sequences", sequences.shape[0], subsample_size=batch) as index:
        state = None
        for t in pyro.markov(range(sequences.shape[1])):
            probs = init if state is None else transitions[state]
            state = pyro.sample(f"x_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
            pyro.sample(
                f"y_{t}", dist.Normal(locs[state], variances[state].sqrt()), obs=sequences[index, t]
            )


def _hmm_data(num: int, length: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    transitions = np.array([[0.8, 0.2], [0.3, 0.7]])
    states = np.zeros((num, length), dtype=int)
    states[:, 0] = rng.choice(2, size=num, p=[0.6, 0.4])
    for t in range(1, length):
        states[:, t] = rng.random(num) > transitions[states[:, t - 1], 0]
    return np.array([-3.0, 3.0])[states] + rng.normal(size=(num, length))


def _hmmlearn(params: dict[str, torch.Tensor], **options: float) -> GaussianHMM:
    """hmmlearn's Gaussian HMM at ``params``, its M-step the plain MLE."""
    reference = GaussianHMM(
        2,
        covariance_type="diag",
        init_params="",
        min_covar=0.0,
        startprob_prior=1.0,
        transmat_prior=1.0,
        means_prior=0.0,
        means_weight=0.0,
        covars_prior=0.0,
        covars_weight=1.0,
        **options,  # type: ignore[arg-type]
    )
    reference.startprob_ = params["init_probs"].numpy().copy()
    reference.transmat_ = params["transition_probs"].numpy().copy()
    reference.means_ = params["locs"].numpy()[:, None].copy()
    reference.covars_ = params["variances"].numpy()[:, None].copy()
    return reference


def test_hmm_program_stepwise_reaches_hmmlearn_optimum() -> None:
    r"""An HMM over 410 sequences of 10 steps, the sequences plate subsampled 20 at a time
    (the last subsample of a pass short: 10): three passes of stepwise EM reach hmmlearn's
    Baum-Welch optimum (from the same start) within the noise the schedule leaves, and
    each pass's objective is hmmlearn's exact log-likelihood at the reported parameters.

    The tolerance follows the mixture's (γ_t / 2 of the minibatch noise, γ at
    t0 = 410 // 20 updates, 5 standard deviations), with a minibatch of b sequences of
    T steps: a state's mean σ² / (b T π_k), its variance 2σ⁴ / (b T π_k), a transition
    probability a(1 − a) / (b (T − 1) π_i) ≤ 1 / (4 b (T − 1) π_min), a start
    probability ≤ 1 / (4 b); π_min = 0.4 is the smaller state's stationary share, σ = 1.
    """
    torch.set_default_dtype(torch.float64)
    num, length, batch = 410, 10, 20
    data = _hmm_data(num, length)
    fit = pyroem.fit(
        hmm, torch.tensor(data), model_kwargs={"batch": batch}, seed=0, stepwise=True, passes=3
    )
    lengths = np.full(num, length)
    flat = data.reshape(-1, 1)
    reference = _hmmlearn(START, n_iter=1000, tol=1e-10).fit(flat, lengths)

    gamma = step_size(num // batch, KAPPA)
    pi_min, steps = 0.4, batch * length
    mean_tol = 5 * math.sqrt(gamma / 2 / (steps * pi_min))
    variance_tol = 5 * math.sqrt(gamma / 2 * 2 / (steps * pi_min))
    transition_tol = 5 * math.sqrt(gamma / 2 / (4 * batch * (length - 1) * pi_min))
    start_tol = 5 * math.sqrt(gamma / 2 / (4 * batch))
    params = {name: value.numpy() for name, value in fit.params.items()}
    np.testing.assert_allclose(params["locs"], reference.means_[:, 0], rtol=0, atol=mean_tol)
    np.testing.assert_allclose(
        params["variances"], reference.covars_[:, 0, 0], rtol=0, atol=variance_tol
    )
    np.testing.assert_allclose(
        params["transition_probs"], reference.transmat_, rtol=0, atol=transition_tol
    )
    np.testing.assert_allclose(params["init_probs"], reference.startprob_, rtol=0, atol=start_tol)
    expected = _hmmlearn(fit.params).score(flat, lengths)
    assert len(fit.history.objective) == 4
    assert fit.history.objective[-1] == pytest.approx(expected, rel=1e-10)
    assert expected <= reference.score(flat, lengths) + 1e-9


def test_subsampled_plate_without_stepwise_points_at_stepwise() -> None:
    """Batch map-em on a subsampling plate is refused, naming the plate and both routes."""
    torch.set_default_dtype(torch.float64)
    with pytest.raises(NotSupportedError) as refused:
        pyroem.fit(mixture, _mixture_data(200), model_kwargs={"batch": 50}, seed=0)
    message = str(refused.value)
    assert "plate 'data' subsamples 50 of its 200 entries" in message
    assert "stepwise=True" in message
    assert "batch_size=None" in message


def gradient_mixture(data: torch.Tensor, batch: int | None = None) -> None:
    """Mixture weights through a softmax: no closed form."""
    logits = pyro.param("logits", torch.zeros(2))
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    with pyro.plate("data", len(data), subsample_size=batch) as index:
        z = pyro.sample("z", dist.Categorical(logits=logits))
        pyro.sample("x", dist.Normal(locs[z], 1.0), obs=data[index])


def test_stepwise_refusals_name_the_cause() -> None:
    torch.set_default_dtype(torch.float64)
    data = _mixture_data(200)
    with pytest.raises(NotSupportedError, match=r"closed-form M-steps only.*\['logits'\]"):
        pyroem.fit(gradient_mixture, data, model_kwargs={"batch": 50}, stepwise=True)
    with pytest.raises(NotSupportedError, match="no plate of mixture subsamples"):
        pyroem.fit(mixture, data, stepwise=True)
    with pytest.raises(NotSupportedError, match=r"obs=data\[indices\]"):
        pyroem.fit(unindexed_mixture, data, stepwise=True, batch_size=50)
    with pytest.raises(SpecError, match="must be smaller than the 200 entries"):
        pyroem.fit(full_plate_mixture, data, stepwise=True, batch_size=200)
    with pytest.raises(SpecError, match="batch_size=40, but the plate 'data' subsamples 50"):
        pyroem.fit(mixture, data, model_kwargs={"batch": 50}, stepwise=True, batch_size=40)
    with pytest.raises(SpecError, match="kappa must be a number in"):
        pyroem.fit(mixture, data, model_kwargs={"batch": 50}, stepwise=True, kappa=0.4)
    with pytest.raises(NotSupportedError, match="stepwise=True"):
        pyroem.fit(mixture, data, model_kwargs={"batch": 50}, batch_size=50)


def minibatch_hmm(
    sequences: torch.Tensor,
    lengths: torch.Tensor,
    batch_size: int | None = None,
    own_length: bool = False,
) -> None:
    """hmm.py's vectorised first model in minibatch mode: Dirichlet and Beta priors, a
    tones plate inside the subsampled sequences plate, the steps past each length masked
    (``own_length``: the loop runs to the subsample's longest sequence, as hmm.py does)."""
    num_sequences, max_length, data_dim = sequences.shape
    probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(3) + 0.1).to_event(1))
    probs_y = pyro.sample("probs_y", dist.Beta(0.1, 0.9).expand([3, data_dim]).to_event(2))
    tones = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, batch_size, dim=-2) as batch:
        lengths = lengths[batch]
        steps = int(lengths.max()) if own_length else max_length
        x = 0
        for t in pyro.markov(range(steps)):
            with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                x = pyro.sample(
                    f"x_{t}", dist.Categorical(probs_x[x]), infer={"enumerate": "parallel"}
                )
                with tones:
                    pyro.sample(
                        f"y_{t}", dist.Bernoulli(probs_y[x.squeeze(-1)]), obs=sequences[batch, t]
                    )


def _tones(num: int, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(num, 12, 5, generator=generator) < 0.2).double()


def test_minibatch_hmm_objective_is_pyros_log_joint() -> None:
    """Conjugate priors, masks and a plate inside the subsampled one: the log joint the
    fit reports after its passes (90 sequences, 20 per subsample, the last short) is
    Pyro's TraceEnum_ELBO log joint over all sequences at the fitted parameters."""
    torch.set_default_dtype(torch.float64)
    generator = torch.Generator().manual_seed(0)
    sequences = _tones(90, generator)
    lengths = torch.tensor([12 - 3 * (i % 2) for i in range(90)])
    fit = pyroem.fit(minibatch_hmm, sequences, lengths, 20, seed=0, stepwise=True, passes=2)
    assert fit.m_step_kinds == {"probs_x": "dirichlet-categorical", "probs_y": "beta-bernoulli"}
    expected = float(pyro_log_joint(minibatch_hmm, fit.params, 2, sequences, lengths, None))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-10)
    # A loop to the subsample's own longest sequence changes the sites between
    # subsamples: refused, naming the fix.
    lengths = torch.randint(2, 12, (90,), generator=generator)
    lengths[0] = 12
    with pytest.raises(NotSupportedError, match=r"range\(max_length\)"):
        pyroem.fit(minibatch_hmm, sequences, lengths, 20, True, stepwise=True, passes=2)


def group_means(x: torch.Tensor, group: torch.Tensor, batch: int | None = None) -> None:
    """A mean per group, each point reading its group's by an id observed with it."""
    locs = pyro.param("locs", torch.zeros(3))
    with pyro.plate("data", len(x), subsample_size=batch) as index:
        pyro.sample("x", dist.Normal(locs[group[index]], 1.0), obs=x[index])


def test_rows_read_by_data_ids_are_refused() -> None:
    """Which mean a point reads depends on its group id, so on the subsample: the closed
    form's rows recognised on the first subsample would be applied to all of them (a
    silent wrong answer: 7.7, 0, 0 for group means 0, 3, 6). Refused, naming the site."""
    torch.set_default_dtype(torch.float64)
    generator = torch.Generator().manual_seed(0)
    group = torch.arange(300) // 100
    x = torch.randn(300, generator=generator) + 3.0 * group
    with pytest.raises(NotSupportedError, match=r"which rows of \['locs'\] a site reads"):
        pyroem.fit(group_means, x, group, 30, stepwise=True, seed=0)


def two_normals(data: torch.Tensor, batch: int | None = None) -> None:
    """Two Gaussian components, maximum likelihood, the data plate subsampled."""
    weights = pyro.param("weights", torch.tensor([0.5, 0.5]), constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    variances = pyro.param("variances", torch.tensor([1.0, 2.0]), constraint=constraints.positive)
    with pyro.plate("data", len(data), subsample_size=batch) as index:
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("x", dist.Normal(locs[z], variances[z].sqrt()), obs=data[index])


def test_one_pass_follows_the_stepwise_recursion() -> None:
    r"""One pass in order (N = 12, b = 4) against the recursion written out in NumPy:
    per subsample, responsibilities at the current parameters, the closed forms' data
    sums scaled by N/b (the means' precision-weighted sums, then the variances' squared
    residuals about the new means, the weights' counts), s ← (1 − γ_t) s + γ_t ŝ with
    γ_t = (t + 2)^(−κ) after the first subsample sets s, and the maximum-likelihood
    values of the running sums. After one pass the fit reports the last iterate."""
    torch.set_default_dtype(torch.float64)
    x = np.array([-2.1, -1.4, 0.3, 1.9, 2.4, -0.8, 3.1, -2.6, 0.9, 1.2, -1.7, 2.8])
    kappa, batch = 0.6, 4
    fit = pyroem.fit(
        two_normals,
        torch.tensor(x),
        model_kwargs={"batch": batch},
        stepwise=True,
        passes=1,
        shuffle=False,
        kappa=kappa,
    )
    weights, locs, variances = np.array([0.5, 0.5]), np.array([-1.0, 1.0]), np.array([1.0, 2.0])
    sums: list[np.ndarray] = []
    running: list[np.ndarray] = []
    scale = len(x) / batch

    def moved(old: list[np.ndarray], new: list[np.ndarray], gain: float) -> list[np.ndarray]:
        return [(1 - gain) * s + gain * e for s, e in zip(old, new, strict=True)]

    for t, start in enumerate(range(0, len(x), batch)):
        b = x[start : start + batch, None]
        joint = np.log(weights) + norm.logpdf(b, locs, np.sqrt(variances))
        resp = np.exp(joint - logsumexp(joint, axis=1, keepdims=True))
        # The means' closed form: precision-weighted sums (at the current variances).
        estimate = [scale * resp.sum(0) / variances, scale * (resp * b).sum(0) / variances]
        gain = step_size(t, kappa)
        sums = estimate if t == 0 else moved(sums, estimate, gain)
        new_locs = sums[1] / sums[0]
        # The variances' and the weights': counts and squared residuals about the new means.
        counts = scale * resp.sum(0)
        more = [counts, scale * (resp * (b - new_locs) ** 2).sum(0), counts]
        running = more if t == 0 else moved(running, more, gain)
        locs, variances = new_locs, running[1] / running[0]
        weights = running[2] / running[2].sum()
    np.testing.assert_allclose(fit.params["locs"].numpy(), locs, rtol=1e-10)
    np.testing.assert_allclose(fit.params["variances"].numpy(), variances, rtol=1e-10)
    np.testing.assert_allclose(fit.params["weights"].numpy(), weights, rtol=1e-10)


def test_program_stepwise_defaults_are_the_mixture_ones() -> None:
    """kappa, passes and shuffle default as for a Mixture's stepwise EM."""
    import inspect

    from pyroem.api import _PROGRAM_OPTIONS
    from pyroem.engines.streamed import fit_mixture_large

    parameters = inspect.signature(fit_mixture_large).parameters
    for name in ("kappa", "passes", "shuffle"):
        assert _PROGRAM_OPTIONS[name] == parameters[name].default


def global_switch(data: torch.Tensor, batch: int | None = None) -> None:
    """One discrete latent for all the data: which of two means they share."""
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    which = pyro.sample("which", dist.Categorical(torch.tensor([0.5, 0.5])))
    with pyro.plate("data", len(data), subsample_size=batch) as index:
        pyro.sample("x", dist.Normal(locs[which], 1.0), obs=data[index])


def test_discrete_latent_outside_the_plate_is_refused() -> None:
    """Its posterior couples all the subsamples, and log p(x) is no sum over them."""
    torch.set_default_dtype(torch.float64)
    with pytest.raises(NotSupportedError, match=r"enumerated sites \['which'\] lie outside"):
        pyroem.fit(global_switch, _mixture_data(200), model_kwargs={"batch": 50}, stepwise=True)
