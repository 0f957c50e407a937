"""A fit of a streamed source keeps no per-row values (memory flat in the number of
rows): its labels, pointwise log-likelihood, ``predict``, ``predict_proba`` and
``score_samples`` are computed on demand, chunk by chunk, and equal the in-memory
fit's and SciPy's."""

import numpy as np
import pytest
import torch

import pyroem
from pyroem.errors import NotSupportedError
from tests.reference_densities import gaussian_mixture_pointwise

NUM = 3000
START = {
    "weights": np.array([0.2, 0.3, 0.5]),
    "means": np.array([[-4.0, 1.0], [1.0, 4.0], [4.0, -1.0]]),
    "covariances": np.stack([np.eye(2) * 2.0] * 3),
}


def _blobs() -> np.ndarray:
    rng = np.random.default_rng(7)
    centres = np.array([[-6.0, 0.0], [0.0, 6.0], [6.0, 0.0]])
    return centres[rng.choice(3, size=NUM, p=[0.3, 0.3, 0.4])] + rng.normal(size=(NUM, 2))


def _arrays(value, seen=None):
    """Every tensor and array reachable from ``value``'s attributes and containers."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor | np.ndarray):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _arrays(item, seen)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _arrays(item, seen)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        for item in vars(value).values():
            yield from _arrays(item, seen)


@pytest.mark.parametrize("method", ["map-em", "vb-em"])
def test_streamed_fit_holds_no_per_row_array_and_computes_them_on_demand(method, tmp_path):
    data = _blobs()
    path = tmp_path / "x.npy"
    np.save(path, data)
    spec = pyroem.Mixture(3, "gaussian", prior=None if method == "map-em" else "default")
    options = dict(method=method, init=START, chunk_size=256, tol=1e-10, max_iter=300, seed=0)
    # The whole data as the reservoir sample: the default prior resolves to the same numbers.
    streamed = pyroem.fit(spec, str(path), reservoir_size=NUM, **options)
    held = pyroem.fit(spec, data, **options)

    # No tensor or array of the fit has a dimension of the rows (the in-memory fit's
    # labels and pointwise values have).
    def per_row(fit):
        return [value.shape for value in _arrays(fit) if NUM in value.shape]

    assert per_row(streamed) == []
    assert per_row(held)
    assert streamed.num_data == NUM
    assert streamed.log_likelihood() == pytest.approx(held.log_likelihood(), rel=1e-12)

    # On demand, from the source, chunk by chunk: the in-memory fit's values.
    for name, value in held.params.items():
        torch.testing.assert_close(streamed.params[name], value, rtol=0, atol=1e-10)
    pointwise = streamed.log_likelihood(pointwise=True)
    torch.testing.assert_close(pointwise, held.log_likelihood(pointwise=True), rtol=1e-12, atol=0)
    np.testing.assert_allclose(
        pointwise.numpy(), gaussian_mixture_pointwise(data, streamed.params), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(streamed.score_samples(str(path)), pointwise, rtol=0, atol=0)
    assert torch.equal(streamed.labels, held.predict(data))
    assert torch.equal(streamed.predict(np.load(path, mmap_mode="r")), held.predict(data))
    torch.testing.assert_close(
        streamed.predict_proba(str(path)), held.predict_proba(data), rtol=1e-12, atol=1e-14
    )

    # Saved and loaded, the fit keeps its totals but has no source to re-read.
    streamed.save(tmp_path / "fit.npz")
    loaded = pyroem.load(tmp_path / "fit.npz")
    assert loaded.num_data == NUM
    assert loaded.log_likelihood() == streamed.log_likelihood()
    assert loaded.bic() == streamed.bic()
    with pytest.raises(NotSupportedError, match=r"fit.predict\(path\)"):
        _ = loaded.labels
    assert torch.equal(loaded.predict(str(path)), held.predict(data))


def test_a_streamed_fit_pickles_without_its_source(tmp_path):
    import pickle

    generator = np.random.default_rng(5)
    data = np.concatenate([generator.normal(-4, 1, (150, 2)), generator.normal(4, 1, (150, 2))])
    path = tmp_path / "data.npy"
    np.save(path, data)
    fit = pyroem.fit(pyroem.Mixture(2), str(path), seed=0)
    copy = pickle.loads(pickle.dumps(fit))
    assert copy.source is None
    reference = pyroem.fit(pyroem.Mixture(2), data, seed=0)
    np.testing.assert_allclose(
        copy.score_samples(data).numpy(), reference.score_samples(data).numpy(), rtol=1e-12
    )
    with pytest.raises(NotSupportedError, match=r"fit\.predict"):
        _ = copy.labels
