r"""Stepwise (online) EM for a :class:`~pyroem.Mixture` (Cappé & Moulines 2009; Liang &
Klein 2009).

For data too large to pass over many times, each minibatch ``B_t`` of ``b`` rows moves
running sufficient statistics towards the minibatch's, scaled to the data size ``N``:

.. math::
    s_t = (1 − γ_t)\, s_{t−1} + γ_t\, \frac{N}{|B_t|} \hat s(B_t; θ_{t−1}),\qquad
    γ_t = (t + 2)^{−κ},\ κ ∈ (0.5, 1],\qquad θ_t = \bar θ(s_t),

where ``ŝ`` are the exact E-step's statistics of the minibatch and ``θ̄`` the closed-form
M-step (the same as batch MAP-EM's, prior included). The first minibatch sets ``s_1``.
``Σ γ_t = ∞`` and ``Σ γ_t² < ∞`` make the iterates converge to a fixed point of batch
EM. The parameters reported after each pass are the Polyak–Ruppert average of the
iterates ``θ_t`` of the passes after the first (the first pass's iterates are a burn-in;
after a single pass, its last iterate): averaging removes most of the noise a slowly
decreasing ``γ_t`` leaves.

Each EM "iteration" of the history is one pass over the data, and its objective is the
exact ``log p(x, θ̄)`` of the averaged parameters, computed by one more pass (streamed).
Gaussian statistics hold scatter about each component's own mean, so the convex
combination above is taken by the exact pairwise merge, never by raw second moments.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from pyroem.em import EMRun, Engine, EStepResult, MStepResult
from pyroem.engines.initialization import initial_params, seeded_generator
from pyroem.errors import SpecError
from pyroem.estep.enumerate import add_statistics, scale_statistics
from pyroem.estep.stream import ChunksEStep
from pyroem.model.families import Family
from pyroem.model.mixture import Mixture, MixtureParams
from pyroem.mstep.mixture import mixture_m_step
from pyroem.options import check_integer
from pyroem.sources import ChunkSource

__all__ = ["StepwiseEngine", "check_stepwise", "minibatches", "step_size"]


def step_size(t: int, kappa: float) -> float:
    """``γ_t = (t + 2)^{−κ}``, the weight of update ``t`` (``t = 1, 2, …``)."""
    return float((t + 2) ** (-kappa))


def minibatches(
    source: ChunkSource, batch_size: int, shuffle: bool, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """One pass of minibatches of ``batch_size`` rows (the last may be smaller): the
    rows in a fresh random order when ``shuffle`` (in-memory data: ``source`` then yields
    the whole data as one chunk), else in the source's order."""
    if shuffle:
        for data in source:
            order = torch.randperm(data.shape[0], generator=generator)
            for index in order.split(batch_size):
                yield data[index.to(data.device)]
        return
    pending: list[torch.Tensor] = []
    held = 0
    for chunk in source:
        while chunk.shape[0]:
            take = min(batch_size - held, chunk.shape[0])
            pending.append(chunk[:take])
            held += take
            chunk = chunk[take:]
            if held == batch_size:
                yield torch.cat(pending) if len(pending) > 1 else pending[0]
                pending, held = [], 0
    if held:
        yield torch.cat(pending)


def check_stepwise(batch_size: Any, kappa: Any) -> None:
    """Raises :class:`SpecError` unless ``batch_size`` is a positive integer and
    ``κ ∈ (0.5, 1]``."""
    check_integer("batch_size", batch_size, 1)
    if isinstance(kappa, bool) or not isinstance(kappa, int | float) or not 0.5 < kappa <= 1:
        raise SpecError(
            f"kappa must be a number in (0.5, 1] (step sizes (t + 2)^-kappa must sum to "
            f"infinity while their squares do not); got {kappa!r}"
        )


def running_mean(mean: torch.Tensor, new: torch.Tensor, count: int) -> torch.Tensor:
    """The Polyak–Ruppert running mean of ``count`` iterates, updated with the ``count``-th.

    Args:
        mean: the mean of the first ``count - 1`` iterates (any shape).
        new: the ``count``-th iterate (the shape of ``mean``).
        count: how many iterates the returned mean covers (at least 1).
    """
    return mean + (new - mean) / count


