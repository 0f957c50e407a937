"""SQUAREM's safeguard on a map whose extrapolation overshoots onto a cliff.

The EM map ``d -> d (1/2 + d)`` contracts faster near its fixed point 0, so the S3
step (which assumes a constant rate) overshoots past 0, where the objective drops
to -100. By hand, from ``d0 = 0.4``: ``d1 = 0.36``, ``d2 = 0.3096``, ``α = -0.04 /
0.0104``, the jump lands at ``-0.0615`` (rejected); halfway to -1, ``α' = (α - 1)/2``
lands at ``0.1451`` (accepted), and one EM step from there is the cycle's result.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from pyroem.em import Engine, EStepResult, MStepResult, run_em
from pyroem.engines.squarem import SquaremEngine
from pyroem.errors import ConvergenceWarning


def _objective(d: float) -> float:
    return -(d**2) if d >= 0 else -100.0


class _Cliff(Engine):
    name = "cliff"

    def init(self, restart: int) -> MStepResult:
        return MStepResult({"d": torch.tensor([0.4], dtype=torch.float64)})

    def e_step(self, params: Any) -> EStepResult:
        return EStepResult(None, _objective(float(params["d"])), math.nan)

    def m_step(self, stats: Any, params: Any, iteration: int) -> MStepResult:
        d = params["d"]
        return MStepResult({"d": d * (0.5 + d)})


def _squarem() -> SquaremEngine:
    return SquaremEngine(_Cliff(), lambda params: params["d"].clone(), lambda u: {"d": u})


def test_rejected_jump_falls_back_and_the_objective_never_decreases() -> None:
    result = run_em(_squarem(), n_init=1, tol=1e-12, max_iter=6)
    objectives = result.best.history.objective
    assert bool((np.diff(objectives) >= 0).all())
    alpha = -0.04 / 0.0104
    halved = (alpha - 1) / 2
    assert result.best.info[1]["squarem_alpha"] == pytest.approx(halved, rel=1e-9)
    jump = 0.4 - 2 * halved * (-0.04) + halved**2 * (-0.0104)
    stabilised = jump * (0.5 + jump)
    assert objectives[1] == pytest.approx(-(stabilised**2), rel=1e-9)
    # The unguarded jump would have fallen off the cliff.
    unguarded = 0.4 - 2 * alpha * (-0.04) + alpha**2 * (-0.0104)
    assert _objective(unguarded) == -100.0


def test_plain_steps_are_kept_when_every_jump_fails() -> None:
    """With no halving allowed to succeed (every jump lands below θ₂'s objective), the
    cycle's result is the double EM step."""

    class _Flat(_Cliff):
        def e_step(self, params: Any) -> EStepResult:
            d = float(params["d"])
            # Only points the plain map reaches score well.
            reachable = any(abs(d - v) < 1e-12 for v in (0.4, 0.36, 0.3096))
            return EStepResult(None, _objective(d) if reachable else -100.0, math.nan)

    engine = SquaremEngine(_Flat(), lambda params: params["d"].clone(), lambda u: {"d": u})
    with pytest.warns(ConvergenceWarning):
        result = run_em(engine, n_init=1, tol=1e-12, max_iter=1)
    assert float(result.best.params["d"]) == pytest.approx(0.3096, rel=1e-12)
    assert result.best.info[1]["squarem_alpha"] == -1.0
