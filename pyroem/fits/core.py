"""The result of :func:`pyroem.fit`: one core :class:`Fit` for every model and method,
with a ``Mixture``'s extras in :class:`FitResult` (a Pyro program's in
:class:`~pyroem.ProgramFit`); :func:`pyroem.load` reads every kind back."""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, ClassVar

import numpy as np
import torch

from pyroem.diagnostics import to_arviz
from pyroem.em import History
from pyroem.errors import DataError, NotSupportedError
from pyroem.estep.enumerate import score_mixture
from pyroem.fits.archive import FORMAT_VERSION, MIXTURE_FORMAT
from pyroem.model.families import Family
from pyroem.model.mixture import Mixture, MixtureParams, as_data, fill_missing
from pyroem.sources import ChunkSource, open_source

__all__ = ["Fit", "FitResult", "fit_start", "format_array", "mixture_fit_from_program"]


class Fit:
    """What :func:`pyroem.fit` returns, whatever the model and the method; each method's
    extras are in a small subclass (:class:`FitResult`, :class:`~pyroem.VariationalFit`,
    :class:`~pyroem.ProgramFit`, :class:`~pyroem.SVIFit`, :class:`~pyroem.MCMCEMFit`,
    :class:`~pyroem.BayesFit`).

    Attributes:
        model: the :class:`~pyroem.Mixture`, or the Pyro program's
            :class:`~pyroem.model.program.ProgramModel`, that was fitted.
        kind: ``"mixture"`` (a ``Mixture`` fitted by its own kernels) or ``"program"``.
        method: the EM variant (``"map-em"``, ``"vb-em"``, ``"mcmc-em"``, ``"nuts"``).
        params: fitted parameters (copies; editing them does not change the fit).
        history: :class:`~pyroem.em.History` of the kept run.
        converged: whether the kept run met ``tol`` before ``max_iter``.
        num_iterations: M-steps taken by the kept run.
        num_data: the number of data points (observations).
        restart_objectives: final objective of every restart.
        draws: posterior draws keyed like ``params``, each
            ``(num_chains, num_draws, *shape)`` (NUTS, MCMC-EM, a fitted guide's
            draws, the variational posterior); ``None`` for MAP-EM.
        sample_stats: per-iteration or per-draw statistics by name, each a NumPy
            array (ELBO trace, chain diagnostics, NUTS statistics).
        runtime: wall-clock seconds of the whole fit, restarts included (set by
            :func:`pyroem.fit`; NaN for a loaded fit).
        options: the fitting options.
        mixture: the fit as a ``Mixture``'s :class:`FitResult` (what ``predict``,
            ``predict_proba``, ``score_samples`` and ``impute`` read), ``None`` for a
            Pyro program that is not a ``Mixture``'s.
    """

    kind: ClassVar[str]
    archive_format: ClassVar[str]

    def __init__(
        self,
        *,
        model: Any,
        method: str,
        history: History,
        converged: bool,
        num_iterations: int,
        num_data: int,
        log_likelihood: float,
        log_joint: float,
        restart_objectives: list[float],
        options: dict[str, Any],
        draws: dict[str, torch.Tensor] | None = None,
        sample_stats: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.model = model
        self.method = method
        self.history = history
        self.converged = converged
        self.num_iterations = num_iterations
        self.num_data = num_data
        self._log_likelihood = log_likelihood
        self._log_joint = log_joint
        self.restart_objectives = restart_objectives
        self.options = options
        self.draws = draws
        self.sample_stats = dict(sample_stats or {})
        self.runtime = math.nan

    @property
    def params(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def num_parameters(self) -> int:
        raise NotImplementedError

    @property
    def mixture(self) -> FitResult | None:
        return None

    # ----- scores ---------------------------------------------------------------
    def log_likelihood(self, data: Any = None, *, pointwise: bool = False) -> Any:
        """``log p(x | θ)`` at the fitted parameters, discrete latents summed out.

        Args:
            data: a ``Mixture``'s new data, or ``None`` for the training data.
            pointwise: a ``Mixture``'s ``(N,)`` per-point values instead of their sum.

        Returns:
            A float, or a tensor ``(N,)`` with ``pointwise=True``.
        """
        if data is None and not pointwise:
            return self._log_likelihood
        mixture = self._scorer("log_likelihood(data)")
        values = mixture._pointwise_values() if data is None else mixture.score_samples(data)
        return values.clone() if pointwise else float(values.sum())

    def log_joint(self) -> float:
        """``log p(x, θ)`` on the training data: the log-likelihood plus the log prior
        density of the parameters — the objective MAP-EM maximises."""
        return self._log_joint

    def bic(self, data: Any = None) -> float:
        """Bayesian information criterion ``−2 log L + p log N``; lower is better
        (scikit-learn's convention)."""
        num = self.num_data if data is None else self._scorer("bic")._data(data).shape[0]
        return -2 * self.log_likelihood(data) + self.num_parameters * math.log(num)

    def aic(self, data: Any = None) -> float:
        """Akaike information criterion ``−2 log L + 2p``; lower is better."""
        return -2 * self.log_likelihood(data) + 2 * self.num_parameters

    # ----- a Mixture's predictions ------------------------------------------------
    def _scorer(self, what: str) -> FitResult:
        """:attr:`mixture`, or an error naming the route for a Pyro program."""
        if self.mixture is None:
            raise NotSupportedError(
                f"{what} scores new data under a pyroem.Mixture; this is a fit of a Pyro "
                "program: fit a pyroem.Mixture, or use fit.to_arviz() and Pyro's "
                "Predictive with the fitted parameters"
            )
        return self.mixture

    def score_samples(self, data: Any) -> torch.Tensor:
        """A ``Mixture``'s pointwise log-likelihood ``log p(x_n | θ)`` (z summed out),
        ``(N,)``, at ``fit.params`` (for nuts the posterior means of the aligned draws,
        for mcmc-em and SVI the final estimate)."""
        return self._scorer("score_samples")._score(data, log_resp=False)[0]

    def predict_proba(self, data: Any) -> torch.Tensor:
        """A ``Mixture``'s posterior component probabilities (responsibilities), ``(N, K)``."""
        return self._scorer("predict_proba")._score(data)[1].exp_()  # a fresh tensor

    def predict(self, data: Any) -> torch.Tensor:
        """A ``Mixture``'s most probable component of each point, ``(N,)`` int64."""
        return self.predict_proba(data).argmax(-1)

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
        mixture = self._scorer("impute")
        if data is None:
            if mixture.data is None:
                raise DataError("this fit holds no training data (a loaded fit); pass data")
            data = mixture.data
        tensor = mixture._data(data)
        if not bool(torch.isnan(tensor).any()):
            return tensor.clone()
        log_resp = mixture._score(tensor)[1]
        return mixture.family.impute(mixture._internal.components, tensor, log_resp.exp())

    def to_arviz(self, **options: Any) -> Any:
        """The fit as ``arviz.InferenceData`` (options: see :func:`pyroem.diagnostics.to_arviz`)."""
        return to_arviz(self, **options)

    # ----- display ----------------------------------------------------------------
    def _repr_fields(self) -> list[str]:
        return [f"method={self.method!r}"]

    def __repr__(self) -> str:
        fields = ", ".join(self._repr_fields())
        return (
            f"{type(self).__name__}({fields}, converged={self.converged}, "
            f"num_iterations={self.num_iterations})"
        )

    def _summary_parts(self) -> tuple[str, list[str], list[str], list[str]]:
        """What the summary says of this kind of fit: what was fitted, the lines before the
        scores, after them, and the parameters."""
        raise NotImplementedError

    def summary(self) -> str:
        """A readable account of the fit: scores, then the parameters."""
        title, head, notes, params = self._summary_parts()
        lines = [
            f"pyroem {self.method} fit of {title}",
            *head,
            f"  converged          {self.converged} after {self.num_iterations} iterations",
            f"  log-likelihood     {self.log_likelihood():.6f}",
            f"  log joint          {self.log_joint():.6f}",
            f"  BIC / AIC          {self.bic():.4f} / {self.aic():.4f}",
            f"  free parameters    {self.num_parameters}",
            *notes,
            "",
            *params,
        ]
        return "\n".join(lines)

    # ----- persistence --------------------------------------------------------------
    def _archive(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The arrays and the metadata of this kind of fit that :meth:`save` writes
        besides the common ones."""
        raise NotImplementedError

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the fit to ``path`` (a ``.npz`` archive of arrays plus JSON metadata).

        Nothing is pickled: :func:`pyroem.load` reads it back with ``allow_pickle=False``
        as the class that was saved. A ``Mixture`` fitted by any method is saved as its
        :class:`FitResult`, restored with every parameter bit for bit, the draws and
        sample statistics where the method made them (and, for ``method="vb-em"``, the
        variational factors of its :class:`~pyroem.VariationalFit`); the data are not
        stored. For any other program the parameters, marginals, history, draws, sample
        statistics and the method's own results (NUTS's and MCMC-EM's chain diagnostics,
        MCMC-EM's parameter trace, SVI's ELBO) are saved, and
        ``pyroem.load(path, model, *model_args)`` rebuilds the fit given the program.
        Code is not saved: a loaded :class:`~pyroem.SVIFit` has no guide.
        """
        saved = self.mixture or self
        arrays, meta = saved._archive()
        arrays["restart_objectives"] = np.asarray(saved.restart_objectives, dtype=np.float64)
        for name, value in saved.history._asdict().items():
            arrays[f"history/{name}"] = np.asarray(value, dtype=np.float64)
        for name, draws in (saved.draws or {}).items():
            arrays[f"draws/{name}"] = draws.detach().cpu().numpy()
        for name, stat in saved.sample_stats.items():
            arrays[f"sample_stats/{name}"] = np.asarray(stat)
        meta = {
            "format": saved.archive_format,
            "version": FORMAT_VERSION,
            "class": type(saved).__name__,
            "method": saved.method,
            **meta,
            "converged": saved.converged,
            "num_iterations": saved.num_iterations,
            "options": _plain_options(saved.options),
            "runtime": self.runtime,
        }
        arrays["meta"] = np.array(json.dumps(meta))
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]


class FitResult(Fit):
    """A :class:`~pyroem.Mixture` fitted by its own kernels (map-em; vb-em's
    :class:`~pyroem.VariationalFit`), or the mixture view (:attr:`Fit.mixture`) of a
    ``Mixture`` fitted through its Pyro program.

    Everything of :class:`Fit` holds, with:

    Attributes:
        spec: the :class:`~pyroem.Mixture` that was fitted (also ``model``).
        params: user-facing parameters: ``"weights"`` ``(K,)`` plus the family's
            (gaussian: ``"means"``, ``"covariances"``; poisson/exponential: ``"rates"``;
            bernoulli: ``"probs"`` ``(K, D)``; categorical: ``"probs"`` ``(K, D, C)``).
        labels: most probable component of each training point, ``(N,)``. A fit of a
            streamed source holds no per-row values: ``labels`` and
            ``log_likelihood(pointwise=True)`` re-read the source chunk by chunk.
        data: the training data ``(num_data, dim)`` (``None`` for a loaded fit).
        source: the streamed source a fit read chunk by chunk (``None`` for data held
            in memory, and for a loaded fit).
        removed_components: original indices of components removed because their
            weight collapsed (only with ``weights_prior < 1``).
    """

    kind = "mixture"
    archive_format = MIXTURE_FORMAT
    accepts_missing: ClassVar[bool] = True
    """Whether scoring takes rows with missing entries (NaN), marginalised at ``params``."""

    def __init__(
        self,
        *,
        spec: Mixture,
        family: Family,
        internal: MixtureParams,
        pointwise_log_likelihood: torch.Tensor | None,
        labels: torch.Tensor | None,
        objective: float,
        data: torch.Tensor | None = None,
        source: ChunkSource | None = None,
        **fit: Any,
    ) -> None:
        # Without per-row values (a streamed fit), ``num_data`` and ``log_likelihood``
        # come in ``fit``.
        if pointwise_log_likelihood is not None:
            fit.update(
                num_data=int(pointwise_log_likelihood.shape[0]),
                log_likelihood=float(pointwise_log_likelihood.sum()),
            )
        super().__init__(model=spec, log_joint=objective, **fit)
        self.spec = spec
        self.family = family
        self._internal = internal
        self._pointwise = pointwise_log_likelihood
        self._labels = labels
        self.data = data
        self.source = source

    def __getstate__(self) -> dict[str, Any]:
        """A pickled fit leaves out the source it streamed (an open reader), as a saved
        one does: per-row values then need the data passed again."""
        return {**self.__dict__, "source": None}

    def __copy__(self) -> FitResult:
        """A shallow copy keeps the source (``__getstate__`` is for pickling)."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    @property
    def labels(self) -> torch.Tensor:
        """Most probable component of each training point, ``(N,)`` (a streamed fit's
        computed now, chunk by chunk from its source)."""
        if self._labels is None:
            return self.predict(self._training_source("labels"))
        return self._labels

    @labels.setter
    def labels(self, value: torch.Tensor | None) -> None:
        self._labels = value

    def _reordered(self, index: torch.Tensor) -> None:
        """Hook for :func:`pyroem.align`: a fit whose outputs read more than ``params``
        (a variational fit's ``q``) reads its components in the order ``index``."""

    def _pointwise_values(self) -> torch.Tensor:
        """The training data's pointwise log-likelihood, ``(N,)``."""
        if self._pointwise is None:
            return self.score_samples(self._training_source("log_likelihood(pointwise=True)"))
        return self._pointwise

    def _training_source(self, what: str) -> ChunkSource:
        """The source a streamed fit read, or an error naming the route."""
        if self.source is None:
            raise NotSupportedError(
                f"{what}: this fit of a streamed source keeps no per-row values (memory "
                "does not grow with the rows) and, loaded from a file, no source to "
                "re-read: pass the data, e.g. fit.predict(path) or fit.score_samples(path), "
                "which read it chunk by chunk"
            )
        return self.source

    @property
    def mixture(self) -> FitResult:
        return self

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
        # Indexing copies the data: only where a column is wholly missing.
        self.family.validate(fill_missing(tensor if bool(seen.all()) else tensor[:, seen]))
        return tensor

    def _score(self, data: Any, log_resp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        chunk_size = int(self.options.get("chunk_size", 65536))
        parts = [
            score_mixture(self.family, self._internal, self._data(chunk), chunk_size, log_resp)
            for chunk in self._chunks(data)
        ]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            raise DataError("the source gave no rows; pass data with at least one row")
        return torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])

    def _chunks(self, data: Any) -> Any:
        """``data`` as one block when held in memory; a source (a file, a glob, a memmap,
        a function of chunks, a :class:`~pyroem.sources.ChunkSource`) chunk by chunk, in
        the fit's dtype and device, so only the per-row results are held."""
        source = data if isinstance(data, ChunkSource) else None
        if source is None and (
            isinstance(data, np.memmap) or not isinstance(data, torch.Tensor | np.ndarray)
        ):
            source = open_source(data, int(self.options.get("chunk_size", 65536)))
        if source is None:
            return [data]
        weights = self._internal.weights
        return source.with_options(weights.dtype, weights.device)

    # ----- display --------------------------------------------------------------
    def _repr_fields(self) -> list[str]:
        return [
            f"method={self.method!r}",
            f"spec={self.spec!r}",
            f"log_likelihood={self.log_likelihood():.6g}",
        ]

    def _summary_parts(self) -> tuple[str, list[str], list[str], list[str]]:
        # The model as fitted: its prior with the numbers resolved from the data.
        fitted = copy.copy(self.spec)
        fitted.family = self.family
        head = [f"  data points        {self.num_data}", f"  dimension          {self.family.dim}"]
        notes = []
        if self.removed_components:
            notes.append(f"  removed components {self.removed_components}")
        params = self.params
        names = [name for name in params if name != "weights"]
        tied = getattr(self.family, "covariance_type", None) == "tied"
        table = [f"  {'k':>3}  {'weight':>8}  " + "  ".join(f"{n}" for n in names)]
        for k in range(self.num_components):
            cells = []
            for name in names:
                value = params[name]
                if value.ndim == 0 or (name == "covariances" and tied):
                    cells.append("(shared)")
                else:
                    cells.append(format_array(value[k]))
            table.append(f"  {k:>3}  {float(params['weights'][k]):8.4f}  " + "  ".join(cells))
        if tied:
            table.append(f"  shared covariance: {format_array(params['covariances'])}")
        return repr(fitted), head, notes, table

    # ----- persistence ------------------------------------------------------------
    def _archive(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays: dict[str, np.ndarray] = {
            "weights": self._internal.weights.cpu().numpy(),
            "active": self._internal.active.cpu().numpy(),
        }
        if self._pointwise is not None and self._labels is not None:
            arrays["pointwise_log_likelihood"] = self._pointwise.cpu().numpy()
            arrays["labels"] = self._labels.cpu().numpy()
        for name, value in self._internal.components._asdict().items():
            arrays[f"component/{name}"] = value.detach().cpu().numpy()
        shift = getattr(self.family, "shift", None)
        if shift is not None:
            arrays["shift"] = shift.cpu().numpy()
        meta = {
            "spec": {**self.spec.to_config(), "family": self.family.explicit().to_config()},
            "dim": self.family.dim,
            "dtype": str(self._internal.weights.dtype).removeprefix("torch."),
            "objective": self._log_joint,
        }
        if self._pointwise is None:
            # A streamed fit: its totals, not per-row values.
            meta["rows"] = {"num_data": self.num_data, "log_likelihood": self._log_likelihood}
        return arrays, meta


def fit_start(init: Any) -> Any:
    """``init`` as starting values: a previous fit's parameters (for a ``Mixture``'s fit
    by any method, in the mixture's form, :attr:`Fit.mixture`), anything else as given."""
    return (init.mixture or init).params if isinstance(init, Fit) else init


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
    view = FitResult(
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
    view.runtime = fit.runtime
    return view


def format_array(value: torch.Tensor) -> str:
    """``value`` on one line, to 4 digits (the summaries' parameter tables)."""
    return np.array2string(
        value.detach().cpu().numpy(), precision=4, suppress_small=True, separator=", "
    ).replace("\n", "")
