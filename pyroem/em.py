"""The one EM loop: iterations, convergence, history, progress, restarts.

Engines supply an E-step (``params -> EStep``: statistics plus the objective at
``params``) and an M-step (``(stats, params) -> params``). This module owns
everything else, so every EM variant converges, records and restarts alike.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from pyroem.errors import ConvergenceWarning
from pyroem.estep.enumerate import EStep

__all__ = ["EMRun", "History", "run_em"]


class History(NamedTuple):
    """Per-iteration record of one EM run; entry 0 is the starting point.

    Attributes:
        objective: the objective after each M-step (``log p(x, θ_t)`` for MAP-EM), ``(T+1,)``.
        log_likelihood: ``log p(x | θ_t)``, z summed out, ``(T+1,)``.
        elapsed: seconds since the run started, ``(T+1,)``.
    """

    objective: np.ndarray
    log_likelihood: np.ndarray
    elapsed: np.ndarray

    @property
    def change(self) -> np.ndarray:
        """Objective change per iteration, ``(T,)``."""
        return np.diff(self.objective)


class EMRun(NamedTuple):
    """Outcome of one EM run from one starting point."""

    params: Any
    last: EStep
    history: History
    converged: bool
    num_iterations: int


def run_em(
    e_step: Callable[[Any], EStep],
    m_step: Callable[[Any, Any], Any],
    params: Any,
    *,
    num_data: float,
    tol: float,
    max_iter: int,
    progress: bool = False,
    description: str = "EM",
) -> EMRun:
    r"""Alternate E- and M-steps until the objective settles.

    Converged when the objective's change per data point falls below ``tol``:
    :math:`|\mathcal{L}_t - \mathcal{L}_{t-1}| / N < \text{tol}`. Each E-step
    serves twice: it scores ``θ_t`` (the history) and gives the statistics for
    ``θ_{t+1}``, so the returned parameters are always the scored ones.

    Args:
        e_step: ``params -> EStep``.
        m_step: ``(stats, params) -> params``.
        params: starting parameters.
        num_data: ``N``, to scale the tolerance.
        tol: tolerance on the per-datum objective change.
        max_iter: most M-steps.
        progress: show a progress bar.
        description: progress bar label.

    Returns:
        The final parameters with their E-step, history and convergence flag.
    """
    start = time.perf_counter()
    current = e_step(params)
    objectives = [current.objective]
    log_likelihoods = [current.log_likelihood]
    elapsed = [time.perf_counter() - start]
    converged = False
    iterations = 0
    with tqdm(total=max_iter, desc=description, disable=not progress, leave=False) as bar:
        for _ in range(max_iter):
            params = m_step(current.stats, params)
            current = e_step(params)
            objectives.append(current.objective)
            log_likelihoods.append(current.log_likelihood)
            elapsed.append(time.perf_counter() - start)
            iterations += 1
            change = abs(objectives[-1] - objectives[-2]) / num_data
            bar.update(1)
            bar.set_postfix(objective=f"{objectives[-1]:.6g}", change=f"{change:.2e}")
            if not math.isfinite(objectives[-1]):
                break
            if change < tol:
                converged = True
                break
    history = History(np.array(objectives), np.array(log_likelihoods), np.array(elapsed))
    return EMRun(params, current, history, converged, iterations)


def best_of_restarts(run_once: Callable[[int], EMRun], n_init: int) -> tuple[EMRun, list[float]]:
    """Run ``n_init`` restarts and keep the one with the highest final objective.

    Warns with :class:`ConvergenceWarning` if the kept run did not converge.

    Returns:
        The best run and every restart's final objective.
    """
    best: EMRun | None = None
    finals = []
    for restart in range(n_init):
        run = run_once(restart)
        finals.append(float(run.last.objective))
        if best is None or run.last.objective > best.last.objective:
            best = run
    assert best is not None
    if not best.converged:
        last_change = abs(best.history.change[-1]) if best.num_iterations else float("nan")
        warnings.warn(
            f"EM did not converge in {best.num_iterations} iterations (last change of the "
            f"objective {last_change:.3g}); "
            "raise max_iter or tol, or check the model",
            ConvergenceWarning,
            stacklevel=3,
        )
    return best, finals
