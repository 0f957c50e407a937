"""CAVI (vb-em on a Mixture) on streamed data: the statistics of the variational E-step
are sums over rows, so a fit read chunk by chunk from a file equals the in-memory fit
from the same start, keeps no data and no q(z) of every row, and saves and loads."""

import numpy as np
import pytest
import torch

import pyroem
from pyroem.errors import SpecError

SPEC = pyroem.Mixture(3, "gaussian")
OPTIONS = {"method": "vb-em", "seed": 1, "chunk_size": 64, "num_draws": 0, "tol": 1e-10}


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = np.array([[-5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    return centres[rng.choice(3, size=500)] + rng.normal(size=(500, 2))


@pytest.fixture(scope="module")
def in_memory(data):
    return pyroem.fit(SPEC, data, **OPTIONS)


def test_a_streamed_cavi_fit_is_the_in_memory_fit(data, in_memory, tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, data)
    streamed = pyroem.fit(SPEC, str(path), **OPTIONS)
    assert isinstance(streamed, pyroem.VariationalFit)
    assert streamed.data is None and "assignment" not in streamed.variational
    assert streamed.num_iterations == in_memory.num_iterations
    np.testing.assert_allclose(streamed.history.objective, in_memory.history.objective, rtol=1e-12)
    for name, value in in_memory.params.items():
        torch.testing.assert_close(streamed.params[name], value, rtol=0, atol=1e-10)
    assert torch.equal(streamed.labels, in_memory.labels)
    torch.testing.assert_close(
        streamed.log_likelihood(pointwise=True),
        in_memory.log_likelihood(pointwise=True),
        rtol=0,
        atol=1e-10,
    )
    streamed.save(tmp_path / "fit.npz")
    loaded = pyroem.load(tmp_path / "fit.npz")
    assert loaded.elbo == streamed.elbo
    torch.testing.assert_close(loaded.predict_proba(data), in_memory.predict_proba(data))


def test_a_sampled_start_reaches_the_same_optimum(data, tmp_path):
    # 100 of the 500 rows initialise the fit; the rest only enter the E-steps. The prior
    # is given in full, so that no default is drawn from the sample.
    prior = pyroem.NormalInverseWishart(
        mean=[0.0, 0.0], mean_precision=0.01, dof=4.0, scale=1.0, weight=1.0
    )
    spec = pyroem.Mixture(3, "gaussian", prior=prior)
    in_memory = pyroem.fit(spec, data, **OPTIONS)
    np.save(tmp_path / "x.npy", data)
    streamed = pyroem.fit(spec, str(tmp_path / "x.npy"), reservoir_size=100, **OPTIONS)
    assert streamed.options["reservoir_size"] == 100
    assert streamed.elbo == pytest.approx(in_memory.elbo, rel=1e-9)
    order = torch.argsort(streamed.params["means"][:, 0])
    reference = torch.argsort(in_memory.params["means"][:, 0])
    torch.testing.assert_close(
        streamed.params["means"][order], in_memory.params["means"][reference], rtol=0, atol=1e-6
    )


def test_a_source_is_refused_for_mcmc_em_with_the_alternatives(tmp_path, data):
    np.save(tmp_path / "x.npy", data)
    with pytest.raises(SpecError, match="map-em or vb-em"):
        pyroem.fit(SPEC, str(tmp_path / "x.npy"), method="mcmc-em")
