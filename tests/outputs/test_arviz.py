"""ArviZ export: pointwise log-likelihood with z summed out, groups, netCDF, LOO.

The references are independent of pyroem: every pointwise log-likelihood is
recomputed by brute force — an explicit sum over every configuration of the
discrete latents with scipy densities — and the LOO estimate of a conjugate
Gamma–Poisson model is compared with the exact leave-one-out predictive density
(a negative binomial), from exact posterior draws.
"""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

import pyroem
import pyroem.diagnostics
from pyroem.diagnostics import from_netcdf, loo, to_arviz
from pyroem.errors import NotSupportedError, SpecError
from pyroem.model.program import ProgramModel
from pyroem.outputs.pointwise import pointwise_log_likelihood


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)


# ----- brute-force references -------------------------------------------------------------


def _gaussian_mixture_pointwise(params: dict[str, np.ndarray], data: np.ndarray) -> np.ndarray:
    """``log Σ_k π_k N(x_n; μ_k, Σ_k)`` by scipy, one term per component."""
    terms = [
        math.log(params["weights"][k])
        + stats.multivariate_normal(params["means"][k], params["covariances"][k]).logpdf(data)
        for k in range(len(params["weights"]))
    ]
    return logsumexp(np.stack(terms), axis=0)


def _poisson_mixture_pointwise(params: dict[str, np.ndarray], data: np.ndarray) -> np.ndarray:
    terms = [
        math.log(params["weights"][k]) + stats.poisson(params["rates"][k]).logpmf(data).sum(-1)
        for k in range(len(params["weights"]))
    ]
    return logsumexp(np.stack(terms), axis=0)


def _numpy(values: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: value.detach().numpy() for name, value in values.items()}


def _perturbed_draws(params: dict[str, torch.Tensor], shape: tuple[int, int], seed: int):
    """Draws near ``params`` that stay in every support (simplex, positive definite, …)."""
    generator = torch.Generator().manual_seed(seed)
    draws = {}
    for name, value in params.items():
        noise = torch.randn((*shape, *value.shape), generator=generator, dtype=value.dtype)
        if name == "weights":
            draw = (value.log() + 0.2 * noise).softmax(-1)
        elif name == "covariances":
            factor = torch.eye(value.shape[-1]) + 0.1 * noise
            draw = factor @ value @ factor.mT
        elif name in ("rates", "scale"):
            draw = value * (0.2 * noise).exp()
        else:
            draw = value + 0.3 * noise
        draws[name] = draw
    return draws


# ----- Mixture fits -------------------------------------------------------------------------


def test_mixture_map_em_arviz_summarises_the_point_estimate():
    """A fit without draws: ``az.summary`` lists θ (the MAP, no spread), never rows of
    a one-draw pointwise log-likelihood, and LOO is refused with the reason."""
    import arviz as az

    spec = pyroem.Mixture(2, "gaussian", covariance_type="full")
    data, _ = spec.simulate(6, seed=3)
    fit = pyroem.fit(spec, data, seed=0)
    pointwise = fit.log_likelihood(pointwise=True).numpy()
    expected = _gaussian_mixture_pointwise(_numpy(fit.params), data.numpy())
    np.testing.assert_allclose(pointwise, expected, rtol=1e-10, atol=1e-10)
    idata = to_arviz(fit)
    assert "log_likelihood" not in idata.groups()
    summary = az.summary(idata)
    elements = [
        f"{name}[{', '.join(map(str, index))}]" if value.dim() else name
        for name, value in fit.params.items()
        for index in itertools.product(*map(range, value.shape))
    ]
    assert list(summary.index) == elements
    flat = np.concatenate([value.reshape(-1).numpy() for value in fit.params.values()])
    np.testing.assert_allclose(summary["mean"].values, flat, atol=1e-3)
    assert "MAP" in idata.point_estimate.attrs["estimate"]
    with pytest.raises(NotSupportedError, match="point estimate has no posterior draws"):
        loo(idata)
    assert idata.point_estimate["covariances"].dims == ("component", "dim_row", "dim_col")
    np.testing.assert_array_equal(idata.observed_data["obs"].values, data.numpy())
    with pytest.raises(NotSupportedError, match="posterior draws"):
        loo(idata)


