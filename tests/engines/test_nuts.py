"""method="nuts": full Bayesian inference with z summed out.

References: exact conjugate posteriors (Beta–Bernoulli, Dirichlet–Categorical,
Gamma–Poisson) with Monte Carlo tolerances from the effective sample size; the
MAP-EM estimate of a well-separated mixture, which the posterior concentrates
around; Pyro's own enumerated density of the mixture program, which the fast
mixture potential must reproduce; scipy densities for the pointwise
log-likelihood of the draws.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

import pyroem
from pyroem.diagnostics import chain_diagnostics, loo, to_arviz
from pyroem.engines import bayes
from pyroem.errors import MCMCWarning, NotSupportedError, SpecError
from pyroem.model.program import ProgramModel
from pyroem.outputs.alignment import align
from pyroem.outputs.pointwise import pointwise_log_likelihood_draws


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)


# ----- the potential -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "options", "dim"),
    [
        ("gaussian", {"covariance_type": "full"}, 2),
        ("gaussian", {"covariance_type": "diag"}, 2),
        ("gaussian", {"covariance_type": "spherical"}, 2),
        ("gaussian", {"covariance_type": "tied"}, 2),
        ("poisson", {}, 2),
        ("bernoulli", {}, 3),
        ("categorical", {}, 2),
        ("exponential", {}, 2),
    ],
)
def test_mixture_potential_equals_pyro_density(family, options, dim):
    """The fast mixture potential against Pyro's enumerated log joint of the program."""
    spec = pyroem.Mixture(3, family, weights_prior=1.5, **options)
    data, _ = spec.simulate(40, seed=1, dim=dim)
    program, start, fam, data = bayes._mixture_setup(spec, (data,), None, None, 0)
    transforms = bayes._unconstraining(program)
    terms = bayes._mixture_log_joint(spec, fam, data, chunk_size=16)
    fast = bayes._potential(terms, transforms)
    reference = bayes._program_potential(program, transforms, jit_compile=False)
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        point = {
            name: transforms[name](value)
            + 0.1 * torch.randn(transforms[name](value).shape, generator=generator)
            for name, value in start.items()
        }
        assert math.isclose(float(fast(point)), float(reference(point)), rel_tol=1e-10)


def test_pyro_param_sites_cannot_be_sampled():
    spec = pyroem.Mixture(2, "gaussian", prior=None)
    data, _ = spec.simulate(20, seed=0)
    with pytest.raises(NotSupportedError, match=r"prior='default'.*"):
        pyroem.fit(spec, data, method="nuts", num_samples=5)

    def with_param(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=x)

    with pytest.raises(NotSupportedError, match=r"\['loc'\].*give them priors"):
        bayes.fit_nuts(with_param, (torch.zeros(3),))


def test_unknown_option_is_refused():
    spec = pyroem.Mixture(2, "poisson")
    data, _ = spec.simulate(20, seed=0, dim=1)
    with pytest.raises(SpecError, match="num_sample"):
        bayes.fit_nuts(spec, (data,), num_sample=10)
    with pytest.raises(SpecError, match="target_accept_prob"):
        bayes.fit_nuts(spec, (data,), target_accept_prob=1.5)


def _beta_bernoulli(flips):
    p = pyro.sample("p", dist.Beta(2.0, 3.0))
    with pyro.plate("flips", flips.shape[0]):
        pyro.sample("flip", dist.Bernoulli(p), obs=flips)


def test_seeded_runs_repeat_and_record_transitions():
    flips = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    options = {"num_samples": 8, "warmup_steps": 8, "num_chains": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MCMCWarning)
        first = bayes.fit_nuts(_beta_bernoulli, (flips,), seed=3, **options)
        second = bayes.fit_nuts(_beta_bernoulli, (flips,), seed=3, **options)
        other = bayes.fit_nuts(_beta_bernoulli, (flips,), seed=4, **options)
    assert first.method == "nuts"
    assert first.draws["p"].shape == (2, 8)
    torch.testing.assert_close(first.draws["p"], second.draws["p"], rtol=0, atol=0)
    assert not torch.equal(first.draws["p"], other.draws["p"])
    assert not torch.equal(first.draws["p"][0], first.draws["p"][1])
    stats_ = first.sample_stats
    for key in ("diverging", "step_size", "tree_depth", "n_steps", "acceptance_rate", "lp"):
        assert stats_[key].shape == (2, 8)
    assert np.all(stats_["n_steps"] >= 1)
    assert np.all(stats_["n_steps"] <= 2 ** stats_["tree_depth"] - 1)
    assert np.all((stats_["acceptance_rate"] >= 0) & (stats_["acceptance_rate"] <= 1))
    # lp is the unconstrained log density: the log joint plus log|dp/du| = log p(1 - p).
    p = first.draws["p"].numpy()
    np.testing.assert_allclose(stats_["lp"], stats_["log_joint"] + np.log(p * (1 - p)))
    assert first.history.objective.shape == (8,)
    torch.testing.assert_close(first.params["p"], first.draws["p"].mean())


