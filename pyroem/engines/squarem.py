r"""Safeguarded acceleration of EM: SQUAREM (Varadhan & Roland, 2008).

EM is a fixed-point iteration :math:`θ_{t+1} = F(θ_t)` that converges linearly, slowly
where the fraction of missing information is large. SQUAREM's scheme S3 extrapolates
along two EM steps from :math:`θ_0`, in coordinates where every point is valid (here:
each parameter mapped to an unconstrained space):

.. math::

    θ_1 = F(θ_0),\quad θ_2 = F(θ_1),\quad r = θ_1 - θ_0,\quad v = θ_2 - 2θ_1 + θ_0,

    α = -\|r\| / \|v\|,\qquad θ' = θ_0 - 2α r + α^2 v,

then takes one EM step from :math:`θ'` to stabilise. ``α = -1`` gives back
:math:`θ_2`. The safeguard keeps EM's guarantee: the extrapolated point is accepted
only if its objective is at least that of :math:`θ_2` (else ``α`` moves halfway to
``-1``, twice, and then :math:`θ_2` itself is the result), so the objective recorded
after each cycle never decreases. One cycle is one iteration of the EM loop; it
costs three E-steps and three M-steps when the extrapolation is accepted; each
rejected jump costs one E-step.

With ``switch_rate`` (``accelerate="auto"``) the engine takes plain EM steps until the
run slows down: once a gain is more than ``switch_rate`` times the one before (EM's rate
of linear convergence, the fraction of missing information, is high), it runs SQUAREM
cycles from there on. A run that converges fast stays plain EM, step for step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from pyroem.em import EMRun, Engine, EStepResult, MStepResult
from pyroem.errors import DataError, NotSupportedError, PyroEMError, SpecError

__all__ = ["ACCELERATIONS", "SquaremEngine"]

#: The values of the ``accelerate`` option.
ACCELERATIONS = (None, "squarem", "auto")

# Halvings of α towards -1 before the plain double EM step is kept.
_BACKTRACKS = 2


class SquaremEngine(Engine):
    """An engine whose M-step is a SQUAREM cycle of ``inner``'s EM map.

    Args:
        inner: the engine to accelerate.
        encode: parameters → one flat unconstrained vector.
        decode: a flat vector → parameters (valid for every vector).
        switch_rate: ``None``: every M-step is a SQUAREM cycle; a rate in ``[0, 1)``:
            plain EM steps until a gain exceeds ``switch_rate`` times the one before,
            SQUAREM cycles from then on (in each restart).
        score: the E-step of an extrapolated point (``inner.e_step`` by default); it
            raises ``ValueError`` (the jump is then rejected) where the point is
            outside what the model accepts.

    The E-step of the cycle's result is computed inside the cycle and handed back by
    the next :meth:`e_step` call, so a cycle's E-steps are not repeated.
    """

    def __init__(
        self,
        inner: Engine,
        encode: Callable[[Any], torch.Tensor],
        decode: Callable[[torch.Tensor], Any],
        switch_rate: float | None = None,
        score: Callable[[Any], EStepResult] | None = None,
    ) -> None:
        self.inner = inner
        self.switch_rate = switch_rate
        self.score = inner.e_step if score is None else score
        self._objectives: list[float] = []
        self._engaged = switch_rate is None
        self.encode = encode
        self.decode = decode
        self.name = inner.name
        self.num_data = inner.num_data
        self._cached: tuple[Any, EStepResult] | None = None

    def init(self, restart: int) -> MStepResult:
        self._cached = None
        self._objectives = []
        self._engaged = self.switch_rate is None
        return self.inner.init(restart)

    def e_step(self, params: Any) -> EStepResult:
        if self._cached is not None and self._cached[0] is params:
            scored = self._cached[1]
        else:
            scored = self.inner.e_step(params)
        self._objectives.append(scored.objective)
        return scored

    def _slow(self) -> bool:
        """Whether plain EM's last gain is more than ``switch_rate`` times the one before."""
        if len(self._objectives) < 3 or self.switch_rate is None:
            return False
        gain = self._objectives[-1] - self._objectives[-2]
        before = self._objectives[-2] - self._objectives[-3]
        return before > 0 and gain > self.switch_rate * before

    def converged(self, objectives: list[float], info: list[Any], tol: float) -> bool:
        return self.inner.converged(objectives, info, tol)

    def finish(self, run: EMRun) -> EMRun:
        return self.inner.finish(run)

    def unconverged_message(self, run: EMRun) -> str | None:
        return self.inner.unconverged_message(run)

    def _em(self, stats: Any, params: Any, iteration: int) -> tuple[Any, EStepResult]:
        """One plain EM step and the E-step of its result."""
        step = self.inner.m_step(stats, params, iteration)
        return step.params, self.inner.e_step(step.params)

    def _try(self, params: Any) -> EStepResult | None:
        """The E-step of an extrapolated point; ``None`` where the model cannot score it."""
        try:
            scored = self.score(params)
        except (SpecError, DataError, NotSupportedError):
            raise
        except (PyroEMError, ValueError, RuntimeError):
            return None
        return scored if math.isfinite(scored.objective) else None

    def m_step(self, stats: Any, params: Any, iteration: int) -> MStepResult:
        """One SQUAREM cycle from ``params`` (whose E-step gave ``stats``)."""
        if not self._engaged:
            self._engaged = self._slow()
            if not self._engaged:
                return self.inner.m_step(stats, params, iteration)
        first, first_e = self._em(stats, params, iteration)
        second, second_e = self._em(first_e.stats, first, iteration)
        result, result_e, accepted = second, second_e, False
        start, middle, end = self.encode(params), self.encode(first), self.encode(second)
        r = middle - start
        v = end - 2 * middle + start
        r_norm, v_norm = float(r.norm()), float(v.norm())
        alpha = -r_norm / v_norm if v_norm > 0 and math.isfinite(r_norm / v_norm) else -1.0
        for _ in range(_BACKTRACKS + 1):
            if alpha >= -1.0:
                break
            jumped = self.decode(start - 2 * alpha * r + alpha**2 * v)
            jumped_e = self._try(jumped)
            if jumped_e is not None and jumped_e.objective >= second_e.objective:
                try:
                    result, result_e = self._em(jumped_e.stats, jumped, iteration)
                except (PyroEMError, ValueError, RuntimeError):
                    result, result_e = jumped, jumped_e
                if result_e.objective < jumped_e.objective or not math.isfinite(result_e.objective):
                    result, result_e = jumped, jumped_e
                accepted = True
                break
            alpha = (alpha - 1.0) / 2
        self._cached = (result, result_e)
        info = {"squarem_alpha": alpha if accepted else -1.0}
        return MStepResult(result, None, info)