@pytest.mark.parametrize("family", ["gaussian", "poisson"])
def test_mixture_draws_pointwise_equals_brute_force(family):
    spec = pyroem.Mixture(3, family)
    data, _ = spec.simulate(7, seed=5, dim=2)
    fit = copy.copy(pyroem.fit(spec, data, seed=0))
    fit.draws = _perturbed_draws(fit.params, (2, 3), seed=1)
    idata = to_arviz(fit)
    assert idata.posterior["weights"].dims == ("chain", "draw", "component")
    brute = _gaussian_mixture_pointwise if family == "gaussian" else _poisson_mixture_pointwise
    table = idata.log_likelihood["obs"].values
    assert table.shape == (2, 3, 7)
    for chain, draw in itertools.product(range(2), range(3)):
        values = {name: value[chain, draw] for name, value in fit.draws.items()}
        expected = brute(_numpy(values), data.numpy())
        np.testing.assert_allclose(table[chain, draw], expected, rtol=1e-10, atol=1e-10)


def test_mixture_dims_agree_between_spec_and_program_fits():
    spec = pyroem.Mixture(2, "gaussian", covariance_type="full")
    data, _ = spec.simulate(30, seed=2)
    direct = to_arviz(pyroem.fit(spec, data, seed=0))
    program = to_arviz(pyroem.fit(spec.model(data), seed=0))
    for name in ("weights", "means", "covariances"):
        assert direct.point_estimate[name].dims == program.point_estimate[name].dims
        assert direct.posterior[name].dims == program.posterior[name].dims
    assert program.observed_data["obs"].dims == ("data", "dim")


# ----- Pyro programs -----------------------------------------------------------------------


