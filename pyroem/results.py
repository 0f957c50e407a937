"""The fit result: parameters, predictions, scores, history, save (loaded by pyroem.loading)."""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, ClassVar

import numpy as np
import torch

from pyroem.archive import FORMAT_VERSION, MIXTURE_FORMAT, PROGRAM_FORMAT
from pyroem.diagnostics import to_arviz
from pyroem.em import History
from pyroem.errors import DataError
from pyroem.estep.enumerate import score_mixture
from pyroem.spec.families import Family
from pyroem.spec.mixture import Mixture, MixtureParams, as_data, fill_missing

__all__ = ["FitResult", "mixture_fit_from_program", "save_program_fit"]


class FitResult:
    """A fitted mixture.

    Attributes:
        spec: the :class:`~pyroem.Mixture` that was fitted.
        method: the EM variant (``"map-em"``, …).
        params: user-facing parameters: ``"weights"`` ``(K,)`` plus the family's
            (gaussian: ``"means"``, ``"covariances"``; poisson/exponential: ``"rates"``;
            bernoulli: ``"probs"`` ``(K, D)``; categorical: ``"probs"`` ``(K, D, C)``).
        history: :class:`~pyroem.em.History` of the kept run.
        converged: whether the kept run met ``tol`` before ``max_iter``.
        num_iterations: M-steps taken by the kept run.
        labels: most probable component of each training point, ``(N,)``.
        restart_objectives: final objective of every restart.
        draws: posterior draws keyed like ``params``, each
            ``(num_chains, num_draws, *shape)`` (NUTS, MCMC-EM, a fitted guide's
            draws, the variational posterior); ``None`` for MAP-EM.
        sample_stats: per-iteration or per-draw statistics by name, each a NumPy
            array (ELBO trace, chain diagnostics, NUTS statistics).
        runtime: wall-clock seconds of the whole fit, restarts included (set by
            :func:`pyroem.fit`; NaN for a loaded fit).
        data: the training data ``(num_data, dim)`` (``None`` for a loaded fit).
        removed_components: original indices of components removed because their
            weight collapsed (only with ``weights_prior < 1``).
    """

    accepts_missing: ClassVar[bool] = True
    """Whether scoring takes rows with missing entries (NaN), marginalised at ``params``."""

    def __init__(
        self,
        *,
        spec: Mixture,
        family: Family,
        method: str,
        internal: MixtureParams,
        history: History,
        converged: bool,
        num_iterations: int,
        pointwise_log_likelihood: torch.Tensor,
        labels: torch.Tensor,
        objective: float,
        restart_objectives: list[float],
        options: dict[str, Any],
        draws: dict[str, torch.Tensor] | None = None,
        sample_stats: dict[str, np.ndarray] | None = None,
        data: torch.Tensor | None = None,
    ) -> None:
        self.spec = spec
        self.family = family
        self.method = method
        self._internal = internal
        self.history = history
        self.converged = converged
        self.num_iterations = num_iterations
        self._pointwise = pointwise_log_likelihood
        self.labels = labels
        self._objective = objective
        self.restart_objectives = restart_objectives
        self.options = options
        self.draws = draws
        self.sample_stats = dict(sample_stats or {})
        self.runtime = math.nan
        self.data = data

    # ----- parameters ---------------------------------------------------------
    @property
    def params(self) -> dict[str, torch.Tensor]:
        """Parameters in user form (copies; editing them does not change the fit)."""
        values = {
            "weights": self._internal.weights,
            **self.family.to_user(self._internal.components),
        }
        return {key: value.detach().clone() for key, value in values.items()}

    @property
    def num_components(self) -> int:
        """Components still in the model (``K`` minus removed ones)."""
        return int(self._internal.weights.shape[0])

    @property
    def removed_components(self) -> list[int]:
        alive = set(self._internal.active.tolist())
        return [k for k in range(self.spec.num_components) if k not in alive]

    @property
    def num_data(self) -> int:
        return int(self._pointwise.shape[0])

    @property
    def num_parameters(self) -> int:
        """Free parameters: component parameters plus ``K − 1`` weights."""
        return self.family.num_parameters(self.num_components) + self.num_components - 1

    # ----- scoring ------------------------------------------------------------
    def _data(self, data: Any) -> torch.Tensor:
        weights = self._internal.weights
        tensor = as_data(
            data, dtype=weights.dtype, device=weights.device, allow_missing=self.accepts_missing
        )
        if tensor.shape[1] != self.family.dim:
            raise DataError(
                f"data has {tensor.shape[1]} columns but the model was fitted on "
                f"{self.family.dim}; pass data with the training columns"
            )
        # Missing entries (NaN) are marginalised; the observed ones must be in the support.
        seen = ~torch.isnan(tensor).all(0)
        self.family.validate(fill_missing(tensor[:, seen]))
        return tensor

    def _score(self, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
        chunk_size = int(self.options.get("chunk_size", 65536))
        return score_mixture(self.family, self._internal, self._data(data), chunk_size)

    def score_samples(self, data: Any) -> torch.Tensor:
        """Pointwise log-likelihood ``log p(x_n | θ)`` (z summed out), ``(N,)``."""
        return self._score(data)[0]

    def predict_proba(self, data: Any) -> torch.Tensor:
        """Posterior component probabilities (responsibilities), ``(N, K)``."""
        return self._score(data)[1].exp()

    def predict(self, data: Any) -> torch.Tensor:
        """Most probable component of each point, ``(N,)`` int64."""
        return self._score(data)[1].argmax(-1)

    def impute(self, data: Any = None) -> torch.Tensor:
        r"""``data`` with each missing entry (NaN) replaced by its conditional mean given the
        row's observed entries under the fitted mixture,
        :math:`\sum_k r_{nk}\, E[x_m | x_o, z = k]` (``r`` the responsibilities given
        ``x_o``; for the gaussian family ``E[x_m | x_o, k] = μ_m + Σ_mo Σ_oo⁻¹(x_o − μ_o)``).
        The categorical family fills in the most probable category instead.

        Args:
            data: ``(N, dim)`` with NaN where missing; ``None`` for the training data.

        Returns:
            A ``(N, dim)`` tensor; observed entries are returned unchanged.
        """
        if data is None:
            if self.data is None:
                raise DataError("this fit holds no training data (a loaded fit); pass data")
            data = self.data
        tensor = self._data(data)
        if not bool(torch.isnan(tensor).any()):
            return tensor.clone()
        log_resp = self._score(tensor)[1]
        return self.family.impute(self._internal.components, tensor, log_resp.exp())

    def log_likelihood(self, data: Any = None, *, pointwise: bool = False) -> Any:
        """Marginal log-likelihood ``Σ_n log Σ_k π_k p(x_n | θ_k)``.

        Args:
            data: new data, or ``None`` for the training data.
            pointwise: return the ``(N,)`` per-point values instead of their sum.

        Returns:
            A float, or a tensor ``(N,)`` with ``pointwise=True``.
        """
        values = self._pointwise if data is None else self.score_samples(data)
        return values.clone() if pointwise else float(values.sum())

    def log_joint(self) -> float:
        """``log p(x, θ)`` on the training data: the objective MAP-EM maximises
        (log-likelihood plus the log prior density of the weights and components)."""
        return self._objective

    def bic(self, data: Any = None) -> float:
        """Bayesian information criterion ``−2 log L + p log N``; lower is better
        (scikit-learn's convention)."""
        num = self.num_data if data is None else self._data(data).shape[0]
        return -2 * self.log_likelihood(data) + self.num_parameters * math.log(num)

    def aic(self, data: Any = None) -> float:
        """Akaike information criterion ``−2 log L + 2p``; lower is better."""
        return -2 * self.log_likelihood(data) + 2 * self.num_parameters

    def to_arviz(self, **options: Any) -> Any:
        """The fit as ``arviz.InferenceData`` (options: see :func:`pyroem.diagnostics.to_arviz`)."""
        return to_arviz(self, **options)

    # ----- display --------------------------------------------------------------
    def __repr__(self) -> str:
        return (
            f"FitResult(method={self.method!r}, spec={self.spec!r}, "
            f"log_likelihood={self.log_likelihood():.6g}, converged={self.converged}, "
            f"num_iterations={self.num_iterations})"
        )

    def summary(self) -> str:
        """A readable table of the fit: scores, then parameters per component."""
        # The model as fitted: its prior with the numbers resolved from the data.
        fitted = copy.copy(self.spec)
        fitted.family = self.family
        lines = [
            f"pyroem {self.method} fit of {fitted!r}",
            f"  data points        {self.num_data}",
            f"  dimension          {self.family.dim}",
            f"  converged          {self.converged} after {self.num_iterations} iterations",
            f"  log-likelihood     {self.log_likelihood():.6f}",
            f"  log joint          {self.log_joint():.6f}",
            f"  BIC / AIC          {self.bic():.4f} / {self.aic():.4f}",
            f"  free parameters    {self.num_parameters}",
        ]
        if self.removed_components:
            lines.append(f"  removed components {self.removed_components}")
        params = self.params
        names = [name for name in params if name != "weights"]
        tied = getattr(self.family, "covariance_type", None) == "tied"
        lines.append("")
        header = f"  {'k':>3}  {'weight':>8}  " + "  ".join(f"{n}" for n in names)
        lines.append(header)
        for k in range(self.num_components):
            cells = []
            for name in names:
                value = params[name]
                if value.ndim == 0 or (name == "covariances" and tied):
                    cells.append("(shared)")
                else:
                    cells.append(_format_array(value[k]))
            lines.append(f"  {k:>3}  {float(params['weights'][k]):8.4f}  " + "  ".join(cells))
        if tied:
            lines.append(f"  shared covariance: {_format_array(params['covariances'])}")
        return "\n".join(lines)

    # ----- persistence ------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the fit to ``path`` (a ``.npz`` archive of arrays plus JSON metadata).

        Nothing is pickled: :func:`pyroem.load` reads it back with
        ``allow_pickle=False`` and reproduces every parameter bit for bit, with the
        draws and sample statistics where the method made them (and, for
        ``method="vb-em"``, the variational factors). The data are not stored.
        """
        arrays, meta = self._archive()
        arrays["meta"] = np.array(json.dumps(meta))
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]

    def _archive(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The arrays and the metadata :meth:`save` writes."""
        arrays: dict[str, np.ndarray] = {
            "weights": self._internal.weights.cpu().numpy(),
            "active": self._internal.active.cpu().numpy(),
            "pointwise_log_likelihood": self._pointwise.cpu().numpy(),
            "labels": self.labels.cpu().numpy(),
            "restart_objectives": np.asarray(self.restart_objectives, dtype=np.float64),
        }
        for name, value in self._internal.components._asdict().items():
            arrays[f"component/{name}"] = value.detach().cpu().numpy()
        for name, value in self.history._asdict().items():
            arrays[f"history/{name}"] = value
        for name, draws in (self.draws or {}).items():
            arrays[f"draws/{name}"] = draws.detach().cpu().numpy()
        for name, stat in self.sample_stats.items():
            arrays[f"sample_stats/{name}"] = np.asarray(stat)
        shift = getattr(self.family, "shift", None)
        if shift is not None:
            arrays["shift"] = shift.cpu().numpy()
        meta = {
            "format": MIXTURE_FORMAT,
            "version": FORMAT_VERSION,
            "method": self.method,
            "spec": {**self.spec.to_config(), "family": self.family.explicit().to_config()},
            "dim": self.family.dim,
            "dtype": str(self._internal.weights.dtype).removeprefix("torch."),
            "converged": self.converged,
            "num_iterations": self.num_iterations,
            "objective": self._objective,
            "options": self.options,
            "runtime": self.runtime,
        }
        return arrays, meta


def _plain_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options that JSON can hold; others (a guide, a callable) by their repr."""
    plain = {}
    for key, value in options.items():
        try:
            json.dumps(value)
            plain[key] = value
        except (TypeError, ValueError):
            plain[key] = repr(value)
    return plain


def mixture_fit_from_program(
    spec: Mixture, data: torch.Tensor, fit: Any, chunk_size: int
) -> FitResult:
    """The :class:`FitResult` of a ``Mixture`` fitted through its Pyro program (MCMC-EM,
    NUTS, SVI): the program fit's parameters, history and draws, scored on ``data``.

    Args:
        spec: the mixture.
        data: the training data ``(num_data, dim)``.
        fit: the :class:`~pyroem.ProgramFit` of ``spec.model(data)``.
        chunk_size: data rows per scoring chunk.
    """
    family = spec.bind(data)
    params = fit.params
    weights = params["weights"].to(dtype=data.dtype, device=data.device)
    components = family.from_user(
        {name: params[name] for name in family.params_type._fields}, spec.num_components, data
    )
    internal = MixtureParams(weights, components, torch.arange(spec.num_components))
    pointwise, log_resp = score_mixture(family, internal, data, chunk_size)
    return FitResult(
        spec=spec,
        family=family,
        method=fit.method,
        internal=internal,
        history=fit.history,
        converged=fit.converged,
        num_iterations=fit.num_iterations,
        pointwise_log_likelihood=pointwise,
        labels=log_resp.argmax(-1),
        objective=fit.log_joint(),
        restart_objectives=list(fit.restart_objectives),
        options=_plain_options({**fit.options, "chunk_size": chunk_size}),
        draws=fit.draws,
        sample_stats=fit.sample_stats,
        data=data,
    )


def save_program_fit(fit: Any, path: str | os.PathLike[str]) -> None:
    """Write a :class:`~pyroem.ProgramFit`: parameters, marginals, history, draws and
    sample statistics as arrays, the rest as JSON (the program's code is not saved:
    :func:`pyroem.load` takes the program again)."""
    arrays: dict[str, np.ndarray] = {
        "restart_objectives": np.asarray(fit.restart_objectives, dtype=np.float64),
    }
    for name, value in fit.params.items():
        arrays[f"params/{name}"] = value.detach().cpu().numpy()
    for name, value in fit.marginals.items():
        arrays[f"marginals/{name}"] = value.detach().cpu().numpy()
    for name, value in fit.history._asdict().items():
        arrays[f"history/{name}"] = np.asarray(value, dtype=np.float64)
    for name, draws in (fit.draws or {}).items():
        arrays[f"draws/{name}"] = draws.detach().cpu().numpy()
    for name, stat in fit.sample_stats.items():
        arrays[f"sample_stats/{name}"] = np.asarray(stat)
    meta = {
        "format": PROGRAM_FORMAT,
        "version": FORMAT_VERSION,
        "method": fit.method,
        "program": fit.program.name,
        "m_step_kinds": dict(fit.m_step_kinds),
        "log_likelihood": fit.log_likelihood(),
        "log_joint": fit.log_joint(),
        "converged": fit.converged,
        "num_iterations": fit.num_iterations,
        "num_data": fit.num_data,
        "options": _plain_options(fit.options),
        "runtime": fit.runtime,
    }
    arrays["meta"] = np.array(json.dumps(meta))
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]


def _format_array(value: torch.Tensor) -> str:
    return np.array2string(
        value.detach().cpu().numpy(), precision=4, suppress_small=True, separator=", "
    ).replace("\n", "")