# ----- exact posteriors ----------------------------------------------------------------------


def _conjugate(flips, draws, counts):
    p = pyro.sample("p", dist.Beta(2.0, 3.0))
    probs = pyro.sample("probs", dist.Dirichlet(torch.tensor([1.0, 2.0, 3.0])))
    rate = pyro.sample("rate", dist.Gamma(2.0, 0.5))
    with pyro.plate("flips", flips.shape[0]):
        pyro.sample("flip", dist.Bernoulli(p), obs=flips)
    with pyro.plate("draws", draws.shape[0]):
        pyro.sample("draw", dist.Categorical(probs), obs=draws)
    with pyro.plate("counts", counts.shape[0]):
        pyro.sample("count", dist.Poisson(rate), obs=counts)


@pytest.mark.slow
def test_conjugate_posteriors_are_recovered():
    """Posterior mean and sd of each parameter against the exact conjugate posterior.

    Tolerances from Monte Carlo error with the chains' own effective sample size:
    the mean's standard error is ``sd / sqrt(ESS_bulk)``; the sd's is
    ``sd · sqrt((κ + 2) / (4 ESS))`` with κ the posterior's excess kurtosis (delta
    method on the sample variance), with ESS the smaller of bulk and tail. Both
    are allowed four standard errors.
    """
    generator = torch.Generator().manual_seed(0)
    flips = torch.bernoulli(torch.full((20,), 0.3), generator=generator)
    draws = torch.multinomial(torch.tensor([0.2, 0.3, 0.5]), 30, True, generator=generator)
    counts = torch.poisson(torch.full((15,), 4.0), generator=generator)
    fit = bayes.fit_nuts(
        _conjugate,
        (flips, draws, counts),
        seed=1,
        num_samples=400,
        warmup_steps=200,
        num_chains=2,
        jit_compile=True,
    )
    heads = float(flips.sum())
    alpha = np.array([1.0, 2.0, 3.0]) + np.bincount(draws.numpy(), minlength=3)
    exact = {
        "p": [stats.beta(2 + heads, 3 + len(flips) - heads)],
        "probs": [stats.beta(a, alpha.sum() - a) for a in alpha],
        "rate": [stats.gamma(2 + float(counts.sum()), scale=1 / (0.5 + len(counts)))],
    }
    for name, marginals in exact.items():
        values = fit.draws[name].reshape(2, 400, -1).numpy()
        diagnostics = chain_diagnostics({name: fit.draws[name]})
        ess = min(diagnostics.min_ess_bulk, diagnostics.min_ess_tail)
        for index, marginal in enumerate(marginals):
            sample = values[..., index].ravel()
            mean, sd, kurtosis = marginal.mean(), marginal.std(), float(marginal.stats("k"))
            assert abs(sample.mean() - mean) < 4 * sd / math.sqrt(diagnostics.min_ess_bulk)
            assert abs(sample.std() - sd) < 4 * sd * math.sqrt((kurtosis + 2) / (4 * ess))


# ----- a mixture against MAP-EM ------------------------------------------------------------------


