"""The same Mixture fitted by every method answers the whole common interface.

``predict``, ``predict_proba`` and ``score_samples`` are held against the mixture
density built with SciPy from the fit's own parameters; ``summary`` and ``to_arviz``
must answer; ``save`` → ``pyroem.load`` must give the same predictions bit for bit.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import special, stats

import pyroem
from pyroem.errors import FitFileError, NotSupportedError

#: Short runs: the interface is checked, not the quality of the fit.
OPTIONS = {
    "map-em": {},
    "vb-em": {"max_iter": 100, "num_draws": 200},
    "mcmc-em": {"max_iter": 3, "num_samples": 20},
    "nuts": {"num_samples": 20, "warmup_steps": 20, "num_chains": 2},
}
METHODS = list(pyroem.METHODS)


def _scipy_joint(params: dict[str, torch.Tensor], data: np.ndarray) -> np.ndarray:
    """``log w_k + log N(x_n | μ_k, Σ_k)``, ``(num_data, K)``, by SciPy."""
    p = {name: value.detach().double().numpy() for name, value in params.items()}
    columns = [
        np.log(weight) + stats.multivariate_normal(mean, covariance).logpdf(data)
        for weight, mean, covariance in zip(p["weights"], p["means"], p["covariances"], strict=True)
    ]
    return np.stack(columns, -1)


def test_methods_cover_the_registry() -> None:
    assert set(OPTIONS) == set(pyroem.METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_answers_the_common_interface(method: str, tmp_path: Path) -> None:
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _check_interface(method, tmp_path)
    finally:
        torch.set_default_dtype(default_dtype)


def _check_interface(method: str, tmp_path: Path) -> None:
    spec = pyroem.Mixture(2)
    data, _ = spec.simulate(60, seed=1, dim=2)
    new, _ = spec.simulate(20, seed=2, dim=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = pyroem.fit(spec, data, method=method, seed=0, **OPTIONS[method])
        proba = fit.predict_proba(new).numpy()
        np.testing.assert_allclose(proba.sum(-1), 1.0, rtol=1e-12)
        np.testing.assert_array_equal(fit.predict(new).numpy(), proba.argmax(-1))
        scores = fit.score_samples(new).numpy()
        assert scores.shape == (len(new),) and np.isfinite(scores).all()
        if method != "vb-em":
            # Scored at the point estimate fit.params (nuts: the posterior mean): the exact
            # posterior of z there (vb-em's uses the variational expectations, held
            # against scikit-learn's BayesianGaussianMixture in test_cavi_sklearn.py).
            joint = _scipy_joint(fit.params, new.numpy())
            expected = np.exp(joint - special.logsumexp(joint, -1, keepdims=True))
            np.testing.assert_allclose(proba, expected, rtol=1e-9, atol=1e-300)
            np.testing.assert_allclose(scores, special.logsumexp(joint, -1), rtol=1e-9)
        summary = fit.summary()
        assert isinstance(summary, str) and method in summary
        idata = fit.to_arviz()
        assert "posterior" in idata.groups()
        path = tmp_path / "fit.npz"
        fit.save(path)
        loaded = pyroem.load(path)
        assert loaded.method == method
        assert torch.equal(loaded.predict(new), fit.predict(new))
        assert torch.equal(loaded.predict_proba(new), fit.predict_proba(new))
        assert torch.equal(loaded.score_samples(new), fit.score_samples(new))


def test_a_program_fit_refuses_mixture_scores_clearly() -> None:
    def program(x: torch.Tensor) -> None:
        loc = pyro.param("loc", torch.tensor(0.0, dtype=x.dtype))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    fit = pyroem.fit(program, torch.tensor([0.5, 1.5, 2.5], dtype=torch.float64))
    for name in ("predict", "predict_proba", "score_samples"):
        with pytest.raises(NotSupportedError, match=r"pyroem\.Mixture"):
            getattr(fit, name)(torch.zeros(2, 1))


def _two_means(data: torch.Tensor) -> None:
    """A two-component mixture of unit-variance normals as a Pyro program."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.full((2,), 2.0, dtype=data.dtype)))
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(torch.zeros((), dtype=data.dtype), 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("x", dist.Normal(locs[assignment], 1.0), obs=data)


@pytest.mark.parametrize("method", METHODS)
def test_every_fit_is_one_kind_of_object_and_loads_back_as_it(method: str, tmp_path: Path) -> None:
    """A Mixture's fit and a Pyro program's fit, by every method, are both a
    ``pyroem.Fit``; ``pyroem.load`` gives back the class of what was saved (the Mixture's
    view for a Mixture), with the same parameters bit for bit and scores that agree with
    SciPy's density at those parameters."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        spec = pyroem.Mixture(2)
        data, _ = spec.simulate(40, seed=3, dim=2)
        x = torch.cat(
            [torch.randn(15, generator=torch.Generator().manual_seed(4)) - 3, data[:15, 0] + 3]
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mixture = pyroem.fit(spec, data, method=method, seed=0, **OPTIONS[method])
            program = pyroem.fit(_two_means, x, method=method, seed=0, **OPTIONS[method])
        for fit in (mixture, program):
            assert isinstance(fit, pyroem.Fit) and fit.method == method
        # map-em and CAVI fit the Mixture by its own kernels; the others through its
        # program, with the Mixture's view for predictions and saving.
        assert mixture.kind == ("mixture" if method in ("map-em", "vb-em") else "program")
        assert mixture.mixture is not None and program.mixture is None

        mixture.save(tmp_path / "mixture.npz")
        loaded = pyroem.load(tmp_path / "mixture.npz")
        saved = mixture.mixture
        assert isinstance(loaded, pyroem.Fit) and type(loaded) is type(saved)
        # (Its repr shows the model as saved, with the prior's numbers resolved.)
        assert loaded.summary() == saved.summary()
        # The training data are not saved: the groups drawn from them are left out.
        _assert_same_inference_data(
            loaded.to_arviz(log_likelihood=False, posterior_predictive=False),
            saved.to_arviz(log_likelihood=False, posterior_predictive=False),
            skip=frozenset({"observed_data"}),
        )
        assert loaded.method == method and loaded.num_iterations == mixture.num_iterations
        for name, value in saved.params.items():
            assert torch.equal(loaded.params[name], value), name
        joint = _scipy_joint(loaded.params, data.numpy())
        np.testing.assert_allclose(
            loaded.log_likelihood(), special.logsumexp(joint, -1).sum(), rtol=1e-9
        )

        program.save(tmp_path / "program.npz")
        restored = pyroem.load(tmp_path / "program.npz", _two_means, x)
        assert type(restored) is type(program) and restored.method == method
        assert restored.summary() == program.summary() and repr(restored) == repr(program)
        _assert_same_inference_data(restored.to_arviz(), program.to_arviz())
        if method == "vb-em":
            # The guide is code, which is not saved: asked for, it says so.
            for name in ("guide", "param_state"):
                with pytest.raises(NotSupportedError, match="loaded from a file"):
                    getattr(restored, name)
            with pytest.raises(NotSupportedError, match="loaded from a file"):
                with restored.scope():
                    pass
        assert restored.params.keys() == program.params.keys()
        for name, value in program.params.items():
            assert torch.equal(restored.params[name], value), name
        assert restored.log_likelihood() == program.log_likelihood()
        assert restored.bic() == program.bic() and restored.aic() == program.aic()
        for name, value in program.history._asdict().items():
            np.testing.assert_array_equal(getattr(restored.history, name), value)
        # The program's log-likelihood at its fitted parameters, by SciPy.
        params = restored.params
        weights = params["weights"].numpy()
        locs = params["locs"].numpy()
        expected = special.logsumexp(
            np.log(weights) + stats.norm(locs, 1.0).logpdf(x.numpy()[:, None]), -1
        ).sum()
        np.testing.assert_allclose(restored.log_likelihood(), expected, rtol=1e-9)
    finally:
        torch.set_default_dtype(default_dtype)


def _assert_same_inference_data(
    actual: Any, expected: Any, skip: frozenset[str] = frozenset()
) -> None:
    """The same groups, variables, coordinates, values and attributes (but the time
    ArviZ stamps each group with)."""
    assert set(actual.groups()) - skip == set(expected.groups()) - skip
    for group in set(expected.groups()) - skip:
        got, want = actual[group], expected[group]
        assert set(got.data_vars) == set(want.data_vars), group
        for name in want.data_vars:
            assert got[name].dims == want[name].dims, (group, name)
            np.testing.assert_allclose(
                got[name].values, want[name].values, rtol=1e-12, err_msg=f"{group}/{name}"
            )
        for dim, values in want.coords.items():
            np.testing.assert_array_equal(got.coords[dim].values, values.values)
        stamp = "created_at"
        assert {k: v for k, v in got.attrs.items() if k != stamp} == {
            k: v for k, v in want.attrs.items() if k != stamp
        }, group


@pytest.fixture
def float64() -> Iterator[None]:
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default_dtype)


@pytest.mark.usefixtures("float64")
def test_a_program_fit_saved_without_its_class_loads_as_a_program_fit(tmp_path: Path) -> None:
    """An archive as earlier versions wrote it (no class, none of the method's own
    results) still loads, as the common :class:`~pyroem.ProgramFit`."""
    x = torch.tensor([-3.1, -2.7, -3.4, 2.9, 3.3, 3.0], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = pyroem.fit(_two_means, x, method="mcmc-em", seed=0, **OPTIONS["mcmc-em"])
    fit.save(tmp_path / "new.npz")
    with np.load(tmp_path / "new.npz", allow_pickle=False) as archive:
        arrays = {
            key: archive[key]
            for key in archive.files
            if not key.startswith(("diagnostics", "parameter_trace/"))
        }
    meta = json.loads(str(arrays["meta"]))
    for key in ("final_diagnostics", "problems", "schedule", "burn_in", "latents"):
        del meta[key]
    del meta["log_likelihood_se"]
    # Named MCMCEMFit but without its own results, the file is refused, and says why.
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "damaged.npz", **arrays)
    with pytest.raises(FitFileError, match="MCMCEMFit results are incomplete"):
        pyroem.load(tmp_path / "damaged.npz", _two_means, x)
    del meta["class"]
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "old.npz", **arrays)
    old = pyroem.load(tmp_path / "old.npz", _two_means, x)
    assert type(old) is pyroem.ProgramFit and old.method == "mcmc-em"
    assert old.summary() == pyroem.ProgramFit.summary(fit)
    for name, value in fit.params.items():
        assert torch.equal(old.params[name], value), name
    for name, value in fit.draws.items():
        assert torch.equal(old.draws[name], value), name


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("method", ["map-em", "vb-em"])
def test_a_mixture_fit_by_any_method_starts_another(method: str) -> None:
    """``init=`` takes a previous fit of the Mixture whatever its method (here MCMC-EM,
    fitted through the Mixture's program): the same fit as from its parameters."""
    spec = pyroem.Mixture(2)
    data, _ = spec.simulate(40, seed=3, dim=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = pyroem.fit(spec, data, method="mcmc-em", seed=0, **OPTIONS["mcmc-em"])
        assert previous.kind == "program" and previous.mixture is not None
        warm = pyroem.fit(spec, data, method=method, init=previous, max_iter=5)
        given = pyroem.fit(spec, data, method=method, init=previous.mixture.params, max_iter=5)
    for name, value in given.params.items():
        assert torch.equal(warm.params[name], value), name


def _random_effects(y: torch.Tensor, prior: bool = False) -> None:
    """A continuous latent per observation, which MAP-EM cannot sum out; its mean a
    parameter, or with ``prior`` a latent too (for NUTS)."""
    if prior:
        loc = pyro.sample("loc", dist.Normal(torch.zeros((), dtype=y.dtype), 10.0))
    else:
        loc = pyro.param("loc", torch.zeros((), dtype=y.dtype))
    with pyro.plate("data", len(y)):
        effect = pyro.sample("effect", dist.Normal(loc, 1.0))
        pyro.sample("y", dist.Normal(effect, 1.0), obs=y)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
    ("method", "options"),
    [
        (
            "mcmc-em",
            {
                **OPTIONS["mcmc-em"],
                "num_chains": 2,
                "warmup_steps": 20,
                "final_draws": 20,
                "log_likelihood_samples": 50,
            },
        ),
        ("vb-em", {"max_iter": 50}),
        ("nuts", OPTIONS["nuts"]),
    ],
)
def test_a_program_with_local_latents_loads_back_as_its_class(
    method: str, options: dict[str, Any], tmp_path: Path
) -> None:
    """The program is rebuilt as its method saw it (local continuous latents sampled or
    covered by the guide), so the fit loads back whole."""
    y = torch.randn(12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prior = method == "nuts"
        fit = pyroem.fit(_random_effects, y, prior, method=method, seed=0, **options)
        fit.save(tmp_path / "fit.npz")
        loaded = pyroem.load(tmp_path / "fit.npz", _random_effects, y, prior)
        assert type(loaded) is type(fit)
        assert loaded.summary() == fit.summary()
        _assert_same_inference_data(loaded.to_arviz(), fit.to_arviz())
