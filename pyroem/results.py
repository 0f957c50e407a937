"""The fit result: parameters, predictions, scores, history, save/load."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch

from pyroem.em import History
from pyroem.errors import DataError, PyroEMError
from pyroem.estep.enumerate import score_mixture
from pyroem.spec.families import Family
from pyroem.spec.mixture import Mixture, MixtureParams, as_data

__all__ = ["FitResult", "load"]

_FORMAT = "pyroem-fit"
_FORMAT_VERSION = 1


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
        tensor = as_data(data, dtype=weights.dtype, device=weights.device)
        if tensor.shape[1] != self.family.dim:
            raise DataError(
                f"data has {tensor.shape[1]} columns but the model was fitted on "
                f"{self.family.dim}; pass data with the training columns"
            )
        self.family.validate(tensor)
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
        from pyroem.diagnostics import to_arviz

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
        lines = [
            f"pyroem {self.method} fit of {self.spec!r}",
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
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
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


def load(path: str | os.PathLike[str]) -> FitResult:
    """Read a fit written by :meth:`FitResult.save` (never unpickles)."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise PyroEMError(f"cannot read a pyroem fit from {os.fspath(path)!r}: {err}") from err
    with archive:
        if "meta" not in archive.files:
            raise PyroEMError(f"{os.fspath(path)!r} is not a pyroem fit (no metadata)")
        try:
            meta = json.loads(str(archive["meta"]))
        except ValueError as err:
            raise PyroEMError(f"cannot read a pyroem fit from {os.fspath(path)!r}: {err}") from err
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise PyroEMError(f"{os.fspath(path)!r} is not a pyroem fit")
        dtype = getattr(torch, meta["dtype"])
        spec = Mixture.from_config(meta["spec"])
        shift = torch.from_numpy(archive["shift"]) if "shift" in archive.files else None
        family = spec.family.rebind(meta["dim"], shift, dtype)
        components = {
            name.removeprefix("component/"): torch.from_numpy(archive[name])
            for name in archive.files
            if name.startswith("component/")
        }
        internal = MixtureParams(
            torch.from_numpy(archive["weights"]),
            family.params_type(**components),
            torch.from_numpy(archive["active"]),
        )
        history = History(*(archive[f"history/{name}"] for name in History._fields))
        draws = {
            name.removeprefix("draws/"): torch.from_numpy(archive[name])
            for name in archive.files
            if name.startswith("draws/")
        }
        sample_stats = {
            name.removeprefix("sample_stats/"): archive[name]
            for name in archive.files
            if name.startswith("sample_stats/")
        }
        fields: dict[str, Any] = dict(
            spec=spec,
            family=family,
            method=meta["method"],
            internal=internal,
            history=history,
            converged=meta["converged"],
            num_iterations=meta["num_iterations"],
            pointwise_log_likelihood=torch.from_numpy(archive["pointwise_log_likelihood"]),
            labels=torch.from_numpy(archive["labels"]),
            objective=meta["objective"],
            restart_objectives=archive["restart_objectives"].tolist(),
            options=meta["options"],
            draws=draws or None,
            sample_stats=sample_stats,
        )
        if "variational" in meta:
            # Imported here: the variational module builds on this one.
            from pyroem.variational.cavi import restore_variational_fit

            result: FitResult = restore_variational_fit(archive, meta["variational"], fields)
        else:
            result = FitResult(**fields)
    result.runtime = float(meta.get("runtime", math.nan))
    return result


def _format_array(value: torch.Tensor) -> str:
    return np.array2string(
        value.detach().cpu().numpy(), precision=4, suppress_small=True, separator=", "
    ).replace("\n", "")
