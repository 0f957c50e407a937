"""Streamed data: a fit read chunk by chunk from a file, a memmap, a function of
chunks or a DataLoader equals the fit of the same data held in memory, from the same
start; the reservoir sample that initialises a streamed fit is uniform and bounded."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.mixture import GaussianMixture

import pyroem
from pyroem.errors import DataError, SpecError
from pyroem.sources import open_source, scan


def _blobs(seed: int, num: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.array([[-6.0, 0.0], [0.0, 6.0], [6.0, 0.0]])
    labels = rng.choice(3, size=num, p=[0.3, 0.3, 0.4])
    return centres[labels] + rng.normal(size=(num, 2)) * [1.0, 0.7]


START = {
    "weights": np.array([0.2, 0.3, 0.5]),
    "means": np.array([[-4.0, 1.0], [1.0, 4.0], [4.0, -1.0]]),
    "covariances": np.stack([np.eye(2) * 2.0] * 3),
}

SPEC = pyroem.Mixture(3, "gaussian", prior=None)
CHUNK = 128


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return _blobs(0, 1000)


@pytest.fixture(scope="module")
def reference(data: np.ndarray) -> pyroem.FitResult:
    return pyroem.fit(SPEC, data, init=START, chunk_size=CHUNK, tol=1e-12, max_iter=500)


def _same_fit(fit: pyroem.FitResult, reference: pyroem.FitResult) -> None:
    assert fit.num_iterations == reference.num_iterations
    for name, value in reference.params.items():
        torch.testing.assert_close(fit.params[name], value, rtol=0, atol=1e-10)
    np.testing.assert_allclose(fit.history.objective, reference.history.objective, rtol=1e-12)
    assert fit.num_data == reference.num_data
    assert torch.equal(fit.labels, reference.labels)


def _stream_fit(source) -> pyroem.FitResult:
    return pyroem.fit(SPEC, source, init=START, chunk_size=CHUNK, tol=1e-12, max_iter=500)


def test_npy_file_and_memmap_are_streamed_to_the_in_memory_fit(data, reference, tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, data)
    from_file = _stream_fit(str(path))
    _same_fit(from_file, reference)
    # The data are read chunk by chunk and not held by the fit.
    assert from_file.data is None and from_file.options["source"] == repr(str(path))
    mapped = np.load(path, mmap_mode="r")
    assert isinstance(mapped, np.memmap)
    from_map = _stream_fit(mapped)
    _same_fit(from_map, reference)
    assert from_map.data is None and from_map.options["source"] == "the memmap"
    # A view of a memmap is read through the mapping.
    _same_fit(_stream_fit(mapped[:]), reference)


def test_a_pass_over_a_npy_file_holds_a_few_chunks_not_the_file(tmp_path):
    """NumPy's allocations (traced by tracemalloc) during a pass stay within a few
    chunks: 200 000 rows × 4 columns is 6.4 MB, a chunk of 1000 rows 32 kB."""
    import tracemalloc

    rows = np.random.default_rng(0).normal(size=(200_000, 4))
    np.save(tmp_path / "x.npy", rows)
    del rows
    for source in (str(tmp_path / "x.npy"), np.load(tmp_path / "x.npy", mmap_mode="r")):
        chunks = open_source(source, chunk_size=1000)
        assert chunks is not None
        tracemalloc.start()
        total = sum(float(chunk.sum()) for chunk in chunks)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert math.isfinite(total)
        assert peak < 10 * 1000 * 4 * 8


def test_csv_and_glob_of_files_give_the_in_memory_fit(data, reference, tmp_path):
    csv = tmp_path / "x.csv"
    pd.DataFrame(data, columns=["a", "b"]).to_csv(csv, index=False)
    _same_fit(_stream_fit(str(csv)), reference)
    # A pattern reads its files in sorted order: part-0 then part-1.
    np.save(tmp_path / "part-1.npy", data[600:])
    np.save(tmp_path / "part-0.npy", data[:600])
    _same_fit(_stream_fit(str(tmp_path / "part-*.npy")), reference)
    # A folder: its data files in sorted order.
    folder = tmp_path / "parts"
    folder.mkdir()
    pd.DataFrame(data[:450], columns=["a", "b"]).to_csv(folder / "a.csv", index=False)
    np.save(folder / "b.npy", data[450:])
    (folder / "notes.txt").write_text("not data")
    _same_fit(_stream_fit(folder), reference)


def test_function_of_chunks_and_dataloader_give_the_in_memory_fit(data, reference):
    calls = []

    def chunks():
        calls.append(1)
        return iter(np.array_split(data, 9))

    fit = _stream_fit(chunks)
    # One pass for the scan, one per E-step, one for the final scores.
    assert len(calls) == reference.num_iterations + 3
    _same_fit(fit, reference)
    # The labels are not kept but computed on demand: one more pass.
    assert len(calls) == reference.num_iterations + 4
    dataset = torch.utils.data.TensorDataset(torch.as_tensor(data))
    loader = torch.utils.data.DataLoader(dataset, batch_size=100, shuffle=False)
    _same_fit(_stream_fit(loader), reference)


def test_poisson_mixture_streamed(tmp_path):
    rng = np.random.default_rng(1)
    counts = np.concatenate([rng.poisson([2.0, 9.0], (400, 2)), rng.poisson([12.0, 1.0], (300, 2))])
    start = {"weights": np.array([0.5, 0.5]), "rates": np.array([[3.0, 5.0], [8.0, 2.0]])}
    spec = pyroem.Mixture(2, "poisson", prior=None)
    expected = pyroem.fit(spec, counts, init=start, chunk_size=64, tol=1e-12)
    np.save(tmp_path / "counts.npy", counts.astype(float))
    fit = pyroem.fit(spec, str(tmp_path / "counts.npy"), init=start, chunk_size=64, tol=1e-12)
    _same_fit(fit, expected)


def test_reservoir_sample_is_uniform_and_bounded():
    """Algorithm R keeps each of N rows with probability k/N: over 1500 seeds each row's
    frequency is within 4.5 binomial standard deviations of k/N."""
    num, size, seeds = 50, 10, 1500
    rows = np.arange(num, dtype=float)[:, None]
    source = open_source(lambda: iter(np.array_split(rows, 8)), chunk_size=4)
    assert source is not None
    hits = np.zeros(num)
    for seed in range(seeds):
        found = scan(source, lambda chunk: None, size, seed)
        assert found.num_rows == num and found.sample.shape == (size, 1)
        picked = found.sample[:, 0].numpy().astype(int)
        assert len(set(picked.tolist())) == size  # without replacement
        hits[picked] += 1
    p = size / num
    bound = 4.5 * math.sqrt(p * (1 - p) / seeds)
    assert np.abs(hits / seeds - p).max() < bound
    # No more rows than the reservoir: the whole data, in order.
    whole = scan(source, lambda chunk: None, 100, 0)
    assert torch.equal(whole.sample, torch.as_tensor(rows))


def test_streamed_kmeanspp_on_reservoir_reaches_sklearns_optimum(tmp_path):
    data = _blobs(2, 3000)
    np.save(tmp_path / "x.npy", data)
    fit = pyroem.fit(
        SPEC, str(tmp_path / "x.npy"), seed=0, chunk_size=500, reservoir_size=200, tol=1e-10
    )
    assert fit.options["reservoir_size"] == 200
    gmm = GaussianMixture(3, reg_covar=0.0, tol=1e-12, max_iter=1000, random_state=0, n_init=3)
    gmm.fit(data)
    np.testing.assert_allclose(fit.log_likelihood(), gmm.score(data) * len(data), rtol=1e-9)
    order = np.argsort(fit.params["means"][:, 0].numpy())
    np.testing.assert_allclose(
        fit.params["means"].numpy()[order],
        gmm.means_[np.argsort(gmm.means_[:, 0])],
        atol=1e-6,
    )


def test_bad_sources_are_refused_with_a_remedy(tmp_path, data):
    with pytest.raises(DataError, match="read only once"):
        pyroem.fit(SPEC, (chunk for chunk in np.array_split(data, 3)))
    with pytest.raises(DataError, match="does not exist"):
        pyroem.fit(SPEC, str(tmp_path / "missing.npy"))
    with pytest.raises(DataError, match="no file matches"):
        pyroem.fit(SPEC, str(tmp_path / "none-*.npy"))
    bad = data.copy()
    bad[700, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        pyroem.fit(SPEC, lambda: iter(np.array_split(bad, 4)))
    with pytest.raises(DataError, match="same columns"):
        pyroem.fit(SPEC, lambda: iter([data[:10], data[10:, :1]]))
    with pytest.raises(SpecError, match="map-em"):
        pyroem.fit(SPEC, lambda: iter([data]), method="mcmc-em")
    with pytest.raises(SpecError, match="unknown options"):
        pyroem.fit(SPEC, lambda: iter([data]), learning_rate=0.1)


def test_parquet_is_streamed_when_pyarrow_is_installed(data, reference, tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "x.parquet"
    pd.DataFrame(data, columns=["a", "b"]).to_parquet(path, row_group_size=300)
    _same_fit(_stream_fit(str(path)), reference)


def test_parquet_files_are_sharded_by_row_groups(tmp_path, monkeypatch):
    """Fewer Parquet files than ranks: each rank reads only its consecutive row groups
    (5 row groups of 60, 60, 60, 60, 30 rows over 2 ranks: groups 0-1 and 2-4), and the
    shards in rank order are the file; more files than ranks: consecutive files."""
    pq = pytest.importorskip("pyarrow.parquet")
    data = np.arange(540.0).reshape(270, 2)
    path = tmp_path / "x.parquet"
    pd.DataFrame(data, columns=["a", "b"]).to_parquet(path, row_group_size=60)
    assert pq.ParquetFile(path).num_row_groups == 5
    requested = []
    iter_batches = pq.ParquetFile.iter_batches

    def recording(self, *args, **kwargs):
        requested.append(kwargs.get("row_groups"))
        return iter_batches(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recording)
    source = open_source(str(path), 50)
    shards = [source.shard(rank, 2) for rank in range(2)]
    rows = [torch.cat(list(shard)).numpy() for shard in shards]
    np.testing.assert_array_equal(rows[0], data[:120])
    np.testing.assert_array_equal(rows[1], data[120:])
    assert requested == [[0, 1], [2, 3, 4]]
    assert all(shard.ordered for shard in shards)
    # Two files (row groups of 40, 40, 20 and 40, 40, 40, 40, 10 rows) over three ranks:
    # groups [0, 2), [2, 5), [5, 8) of the eight.
    pd.DataFrame(data[:100], columns=["a", "b"]).to_parquet(
        tmp_path / "p-0.parquet", row_group_size=40
    )
    pd.DataFrame(data[100:], columns=["a", "b"]).to_parquet(
        tmp_path / "p-1.parquet", row_group_size=40
    )
    source = open_source(str(tmp_path / "p-*.parquet"), 50)
    parts = [torch.cat(list(source.shard(rank, 3))).numpy() for rank in range(3)]
    np.testing.assert_array_equal(np.concatenate(parts), data)
    assert [len(part) for part in parts] == [80, 100, 90]
