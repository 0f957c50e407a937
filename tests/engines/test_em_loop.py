"""The one EM loop: restarts that survive a failed start, the per-iteration callback,
Ctrl-C, and CAVI's final q(z)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

import pyroem
from pyroem.datasets import load_faithful, load_iris
from pyroem.em import Iteration
from pyroem.errors import ConvergenceWarning, SingularCovarianceError

# Published maximum log-likelihood of a 3-component full-covariance gaussian mixture on
# the iris measurements (scikit-learn's GaussianMixture and mclust's VVV, G=3, reach it).
IRIS_LOG_LIKELIHOOD = -180.1855


def test_a_failed_restart_is_recorded_and_skipped() -> None:
    data = load_iris().data
    # With seed 0 the third of ten k-means++ starts collapses a covariance.
    with pytest.warns(ConvergenceWarning, match=r"1 of 10 restarts failed.*restart 3"):
        fit = pyroem.fit(pyroem.Mixture(3, prior=None), data, n_init=10, seed=0)
    assert fit.log_likelihood() == pytest.approx(IRIS_LOG_LIKELIHOOD, abs=1e-3)
    assert len(fit.restart_objectives) == 10
    assert math.isnan(fit.restart_objectives[2])
    assert sum(math.isnan(value) for value in fit.restart_objectives) == 1
    (failure,) = fit.options["failed_restarts"]
    assert failure.startswith("restart 3: SingularCovarianceError")
    # The kept run is the best of the valid ones.
    assert fit.history.objective[-1] == max(v for v in fit.restart_objectives if v == v)


def test_an_error_only_when_every_restart_fails() -> None:
    data = torch.tensor([[0.0, 0.0], [1.0, 0.5], [2.0, 2.5], [3.0, 1.0]], dtype=torch.float64)
    with pytest.raises(SingularCovarianceError, match=r"every one of the 3 restarts failed") as err:
        pyroem.fit(pyroem.Mixture(3, prior=None), data, n_init=3, seed=0)
    assert "use a prior" in str(err.value)
    assert str(err.value).count("SingularCovarianceError") == 3


class _StopAt:
    """A callback that records every iteration and raises KeyboardInterrupt at one."""

    def __init__(self, stop: int) -> None:
        self.stop = stop
        self.seen: list[Iteration] = []

    def __call__(self, state: Iteration) -> None:
        self.seen.append(state)
        if state.iteration == self.stop:
            raise KeyboardInterrupt


@pytest.mark.parametrize("method", ["map-em", "vb-em"])
def test_keyboard_interrupt_returns_the_state_so_far(method: str) -> None:
    data = load_faithful().data
    spec = pyroem.Mixture(2)
    options: dict[str, Any] = {} if method == "map-em" else {"num_draws": 0}
    stop = _StopAt(5)
    with pytest.warns(ConvergenceWarning, match="interrupted"):
        stopped = pyroem.fit(spec, data, method=method, seed=1, callback=stop, **options)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        reference = pyroem.fit(spec, data, method=method, seed=1, tol=0.0, max_iter=5, **options)
    assert [state.iteration for state in stop.seen] == [1, 2, 3, 4, 5]
    assert stop.seen[-1].objective == reference.history.objective[-1]
    assert not stopped.converged and stopped.options["interrupted"]
    assert stopped.num_iterations == 5
    np.testing.assert_array_equal(stopped.history.objective, reference.history.objective)
    for name, value in reference.params.items():
        torch.testing.assert_close(stopped.params[name], value, rtol=0, atol=0)


def test_interrupt_keeps_the_best_finished_restart() -> None:
    data = load_faithful().data
    stop = _StopAt(3)
    seen_restarts: list[int] = []

    def callback(state: Iteration) -> None:
        seen_restarts.append(state.restart)
        if state.restart == 1:
            stop(state)

    with pytest.warns(ConvergenceWarning, match="interrupted"):
        fit = pyroem.fit(pyroem.Mixture(2), data, n_init=4, seed=0, callback=callback)
    assert set(seen_restarts) == {0, 1}
    assert len(fit.restart_objectives) == 2 and fit.options["interrupted"]
    # The interrupted restart competes with the finished one; the better is kept.
    assert fit.history.objective[-1] == max(fit.restart_objectives)


def test_cavi_labels_are_the_predictions_of_the_final_q() -> None:
    data = load_faithful().data
    fit = pyroem.fit(
        pyroem.Mixture(4), data, method="vb-em", max_iter=2, tol=0.0, seed=0, num_draws=0
    )
    torch.testing.assert_close(fit.labels, fit.predict(data), rtol=0, atol=0)


def test_default_stopping_rule_gives_the_mle_to_printed_digits() -> None:
    """1-D Old Faithful waiting times, two components, no prior: the default ``tol``
    must deliver the maximum-likelihood parameters to the printed digits (the objective
    alone is flat there: EM used to stop at means 54.6217, 80.0954)."""
    sklearn_mixture = pytest.importorskip("sklearn.mixture")
    data = load_faithful().data[:, 1:2]
    reference = sklearn_mixture.GaussianMixture(
        2, tol=1e-14, max_iter=100000, reg_covar=0.0, means_init=[[50.0], [80.0]]
    ).fit(data.numpy())
    fit = pyroem.fit(pyroem.Mixture(2, prior=None), data, seed=0)
    assert fit.converged
    order = fit.params["means"][:, 0].argsort()
    params = {name: value[order].numpy() for name, value in fit.params.items()}
    np.testing.assert_allclose(params["means"], reference.means_, rtol=1e-6)
    np.testing.assert_allclose(params["covariances"], reference.covariances_, rtol=1e-6)
    np.testing.assert_allclose(params["weights"], reference.weights_, rtol=1e-6)
    # The objective alone (scikit-learn's rule) stops earlier, short of those digits.
    coarse = pyroem.fit(pyroem.Mixture(2, prior=None), data, seed=0, stop_rule="objective")
    assert coarse.num_iterations < fit.num_iterations
    means = np.sort(coarse.params["means"][:, 0].numpy())
    assert np.abs(means - np.sort(reference.means_[:, 0])).max() > 1e-3