def _average(mean: MixtureParams, new: MixtureParams, count: int) -> MixtureParams:
    """The running mean of ``count`` mixture iterates, updated with the ``count``-th."""
    components = type(new.components)(
        *(running_mean(a, b, count) for a, b in zip(mean.components, new.components, strict=True))
    )
    return MixtureParams(running_mean(mean.weights, new.weights, count), components, new.active)


class StepwiseEngine(Engine):
    """Stepwise EM as an :class:`~pyroem.em.Engine`: ``m_step`` is one pass of minibatch
    updates, ``e_step`` scores the averaged parameters on all the data.

    Args:
        spec: the mixture.
        family: its family, bound.
        source: the data, chunk by chunk.
        sample: rows the initialisation reads (all the data, or a reservoir sample).
        num_data: ``N``.
        init: as for :func:`pyroem.fit`.
        seed: seed of the initialisation and the shuffling.
        batch_size: rows per minibatch ``b``.
        kappa: step-size exponent ``κ ∈ (0.5, 1]``.
        shuffle: visit the rows in a fresh random order each pass (in-memory data only:
            ``source`` then yields the whole data as one chunk).
        name: progress-bar label.
    """

    def __init__(
        self,
        spec: Mixture,
        family: Family,
        source: ChunkSource,
        sample: torch.Tensor,
        num_data: int,
        init: Any,
        seed: int | None,
        *,
        batch_size: int,
        kappa: float,
        shuffle: bool,
        name: str,
    ) -> None:
        check_stepwise(batch_size, kappa)
        self.spec, self.family, self.source, self.sample = spec, family, source, sample
        self.start, self.batch_size, self.kappa, self.shuffle = init, batch_size, kappa, shuffle
        self.generator = seeded_generator(seed)
        self.estep = ChunksEStep(family, spec.weights_prior, source, sample.dtype, sample.device)
        self.name = name
        self.num_data = num_data
        self._reset(None)

    def _reset(self, params: MixtureParams | None) -> None:
        self.current = params
        self.stats: Any = None
        self.updates = 0
        self.mean: MixtureParams | None = None
        self.averaged = 0

    def init(self, restart: int) -> MStepResult:
        params = initial_params(self.spec, self.family, self.sample, self.start, self.generator)
        self._reset(params)
        return MStepResult(params)

    def e_step(self, params: Any) -> EStepResult:
        return self.estep(params)

    def m_step(self, stats: Any, params: Any, iteration: int) -> MStepResult:
        assert self.current is not None
        gain = 1.0
        weights_prior = self.spec.weights_prior
        for batch in minibatches(self.source, self.batch_size, self.shuffle, self.generator):
            batch_estep = ChunksEStep(
                self.family, weights_prior, [batch], batch.dtype, batch.device
            )
            estimate = scale_statistics(
                batch_estep(self.current).stats, self.num_data / batch.shape[0]
            )
            if self.stats is None:
                self.stats = estimate
            else:
                gain = step_size(self.updates, self.kappa)
                self.stats = add_statistics(
                    scale_statistics(self.stats, 1.0 - gain), scale_statistics(estimate, gain)
                )
            self.updates += 1
            before = self.current.active
            self.current = mixture_m_step(self.family, weights_prior, self.stats, self.current)
            if self.current.active.shape != before.shape:
                # A component collapsed: keep the statistics of the rest, restart the average.
                keep = torch.nonzero(torch.isin(before, self.current.active)).reshape(-1)
                self.stats = self.family.select(self.stats, keep)
                self.mean, self.averaged = None, 0
            if iteration > 1:
                self.averaged += 1
                if self.mean is None:
                    self.mean = self.current
                else:
                    self.mean = _average(self.mean, self.current, self.averaged)
        reported = self.current if self.mean is None else self.mean
        return MStepResult(
            reported, info={"step_size": gain, "updates": self.updates, "averaged": self.averaged}
        )

    def unconverged_message(self, run: EMRun) -> str | None:
        # Stepwise EM runs the passes it is given; reaching ``passes`` is expected.
        return None
