"""The result of fitting a Pyro program."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from pyroem.diagnostics import to_arviz
from pyroem.em import History
from pyroem.errors import NotSupportedError
from pyroem.program.model import ProgramModel
from pyroem.results import FitResult, save_program_fit
from pyroem.transforms import unconstraining

__all__ = ["ProgramFit"]


class ProgramFit:
    """A Pyro program fitted by EM.

    Attributes:
        program: the :class:`~pyroem.program.ProgramModel` (sites sorted).
        method: the EM variant.
        params: parameter values keyed by site name (copies).
        m_step_kinds: the M-step each parameter got: a recognised closed form
            (e.g. ``"dirichlet-categorical"``, ``"normal-mean"``,
            ``"inverse-gamma-normal-variance"``; ``"flat-…"`` for ``pyro.param`` sites,
            which have no prior) or ``"gradient"``.
        marginals: posterior marginal probabilities of every enumerated site at the
            fitted parameters, ``(*value_shape, num_values)``.
        history: :class:`~pyroem.em.History` of the kept run (objective = log joint).
        converged: whether the kept run met ``tol`` before ``max_iter``.
        num_iterations: M-steps taken by the kept run.
        restart_objectives: final log joint of every restart.
        draws: posterior draws keyed like ``params``, each
            ``(num_chains, num_draws, *shape)`` (NUTS, MCMC-EM, a fitted guide's
            draws, the variational posterior); ``None`` for MAP-EM.
        sample_stats: per-iteration or per-draw statistics by name, each a NumPy
            array (ELBO trace, chain diagnostics, NUTS statistics).
        runtime: wall-clock seconds of the whole fit, restarts included (set by
            :func:`pyroem.fit`; NaN for a loaded fit).
        options: the fitting options.
    """

    def __init__(
        self,
        *,
        program: ProgramModel,
        method: str,
        values: dict[str, torch.Tensor],
        m_step_kinds: dict[str, str],
        marginals: dict[str, torch.Tensor],
        log_likelihood: float,
        log_joint: float,
        history: History,
        converged: bool,
        num_iterations: int,
        num_data: int,
        restart_objectives: list[float],
        options: dict[str, Any],
        draws: dict[str, torch.Tensor] | None = None,
        sample_stats: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.program = program
        self.method = method
        self._values = values
        self.m_step_kinds = m_step_kinds
        self.marginals = marginals
        self._log_likelihood = log_likelihood
        self._log_joint = log_joint
        self.history = history
        self.converged = converged
        self.num_iterations = num_iterations
        self.num_data = num_data
        self.restart_objectives = restart_objectives
        self.options = options
        self.draws = draws
        self.sample_stats = dict(sample_stats or {})
        self.runtime = math.nan
        # Set by pyroem.fit when the program is a Mixture's: the same fit as a
        # FitResult (predictions, scores, and what save writes).
        self.mixture_fit: FitResult | None = None

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """Fitted parameters by site name (copies; editing them does not change the fit)."""
        return {name: value.detach().clone() for name, value in self._values.items()}

    @property
    def num_parameters(self) -> int:
        """Free parameters: the unconstrained dimension of every parameter site."""
        return sum(
            math.prod(unconstraining(name, site.constraint).forward_shape(self._values[name].shape))
            for name, site in self.program.params.items()
        )

    def log_likelihood(self) -> float:
        """``log p(x | θ)`` at the fitted parameters, discrete latents summed out."""
        return self._log_likelihood

    def log_joint(self) -> float:
        """``log p(x, θ)``: the log-likelihood plus the log prior of the sample-site
        parameters — the objective MAP-EM maximises."""
        return self._log_joint

    def bic(self) -> float:
        """``−2 log L + p log N`` with N the number of observations; lower is better."""
        return -2 * self._log_likelihood + self.num_parameters * math.log(self.num_data)

    def aic(self) -> float:
        """``−2 log L + 2p``; lower is better."""
        return -2 * self._log_likelihood + 2 * self.num_parameters

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the fit to ``path`` (a ``.npz`` archive of arrays plus JSON metadata).

        A ``Mixture`` fitted by any method is saved as its :class:`~pyroem.FitResult`,
        which :func:`pyroem.load` restores with predictions; for any other program the
        parameters, marginals, history, draws and sample statistics are saved, and
        ``pyroem.load(path, model, *model_args)`` rebuilds the fit given the program.
        Nothing is pickled.
        """
        if self.mixture_fit is not None:
            self.mixture_fit.runtime = self.runtime
            self.mixture_fit.save(path)
        else:
            save_program_fit(self, path)

    def _mixture(self, what: str) -> FitResult:
        """The fit as a :class:`~pyroem.FitResult` (a ``Mixture``'s fit only)."""
        if self.mixture_fit is None:
            raise NotSupportedError(
                f"{what} scores new data under a pyroem.Mixture; this is a fit of a Pyro "
                "program: fit a pyroem.Mixture, or use fit.to_arviz() and Pyro's "
                "Predictive with the fitted parameters"
            )
        return self.mixture_fit

    def score_samples(self, data: Any) -> torch.Tensor:
        """A ``Mixture``'s pointwise log-likelihood ``log p(x_n | θ)`` ``(N,)`` at the
        fitted parameters ``fit.params`` (for nuts the posterior means of the aligned
        draws, for mcmc-em and SVI the final estimate)."""
        return self._mixture("score_samples").score_samples(data)

    def predict_proba(self, data: Any) -> torch.Tensor:
        """A ``Mixture``'s component probabilities ``(N, K)`` at ``fit.params``."""
        return self._mixture("predict_proba").predict_proba(data)

    def predict(self, data: Any) -> torch.Tensor:
        """A ``Mixture``'s most probable component of each point ``(N,)`` at ``fit.params``."""
        return self._mixture("predict").predict(data)

    def to_arviz(self, **options: Any) -> Any:
        """The fit as ``arviz.InferenceData`` (options: see :func:`pyroem.diagnostics.to_arviz`)."""
        return to_arviz(self, **options)

    def __repr__(self) -> str:
        return (
            f"ProgramFit(model={self.program.name}, method={self.method!r}, "
            f"log_joint={self._log_joint:.6g}, converged={self.converged}, "
            f"num_iterations={self.num_iterations})"
        )

    def summary(self) -> str:
        """A readable account of the fit: scores, M-step kinds, parameter values."""
        lines = [
            f"pyroem {self.method} fit of the Pyro program {self.program.name}",
            f"  observations       {self.num_data}",
            f"  enumerated sites   {len(self.program.enumerated)}",
            f"  converged          {self.converged} after {self.num_iterations} iterations",
            f"  log-likelihood     {self._log_likelihood:.6f}",
            f"  log joint          {self._log_joint:.6f}",
            f"  BIC / AIC          {self.bic():.4f} / {self.aic():.4f}",
            f"  free parameters    {self.num_parameters}",
        ]
        if self.mixture_fit is not None:
            lines.append(f"  prior              {self.mixture_fit.family.prior_repr()}")
        lines.append("")
        width = max(len(name) for name in self._values) if self._values else 0
        for name, value in self._values.items():
            text = np.array2string(
                value.detach().cpu().numpy(), precision=4, suppress_small=True, separator=", "
            ).replace("\n", "")
            lines.append(f"  {name:<{width}}  [{self.m_step_kinds[name]}]  {text}")
        return "\n".join(lines)
