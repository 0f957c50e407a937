"""Plots of fits: objective traces, fitted components over the data, forest plots.

Every function draws on a Matplotlib ``Axes`` (a new figure when none is given)
and returns the ``Axes``; :func:`write_plots` saves the standard set as PNG files.
The forest plot is ArviZ's (through :mod:`pyroem.diagnostics`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyroem.diagnostics import plot_forest
from pyroem.errors import SpecError
from pyroem.outputs.comparison import labelled_fits

__all__ = ["plot_components", "plot_objective", "plot_parameter_trace", "write_plots"]


def _pyplot() -> Any:
    """Matplotlib's pyplot on a non-interactive backend unless one is already chosen."""
    import matplotlib

    if "matplotlib.pyplot" not in __import__("sys").modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _axes(ax: Any) -> Any:
    if ax is not None:
        return ax
    _, ax = _pyplot().subplots(figsize=(6, 4.5))
    return ax


def plot_objective(fits: Sequence[Any] | Mapping[str, Any], ax: Any = None) -> Any:
    """The objective trace of each fit against the iteration.

    The objective is each method's own: the log joint for ``map-em``, the ELBO for
    ``vb-em``, the Monte Carlo estimate for ``mcmc-em``, the log joint of the draws
    for ``nuts`` (see each method's ``history``).

    Args:
        fits: fits, or ``{label: fit}``.
        ax: Matplotlib axes to draw on.
    """
    ax = _axes(ax)
    for label, fit in labelled_fits(fits).items():
        objective = np.asarray(fit.history.objective, dtype=float)
        ax.plot(
            np.arange(objective.shape[0]),
            objective,
            label=label,
            marker="." * (len(objective) < 60),
        )
    ax.set_xlabel("iteration")
    ax.set_ylabel("objective")
    ax.set_title("objective per iteration")
    ax.legend()
    return ax


def plot_parameter_trace(fit: Any, axes: Any = None) -> Any:
    """MCMC-EM's θ_t against the iteration, one panel per parameter, one line per
    entry, the final estimate marked.

    Args:
        fit: a fit with a ``parameter_trace`` (``method="mcmc-em"``).
        axes: one Matplotlib axes per parameter (default: a new figure).

    Returns:
        The axes, in a NumPy array.

    Raises:
        SpecError: the fit has no parameter trace.
    """
    trace = getattr(fit, "parameter_trace", None)
    if not trace:
        raise SpecError(
            f"a {fit.method} fit keeps no parameter trace; plot_parameter_trace draws "
            "method='mcmc-em' fits (plot_objective draws any fit's objective)"
        )
    if axes is None:
        _, axes = _pyplot().subplots(
            len(trace), 1, figsize=(6, 2.2 * len(trace)), squeeze=False, sharex=True
        )
    axes = np.ravel(axes)
    for ax, (name, values) in zip(axes, trace.items(), strict=True):
        series = _numpy(values).reshape(values.shape[0], -1)
        steps = np.arange(series.shape[0])
        for column in range(series.shape[1]):
            line = ax.plot(steps, series[:, column], lw=1)[0]
            ax.plot(steps[-1], series[-1, column], "o", color=line.get_color(), ms=4)
        ax.set_title(f"{name} ({series.shape[1]} entries; dot: final estimate)")
    axes[-1].set_xlabel("iteration")
    return axes


def _numpy(value: Any) -> np.ndarray:
    return (
        value.detach().cpu().double().numpy()
        if isinstance(value, torch.Tensor)
        else np.asarray(value, dtype=float)
    )


def _covariances(params: Mapping[str, Any], num_components: int, dim: int) -> np.ndarray:
    """Full ``(K, D, D)`` covariances from any Gaussian covariance type."""
    value = _numpy(params["covariances"])
    if value.shape == (num_components, dim, dim):
        return value
    if value.shape == (dim, dim):
        return np.broadcast_to(value, (num_components, dim, dim))
    if value.shape == (num_components, dim):
        return np.stack([np.diag(row) for row in value])
    if value.shape == (num_components,):
        return value[:, None, None] * np.eye(dim)
    raise SpecError(f"covariances of shape {value.shape} do not fit {num_components} components")