def _two_latents(x, y):
    """Two discrete latents per observation, two observed sites sharing them."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(3)))
    rho = pyro.sample("rho", dist.Beta(2.0, 2.0))
    loc = pyro.sample("loc", dist.Normal(torch.zeros(3), 5.0).to_event(1))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Categorical(weights))
        z2 = pyro.sample("z2", dist.Bernoulli(rho))
        pyro.sample("x", dist.Normal(loc[z1] + 2.0 * z2, scale), obs=x)
        pyro.sample("y", dist.Bernoulli(0.2 + 0.6 * z2), obs=y)


def _two_latents_brute_force(values: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray):
    terms = []
    for z1, z2 in itertools.product(range(3), range(2)):
        terms.append(
            math.log(values["weights"][z1])
            + stats.bernoulli(values["rho"]).logpmf(z2)
            + stats.norm(values["loc"][z1] + 2.0 * z2, values["scale"]).logpdf(x)
            + stats.bernoulli(0.2 + 0.6 * z2).logpmf(y)
        )
    return logsumexp(np.stack(terms), axis=0)


def _two_latents_data():
    x = torch.tensor([-2.1, 0.3, 4.2, 1.7, -0.4])
    y = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    return x, y


def test_program_pointwise_two_discrete_latents_equals_brute_force():
    x, y = _two_latents_data()
    fit = pyroem.fit(_two_latents, x, y, seed=0, max_iter=30)
    table = pointwise_log_likelihood(fit.program, fit.params).numpy()
    expected = _two_latents_brute_force(_numpy(fit.params), x.numpy(), y.numpy())
    np.testing.assert_allclose(table, expected, rtol=1e-10, atol=1e-10)
    assert math.isclose(table.sum(), fit.log_likelihood(), rel_tol=1e-10)
    assert set(to_arviz(fit).observed_data.data_vars) == {"x", "y"}


def test_program_draws_pointwise_equals_brute_force():
    x, y = _two_latents_data()
    fit = copy.copy(pyroem.fit(_two_latents, x, y, seed=0, max_iter=30))
    params = fit.params
    draws = _perturbed_draws(params, (2, 2), seed=4)
    draws["rho"] = (params["rho"].logit() + 0.3 * torch.randn(2, 2)).sigmoid()
    fit.draws = draws
    fit.sample_stats = {"diverging": np.zeros((2, 2), dtype=bool)}
    table = to_arviz(fit).log_likelihood["log_likelihood"].values
    for chain, draw in itertools.product(range(2), range(2)):
        values = _numpy({name: value[chain, draw] for name, value in draws.items()})
        expected = _two_latents_brute_force(values, x.numpy(), y.numpy())
        np.testing.assert_allclose(table[chain, draw], expected, rtol=1e-10, atol=1e-10)


def _hmm(sequences):
    """Two-state HMM over several sequences (plate) with a Markov chain in time."""
    start = pyro.param("start", torch.tensor([0.6, 0.4]))
    transition = pyro.param("transition", torch.tensor([[0.7, 0.3], [0.2, 0.8]]))
    means = pyro.param("locs", torch.tensor([-1.0, 1.5]))
    with pyro.plate("sequences", sequences.shape[0], dim=-1):
        state = pyro.sample("state_0", dist.Categorical(start))
        pyro.sample("obs_0", dist.Normal(means[state], 1.0), obs=sequences[:, 0])
        for t in pyro.markov(range(1, sequences.shape[1])):
            state = pyro.sample(f"state_{t}", dist.Categorical(transition[state]))
            pyro.sample(f"obs_{t}", dist.Normal(means[state], 1.0), obs=sequences[:, t])


def test_hmm_pointwise_per_sequence_equals_brute_force():
    sequences = torch.tensor([[0.1, -1.2, 2.0], [1.1, 1.4, -0.3]])
    program = ProgramModel(_hmm, (sequences,))
    values = dict(program.param_inits)
    table = pointwise_log_likelihood(program, values).numpy()
    start, transition, locs = (values[n].numpy() for n in ("start", "transition", "locs"))
    for index, sequence in enumerate(sequences.numpy()):
        paths = []
        for path in itertools.product(range(2), repeat=3):
            total = math.log(start[path[0]])
            total += sum(math.log(transition[a, b]) for a, b in itertools.pairwise(path))
            total += stats.norm(locs[list(path)], 1.0).logpdf(sequence).sum()
            paths.append(total)
        assert math.isclose(table[index], logsumexp(paths), rel_tol=1e-10)


def test_model_without_observation_plate_needs_log_likelihood_off():
    def unplated(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(loc, 1.0).expand([x.shape[0]]).to_event(1), obs=x)

    fit = copy.copy(pyroem.fit(unplated, torch.tensor([0.5, 1.0, -0.2]), seed=0))
    fit.draws = _perturbed_draws(fit.params, (2, 3), seed=0)
    with pytest.raises(SpecError, match="log_likelihood=False"):
        to_arviz(fit)
    idata = to_arviz(fit, log_likelihood=False)
    assert "log_likelihood" not in idata.groups()


# ----- netCDF and LOO ---------------------------------------------------------------------------


def test_netcdf_round_trip(tmp_path):
    x, y = _two_latents_data()
    fit = copy.copy(pyroem.fit(_two_latents, x, y, seed=0, max_iter=30))
    fit.draws = _perturbed_draws({"loc": fit.params["loc"]}, (2, 4), seed=2)
    fit.sample_stats = {
        "diverging": np.array([[False, True, False, False], [False] * 4]),
        "step_size": np.full((2, 4), 0.25),
    }
    idata = to_arviz(fit)
    path = tmp_path / "fit.nc"
    idata.to_netcdf(str(path))
    back = from_netcdf(path)
    assert set(back.groups()) == set(idata.groups())
    for group in idata.groups():
        original, loaded = idata[group], back[group]
        assert set(original.data_vars) == set(loaded.data_vars)
        for name in original.data_vars:
            assert original[name].dims == loaded[name].dims
            np.testing.assert_array_equal(original[name].values, loaded[name].values)
        assert loaded.attrs["method"] == "map-em"
    assert back.sample_stats["diverging"].values.dtype == bool


def _gamma_poisson(counts):
    rate = pyro.sample("rate", dist.Gamma(2.0, 0.5))
    with pyro.plate("data", counts.shape[0]):
        pyro.sample("obs", dist.Poisson(rate), obs=counts)


def test_loo_matches_exact_leave_one_out():
    """``az.loo`` on exact Gamma–Poisson posterior draws against the exact LOO.

    Leaving ``y_i`` out gives the posterior Gamma(a + S - y_i, b + N - 1), whose
    predictive for ``y_i`` is negative binomial. Monte Carlo error: per point the
    importance-sampling estimate is ``1 / mean_s(1 / p(y_i | λ_s))``, whose log has
    delta-method standard error ``sd(1/p) / (sqrt(S) mean(1/p))``; the errors of
    the points are bounded by the sum of these standard errors, and the check
    allows four times that sum (PSIS only shrinks the variance).
    """
    generator = np.random.default_rng(0)
    counts = generator.poisson(3.0, size=25).astype(np.float64)
    shape_a, rate_b = 2.0, 0.5
    shape_post, rate_post = shape_a + counts.sum(), rate_b + counts.size
    num_chains, num_draws = 4, 1000
    rates = generator.gamma(shape_post, 1 / rate_post, size=(num_chains, num_draws))
    fit = copy.copy(pyroem.fit(_gamma_poisson, torch.tensor(counts), seed=0))
    fit.draws = {"rate": torch.tensor(rates)}
    result = loo(fit, pointwise=True)
    exact = []
    standard_errors = []
    for index, count in enumerate(counts):
        shape_i = shape_post - count
        rate_i = rate_post - 1
        exact.append(stats.nbinom(shape_i, rate_i / (rate_i + 1)).logpmf(count))
        inverse = 1 / stats.poisson(rates.ravel()).pmf(count)
        standard_errors.append(inverse.std() / (math.sqrt(inverse.size) * inverse.mean()))
        assert math.isclose(
            result.loo_i.values[index],
            exact[-1],
            abs_tol=4 * standard_errors[-1] + 1e-12,
        )
    assert abs(result.elpd_loo - sum(exact)) < 4 * sum(standard_errors)
    pointwise = to_arviz(fit).log_likelihood["obs"].values
    np.testing.assert_allclose(
        pointwise, stats.poisson(rates[..., None]).logpmf(counts), rtol=1e-10, atol=1e-10
    )


def test_loo_table_and_forest_plot(tmp_path):
    generator = np.random.default_rng(1)
    counts = generator.poisson(3.0, size=20).astype(np.float64)
    base = pyroem.fit(_gamma_poisson, torch.tensor(counts), seed=0)
    fits = {}
    for label, shift in ((1, 0.0), (2, 1.5)):
        fit = copy.copy(base)
        rates = generator.gamma(2.0 + counts.sum(), 1 / (0.5 + counts.size), size=(2, 500))
        fit.draws = {"rate": torch.tensor(rates + shift)}
        fits[label] = fit
    table = pyroem.diagnostics.loo_table(fits)
    assert list(table.index) == [1, 2]
    for label, fit in fits.items():
        assert math.isclose(table.loc[label, "elpd_loo"], loo(fit).elpd_loo, rel_tol=1e-12)
    with pytest.raises(NotSupportedError, match=r"\['map'\]"):
        pyroem.diagnostics.loo_table({"map": base})
    import matplotlib

    matplotlib.use("Agg")
    ax = pyroem.diagnostics.plot_forest({"exact": fits[1], "map": base})[0]
    path = tmp_path / "forest.png"
    ax.figure.savefig(path)
    assert path.stat().st_size > 1000
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert set(labels) == {"exact", "map"}


# ----- what each method exports -----------------------------------------------------------


def test_vb_em_draws_are_several_chains_with_finite_rhat():
    """CAVI's draws are independent, so split into chains their R-hat is finite and near
    1 (for independent draws its standard deviation is about 1/(2·draws per chain))."""
    import arviz as az

    spec = pyroem.Mixture(2, "gaussian")
    data, _ = spec.simulate(80, seed=1)
    fit = pyroem.fit(spec, data, method="vb-em", seed=0, num_draws=400)
    assert fit.draws["means"].shape == (4, 100, 2, 2)
    rhat = az.rhat(to_arviz(fit, log_likelihood=False))
    values = np.concatenate([np.ravel(rhat[name].values) for name in fit.params])
    assert np.isfinite(values).all()
    assert np.abs(values - 1).max() < 0.05


def test_mcmc_em_exports_theta_and_no_degenerate_loo():
    """MCMC-EM's draws are of z at one θ: θ is the posterior group's one draw, z goes
    to latent_draws, the θ trace to parameter_trace, and there is no log_likelihood
    group for az.compare to rank (its LOO would have p_loo 0)."""
    spec = pyroem.Mixture(2, "gaussian")
    data, _ = spec.simulate(40, seed=2)
    fit = pyroem.fit(spec, data, method="mcmc-em", seed=0, max_iter=20)
    idata = to_arviz(fit)
    assert "log_likelihood" not in idata.groups()
    for name, value in fit.params.items():
        np.testing.assert_array_equal(idata.posterior[name].values[0, 0], value.numpy())
        trace = idata.parameter_trace[name]
        assert trace.dims[0] == "iteration"
        np.testing.assert_array_equal(trace.values[-1], value.numpy())
    assert set(idata.posterior.data_vars) == set(fit.params)
    assert idata.latent_draws["assignment"].dims == ("chain", "draw", "data")
    with pytest.raises(NotSupportedError, match="MCMC-EM draws the latent variables"):
        loo(fit)
    vb = pyroem.fit(spec, data, method="vb-em", seed=0, num_draws=200)
    with pytest.raises(NotSupportedError, match=r"\['mcmc-em'\]"):
        pyroem.diagnostics.loo_table({"mcmc-em": fit, "vb-em": vb})


def test_coordinates_are_column_names():
    import pandas as pd

    spec = pyroem.Mixture(2, "gaussian")
    data, _ = spec.simulate(30, seed=3)
    frame = pd.DataFrame(data.numpy(), columns=["eruptions", "waiting"])
    for method in ("map-em", "vb-em"):
        idata = pyroem.fit(spec, frame, method=method, seed=0).to_arviz()
        for group in ("posterior", "point_estimate", "observed_data"):
            assert list(idata[group].coords["dim"].values) == ["eruptions", "waiting"]
        assert list(idata.posterior.coords["dim_row"].values) == ["eruptions", "waiting"]
        assert list(idata.posterior.coords["component"].values) == [0, 1]
        selected = idata.point_estimate["means"].sel(dim="waiting").values
        np.testing.assert_array_equal(
            selected, pyroem.fit(spec, frame, method=method, seed=0).params["means"][:, 1]
        )
    custom = to_arviz(pyroem.fit(spec, data, seed=0), coords={"component": ["short", "long"]})
    assert list(custom.posterior.coords["component"].values) == ["short", "long"]


@pytest.mark.parametrize("method", ["map-em", "vb-em", "mcmc-em"])
def test_posterior_predictive_matches_the_mixture_moments(method):
    """Replicas are drawn with z: at θ the pooled replicas have the mixture's mean
    m = Σ π_k μ_k and covariance Σ π_k (Σ_k + μ_k μ_kᵀ) − m mᵀ (law of total variance),
    averaged over the θ they were drawn at, within 4.5 Monte Carlo standard errors;
    az.plot_ppc draws them."""
    import arviz as az
    import matplotlib

    matplotlib.use("Agg")
    spec = pyroem.Mixture(2, "gaussian")
    data, _ = spec.simulate(60, seed=4)
    options = {"vb-em": {"num_draws": 200}, "mcmc-em": {"max_iter": 20}}.get(method, {})
    fit = pyroem.fit(spec, data, method=method, seed=0, **options)
    idata = to_arviz(fit)
    replicas = idata.posterior_predictive["obs"]
    assert replicas.dims == ("chain", "draw", "data", "dim")
    assert replicas.shape[2:] == tuple(data.shape)
    values = replicas.values.reshape(-1, 2)
    params = _numpy(fit.params)
    if method == "vb-em":
        # Averaged over q's draws, the replicas follow the draws' mixtures.
        draws = {
            name: value.reshape(-1, *value.shape[2:]).numpy() for name, value in fit.draws.items()
        }
        step = math.ceil(len(draws["weights"]) / 200)
        params = {name: value[::step] for name, value in draws.items()}
        weights, means, covs = params["weights"], params["means"], params["covariances"]
    else:
        weights, means, covs = (params[n][None] for n in ("weights", "means", "covariances"))
    mean = np.einsum("sk,skd->d", weights, means) / len(weights)
    second = np.einsum("sk,skde->de", weights, covs + means[..., :, None] * means[..., None, :])
    covariance = second / len(weights) - np.outer(mean, mean)
    standard_error = np.sqrt(np.diag(covariance) / len(values))
    assert (np.abs(values.mean(0) - mean) < 4.5 * standard_error).all()
    # The sample covariance is a mean of products of centred values; its Monte Carlo
    # standard error is their standard deviation over sqrt(n).
    centred = values - values.mean(0)
    products = centred[:, :, None] * centred[:, None, :]
    product_error = products.std(0) / np.sqrt(len(values))
    assert (np.abs(np.cov(values.T) - covariance) < 4.5 * product_error).all()
    axes = az.plot_ppc(idata, num_pp_samples=10)
    assert np.ravel(axes)[0].get_lines()