@pytest.mark.slow
def test_mixture_posterior_agrees_with_map_em():
    """Well-separated Gaussian mixture: after alignment the posterior means lie within
    three posterior standard deviations of the MAP-EM estimate (the posterior
    concentrates around the mode; mean and mode differ by O(1/N)), and the chains mix
    (R-hat < 1.01)."""
    # The same (proper) prior for both methods: NUTS's default is mclust's.
    spec = pyroem.Mixture(2, "gaussian", covariance_type="spherical", prior="mclust")
    truth = {"weights": [0.45, 0.55], "means": [[-4.0], [4.0]], "covariances": [1.0, 1.5]}
    data, _ = spec.simulate(300, seed=7, params=truth)
    map_fit = pyroem.fit(spec, data, seed=0)
    fit = bayes.fit_nuts(spec, (data,), seed=0, num_samples=300, warmup_steps=200, num_chains=4)
    assert fit.diagnostics.max_rhat < 1.01
    assert fit.diagnostics.num_divergences == 0
    aligned = align(fit, map_fit)
    for name, value in map_fit.params.items():
        draws = aligned.draws[name].flatten(0, 1)
        gap = (draws.mean(0) - value).abs()
        assert bool((gap < 3 * draws.std(0)).all()), name

    # Cluster assignments with uncertainty: the most frequent sampled label is MAP-EM's.
    assignments = aligned.sample_assignments(num_draws=40, seed=0)["assignment"]
    assert assignments.shape == (40, 300)
    frequent = torch.mode(assignments, dim=0).values
    assert float((frequent == map_fit.labels).double().mean()) > 0.98

    # Pointwise log-likelihood of the draws: z summed out, as scipy computes it.
    idata = to_arviz(aligned)
    table = idata.log_likelihood["obs"].values
    assert table.shape == (4, 300, 300)
    x = data.numpy()[:, 0]
    for chain, draw in ((0, 0), (3, 299)):
        values = {name: value[chain, draw].numpy() for name, value in aligned.draws.items()}
        terms = [
            math.log(values["weights"][k])
            + stats.norm(values["means"][k, 0], math.sqrt(values["covariances"][k])).logpdf(x)
            for k in range(2)
        ]
        np.testing.assert_allclose(table[chain, draw], logsumexp(terms, axis=0), rtol=1e-9)
    generic = pointwise_log_likelihood_draws(
        ProgramModel(spec.model(data)), {n: v[:1, :3] for n, v in aligned.draws.items()}, {}
    )
    np.testing.assert_allclose(table[:1, :3], generic.numpy(), rtol=1e-9)
    result = loo(idata)
    assert result.elpd_loo < float(table.mean((0, 1)).sum())


# ----- one chain driver ----------------------------------------------------------------------


def test_full_bayes_and_mcmc_em_run_their_chains_through_one_driver(monkeypatch):
    """Every transition of Pyro's NUTS kernel, in method="nuts" and in MCMC-EM's
    continuous E-step, is made by :class:`pyroem.estep.nuts.NUTSChain`."""
    from pyro.infer.mcmc import NUTS

    from pyroem.estep import nuts

    counts = {"kernel": 0, "driver": 0}
    kernel_sample, driver_run = NUTS.sample, nuts.NUTSChain.run

    def counted_sample(self, params):
        counts["kernel"] += 1
        return kernel_sample(self, params)

    def counted_run(self, steps, on_step=None):
        counts["driver"] += steps
        return driver_run(self, steps, on_step)

    monkeypatch.setattr(NUTS, "sample", counted_sample)
    monkeypatch.setattr(nuts.NUTSChain, "run", counted_run)

    def normal_mean(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = torch.tensor([0.3, -0.5, 1.2, 0.8])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pyroem.fit(
            normal_mean, y, method="nuts", seed=0, num_chains=2, num_samples=6, warmup_steps=4
        )
    assert counts == {"kernel": 2 * (4 + 6), "driver": 2 * (4 + 6)}

    def shifted(y):
        shift = pyro.param("shift", torch.tensor(0.0))
        b = pyro.sample("b", dist.Normal(0.0, 10.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(b + shift, 1.0), obs=y)

    counts.update(kernel=0, driver=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pyroem.fit(
            shifted,
            y,
            method="mcmc-em",
            latents=["b"],
            seed=0,
            max_iter=2,
            num_chains=2,
            num_samples=8,
            warmup_steps=4,
            final_draws=8,
            log_likelihood_samples=0,
        )
    assert counts["kernel"] > 0
    assert counts["driver"] == counts["kernel"]


def test_a_float32_program_is_sampled_in_float32_under_the_float64_default():
    """Pyro's potential adds its plates' zero log-probabilities in torch's default dtype;
    the chains still move in the program's float32 (they drew float64 momenta and
    returned float64 draws), and the posterior is the exact conjugate one:
    μ | y ~ N(Σy / (n + 1/100), 1 / (n + 1/100)) under μ ~ N(0, 10²), y_i ~ N(μ, 1)."""
    y = torch.tensor([0.3, -0.5, 1.2, 0.8, 0.1, 0.9], dtype=torch.float32)

    def normal_mean(y):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 10.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MCMCWarning)
        fit = pyroem.fit(
            normal_mean, y, method="nuts", seed=0, num_chains=2, num_samples=200, warmup_steps=100
        )
    assert fit.draws["mu"].dtype == torch.float32
    precision = len(y) + 1 / 100
    mean, sd = float(y.double().sum()) / precision, 1 / math.sqrt(precision)
    ess = chain_diagnostics({"mu": fit.draws["mu"]}).min_ess_bulk
    assert abs(float(fit.draws["mu"].double().mean()) - mean) < 4 * sd / math.sqrt(ess)