def _ellipse(ax: Any, mean: np.ndarray, covariance: np.ndarray, color: Any) -> None:
    """1- and 2-standard-deviation ellipses of a 2-D Gaussian."""
    from matplotlib.patches import Ellipse

    values, vectors = np.linalg.eigh(covariance)
    angle = math.degrees(math.atan2(vectors[1, -1], vectors[0, -1]))
    for radius in (1.0, 2.0):
        width, height = 2 * radius * np.sqrt(values[::-1])
        ax.add_patch(
            Ellipse(
                (float(mean[0]), float(mean[1])),
                width,
                height,
                angle=angle,
                fill=False,
                color=color,
                lw=1.5 / radius,
            )
        )


def plot_components(
    fit: Any, data: Any = None, ax: Any = None, feature_names: Sequence[str] | None = None
) -> Any:
    """The fitted components over the data.

    2-D Gaussians: the points coloured by their most probable component, with 1- and
    2-standard-deviation ellipses; 1-D Gaussians: a histogram with the weighted
    component densities; Poisson and exponential: the rates of each component
    (with a histogram and the weighted probabilities for 1-D counts); Bernoulli and
    categorical: the component probabilities as an image.

    Args:
        fit: a fit of a ``Mixture`` (any method; its ``params`` give the components).
        data: the data ``(num_data, dim)``; default: the fit's training data.
        ax: Matplotlib axes to draw on.
        feature_names: axis labels.

    Raises:
        SpecError: the fit is not of a mixture (no ``weights`` parameter), or there is
            no data to draw.
    """
    params = fit.params
    if "weights" not in params:
        raise SpecError(
            "plot_components draws mixtures: the fit needs a 'weights' parameter "
            f"(it has {sorted(params)})"
        )
    if data is None:
        data = getattr(fit, "data", None)
    if data is None:
        raise SpecError("no data to draw; pass the data: plot_components(fit, data)")
    points = _numpy(data)
    points = points[:, None] if points.ndim == 1 else points
    weights = _numpy(params["weights"])
    num_components, dim = weights.shape[0], points.shape[1]
    names = list(feature_names or [f"x{d}" for d in range(dim)])
    colors = _pyplot().get_cmap("tab10")(np.arange(num_components) % 10)
    ax = _axes(ax)
    if "means" in params:
        means = _numpy(params["means"]).reshape(num_components, dim)
        covariances = _covariances(params, num_components, dim)
        if dim == 1:
            _gaussian_densities(
                ax, points[:, 0], weights, means[:, 0], covariances[:, 0, 0], colors
            )
            ax.set_xlabel(names[0])
        else:
            _gaussian_scatter(ax, points, weights, means, covariances, colors, names)
    elif "rates" in params:
        _rates(ax, points, weights, _numpy(params["rates"]), colors, names, fit)
    elif "probs" in params:
        probs = _numpy(params["probs"]).reshape(num_components, -1)
        image = ax.imshow(probs, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.figure.colorbar(image, ax=ax, label="probability")
        ax.set_ylabel("component")
        ax.set_xlabel("feature" if probs.shape[1] == dim else "feature × category")
    else:
        raise SpecError(f"no component parameters to draw among {sorted(params)}")
    ax.set_title(f"{fit.method}: {num_components} components")
    return ax


def _gaussian_scatter(
    ax: Any,
    points: np.ndarray,
    weights: np.ndarray,
    means: np.ndarray,
    covariances: np.ndarray,
    colors: np.ndarray,
    names: list[str],
) -> None:
    """Points coloured by most probable component (first two columns) and ellipses."""
    from scipy.stats import multivariate_normal

    log_resp = np.stack(
        [
            np.log(weights[k]) + multivariate_normal(means[k], covariances[k]).logpdf(points)
            for k in range(weights.shape[0])
        ],
        axis=-1,
    )
    labels = log_resp.argmax(-1)
    ax.scatter(points[:, 0], points[:, 1], c=colors[labels], s=10, alpha=0.6)
    for k in range(weights.shape[0]):
        _ellipse(ax, means[k, :2], covariances[k, :2, :2], colors[k])
        ax.plot(*means[k, :2], marker="x", color=colors[k], ms=10, mew=2)
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])


