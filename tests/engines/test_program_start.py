"""The default start of SVI (vb-em) and NUTS on a Pyro program: a short MAP-EM fit.

From a prior draw (``Normal(0, 10)`` locations for data near 2, 5 and 8) SVI and a
short NUTS chain stay in a poor mode; from the default start they find the three
clusters that scikit-learn's ``GaussianMixture`` (an independent reference) finds.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from sklearn.mixture import GaussianMixture

import pyroem


def mixture(x: torch.Tensor, num_components: int = 3) -> None:
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(num_components, dtype=x.dtype)))
    with pyro.plate("components", num_components):
        locs = pyro.sample("locs", dist.Normal(x.new_tensor(0.0), 10.0))
        variances = pyro.sample("variances", dist.InverseGamma(x.new_tensor(2.0), 1.0))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(locs[z], variances[z].sqrt()), obs=x)


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(c, 0.3, 30) for c in (2.0, 5.0, 8.0)])
    return torch.tensor(values, dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(data: torch.Tensor) -> np.ndarray:
    gm = GaussianMixture(3, n_init=5, random_state=0).fit(data.numpy()[:, None])
    return np.sort(gm.means_.ravel())


def test_svi_default_start_finds_the_clusters(data, reference):
    fit = pyroem.fit(mixture, data, method="vb-em", seed=0, max_iter=150, window=25)
    np.testing.assert_allclose(np.sort(fit.params["locs"].numpy()), reference, atol=0.15)
    np.testing.assert_allclose(np.sort(fit.params["weights"].numpy()), [1 / 3] * 3, atol=0.05)
    assert fit.options["init"] == "map-em"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pyroem.errors.MCMCWarning")
def test_nuts_default_start_finds_the_clusters(data, reference):
    fit = pyroem.fit(
        mixture, data, method="nuts", seed=0, num_samples=20, warmup_steps=20, num_chains=1
    )
    np.testing.assert_allclose(np.sort(fit.params["locs"].numpy()), reference, atol=0.15)
    assert fit.options["init"] == "map-em"


def test_prior_start_is_kept_on_request(data):
    """``init="prior"`` starts from a prior draw, as before; the record says so."""
    fit = pyroem.fit(
        mixture,
        data,
        method="vb-em",
        seed=0,
        init="prior",
        max_iter=5,
        window=0,
        num_draws=5,
        num_elbo_particles=2,
    )
    assert fit.options["init"] == "prior"


def test_unknown_named_start_is_an_error(data):
    with pytest.raises(pyroem.errors.SpecError, match="init='map-em'"):
        pyroem.fit(mixture, data, method="vb-em", init="kmeans")


def test_guide_function_starts_from_its_own_values(data, monkeypatch):
    """A guide function has its own starting values: no MAP-EM start is run."""
    import pyroem.engines.program_map as program_fit

    def no_map_em(*args, **kwargs):
        raise AssertionError("MAP-EM ran for a guide function")

    monkeypatch.setattr(program_fit, "fit_program", no_map_em)

    def guide(x, num_components=3):
        pyro.sample("weights", dist.Dirichlet(pyro.param("alpha", torch.ones(3, dtype=x.dtype))))
        with pyro.plate("components", num_components):
            pyro.sample("locs", dist.Normal(pyro.param("m", x.new_tensor([2.0, 5.0, 8.0])), 0.1))
            pyro.sample("variances", dist.Delta(pyro.param("v", x.new_ones(3))))

    fit = pyroem.fit(
        mixture,
        data,
        method="vb-em",
        guide=guide,
        seed=0,
        max_iter=3,
        window=0,
        num_draws=5,
        num_elbo_particles=2,
    )
    assert fit.options["init"] == "guide"
