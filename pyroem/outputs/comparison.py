"""Side-by-side comparison of fits of one model by several methods.

:func:`compare` puts every fit into one table: the scores (log-likelihood, each
method's objective, PSIS-LOO where the fit has posterior draws, runtime,
iterations) and every parameter with its point estimate and, where the method
gives a posterior (``nuts``, ``mcmc-em`` draws, ``vb-em``), a central credible
interval. Mixture components are first aligned to a reference fit (label
switching, see :mod:`pyroem.outputs.alignment`), so row ``means[1, 0]`` is the same
component in every column.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from pyroem.diagnostics import loo_table
from pyroem.errors import SpecError
from pyroem.outputs.alignment import align_fits

__all__ = ["compare", "format_comparison", "labelled_fits"]

#: Names of each method's objective, as recorded in ``history.objective``.
OBJECTIVES = {
    "map-em": "log joint",
    "vb-em": "ELBO",
    "mcmc-em": "log joint (Monte Carlo estimate with continuous latents)",
    "nuts": "log joint of the draws",
}

_STATS = ("estimate", "lower", "upper")


def labelled_fits(fits: Sequence[Any] | Mapping[str, Any]) -> dict[str, Any]:
    """``{label: fit}``; a sequence is labelled by each fit's method, numbered if repeated."""
    if isinstance(fits, Mapping):
        return dict(fits)
    labelled: dict[str, Any] = {}
    for fit in fits:
        label, number = fit.method, 2
        while label in labelled:
            label, number = f"{fit.method} ({number})", number + 1
        labelled[label] = fit
    return labelled


def _flat(value: torch.Tensor) -> np.ndarray:
    return value.detach().cpu().double().reshape(-1).numpy()


def _element_names(name: str, shape: tuple[int, ...]) -> list[str]:
    if not shape:
        return [name]
    return [
        f"{name}[{', '.join(map(str, index))}]"
        for index in itertools.product(*(range(size) for size in shape))
    ]


def _parameter_rows(fit: Any, interval: float) -> dict[str, tuple[float, float, float]]:
    """``{element name: (estimate, lower, upper)}``; the interval is NaN without draws."""
    rows = {}
    draws = fit.draws or {}
    tail = (1 - interval) / 2
    for name, value in fit.params.items():
        names = _element_names(name, tuple(value.shape))
        estimate = _flat(value)
        if name in draws:
            samples = draws[name].detach().cpu().double().reshape(-1, estimate.shape[0]).numpy()
            lower, upper = np.quantile(samples, [tail, 1 - tail], axis=0)
        else:
            lower = upper = np.full(estimate.shape, np.nan)
        for element, est, low, high in zip(names, estimate, lower, upper, strict=True):
            rows[element] = (float(est), float(low), float(high))
    return rows


def compare(
    fits: Sequence[Any] | Mapping[str, Any],
    *,
    interval: float = 0.94,
    align: bool = True,
) -> pd.DataFrame:
    """One table of several fits of the same model.

    Args:
        fits: fits (labelled by method) or ``{label: fit}``.
        interval: probability of the central credible intervals (ArviZ's default 0.94).
        align: align mixture components to the first fit before comparing.

    Returns:
        A DataFrame with one row per quantity — ``log_likelihood``, ``objective``,
        ``elpd_loo``, ``elpd_loo_se``, ``runtime_s``, ``iterations``, ``converged``,
        then every parameter element (``means[1, 0]``) — and columns
        ``(label, "estimate" | "lower" | "upper")``. Scores fill only ``estimate``;
        ``lower``/``upper`` are the credible interval from the fit's posterior draws
        (NaN for a point estimate). ``df.attrs["objectives"]`` names each objective.

    Raises:
        SpecError: no fits, or an interval outside (0, 1).
    """
    labelled = labelled_fits(fits)
    if not labelled:
        raise SpecError("compare needs at least one fit")
    if not 0 < interval < 1:
        raise SpecError(f"interval must be in (0, 1); got {interval!r}")
    if align and len(labelled) > 1:
        labelled = align_fits(labelled)
    # LOO averages over posterior draws of the parameters; draws of latents only (MCMC-EM's
    # E-step at the final θ) are not a posterior of θ.
    with_draws = {
        label: fit for label, fit in labelled.items() if set(fit.draws or ()) & set(fit.params)
    }
    elpd: dict[str, tuple[float, float]] = {}
    if with_draws:
        loo = loo_table(with_draws)
        elpd = {label: (loo.loc[label, "elpd_loo"], loo.loc[label, "se"]) for label in with_draws}
    columns: dict[tuple[str, str], dict[str, float]] = {}
    for label, fit in labelled.items():
        estimate: dict[str, float] = {
            "log_likelihood": fit.log_likelihood(),
            "objective": float(fit.history.objective[-1]),
            "elpd_loo": float(elpd.get(label, (np.nan, np.nan))[0]),
            "elpd_loo_se": float(elpd.get(label, (np.nan, np.nan))[1]),
            "runtime_s": float(fit.runtime),
            "iterations": float(fit.num_iterations),
            "converged": float(fit.converged),
        }
        lower = dict.fromkeys(estimate, np.nan)
        upper = dict.fromkeys(estimate, np.nan)
        for element, (est, low, high) in _parameter_rows(fit, interval).items():
            estimate[element], lower[element], upper[element] = est, low, high
        for stat, values in zip(_STATS, (estimate, lower, upper), strict=True):
            columns[(label, stat)] = values
    table = pd.DataFrame(columns)
    table.columns = pd.MultiIndex.from_tuples(table.columns, names=["fit", "stat"])
    table.attrs["objectives"] = {
        label: OBJECTIVES.get(fit.method, "objective") for label, fit in labelled.items()
    }
    table.attrs["interval"] = interval
    return table


def format_comparison(table: pd.DataFrame, digits: int = 6) -> str:
    """The table of :func:`compare` as text: ``estimate [lower, upper]`` per fit."""
    labels = list(dict.fromkeys(table.columns.get_level_values(0)))
    cells = {}
    for label in labels:
        column = []
        for _, row in table[label].iterrows():
            est, low, high = row["estimate"], row["lower"], row["upper"]
            if np.isnan(est):
                column.append("—")
            elif np.isnan(low):
                column.append(f"{est:.{digits}g}")
            else:
                column.append(f"{est:.{digits}g} [{low:.{digits}g}, {high:.{digits}g}]")
        cells[label] = column
    text = pd.DataFrame(cells, index=table.index).to_string()
    objectives = table.attrs.get("objectives", {})
    notes = "; ".join(f"{label}: {name}" for label, name in objectives.items())
    interval = table.attrs.get("interval", 0.94)
    return (
        f"{text}\n\nobjective = {notes}\n[lower, upper] = central {interval:.0%} credible interval"
    )
