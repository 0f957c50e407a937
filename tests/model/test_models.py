"""The example scripts in ``models/`` run, and their hand-written Pyro programs agree
with pyroem.

Each script writes its model out by hand as a plain Pyro program (Dirichlet weights,
conjugate priors computed by hand, an enumerated Categorical assignment, the
likelihood from ``pyro.distributions``). Its log joint, computed by Pyro's
``TraceEnum_ELBO`` at the fitted parameters, shares no code with pyroem's batched
kernels, so agreement with ``fit.log_joint()`` checks the kernels, the default
priors and the objective together.
"""

from __future__ import annotations

import math
import runpy
from pathlib import Path
from typing import Any

import pytest
import torch

import pyroem

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
SCRIPTS = [
    "gmm.py",
    "poisson_mixture.py",
    "bernoulli_mixture.py",
    "hmm.py",
    "robust_mixture.py",
    # MCMC-EM to convergence: about a minute.
    pytest.param("mixed_effects.py", marks=pytest.mark.slow),
]


def _load(name: str) -> dict[str, Any]:
    """The script's globals, without running its ``__main__`` block."""
    return runpy.run_path(str(MODELS / name), run_name="example")


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_runs_and_hand_written_program_matches(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _load(name)["main"]()
    printed = capsys.readouterr().out
    assert "Interpretation" in printed or "BIC" in printed
    checks = result["checks"]
    assert checks
    for key, check in checks.items():
        assert math.isfinite(check["hand_written"]), key
        assert check["hand_written"] == pytest.approx(check["pyroem"], rel=1e-9, abs=0), key


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_has_guarded_main(name: str) -> None:
    source = (MODELS / name).read_text()
    assert 'if __name__ == "__main__":\n    main()' in source
    namespace = _load(name)
    assert callable(namespace["main"])


def test_fitted_poisson_mixture_is_a_local_maximum_of_the_hand_written_program() -> None:
    """MAP-EM's fixed point maximises the hand-written log joint: moving any rate or
    the weights off it lowers the log joint Pyro computes."""
    namespace = _load("poisson_mixture.py")
    data = pyroem.datasets.load_discoveries().data
    fit = pyroem.fit(pyroem.Mixture(2, "poisson"), data, n_init=3, seed=0, tol=1e-12)
    hyper = namespace["default_prior"](data)

    def hand_written(params: dict[str, torch.Tensor]) -> float:
        return namespace["log_joint"](namespace["poisson_mixture_model"], params, data, 2, **hyper)

    best = hand_written(fit.params)
    assert best == pytest.approx(fit.log_joint(), rel=1e-9, abs=0)
    for k in range(2):
        for step in (1e-3, -1e-3):
            moved = fit.params
            moved["rates"] = moved["rates"].clone()
            moved["rates"][k] *= 1 + step
            assert hand_written(moved) < best
    for step in (1e-3, -1e-3):
        moved = fit.params
        moved["weights"] = moved["weights"] + torch.tensor([step, -step], dtype=torch.float64)
        assert hand_written(moved) < best


def test_hand_written_gaussian_program_detects_a_wrong_prior() -> None:
    """The check can fail: a hand-written prior that differs from mclust's by a
    little changes the log joint by far more than the tolerance."""
    namespace = _load("gmm.py")
    data = pyroem.datasets.load_faithful().data
    fit = pyroem.fit(pyroem.Mixture(2, "gaussian", prior="mclust"), data, seed=0)
    hyper = namespace["mclust_prior"](data, 2)
    log_joint, model = namespace["log_joint"], namespace["gaussian_mixture_model"]
    right = log_joint(model, fit.params, data, 2, **hyper)
    assert right == pytest.approx(fit.log_joint(), rel=1e-9, abs=0)
    wrong = log_joint(model, fit.params, data, 2, **{**hyper, "dof": hyper["dof"] + 0.1})
    assert abs(wrong - fit.log_joint()) > 1e-6 * abs(fit.log_joint())


@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical", "tied"])
def test_benchmark_runs_and_agrees_with_sklearn(
    covariance_type: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench/bench_gmm.py on a small problem: pyroem and scikit-learn, from the same start,
    trace the same log-likelihoods and stop at the same one. The clusters are so well
    separated that most responsibilities underflow (log-responsibilities far below -708),
    which the E-step sets to zero."""
    pytest.importorskip("sklearn")
    compare = runpy.run_path(str(ROOT / "bench" / "bench_gmm.py"), run_name="bench_gmm")["compare"]
    numbers = compare(
        3000, 8, 4, covariance_type, tol=1e-6, max_iter=200, iterations=5, repeats=1, seed=1
    )
    assert "ratio" in capsys.readouterr().out
    assert numbers["final_relative_difference"] < 1e-8
    if math.isfinite(numbers["trace_relative_difference"]):
        assert numbers["trace_relative_difference"] < 1e-8