def _gaussian_densities(
    ax: Any,
    values: np.ndarray,
    weights: np.ndarray,
    means: np.ndarray,
    variances: np.ndarray,
    colors: np.ndarray,
) -> None:
    """Histogram of 1-D data with each weighted component density and their sum."""
    from scipy.stats import norm

    ax.hist(values, bins="auto", density=True, color="0.85")
    grid = np.linspace(values.min(), values.max(), 400)
    densities = [
        w * norm(m, math.sqrt(v)).pdf(grid)
        for w, m, v in zip(weights, means, variances, strict=True)
    ]
    for k, density in enumerate(densities):
        ax.plot(grid, density, color=colors[k], label=f"component {k}")
    ax.plot(grid, np.sum(densities, axis=0), color="black", lw=1, label="mixture")
    ax.set_ylabel("density")
    ax.legend()


def _rates(
    ax: Any,
    points: np.ndarray,
    weights: np.ndarray,
    rates: np.ndarray,
    colors: np.ndarray,
    names: list[str],
    fit: Any,
) -> None:
    """1-D counts: histogram with weighted Poisson probabilities; otherwise rate bars."""
    num_components, dim = rates.shape
    family = getattr(getattr(fit, "family", None), "name", None)
    is_poisson = family == "poisson" or (
        family is None and bool(np.all(points == np.round(points)))
    )
    if dim == 1 and is_poisson:
        from scipy.stats import poisson

        counts = np.arange(int(points.max()) + 2)
        ax.hist(points[:, 0], bins=counts - 0.5, density=True, color="0.85")
        total = np.zeros(counts.shape)
        for k in range(num_components):
            probability = weights[k] * poisson(rates[k, 0]).pmf(counts)
            total += probability
            ax.plot(
                counts, probability, marker="o", color=colors[k], label=f"rate {rates[k, 0]:.3g}"
            )
        ax.plot(counts, total, color="black", lw=1, label="mixture")
        ax.set_xlabel(names[0])
        ax.set_ylabel("probability")
        ax.legend()
        return
    width = 0.8 / num_components
    for k in range(num_components):
        ax.bar(
            np.arange(dim) + k * width,
            rates[k],
            width,
            color=colors[k],
            label=f"component {k} ({weights[k]:.2f})",
        )
    ax.set_xticks(np.arange(dim) + 0.4 - width / 2, names)
    ax.set_ylabel("rate")
    ax.legend()


def write_plots(
    fits: Sequence[Any] | Mapping[str, Any],
    directory: str | Path,
    data: Any = None,
    feature_names: Sequence[str] | None = None,
) -> list[Path]:
    """Write ``objective.png``, ``components-<label>.png`` per fit, ``trace-<label>.png``
    per MCMC-EM fit (θ_t by iteration) and, for several fits or a fit with draws,
    ``forest.png`` (one panel per parameter, components
    aligned) to ``directory``.

    Returns:
        The paths written.
    """
    plt = _pyplot()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    labelled = labelled_fits(fits)
    written = []

    def save(ax: Any, name: str) -> None:
        path = out / name
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=100)
        plt.close(ax.figure)
        written.append(path)

    save(plot_objective(labelled), "objective.png")
    for label, fit in labelled.items():
        slug = "".join(c if c.isalnum() else "-" for c in label).strip("-")
        if "weights" in fit.params:
            save(plot_components(fit, data, feature_names=feature_names), f"components-{slug}.png")
        if getattr(fit, "parameter_trace", None):
            save(plot_parameter_trace(fit)[0], f"trace-{slug}.png")
    if len(labelled) > 1 or any(fit.draws for fit in labelled.values()):
        save(plot_forest(labelled)[0], "forest.png")
    return written
