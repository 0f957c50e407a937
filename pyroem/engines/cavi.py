r"""Closed-form mean-field variational Bayes (CAVI) for the declarative mixture.

The model is the Pyro program :meth:`pyroem.Mixture.model` declares, with its
priors and parameterisation::

    π ~ Dirichlet(α),  θ_k ~ p(θ),  z_n ~ Categorical(π),  x_n ~ family(θ_{z_n})

and the variational family is ``q(π) q(θ) Π_n q(z_n)``: ``q(π)`` Dirichlet,
``q(θ_k)`` in the prior's conjugate family (Normal–Inverse-Wishart, or
Normal–Inverse-Gamma for diag/spherical variances; Gamma; Beta; Dirichlet), and
``q(z_n)`` categorical with probabilities ``r_nk``. Coordinate ascent on

.. math:: \mathcal{L}(q) = E_q[\log p(x, z, π, θ)] - E_q[\log q(z, π, θ)] \le \log p(x)

alternates two exact updates:

- E-step: :math:`r_{nk} ∝ \exp(E_q[\log π_k] + E_q[\log p(x_n | θ_k)])`, chunk by chunk;
- M-step: ``q(π) = Dirichlet(α + N)`` and ``q(θ)`` the conjugate posterior under the
  fractional counts ``r`` (``N_k = Σ_n r_nk``).

The state after each iteration is ``(q(z), q(π, θ))`` with ``q(π, θ)`` optimal for
``q(z)``; its ELBO is then exact in closed form,

.. math:: \mathcal{L} = H(q(z)) + \log\frac{B(α + N)}{B(α)} + \log Z(r),

where :math:`\log Z(r) = \log \int p(θ) \prod_{n,k} p(x_n | θ_k)^{r_{nk}} dθ`
(:mod:`pyroem.mstep.cavi_factors`). It never decreases.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np
import torch

from pyroem.diagnostics import independent_chains
from pyroem.em import EMRun, Engine, EStepResult, MStepResult, run_em
from pyroem.engines.distributed import LOCAL, Collective
from pyroem.engines.initialization import initial_params, seeded_generator
from pyroem.engines.stepwise import minibatches, step_size
from pyroem.errors import SpecError
from pyroem.estep.enumerate import (
    MixtureEStep,
    add_statistics,
    normalise_log_joint,
    scale_statistics,
    score_mixture,
)
from pyroem.estep.stream import ChunksEStep, StreamedData, score_totals
from pyroem.fits.checkpoint import to_device
from pyroem.fits.core import Fit, FitResult
from pyroem.model.mixture import Mixture, MixtureParams
from pyroem.mstep.cavi_factors import (
    BetaPosterior,
    ConjugateFactor,
    DirichletPosterior,
    ExpectedLogDensity,
    GammaPosterior,
    conjugate_factor,
    log_multivariate_beta,
)
from pyroem.mstep.conjugate import NIWPosterior, dirichlet_expected_log
from pyroem.options import FitSettings, check_integer, with_defaults
from pyroem.sources import ChunkSource

__all__ = [
    "CAVI_OPTIONS",
    "DEFAULT_NUM_DRAWS",
    "DEFAULT_WEIGHT_THRESHOLD",
    "CaviStats",
    "OnlineVariational",
    "StepwiseSettings",
    "VariationalFit",
    "VariationalParams",
    "fit_mixture_cavi",
]

DEFAULT_NUM_DRAWS = 1000
DEFAULT_WEIGHT_THRESHOLD = 0.01


class VariationalParams(NamedTuple):
    """``q(π) = Dirichlet(weights_concentration)`` ``(K,)``, or under the truncated
    Dirichlet-process prior the sticks' ``q(v_k) = Beta(γ_k1, γ_k2)`` as ``(K, 2)``, and
    the components' conjugate factor ``q(θ)`` (a posterior NamedTuple of
    :mod:`pyroem.mstep.cavi_factors`)."""

    weights_concentration: torch.Tensor
    components: Any


class CaviStats(NamedTuple):
    """What the CAVI E-step hands to the M-step: the family's expected sufficient
    statistics under the new ``q(z)`` and its entropy ``H(q(z)) = −Σ_nk r_nk log r_nk``."""

    stats: Any
    entropy: torch.Tensor


class _CaviEngine(Engine):
    """CAVI on fixed data: the E-step updates ``q(z)``, the M-step ``q(π, θ)``.

    Args:
        factor: the family's conjugate factor.
        spec: the mixture.
        data: ``(num_data, dim)``.
        init: the Mixture's initialisation (as for MAP-EM).
        generator: its random generator.
        chunk_size: rows per chunk.
        weights_prior: ``α`` ``(K,)``, or the sticks' ``(1, α)`` ``(K, 2)`` of the
            truncated Dirichlet process.
        continued: the ``q(π, θ)`` of a previous fit to continue from (``None``: start
            from ``init``).
        sample_weight: ``(num_data,)`` frequency weights, or ``None``.
        collective: a distributed fit's collectives (:mod:`pyroem.engines.distributed`): the
            E-steps read this rank's rows of ``data`` and are combined over the ranks.
        streamed: data read chunk by chunk from a source (``data`` is then its reservoir
            sample, which the initialisation reads); its ``q(z)`` is not kept.
    """

    name = "vb-em"

    def __init__(
        self,
        factor: ConjugateFactor,
        spec: Mixture,
        data: torch.Tensor,
        init: Any,
        generator: torch.Generator,
        chunk_size: int,
        weights_prior: torch.Tensor,
        continued: VariationalParams | None = None,
        sample_weight: torch.Tensor | None = None,
        collective: Collective = LOCAL,
        streamed: StreamedData | None = None,
    ) -> None:
        self.factor, self.spec, self.data, self.start = factor, spec, data, init
        self.generator = generator
        self.continued = continued
        self.collective = collective
        self.streamed = streamed
        self.map_e_step: MixtureEStep
        if streamed is not None:
            self.map_e_step = ChunksEStep(
                factor.family, spec.weights_prior, streamed.shard, data.dtype, data.device
            )
            self.num_data = streamed.num_data
        else:
            rows = collective.rows(data.shape[0])
            self.map_e_step = MixtureEStep(
                factor.family,
                spec.weights_prior,
                data[rows],
                chunk_size,
                None if sample_weight is None else sample_weight[rows],
                fused=False,  # the chunks go through the plain statistics below
            )
            # Weights are frequencies: the tolerance is per weighted row.
            self.num_data = data.shape[0] if sample_weight is None else float(sample_weight.sum())
        self.chunks = self.map_e_step.chunks
        self.all_chunks = (
            self.chunks
            if collective is LOCAL or streamed is not None
            else [factor.family.prepare(chunk) for chunk in data.split(self.map_e_step.chunk_size)]
        )
        self.weights_prior = weights_prior.to(dtype=data.dtype, device=data.device)
        # This rank's share of the data constant; the ELBO takes the whole data's.
        self.shard_constant = float(
            sum(
                factor.data_constant(chunk, weights)
                for chunk, weights in zip(self.chunks, self.map_e_step.row_weights(), strict=False)
            )
        )
        self.data_constant = collective.sum(self.shard_constant)
        self.log_beta_prior = log_multivariate_beta(self.weights_prior)

    def init(self, restart: int) -> MStepResult:
        """State 1: ``q(π, θ)`` from the exact responsibilities of the initial parameters
        (or the continued fit's ``q(π, θ)``), then one CAVI iteration (as scikit-learn's
        ``BayesianGaussianMixture`` starts)."""
        if self.continued is not None:
            first = self.continued
        else:
            start = initial_params(
                self.spec, self.factor.family, self.data, self.start, self.generator
            )
            start = self.collective.broadcast(start)
            first = self._update(self.collective.reduce(self.map_e_step(start)).stats)
        return self.m_step(self.e_step(first).stats, first, 0)

    def _update(self, stats: Any) -> VariationalParams:
        """``q(π) = Dirichlet(α + N)`` (stick-breaking: ``q(v_k) = Beta(1 + N_k,
        α + Σ_{j>k} N_j)``), ``q(θ)`` the conjugate posterior."""
        counts = stats.counts
        if self.weights_prior.ndim == 2:
            beyond = counts.flip(0).cumsum(0).flip(0) - counts
            counts = torch.stack([counts, beyond], dim=-1)
        return VariationalParams(self.weights_prior + counts, self.factor.update(stats))

    def m_step(self, stats: CaviStats, params: VariationalParams, iteration: int) -> MStepResult:
        """The update above; the objective is the exact ELBO of ``(q(z), new q(π, θ))``,
        the latter optimal for the former."""
        update = self._update(stats.stats)
        weights = (log_multivariate_beta(update.weights_concentration) - self.log_beta_prior).sum()
        theta = self.factor.log_normaliser(update.components, stats.stats)
        elbo = float(stats.entropy + weights + theta) + self.data_constant
        # The q(π, θ) whose q(z) this state holds: finish recomputes that q(z).
        return MStepResult(update, elbo, {"source": params})

    def snapshot(self, params: VariationalParams) -> dict[str, Any]:
        """``q(π, θ)`` (never changed in place) and the restarts' generator."""
        return {"params": params, "generator": self.generator.get_state()}

    def checkpoint_info(self, info: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """Only the last record's ``source`` (what :meth:`finish` reads) is kept."""
        earlier = [{k: v for k, v in entry.items() if k != "source"} for entry in info[:-1]]
        return [*earlier, *info[-1:]]

    def restore(self, snapshot: dict[str, Any], restart: int) -> VariationalParams:
        self.generator.set_state(snapshot["generator"])
        params: VariationalParams = to_device(snapshot["params"], self.data)
        return params

    def finish(self, run: EMRun) -> EMRun:
        """Adds ``(q(z) of the state, q(z) of the final q(π, θ))``, each ``(N, K)``: the
        first pairs with the reported ELBO, the second is what ``predict_proba`` gives
        (streamed data: neither, they would hold ``N · K`` numbers)."""
        if self.streamed is not None:
            return run
        state = _assignment_probs(self.factor, run.info[-1]["source"], self.all_chunks)
        final = _assignment_probs(self.factor, run.params, self.all_chunks)
        return run._replace(extras=(state, final))

    def e_step(self, params: VariationalParams) -> EStepResult:
        """``q(z)`` from ``params``: its statistics and entropy, and the log-likelihood at
        the expected parameters ``E_q[π, θ]`` (the objective comes with the M-step)."""
        kernel = _kernel(self.factor, params)
        stats = None
        entropy = log_likelihood = params.weights_concentration.new_zeros(())
        for chunk, weights in zip(self.chunks, self.map_e_step.row_weights(), strict=False):
            joint, plug_in = kernel(chunk)
            resp, log_total, _ = normalise_log_joint(joint, dim=1, keep_joint=True)
            pointwise = torch.logsumexp(plug_in, 1)
            # log r = joint − log_total, Σ_k r = 1: −Σ r log r = Σ_n log_total − Σ r·joint,
            # each row counted weights_n times.
            if weights is None:
                chunk_entropy = log_total.sum() - torch.dot(resp.reshape(-1), joint.reshape(-1))
            else:
                chunk_entropy = torch.dot(weights, log_total.reshape(-1) - (resp * joint).sum(1))
                resp = resp * weights[:, None]
                pointwise = pointwise * weights
            chunk_stats = self.factor.statistics(chunk, resp)
            stats = chunk_stats if stats is None else add_statistics(stats, chunk_stats)
            entropy = entropy + chunk_entropy
            log_likelihood = log_likelihood + pointwise.sum()
        return self.collective.reduce(
            EStepResult(
                CaviStats(stats, entropy), math.nan, float(log_likelihood) + self.shard_constant
            )
        )


class StepwiseSettings(NamedTuple):
    """Stochastic VI's settings (:class:`_StepwiseCaviEngine`).

    Attributes:
        source: the whole data, read in minibatches.
        batch_size: rows per minibatch ``b``.
        kappa: step-size exponent ``κ ∈ (0.5, 1]``.
        shuffle: visit the rows in a fresh random order each pass (in-memory data).
    """

    source: ChunkSource
    batch_size: int
    kappa: float
    shuffle: bool


class _StepwiseCaviEngine(_CaviEngine):
    r"""Stochastic variational inference: stepwise EM on CAVI's natural parameters.

    ``q(π, θ)`` is conjugate, its natural parameters affine in the expected sufficient
    statistics ``s`` of ``q(z)``; each minibatch ``B_t`` of ``b`` rows moves the running
    statistics towards the minibatch's, scaled to the data size ``N``:

    .. math::
        s_t = (1 − γ_t)\, s_{t−1} + γ_t\, \frac{N}{|B_t|} \hat s(B_t; q_{t−1}),\qquad
        γ_t = (t + 2)^{−κ},\qquad q_t(π, θ) = \text{update}(s_t),

    with ``ŝ(B_t; q)`` the statistics of the optimal ``q(z_n)`` of the minibatch's rows
    under ``q`` (the CAVI E-step) and ``update`` CAVI's M-step, so a step of the natural
    parameters is the natural-gradient step of stochastic VI (Hoffman et al. 2013). The
    first minibatch sets ``s_1``. As for stepwise MAP-EM (:mod:`pyroem.engines.stepwise`), the
    statistics of the iterates of the passes after the first are averaged
    (Polyak–Ruppert; natural parameters are affine in them, so this averages those).

    ``m_step`` is one pass of minibatch updates; ``e_step`` reads all the data (streamed)
    with the averaged ``q̄(π, θ)``: the optimal ``q(z)`` and its statistics. The state
    recorded after a pass is ``(q(z), update(q(z)))``, the one exact CAVI update from
    ``q̄`` that this scoring pass makes possible, so its objective is CAVI's exact ELBO
    in closed form; the fit reports the last such state. The start is the conjugate
    update of the initial parameters' exact responsibilities on the initialisation's
    rows (all the data in memory, else the reservoir sample), scaled to ``N``.
    """

    name = "vb-em stepwise"

    def __init__(self, *args: Any, stepwise: StepwiseSettings, chunk_size: int, **kw: Any):
        super().__init__(*args, **kw)
        self.stepwise = stepwise
        self.chunk_size = chunk_size
        self._reset(None)

    def _reset(self, current: VariationalParams | None) -> None:
        self.current = current
        self.stats: Any = None
        self.mean: Any = None
        self.updates = self.averaged = 0

    def init(self, restart: int) -> MStepResult:
        if self.continued is not None:
            first = self.continued
        else:
            start = initial_params(
                self.spec, self.factor.family, self.data, self.start, self.generator
            )
            rows = ChunksEStep(
                self.factor.family,
                self.spec.weights_prior,
                self.data.split(self.chunk_size),
                self.data.dtype,
                self.data.device,
            )
            stats = scale_statistics(rows(start).stats, self.num_data / self.data.shape[0])
            first = self._update(stats)
        self._reset(first)
        return MStepResult(first)

    def e_step(self, params: VariationalParams) -> EStepResult:
        """The base E-step, with the ELBO of ``(q(z), update(q(z)))`` as objective."""
        scored = super().e_step(params)
        state = super().m_step(scored.stats, params, 0)
        assert state.objective is not None
        return EStepResult(
            scored.stats, state.objective, scored.log_likelihood, {**scored.info, **state.info}
        )

    def m_step(self, stats: CaviStats, params: VariationalParams, iteration: int) -> MStepResult:
        """One pass of minibatch updates; the parameters are ``q̄(π, θ)``."""
        assert self.current is not None
        settings = self.stepwise
        family = self.factor.family
        gain = 1.0
        batches = minibatches(
            settings.source, settings.batch_size, settings.shuffle, self.generator
        )
        for batch in batches:
            prepared = family.prepare(batch)
            joint, _ = _kernel(self.factor, self.current)(prepared)
            resp, _, _ = normalise_log_joint(joint, dim=1)
            estimate = scale_statistics(
                self.factor.statistics(prepared, resp), self.num_data / batch.shape[0]
            )
            if self.stats is None:
                self.stats = estimate
            else:
                gain = step_size(self.updates, settings.kappa)
                self.stats = add_statistics(
                    scale_statistics(self.stats, 1.0 - gain), scale_statistics(estimate, gain)
                )
            self.updates += 1
            self.current = self._update(self.stats)
            if iteration > 1:
                self.averaged += 1
                if self.mean is None:
                    self.mean = self.stats
                else:
                    weight = 1.0 / self.averaged
                    self.mean = add_statistics(
                        scale_statistics(self.mean, 1.0 - weight),
                        scale_statistics(self.stats, weight),
                    )
        reported = self.current if self.mean is None else self._update(self.mean)
        info = {"step_size": gain, "updates": self.updates, "averaged": self.averaged}
        return MStepResult(reported, None, info)

    def finish(self, run: EMRun) -> EMRun:
        """The reported state: the CAVI update of the last scoring pass's ``q(z)``."""
        return super().finish(run._replace(params=self._update(run.last.stats.stats)))

    def unconverged_message(self, run: EMRun) -> str | None:
        # Stochastic VI runs the passes it is given; reaching ``passes`` is expected.
        return None

    def snapshot(self, params: VariationalParams) -> dict[str, Any]:
        """Refused: the running statistics and their average are not checkpointed."""
        return Engine.snapshot(self, params)


class OnlineVariational:
    r"""Stochastic VI one minibatch at a time (``partial_fit`` of the variational
    estimator): the state between calls and what a fitted estimator reads.

    Each :meth:`update` with a minibatch ``X`` of ``n`` rows moves the running
    statistics per row towards the minibatch's,
    ``s̄_t = (1 − γ_t) s̄_{t−1} + γ_t ŝ(X; q_{t−1}) / n`` with ``γ_t = (t + 2)^{−κ}`` (the
    first update sets ``s̄_1``), ``ŝ`` the statistics of the minibatch's optimal ``q(z)``
    under ``q_{t−1}(π, θ)``, and sets ``q_t(π, θ)`` to CAVI's conjugate update of
    ``n_seen · s̄_t`` (``n_seen``: the rows seen so far, so the prior weighs against all
    of them, as stepwise MAP-EM's ``partial_fit`` does).

    Args:
        spec: the mixture (a proper prior).
        family: its family, bound.
        state: the starting ``q(π, θ)``.
        weights_prior_type: ``"dirichlet_distribution"`` or ``"dirichlet_process"``.
    """

    def __init__(
        self, spec: Mixture, family: Any, state: VariationalParams, weights_prior_type: str
    ) -> None:
        self.spec, self.family = spec, family
        self.factor = conjugate_factor(family)
        weights_prior = spec.weights_prior.to(state.weights_concentration)
        if weights_prior_type == "dirichlet_process":
            weights_prior = torch.stack([torch.ones_like(weights_prior), weights_prior], dim=-1)
        self.weights_prior = weights_prior
        self.state = state
        self.mean_stats: Any = None
        self.updates = 0
        self.rows_seen = 0

    @classmethod
    def start(
        cls, spec: Mixture, family: Any, data: torch.Tensor, params: MixtureParams, prior_type: str
    ) -> OnlineVariational:
        """The conjugate update of the exact responsibilities of ``params`` on ``data``
        (as a vb-em fit starts)."""
        stats = MixtureEStep(family, spec.weights_prior, data, 65536)(params).stats
        online = cls(spec, family, VariationalParams(spec.weights_prior, None), prior_type)
        online.state = online._update(stats)
        return online

    @classmethod
    def continuing(cls, fit: VariationalFit) -> OnlineVariational:
        """From a vb-em fit's ``q(π, θ)``."""
        prior_type = str(fit.options.get("weights_prior_type", "dirichlet_distribution"))
        return cls(fit.spec, fit.family, fit._state, prior_type)

    def _update(self, stats: Any) -> VariationalParams:
        counts = stats.counts
        if self.weights_prior.ndim == 2:
            beyond = counts.flip(0).cumsum(0).flip(0) - counts
            counts = torch.stack([counts, beyond], dim=-1)
        return VariationalParams(self.weights_prior + counts, self.factor.update(stats))

    def update(self, data: torch.Tensor, kappa: float) -> float:
        """One step from the minibatch ``data`` ``(n, dim)``; returns its mean
        log-likelihood at ``E_{q_{t−1}}[π, θ]``."""
        prepared = self.family.prepare(data)
        joint, plug_in = _kernel(self.factor, self.state)(prepared)
        log_likelihood = torch.logsumexp(plug_in, 1).sum() + self.factor.data_constant(prepared)
        resp, _, _ = normalise_log_joint(joint, dim=1)
        estimate = scale_statistics(self.factor.statistics(prepared, resp), 1.0 / data.shape[0])
        if self.mean_stats is None:
            self.mean_stats = estimate
        else:
            gain = step_size(self.updates, kappa)
            self.mean_stats = add_statistics(
                scale_statistics(self.mean_stats, 1.0 - gain), scale_statistics(estimate, gain)
            )
        self.updates += 1
        self.rows_seen += data.shape[0]
        self.state = self._update(scale_statistics(self.mean_stats, float(self.rows_seen)))
        return float(log_likelihood) / data.shape[0]

    @property
    def internal(self) -> MixtureParams:
        """``E_q[π, θ]``."""
        alpha = self.state.weights_concentration
        return MixtureParams(
            expected_weights(alpha)[1],
            self.factor.expected_params(self.state.components),
            torch.arange(self.spec.num_components, device=alpha.device),
        )

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """``E_q[π, θ]`` in user form, as ``fit.params``."""
        internal = self.internal
        return {"weights": internal.weights, **self.family.to_user(internal.components)}

    @property
    def variational(self) -> dict[str, Any]:
        """``q(π)`` and ``q(θ)``, as ``fit.variational``."""
        return {
            "weights": _weights_factor(self.state.weights_concentration),
            "components": self.factor.to_user(self.state.components),
        }

    def predict_proba(self, data: torch.Tensor) -> torch.Tensor:
        """``q(z_n = k)`` of ``data`` under ``q(π, θ)``, ``(N, K)``."""
        chunks = (self.family.prepare(chunk) for chunk in data.split(65536))
        return _assignment_probs(self.factor, self.state, chunks)

    def score_samples(self, data: torch.Tensor) -> torch.Tensor:
        """``log p(x_n | E_q[π, θ])``, ``(N,)``."""
        return score_mixture(self.family, self.internal, data, log_resp=False)[0]


def expected_weights(concentration: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``E_q[log π]`` and ``E_q[π]`` (normalised over the ``K`` components), ``(K,)`` each.

    ``concentration`` ``(K,)`` is a Dirichlet's; ``(K, 2)`` holds the sticks' Beta
    parameters of the truncated Dirichlet process, ``π_k = v_k Π_{j<k} (1 − v_j)``:
    :math:`E\log π_k = E\log v_k + Σ_{j<k} E\log(1 − v_j)`.
    """
    if concentration.ndim == 1:
        return dirichlet_expected_log(concentration), concentration / concentration.sum()
    first, second = concentration.unbind(-1)
    log_stick, log_rest = dirichlet_expected_log(concentration).unbind(-1)
    expected_log = log_stick + log_rest.cumsum(0) - log_rest
    mean = first / (first + second) * _before(second / (first + second))
    return expected_log, mean / mean.sum()


def _before(rest: torch.Tensor) -> torch.Tensor:
    """Exclusive cumulative product over the last axis: ``Π_{j<k} rest_j``."""
    ones = torch.ones_like(rest[..., :1])
    return torch.cat([ones, rest[..., :-1]], dim=-1).cumprod(-1)


def _kernel(factor: ConjugateFactor, params: VariationalParams) -> ExpectedLogDensity:
    """The factor's log-density kernel with the weights' ``E_q[log π]`` and ``log E_q[π]``."""
    expected_log_weights, mean_weights = expected_weights(params.weights_concentration)
    return factor.expected_log_density(params.components, expected_log_weights, mean_weights.log())


def _assignment_probs(
    factor: ConjugateFactor, params: VariationalParams, chunks: Iterable[torch.Tensor]
) -> torch.Tensor:
    """``q(z)`` under ``params`` for prepared ``chunks``, ``(N, K)``."""
    kernel = _kernel(factor, params)
    out = []
    for chunk in chunks:
        joint, _ = kernel(chunk)
        out.append(normalise_log_joint(joint, dim=1)[0])
    return torch.cat(out)


class VariationalFit(FitResult):
    r"""A mixture fitted by closed-form mean-field VB (``method="vb-em"``); its data,
    new or old, must be complete (no NaN).

    Everything of :class:`~pyroem.fits.core.FitResult` holds, with:

    - ``params``: the posterior means under ``q``: ``weights`` ``E_q[π] = α̂/Σα̂``;
      gaussian ``means`` ``E_q[μ_k] = m_k`` and ``covariances``
      ``E_q[Σ_k] = Ψ_k / (ν_k − D − 1)`` (full, tied) or ``Ψ_k / (ν_k − 2)`` per variance
      (diag, spherical) when the prior's ``dof`` exceeds ``D + 1`` (diag, spherical: 2),
      else ``E_q[Λ_k]⁻¹ = Ψ_k / ν_k`` (``E_q[Σ_k]`` need not be finite then; any
      ``dof > D − 1`` gives a proper ``q``); ``rates`` ``a/b``;
      ``probs`` ``E_q[p]``.
      ``log_likelihood()``, ``bic()``, ``aic()``, ``score_samples()`` and ``log_joint()``
      (log-likelihood plus log prior) are evaluated at these expected parameters.
    - ``history.objective``: the ELBO after each iteration (entry 0: the first complete
      state, ``q(z)`` from the initial parameters), never decreasing;
      ``history.log_likelihood``: the log-likelihood at each state's expected parameters.
    - ``labels``: ``predict(data)``, the most probable component under the final
      ``q(π, θ)``; ``predict_proba`` / ``predict`` apply the variational E-step
      (``r_nk ∝ exp(E_q[log π_k] + E_q[log p(x | θ_k)])``) to any data.
    - ``draws``: ``num_draws`` draws from ``q(π, θ)`` keyed like ``params``, each
      ``(num_chains, num_draws // num_chains, *shape)``: independent draws split into
      up to 4 chains (:func:`~pyroem.diagnostics.independent_chains`) so R-hat is
      defined; ``sample_stats["elbo"]``: the ELBO trace.

    Attributes:
        variational: the parameters of each factor of ``q``:
            ``"weights"``: ``{"concentration": (K,)}`` (Dirichlet);
            ``"components"``: gaussian ``{"mean" (K, D), "mean_precision" (K,), "dof",
            "scale"}`` with ``Σ_k ~ InverseWishart(dof_k, scale_k)`` and
            ``μ_k | Σ_k ~ Normal(mean_k, Σ_k / mean_precision_k)`` (dof ``(K,)``, tied
            ``()``; scale full ``(K, D, D)``, tied ``(D, D)``, diag ``(K, D)`` with each
            variance ``InverseGamma(dof_k/2, scale_kd/2)``, spherical ``(K,)`` with the
            variance ``InverseGamma(dof_k/2, scale_k/2)``); poisson/exponential
            ``{"concentration", "rate"}`` (Gamma, ``(K, D)``); bernoulli
            ``{"concentration1", "concentration0"}`` (Beta, ``(K, D)``); categorical
            ``{"concentration"}`` (Dirichlet, ``(K, D, C)``);
            ``"assignment"``: ``{"probs": (N, K)}``, the responsibilities ``q(z)`` of the
            reported state (``q(π, θ)`` is their conjugate update, and ``elbo`` is the
            state's ELBO); they lag ``predict_proba`` by one update until convergence.
        elbo: the final ELBO, a lower bound on the log evidence ``log p(x)``.
        weight_threshold: expected weight a component needs to count as effective.
    """

    accepts_missing = False

    def __init__(
        self,
        *,
        variational: dict[str, dict[str, torch.Tensor]],
        elbo: float,
        weight_threshold: float,
        state: VariationalParams,
        factor: ConjugateFactor,
        **fields: Any,
    ) -> None:
        super().__init__(**fields)
        self.variational = variational
        self.elbo = elbo
        self.weight_threshold = weight_threshold
        self._state = state
        self._factor = factor
        # Component order of the outputs: q's state keeps the order it was fitted in, and
        # a relabelled fit (pyroem.align) reads its columns in the new order.
        self._order: torch.Tensor | None = None

    def _reordered(self, index: torch.Tensor) -> None:
        """Read q's components in the order ``index`` from now on (see :func:`pyroem.align`)."""
        self._order = index if self._order is None else self._order[index]

    @property
    def effective_components(self) -> list[int]:
        """Components whose expected weight ``E_q[π_k]`` exceeds ``weight_threshold``.

        With a small ``weights_prior`` (``α < 1``) the weights of superfluous components
        collapse towards ``α_k / (Σα + N)``; they stay in the model but explain no data.
        """
        weights = self._internal.weights
        return torch.nonzero(weights > self.weight_threshold).reshape(-1).tolist()

    @property
    def num_effective_components(self) -> int:
        """``len(effective_components)``."""
        return len(self.effective_components)

    def predict_proba(self, data: Any) -> torch.Tensor:
        """Responsibilities ``q(z_n = k)`` of new data under the fitted ``q(π, θ)``, ``(N, K)``."""
        chunk_size = int(self.options.get("chunk_size", 65536))
        parts = []
        # A source is read chunk by chunk (FitResult._chunks); only the result is held.
        for block in self._chunks(data):
            tensor = self._data(block)
            chunks = (self.family.prepare(chunk) for chunk in tensor.split(chunk_size))
            parts.append(_assignment_probs(self._factor, self._state, chunks))
        probs = parts[0] if len(parts) == 1 else torch.cat(parts)
        return probs if self._order is None else probs[:, self._order.to(probs.device)]

    def _archive(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """:class:`FitResult`'s arrays plus the factors of ``q``: ``q(π)``, ``q(θ)`` in its
        internal form (what :meth:`predict_proba` reads) and ``q(z)``."""
        arrays, meta = super()._archive()
        arrays["variational/weights_concentration"] = (
            self._state.weights_concentration.cpu().numpy()
        )
        for name, value in self._state.components._asdict().items():
            arrays[f"variational/components/{name}"] = value.detach().cpu().numpy()
        if "assignment" in self.variational:
            arrays["variational/assignment_probs"] = (
                self.variational["assignment"]["probs"].detach().cpu().numpy()
            )
        meta["variational"] = {
            "posterior": type(self._state.components).__name__,
            "elbo": self.elbo,
            "weight_threshold": self.weight_threshold,
        }
        if self._order is not None:
            meta["variational"]["order"] = self._order.tolist()
        return arrays, meta

    def _repr_fields(self) -> list[str]:
        return [
            f"spec={self.spec!r}",
            f"elbo={self.elbo:.6g}",
            f"effective_components={self.num_effective_components}",
        ]

    def _summary_parts(self) -> tuple[str, list[str], list[str], list[str]]:
        """:class:`FitResult`'s, with the ELBO and the effective components."""
        title, head, notes, params = super()._summary_parts()
        extra = [
            f"  ELBO               {self.elbo:.6f}",
            f"  effective comps.   {self.num_effective_components} of {self.num_components} "
            f"(E_q[weight] > {self.weight_threshold:g})",
        ]
        return title, head, extra + notes, params


def _continued_state(
    previous: FitResult | None, family: Any, weights_prior: torch.Tensor
) -> VariationalParams | None:
    """A previous vb-em fit's ``q(π, θ)`` to continue from (a warm start), when it
    belongs to the same model: the same weights prior's shape, components and centring
    of the data (else the fit restarts from its expected parameters; a fit by another
    method has no ``q``)."""
    state = getattr(previous, "_state", None)
    if previous is None or state is None:
        return None
    if state.weights_concentration.shape != weights_prior.shape:
        return None
    old_shift, new_shift = previous.family.shift, family.shift
    if (old_shift is None) != (new_shift is None):
        return None
    if old_shift is not None and not torch.equal(old_shift, new_shift):
        return None
    if type(previous.family) is not type(family) or previous.family.dim != family.dim:
        return None
    return state


def _every_component(previous: FitResult, num_components: int) -> dict[str, torch.Tensor]:
    """``previous.params`` for all ``num_components`` components of its model: a component
    it removed (``removed_components``) comes back with weight 0 (and the parameters of
    the heaviest component, which no data point reads), so CAVI, which never removes
    one, starts from the same model."""
    params = previous.params
    active = previous._internal.active.tolist()
    if previous.spec.num_components != num_components or len(active) == num_components:
        return params
    heaviest = int(params["weights"].argmax())
    index = torch.tensor(
        [active.index(k) if k in active else heaviest for k in range(num_components)]
    )
    tied = getattr(previous.family, "covariance_type", None) == "tied"
    expanded = {
        name: value if tied and name == "covariances" else value[index]
        for name, value in params.items()
    }
    expanded["weights"] = expanded["weights"].clone()
    expanded["weights"][previous.removed_components] = 0.0
    return expanded


def _weights_factor(concentration: torch.Tensor) -> dict[str, torch.Tensor]:
    """``fit.variational["weights"]``: the Dirichlet's concentration, or the sticks'."""
    if concentration.ndim == 1:
        return {"concentration": concentration}
    first, second = concentration.unbind(-1)
    return {"stick_concentration1": first, "stick_concentration0": second}


def _draw_weights(concentration: torch.Tensor, num_draws: int) -> torch.Tensor:
    """``num_draws`` weight vectors from ``q(π)``, ``(num_draws, K)`` (sticks renormalised
    over the ``K`` components)."""
    if concentration.ndim == 1:
        return torch.distributions.Dirichlet(concentration).sample((num_draws,))
    sticks = torch.distributions.Beta(concentration[:, 0], concentration[:, 1]).sample((num_draws,))
    weights = sticks * _before(1 - sticks)
    return weights / weights.sum(-1, keepdim=True)


WEIGHTS_PRIOR_TYPES = ("dirichlet_distribution", "dirichlet_process")


#: The options of vb-em on a Mixture (CAVI).
CAVI_OPTIONS = ("num_draws", "weight_threshold", "weights_prior_type")


def _check_cavi_options(options: dict[str, Any]) -> tuple[int, float, str]:
    given = with_defaults(
        "method='vb-em' on a Mixture",
        options,
        {
            "num_draws": DEFAULT_NUM_DRAWS,
            "weight_threshold": DEFAULT_WEIGHT_THRESHOLD,
            "weights_prior_type": "dirichlet_distribution",
        },
        hint="pass guide= to fit the Pyro program by SVI",
    )
    num_draws = check_integer("num_draws", given["num_draws"], 0)
    threshold = given["weight_threshold"]
    if not (isinstance(threshold, int | float) and 0 <= threshold < 1):
        raise SpecError(f"weight_threshold must be a number in [0, 1); got {threshold!r}")
    prior_type = given["weights_prior_type"]
    if prior_type not in WEIGHTS_PRIOR_TYPES:
        raise SpecError(
            f"weights_prior_type must be one of {WEIGHTS_PRIOR_TYPES}; got {prior_type!r}"
        )
    return num_draws, float(threshold), prior_type


def fit_mixture_cavi(
    spec: Mixture,
    data: torch.Tensor,
    settings: FitSettings,
    *,
    sample_weight: torch.Tensor | None = None,
    streamed: StreamedData | None = None,
    stepwise: StepwiseSettings | None = None,
    **options: Any,
) -> VariationalFit:
    r"""Fit ``spec`` to ``data`` by closed-form mean-field VB (see the module docstring).

    Starting point: the Mixture's own initialisation (``init``, as for MAP-EM) gives
    parameters ``θ_0``; the initial ``q(z)`` is their exact posterior responsibilities
    ``r_nk ∝ π_k p(x_n | θ_k)``, and the first ``q(π, θ)`` is its conjugate update.

    Args:
        spec: the mixture; it needs a proper prior (``prior="default"`` or a prior object,
            and for the gaussian family ``mean_precision > 0``).
        data: ``(num_data, dim)``, validated (see :func:`pyroem.model.mixture.as_data`).
        settings: :func:`pyroem.fit`'s common options (``n_init``: the restart with the
            highest final ELBO is kept; ``tol``: converged when the ELBO changes by less
            than ``tol`` per data point; ``seed`` also seeds the draws). ``init``:
            ``"kmeans++"``, ``"kmeans"``, ``"random"``, ``"random_from_data"``, a dict
            of parameters in ``fit.params`` form, or a previous fit. A previous vb-em fit
            of the same model on the same data is continued from its ``q(π, θ)``, so the
            ELBO goes on increasing from where it stopped.
        sample_weight: ``(num_data,)`` non-negative frequency weights: row ``n`` counts
            ``w_n`` times in the statistics, the entropy of ``q(z)`` and the ELBO (so
            integer weights give the fit on repeated rows); ``fit.log_likelihood()``
            stays the unweighted sum, as for map-em.
        streamed: the data read chunk by chunk from a source (:mod:`pyroem.estep.stream`);
            ``data`` is then its reservoir sample (data-derived defaults, initialisation),
            and ``fit.variational`` holds no ``"assignment"`` (``q(z)`` of every row).
        stepwise: run stochastic VI (:class:`_StepwiseCaviEngine`) with these settings:
            ``max_iter`` is then the number of passes over the data.
        **options: ``num_draws`` (default 1000; 0 for none): draws from ``q(π, θ)`` into
            ``fit.draws``; ``weight_threshold`` (default 0.01): the expected weight above
            which a component counts as effective; ``weights_prior_type``:
            ``"dirichlet_distribution"`` (default: ``π ~ Dirichlet(weights_prior)``) or
            ``"dirichlet_process"``: the truncated stick-breaking prior ``v_k ~ Beta(1, α)``,
            ``π_k = v_k Π_{j<k}(1 − v_j)`` with ``α`` the (scalar) ``weights_prior``;
            ``q(v_k) = Beta(1 + N_k, α + Σ_{j>k} N_j)`` (``fit.variational["weights"]``
            then holds ``stick_concentration1``/``stick_concentration0``), and
            ``params["weights"]`` is ``E_q[π]`` renormalised over the ``K`` components.

    Returns:
        A :class:`VariationalFit` with ``method="vb-em"``.

    Raises:
        SpecError: a flat prior (``prior=None`` or ``mean_precision=0``), which has no
            posterior; a gaussian prior ``dof ≤ D − 1``; an
            unknown option.
    """
    num_draws, weight_threshold, prior_type = _check_cavi_options(dict(options))
    family = spec.bind(data)
    factor = conjugate_factor(family)
    init, chunk_size, collective = settings.init, settings.chunk_size, settings.collective
    previous = init.mixture if isinstance(init, Fit) else None
    if previous is not None:
        init = _every_component(previous, spec.num_components)
    settings = replace(settings, init=init, n_init=1 if isinstance(init, dict) else settings.n_init)
    weights_prior = spec.weights_prior
    if prior_type == "dirichlet_process":
        if not bool((weights_prior == weights_prior[0]).all()):
            raise SpecError(
                "weights_prior_type='dirichlet_process' takes one concentration α (a scalar "
                f"weights_prior); got {weights_prior.tolist()}"
            )
        # Sticks v_k ~ Beta(1, α), π_k = v_k Π_{j<k} (1 − v_j), truncated at K.
        weights_prior = torch.stack([torch.ones_like(weights_prior), weights_prior], dim=-1)
    generator = seeded_generator(settings.seed)
    continued = _continued_state(previous, family, weights_prior)
    arguments = (factor, spec, data, init, generator, chunk_size, weights_prior, continued)
    engine: _CaviEngine
    if stepwise is None:
        engine = _CaviEngine(*arguments, sample_weight, collective, streamed)
    else:
        engine = _StepwiseCaviEngine(
            *arguments, streamed=streamed, stepwise=stepwise, chunk_size=chunk_size
        )
    result = run_em(engine, **settings.loop())
    best = result.best
    state: VariationalParams = best.params
    alpha = state.weights_concentration
    internal = MixtureParams(
        expected_weights(alpha)[1],
        factor.expected_params(state.components),
        torch.arange(spec.num_components, device=data.device),
    )
    rows: dict[str, Any]
    if streamed is None:
        resp, final_resp = best.extras
        pointwise, _ = score_mixture(family, internal, data, chunk_size, False)
        rows = dict(pointwise_log_likelihood=pointwise, labels=final_resp.argmax(-1))
        log_likelihood = float(pointwise.sum())
    else:

        def score(chunk: torch.Tensor) -> torch.Tensor:
            return score_mixture(factor.family, internal, chunk, chunk_size, False)[0]

        # No per-row values are kept (memory flat in N): labels are computed on demand.
        num_rows, log_likelihood = score_totals(streamed, score, collective)
        rows = dict(
            pointwise_log_likelihood=None,
            labels=None,
            source=streamed.source,
            num_data=num_rows,
            log_likelihood=log_likelihood,
        )
    history = best.history
    draws = None
    if num_draws:
        draw_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[data.device] if data.device.type == "cuda" else []):
            torch.manual_seed(draw_seed)
            weights = _draw_weights(alpha, num_draws)
            components = factor.sample(state.components, num_draws)
        draws = {
            name: independent_chains(value)
            for name, value in {"weights": weights, **components}.items()
        }
    variational = {
        "weights": _weights_factor(alpha),
        "components": factor.to_user(state.components),
    }
    if streamed is None:
        variational["assignment"] = {"probs": resp}
    fit_options = {
        **settings.record(),
        "num_draws": num_draws,
        "weight_threshold": weight_threshold,
        "weights_prior_type": prior_type,
        **result.record(),
        **collective.record(),
    }
    if stepwise is not None:
        fit_options.update(
            stepwise=True,
            batch_size=stepwise.batch_size,
            kappa=stepwise.kappa,
            passes=settings.max_iter,
            shuffle=stepwise.shuffle,
        )
    log_joint = log_likelihood + float(engine.map_e_step.log_prior(internal))
    return VariationalFit(
        variational=variational,
        elbo=float(history.objective[-1]),
        weight_threshold=weight_threshold,
        state=state,
        factor=factor,
        spec=spec,
        family=family,
        method="vb-em",
        internal=internal,
        **rows,
        objective=log_joint,
        **result.fit_fields(history),
        options=fit_options,
        draws=draws,
        sample_stats={"elbo": history.objective.copy()},
        data=data if streamed is None else None,
    )


_POSTERIORS = {
    posterior.__name__: posterior
    for posterior in (NIWPosterior, GammaPosterior, BetaPosterior, DirichletPosterior)
}


def restore_variational_fit(
    archive: Any, saved: dict[str, Any], fields: dict[str, Any]
) -> VariationalFit:
    """Rebuild a :class:`VariationalFit` read by :func:`pyroem.load`.

    Args:
        archive: the open ``.npz`` archive.
        saved: its ``meta["variational"]``.
        fields: the :class:`FitResult` fields already read.
    """
    posterior_type = _POSTERIORS[saved["posterior"]]
    components = posterior_type(
        **{
            name: torch.from_numpy(archive[f"variational/components/{name}"])
            for name in posterior_type._fields
        }
    )
    state = VariationalParams(
        torch.from_numpy(archive["variational/weights_concentration"]), components
    )
    factor = conjugate_factor(fields["family"])
    variational = {
        "weights": _weights_factor(state.weights_concentration),
        "components": factor.to_user(components),
    }
    if "variational/assignment_probs" in archive:
        probs = torch.from_numpy(archive["variational/assignment_probs"])
        variational["assignment"] = {"probs": probs}
    fit = VariationalFit(
        variational=variational,
        elbo=float(saved["elbo"]),
        weight_threshold=float(saved["weight_threshold"]),
        state=state,
        factor=factor,
        **fields,
    )
    if "order" in saved:
        fit._reordered(torch.tensor(saved["order"], dtype=torch.long))
    return fit
