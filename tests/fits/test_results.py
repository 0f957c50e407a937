"""The fit result: save/load, predictions, scores, restarts, reproducibility, summary.

Scores are checked against independent references: the log-likelihood against
mixture densities built directly from ``torch.distributions``, the number of free
parameters counted by hand (and, for Gaussians, by scikit-learn's
``GaussianMixture._n_parameters``).
"""

from __future__ import annotations

import io
import json
import math
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributions as td
from sklearn.mixture import GaussianMixture

import pyroem
from pyroem.datasets import load_faithful, load_iris
from pyroem.engines.initialization import initial_params, kmeans_plusplus

COVARIANCE_TYPES = ("full", "diag", "spherical", "tied")


def _gaussian(covariance_type: str, prior: Any = "default") -> Callable[[], pyroem.Mixture]:
    return lambda: pyroem.Mixture(3, covariance_type=covariance_type, prior=prior)


#: id -> (spec factory, data dimension).
CASES: dict[str, tuple[Callable[[], pyroem.Mixture], int]] = {
    **{f"gaussian-{ct}": (_gaussian(ct), 2) for ct in COVARIANCE_TYPES},
    **{f"gaussian-{ct}-flat": (_gaussian(ct, None), 3) for ct in COVARIANCE_TYPES},
    "poisson": (lambda: pyroem.Mixture(2, "poisson"), 3),
    "poisson-flat": (lambda: pyroem.Mixture(2, "poisson", prior=None), 2),
    "exponential": (lambda: pyroem.Mixture(2, "exponential"), 2),
    "bernoulli": (lambda: pyroem.Mixture(3, "bernoulli"), 8),
    "categorical": (lambda: pyroem.Mixture(2, "categorical", num_categories=4), 5),
    "categorical-prior": (
        lambda: pyroem.Mixture(2, pyroem.Categorical(prior=pyroem.Dirichlet(2.0))),
        4,
    ),
}


def _train_and_new_data(spec: pyroem.Mixture, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    train, _ = spec.simulate(300, seed=1, dim=dim)
    new, _ = spec.simulate(50, seed=2, dim=dim)
    if spec.family.name == "categorical":
        # Keep new data inside the training categories (num_categories is inferred).
        new = new.clamp(max=float(train.max()))
    return train, new


@pytest.fixture(scope="module")
def fits() -> dict[str, tuple[pyroem.FitResult, torch.Tensor, torch.Tensor]]:
    """One fit per case, shared by the tests of this module (they do not mutate it)."""
    out = {}
    for name, (make_spec, dim) in CASES.items():
        spec = make_spec()
        train, new = _train_and_new_data(spec, dim)
        out[name] = (pyroem.fit(spec, train, n_init=2, seed=0), train, new)
    return out


# ----------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------


def _assert_same_fit(loaded: pyroem.FitResult, original: pyroem.FitResult, new: Any) -> None:
    assert loaded.params.keys() == original.params.keys()
    for name, value in original.params.items():
        assert loaded.params[name].dtype == value.dtype, name
        assert torch.equal(loaded.params[name], value), name
    for field in pyroem.History._fields:
        np.testing.assert_array_equal(
            getattr(loaded.history, field), getattr(original.history, field)
        )
    assert loaded.method == original.method
    assert loaded.converged == original.converged
    assert loaded.num_iterations == original.num_iterations
    assert loaded.restart_objectives == original.restart_objectives
    assert loaded.removed_components == original.removed_components
    assert torch.equal(loaded.labels, original.labels)
    assert loaded.num_parameters == original.num_parameters
    assert loaded.log_likelihood() == original.log_likelihood()
    assert loaded.log_joint() == original.log_joint()
    assert loaded.bic() == original.bic()
    assert loaded.aic() == original.aic()
    assert torch.equal(loaded.predict(new), original.predict(new))
    assert torch.equal(loaded.predict_proba(new), original.predict_proba(new))
    assert torch.equal(loaded.score_samples(new), original.score_samples(new))
    assert loaded.bic(new) == original.bic(new)
    # The loaded spec spells out the prior the original resolved from its data.
    assert loaded.summary().splitlines()[1:] == original.summary().splitlines()[1:]
    assert loaded.family.explicit().to_config() == original.family.explicit().to_config()
    assert loaded.spec.num_components == original.spec.num_components
    assert torch.equal(loaded.spec.weights_prior, original.spec.weights_prior)


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_round_trip_is_exact(fits: dict[str, Any], case: str, tmp_path: Path) -> None:
    original, _, new = fits[case]
    path = tmp_path / "fit.npz"
    original.save(path)
    _assert_same_fit(pyroem.load(path), original, new)


VB_CASES = [case for case in CASES if not case.endswith("-flat")]


@pytest.mark.parametrize("case", VB_CASES)
def test_vb_em_round_trip_keeps_the_variational_factors(case: str, tmp_path: Path) -> None:
    """A vb-em fit comes back as a VariationalFit: the factors of q, the ELBO, the draws
    and the variational E-step on new data, exactly (not the expected parameters only)."""
    factory, dim = CASES[case]
    spec = factory()
    train, new = _train_and_new_data(spec, dim)
    original = pyroem.fit(spec, train, method="vb-em", seed=0, num_draws=20)
    assert isinstance(original, pyroem.VariationalFit)
    path = tmp_path / "fit.npz"
    original.save(path)
    loaded = pyroem.load(path)
    assert isinstance(loaded, pyroem.VariationalFit)
    _assert_same_fit(loaded, original, new)
    assert loaded.elbo == original.elbo
    assert loaded.weight_threshold == original.weight_threshold
    assert loaded.effective_components == original.effective_components
    assert loaded.variational.keys() == original.variational.keys()
    for factor, values in original.variational.items():
        assert loaded.variational[factor].keys() == values.keys(), factor
        for name, value in values.items():
            assert torch.equal(loaded.variational[factor][name], value), (factor, name)
    assert original.draws is not None and loaded.draws is not None
    assert loaded.draws.keys() == original.draws.keys()
    for name, draws in original.draws.items():
        assert torch.equal(loaded.draws[name], draws), name
    np.testing.assert_array_equal(loaded.sample_stats["elbo"], original.sample_stats["elbo"])
    # The variational E-step differs from responsibilities at the expected parameters,
    # so an equal predict_proba shows q itself came back.
    plain = pyroem.FitResult.predict_proba(loaded, new)
    assert not torch.allclose(plain, loaded.predict_proba(new))


def test_round_trip_of_float32_and_collapsed_components(tmp_path: Path) -> None:
    data, _ = pyroem.Mixture(2).simulate(200, seed=3)
    spec = pyroem.Mixture(5, weights_prior=0.3, prior="mclust")
    with pytest.warns(pyroem.CollapsedComponentWarning, match=r"collapsed"):
        original = pyroem.fit(spec, data, seed=0, dtype="float32")
    assert original.removed_components, "the case should remove a component"
    assert original.num_components == 5 - len(original.removed_components)
    path = tmp_path / "fit.npz"
    original.save(path)
    loaded = pyroem.load(path)
    _assert_same_fit(loaded, original, data[:20] + 0.5)
    assert loaded.params["weights"].dtype == torch.float32


def test_saved_file_is_plain_arrays_and_json(fits: dict[str, Any], tmp_path: Path) -> None:
    original, _, _ = fits["gaussian-full"]
    path = tmp_path / "fit.npz"
    original.save(path)
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    assert all(array.dtype != object for array in arrays.values())
    meta = json.loads(str(arrays["meta"]))
    assert meta["method"] == "map-em"
    assert meta["spec"]["num_components"] == 3


def test_loading_a_file_that_is_not_a_fit(tmp_path: Path) -> None:
    text = tmp_path / "notes.npz"
    text.write_text("not an archive")
    with pytest.raises(pyroem.PyroEMError, match=r"cannot read a pyroem fit"):
        pyroem.load(text)

    plain = tmp_path / "plain.npz"
    np.savez(plain, weights=np.ones(2))
    with pytest.raises(pyroem.PyroEMError, match=r"is not a pyroem fit \(no metadata\)"):
        pyroem.load(plain)

    other = tmp_path / "other.npz"
    np.savez(other, meta=np.array(json.dumps({"format": "something-else"})))
    with pytest.raises(pyroem.PyroEMError, match=r"is not a pyroem fit"):
        pyroem.load(other)

    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, meta=np.array([{"format": "pyroem-fit"}], dtype=object))
    with pytest.raises(pyroem.PyroEMError, match=r"cannot read a pyroem fit"):
        pyroem.load(pickled)

    with pytest.raises(pyroem.PyroEMError, match=r"cannot read a pyroem fit"):
        pyroem.load(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------
# Predictions and scores
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_predictions_are_consistent(fits: dict[str, Any], case: str) -> None:
    result, train, new = fits[case]
    for data in (train, new):
        proba = result.predict_proba(data)
        assert proba.shape == (data.shape[0], result.num_components)
        assert bool((proba >= 0).all())
        torch.testing.assert_close(
            proba.sum(-1), torch.ones(data.shape[0], dtype=proba.dtype), rtol=0, atol=1e-12
        )
        assert torch.equal(result.predict(data), proba.argmax(-1))
    assert torch.equal(result.labels, result.predict(train))


@pytest.mark.parametrize("case", list(CASES))
def test_log_likelihood_forms_agree(fits: dict[str, Any], case: str) -> None:
    result, train, new = fits[case]
    pointwise = result.log_likelihood(pointwise=True)
    assert pointwise.shape == (train.shape[0],)
    assert float(pointwise.sum()) == result.log_likelihood()
    # The fit's own values come from its last E-step's kernels, score_samples' from the
    # scoring kernels: the same numbers to rounding (a few units in the last place).
    assert result.log_likelihood(train) == pytest.approx(result.log_likelihood(), rel=1e-14)
    torch.testing.assert_close(result.score_samples(train), pointwise, rtol=1e-14, atol=0)
    assert float(result.score_samples(new).sum()) == result.log_likelihood(new)
    assert result.history.log_likelihood[-1] == pytest.approx(result.log_likelihood(), rel=1e-12)
    assert result.history.objective[-1] == result.log_joint()


def _component_distribution(family: str, covariance_type: str, params: dict[str, Any]) -> Any:
    """The components as ``torch.distributions`` with batch ``(K,)``, built from params."""
    if family == "gaussian":
        means, covariances = params["means"], params["covariances"]
        num_components, dim = means.shape
        if covariance_type == "full":
            return td.MultivariateNormal(means, covariance_matrix=covariances)
        if covariance_type == "tied":
            return td.MultivariateNormal(
                means, covariance_matrix=covariances.expand(num_components, dim, dim)
            )
        if covariance_type == "spherical":
            covariances = covariances[:, None].expand(num_components, dim)
        return td.Independent(td.Normal(means, covariances.sqrt()), 1)
    if family == "poisson":
        return td.Independent(td.Poisson(params["rates"]), 1)
    if family == "exponential":
        return td.Independent(td.Exponential(params["rates"]), 1)
    if family == "bernoulli":
        return td.Independent(td.Bernoulli(probs=params["probs"]), 1)
    return td.Independent(td.Categorical(probs=params["probs"]), 1)


def _reference_pointwise(result: pyroem.FitResult, data: torch.Tensor) -> torch.Tensor:
    params = result.params
    family = result.spec.family
    covariance_type = getattr(family, "covariance_type", "")
    components = _component_distribution(family.name, covariance_type, params)
    log_prob = components.log_prob(data[:, None, :])  # (N, K)
    return torch.logsumexp(params["weights"].log() + log_prob, dim=-1)


def _free_parameters(case: str, num_components: int, dim: int, num_categories: int) -> int:
    """Free parameters counted by hand: component parameters plus K - 1 weights."""
    k, d = num_components, dim
    if case.startswith("gaussian"):
        covariance = {
            "full": k * d * (d + 1) // 2,
            "diag": k * d,
            "spherical": k,
            "tied": d * (d + 1) // 2,
        }[case.split("-")[1]]
        component = k * d + covariance
    elif case.startswith("categorical"):
        component = k * d * (num_categories - 1)
    else:
        component = k * d
    return component + k - 1


@pytest.mark.parametrize("case", list(CASES))
def test_scores_match_independent_references(fits: dict[str, Any], case: str) -> None:
    result, train, new = fits[case]
    for data in (train, new):
        reference = _reference_pointwise(result, data)
        torch.testing.assert_close(result.score_samples(data), reference, rtol=1e-10, atol=1e-10)
    log_likelihood = float(_reference_pointwise(result, train).sum())
    num_categories = int(train.max()) + 1
    free = _free_parameters(case, result.num_components, train.shape[1], num_categories)
    assert result.num_parameters == free
    if case.startswith("gaussian"):
        sklearn_model = GaussianMixture(result.num_components, covariance_type=case.split("-")[1])
        sklearn_model.means_ = result.params["means"].numpy()
        assert sklearn_model._n_parameters() == free
    num_data = train.shape[0]
    assert result.bic() == pytest.approx(-2 * log_likelihood + free * math.log(num_data), rel=1e-10)
    assert result.aic() == pytest.approx(-2 * log_likelihood + 2 * free, rel=1e-10)
    new_log_likelihood = float(_reference_pointwise(result, new).sum())
    assert result.bic(new) == pytest.approx(
        -2 * new_log_likelihood + free * math.log(new.shape[0]), rel=1e-10
    )


def test_flat_prior_log_joint_is_the_log_likelihood(fits: dict[str, Any]) -> None:
    """Flat component prior and flat Dirichlet(1) weights: the log joint differs from the
    log-likelihood only by log Dirichlet(π | 1) = log Γ(K)."""
    for case in ("gaussian-full-flat", "poisson-flat"):
        result, _, _ = fits[case]
        log_dirichlet = math.lgamma(result.num_components)
        assert result.log_joint() == pytest.approx(
            result.log_likelihood() + log_dirichlet, rel=1e-12
        )


# ----------------------------------------------------------------------------
# Restarts, seeds, precision, convergence
# ----------------------------------------------------------------------------


def test_same_seed_gives_identical_fits() -> None:
    data = load_iris().data
    spec = pyroem.Mixture(3, covariance_type="diag")
    first = pyroem.fit(spec, data, n_init=3, seed=5)
    second = pyroem.fit(spec, data, n_init=3, seed=5)
    for name, value in first.params.items():
        assert torch.equal(value, second.params[name]), name
    np.testing.assert_array_equal(first.history.objective, second.history.objective)
    assert first.restart_objectives == second.restart_objectives


def test_the_seed_drives_the_starting_point() -> None:
    data = load_iris().data
    spec = pyroem.Mixture(3, covariance_type="diag")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        starts = {
            float(pyroem.fit(spec, data, seed=seed, max_iter=0).history.objective[0])
            for seed in range(4)
        }
    assert len(starts) > 1


def test_restarts_keep_the_best_objective() -> None:
    data = load_iris().data
    result = pyroem.fit(pyroem.Mixture(3), data, n_init=6, seed=0, init="random_from_data")
    assert len(result.restart_objectives) == 6
    assert len({round(value, 6) for value in result.restart_objectives}) > 1, (
        "restarts should reach different optima for this test to mean something"
    )
    assert result.log_joint() == max(result.restart_objectives)
    assert result.history.objective[-1] == result.log_joint()


def test_float32_params_are_close_to_float64() -> None:
    """Same start, same number of iterations: only the precision differs.

    Tolerances are about 1000 float32 epsilons (observed differences are ~50).
    """
    data = load_iris().data
    spec = pyroem.Mixture(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        start = pyroem.fit(spec, data, seed=0, max_iter=5).params
        options: dict[str, Any] = {"init": start, "tol": 0.0, "max_iter": 60}
        double = pyroem.fit(spec, data, **options)
        single = pyroem.fit(spec, data, dtype="float32", **options)
    for name, value in single.params.items():
        assert value.dtype == torch.float32, name
        reference = double.params[name]
        scale = float(reference.abs().max())
        torch.testing.assert_close(value.double(), reference, rtol=0, atol=1e-4 * scale)
    assert single.predict_proba(data).dtype == torch.float32
    assert single.log_likelihood(pointwise=True).dtype == torch.float32
    assert single.log_likelihood() == pytest.approx(double.log_likelihood(), rel=1e-5)
    assert torch.equal(single.labels, double.labels)


def test_float32_with_seeded_start() -> None:
    data = load_faithful().data
    result = pyroem.fit(pyroem.Mixture(2), data, seed=0, dtype="float32", n_init=2)
    assert {value.dtype for value in result.params.values()} == {torch.float32}
    assert result.converged


@pytest.mark.parametrize("max_iter", [0, 1, 3])
def test_convergence_warning_when_max_iter_is_too_small(max_iter: int) -> None:
    data = load_iris().data
    with pytest.warns(pyroem.ConvergenceWarning, match=rf"did not converge in {max_iter} it"):
        result = pyroem.fit(pyroem.Mixture(3), data, seed=0, max_iter=max_iter)
    assert not result.converged
    assert result.num_iterations == max_iter
    assert result.history.objective.shape == (max_iter + 1,)


def test_no_convergence_warning_when_converged() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", pyroem.ConvergenceWarning)
        result = pyroem.fit(pyroem.Mixture(2), load_faithful().data, seed=0)
    assert result.converged
    assert result.num_iterations < 1000


# ----------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_summary_mentions_every_component_weight(fits: dict[str, Any], case: str) -> None:
    result, _, _ = fits[case]
    summary = result.summary()
    rows = [line.split() for line in summary.splitlines()]
    weights = {int(row[0]): float(row[1]) for row in rows if len(row) > 1 and row[0].isdigit()}
    assert sorted(weights) == list(range(result.num_components))
    for k, weight in enumerate(result.params["weights"].tolist()):
        assert weights[k] == pytest.approx(weight, abs=5e-5)
    assert f"{result.log_likelihood():.6f}" in summary
    if case.startswith("gaussian-tied"):
        assert "shared covariance" in summary


# ----- damaged or inconsistent files ------------------------------------------------------


def _saved_fit(tmp_path: Path, spec: pyroem.Mixture | None = None) -> tuple[Path, Any]:
    data, _ = pyroem.Mixture(2).simulate(60, seed=1, dim=2)
    fit = pyroem.fit(spec or pyroem.Mixture(2), data, seed=0)
    path = tmp_path / "fit.npz"
    fit.save(path)
    return path, fit


def _rewrite(path: Path, change: Callable[[dict[str, np.ndarray], dict[str, Any]], None]) -> Path:
    """A copy of the saved fit with ``change`` applied to its arrays and metadata."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    meta = json.loads(str(arrays["meta"]))
    change(arrays, meta)
    arrays["meta"] = np.array(json.dumps(meta))
    changed = path.with_name("changed.npz")
    with open(changed, "wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    return changed


def _set(key: str, value: Any) -> Callable[[dict[str, np.ndarray], dict[str, Any]], None]:
    def change(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        arrays[key] = value(arrays[key]) if callable(value) else value

    return change


def _meta(edit: Callable[[dict[str, Any]], None]) -> Callable[..., None]:
    return lambda arrays, meta: edit(meta)


def _drop(key: str) -> Callable[..., None]:
    return lambda arrays, meta: arrays.pop(key)


def _covariance_type(meta: dict[str, Any]) -> None:
    meta["spec"]["family"]["covariance_type"] = "diag"


def _family(meta: dict[str, Any]) -> None:
    meta["spec"]["family"] = {"family": "poisson", "prior": None}


def _not_positive_definite(covariances: np.ndarray) -> np.ndarray:
    broken = covariances.copy()
    broken[0] = [[1.0, 2.0], [2.0, 1.0]]
    return broken


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (_drop("labels"), r"array 'labels' is missing"),
        (_drop("component/means"), r"has parameters \['covariances', 'means'\]; the file holds"),
        (_meta(_family), r"the 'poisson' family has parameters \['rates'\]"),
        (_meta(lambda meta: meta.update(dim=10**12)), r"does not hold dim=1000000000000"),
        (_meta(_covariance_type), r"init covariances \(diag\) must have shape \(2, 2\)"),
        (_meta(lambda meta: meta.update(dtype="float16")), r"dtype must be float32 or float64"),
        (_meta(lambda meta: meta.pop("num_iterations")), r"'num_iterations' should be a int"),
        (_meta(lambda meta: meta.update(version=7)), r"written in pyroem fit format 7"),
        (_meta(lambda meta: meta["spec"].update(num_components="x")), r"model description"),
        (_set("component/means", lambda m: m[:, :1]), r"means have shape \(2, 1\)"),
        (_set("component/means", lambda m: m * np.nan), r"'component/means' holds NaN"),
        (_set("component/means", lambda m: m.astype(np.float32)), r"dtype float32; expected"),
        (_set("component/covariances", _not_positive_definite), r"parameters are invalid"),
        (_set("weights", lambda w: np.array([1.5, -0.5])), r"weights are not probabilities"),
        (_set("active", lambda a: np.array([0, 0])), r"'active' must hold distinct components"),
        (_set("labels", lambda labels: labels + 5), r"labels must lie in 0..1"),
        (_set("labels", lambda labels: labels[:3]), r"'labels' has shape \(3,\)"),
        (_set("draws/means", np.zeros((1, 4, 3, 3))), r"draws of 'means' have shape"),
        (_set("extra", np.zeros(3)), r"unknown array 'extra'"),
    ],
    ids=[
        "missing-array",
        "missing-parameter",
        "changed-family",
        "huge-dim",
        "changed-covariance-type",
        "bad-dtype",
        "missing-metadata",
        "future-version",
        "bad-spec",
        "wrong-shape-means",
        "nan-means",
        "means-of-another-dtype",
        "covariance-not-positive-definite",
        "weights-outside-the-simplex",
        "repeated-active-component",
        "labels-out-of-range",
        "labels-of-another-length",
        "draws-of-the-wrong-shape",
        "unknown-array",
    ],
)
def test_inconsistent_files_are_refused_before_anything_is_built(
    tmp_path: Path, change: Callable[..., None], pattern: str
) -> None:
    path, _ = _saved_fit(tmp_path)
    with pytest.raises(pyroem.FitFileError, match=pattern):
        pyroem.load(_rewrite(path, change))


def test_damaged_files_are_refused(tmp_path: Path) -> None:
    path, fit = _saved_fit(tmp_path)
    content = path.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(content[: len(content) // 2])
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    # One bit of the stored means flipped: the archive's checksum no longer matches.
    means = fit._internal.components.means.numpy().tobytes()
    at = content.index(means) + 3
    flipped = tmp_path / "flipped.npz"
    flipped.write_bytes(content[:at] + bytes([content[at] ^ 1]) + content[at + 1 :])
    for damaged, pattern in [
        (truncated, r"cannot read a pyroem fit.*BadZipFile"),
        (empty, r"cannot read a pyroem fit.*BadZipFile"),
        (flipped, r"cannot read a pyroem fit.*Bad CRC-32"),
    ]:
        with pytest.raises(pyroem.FitFileError, match=pattern):
            pyroem.load(damaged)


def test_an_array_header_cannot_ask_for_more_than_is_stored(tmp_path: Path) -> None:
    """A header claiming 10**12 entries is refused from the bytes stored, not by trying
    to allocate 8 TB."""
    path, _ = _saved_fit(tmp_path)
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    header = np.lib.format.header_data_from_array_1_0(np.zeros(2))
    header["shape"] = (10**12,)
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    members["weights.npy"] = buffer.getvalue() + np.array([0.5, 0.5]).tobytes()
    huge = tmp_path / "huge.npz"
    with zipfile.ZipFile(huge, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    with pytest.raises(pyroem.FitFileError, match=r"claims shape \(1000000000000,\)"):
        pyroem.load(huge)


def test_a_valid_rewrite_still_loads(tmp_path: Path) -> None:
    """The rewriting itself keeps a fit loadable: the refusals above come from the change."""
    path, fit = _saved_fit(tmp_path)
    loaded = pyroem.load(_rewrite(path, lambda arrays, meta: None))
    torch.testing.assert_close(loaded.params["means"], fit.params["means"], rtol=0, atol=0)


# ----- every method's fit saves ----------------------------------------------------------

SAMPLER_OPTIONS = {
    "mcmc-em": {"max_iter": 2, "num_samples": 20},
    "nuts": {"num_samples": 20, "warmup_steps": 20, "num_chains": 1},
}


@pytest.mark.parametrize("method", ["mcmc-em", "nuts"])
def test_sampler_fits_of_a_mixture_save_and_load(method: str, tmp_path: Path) -> None:
    """The loaded fit has the sampler's parameters and draws bit for bit, and predicts
    as mixture densities built from those parameters with torch.distributions."""
    spec = pyroem.Mixture(2)
    data, _ = spec.simulate(40, seed=1, dim=2)
    new, _ = spec.simulate(15, seed=2, dim=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = pyroem.fit(spec, data, method=method, seed=0, **SAMPLER_OPTIONS[method])
    path = tmp_path / "fit.npz"
    fit.save(path)
    loaded = pyroem.load(path)
    assert isinstance(loaded, pyroem.FitResult) and loaded.method == method
    for name, value in fit.params.items():
        assert torch.equal(loaded.params[name], value)
    for name, value in (fit.draws or {}).items():
        assert loaded.draws is not None and torch.equal(loaded.draws[name], value)
    assert loaded.history.objective.tolist() == fit.history.objective.tolist()
    params = fit.params
    log_prob = _component_distribution("gaussian", "full", params).log_prob(new[:, None, :])
    joint = params["weights"].log() + log_prob
    assert torch.equal(loaded.predict(new), joint.argmax(-1))
    torch.testing.assert_close(loaded.score_samples(new), torch.logsumexp(joint, -1))


def _location_scale(x: torch.Tensor) -> None:
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(loc, scale), obs=x)


def _other_program(x: torch.Tensor) -> None:
    loc = pyro.sample("mean", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def test_program_fits_save_and_load_given_the_program(tmp_path: Path) -> None:
    """Parameters, history and scores come back exactly; the MAP of this conjugate
    model is the closed form (loc = Σx / (N + 1/100), scale = the RMS about it)."""
    torch.set_default_dtype(torch.float64)
    x = torch.linspace(-1.0, 3.0, 20)
    fit = pyroem.fit(_location_scale, x, seed=0, tol=1e-12)
    path = tmp_path / "program.npz"
    fit.save(path)
    with pytest.raises(pyroem.FitFileError, match=r"program _location_scale.*pass it"):
        pyroem.load(path)
    with pytest.raises(pyroem.FitFileError, match=r"holds parameters \['loc', 'scale'\]"):
        pyroem.load(path, _other_program, x)
    loaded = pyroem.load(path, _location_scale, x)
    assert isinstance(loaded, pyroem.ProgramFit) and loaded.method == "map-em"
    for name, value in fit.params.items():
        assert torch.equal(loaded.params[name], value)
    assert loaded.history.objective.tolist() == fit.history.objective.tolist()
    assert loaded.log_joint() == fit.log_joint() and loaded.bic() == fit.bic()
    scale = float(loaded.params["scale"])
    loc = float(x.sum()) / (len(x) + scale**2 / 100)
    assert float(loaded.params["loc"]) == pytest.approx(loc, rel=1e-6)
    assert scale == pytest.approx(float((x - loc).square().mean().sqrt()), rel=1e-6)


# ----- a seeded fit leaves the global random state alone -----------------------------------


def _two_groups(x: torch.Tensor) -> None:
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    locs = pyro.sample("locs", dist.Normal(0.0, 10.0).expand([2]).to_event(1))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Bernoulli(p))
        pyro.sample("x", dist.Normal(locs[..., z.long()], 1.0), obs=x)


SEEDED_OPTIONS = {
    "map-em": {"max_iter": 3},
    "vb-em": {"max_iter": 3},
    "mcmc-em": {"max_iter": 1, "num_samples": 8, "final_draws": 8},
    "nuts": {"num_samples": 5, "warmup_steps": 5, "num_chains": 1},
}


@pytest.mark.parametrize("target", ["program", "mixture"])
@pytest.mark.parametrize("method", list(SEEDED_OPTIONS))
def test_a_seeded_fit_leaves_the_global_torch_rng_as_it_was(method: str, target: str) -> None:
    torch.set_default_dtype(torch.float64)
    x = torch.cat([torch.randn(10) - 2, torch.randn(10) + 2])
    model: Any = _two_groups if target == "program" else pyroem.Mixture(2)
    data = x if target == "program" else x.reshape(-1, 2)
    state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pyroem.fit(model, data, method=method, seed=0, **SEEDED_OPTIONS[method])
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("chunk_size", [4, 7, 65536])
def test_the_chunked_kmeans_plusplus_start_is_the_brute_force_one(chunk_size: int) -> None:
    """Seeding, nearest-centre labels and the start's weights (label counts / N) by
    chunks of 4 or 7 rows equal a NumPy brute force over all rows at once."""
    spec = pyroem.Mixture(3)
    data, _ = spec.simulate(50, seed=3, dim=2)
    family = spec.bind(data)
    rows = kmeans_plusplus(data, 3, torch.Generator().manual_seed(4), chunk_size)
    points = data.numpy()
    chosen = [int(rows[0])]
    for row in rows[1:].tolist():
        nearest = ((points[:, None, :] - points[chosen][None]) ** 2).sum(-1).min(1)
        assert nearest[row] > 0  # drawn in proportion to the distance: never a chosen row
        chosen.append(row)
    labels = ((points[:, None, :] - points[chosen][None]) ** 2).sum(-1).argmin(1)
    start = initial_params(
        spec, family, data, "kmeans++", torch.Generator().manual_seed(4), chunk_size
    )
    counts = np.bincount(labels, minlength=3)
    np.testing.assert_allclose(start.weights.numpy(), counts / counts.sum(), rtol=1e-12)
    whole = initial_params(spec, family, data, "kmeans++", torch.Generator().manual_seed(4))
    for name, value in whole.components._asdict().items():
        torch.testing.assert_close(getattr(start.components, name), value, rtol=1e-12, atol=0)
