"""Plots are written, are real PNG images with something drawn, and draw the fit."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.patches import Ellipse

import pyroem
from pyroem.errors import SpecError
from pyroem.plots import plot_components, plot_objective, write_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_drawn(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = matplotlib.image.imread(path)
    # More than a blank canvas: many distinct colours.
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20


def _faithful_fit() -> pyroem.FitResult:
    data = pyroem.datasets.load_faithful().data
    return pyroem.fit(pyroem.Mixture(2, "gaussian", covariance_type="full"), data, seed=0)


def test_write_plots_writes_non_empty_images(tmp_path: Path) -> None:
    fit = _faithful_fit()
    paths = write_plots([fit], tmp_path)
    assert sorted(p.name for p in paths) == ["components-map-em.png", "objective.png"]
    for path in paths:
        _assert_drawn(path)


def test_ellipses_are_the_fitted_covariances() -> None:
    fit = _faithful_fit()
    ax = plot_components(fit)
    ellipses = [patch for patch in ax.patches if isinstance(patch, Ellipse)]
    assert len(ellipses) == 4  # 1 and 2 standard deviations for each component
    for k in range(2):
        covariance = fit.params["covariances"][k].numpy()
        axes = 2 * np.sqrt(np.linalg.eigvalsh(covariance))
        inner = ellipses[2 * k]
        np.testing.assert_allclose(inner.center, fit.params["means"][k].numpy())
        np.testing.assert_allclose(sorted([inner.width, inner.height]), axes)
        np.testing.assert_allclose(
            sorted([ellipses[2 * k + 1].width, ellipses[2 * k + 1].height]), 2 * axes
        )


def test_objective_trace_is_the_history() -> None:
    fit = _faithful_fit()
    ax = plot_objective({"map": fit})
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_ydata(), fit.history.objective)


@pytest.mark.parametrize(
    ("family", "options"),
    [("gaussian", {"covariance_type": "diag"}), ("poisson", {}), ("bernoulli", {})],
)
def test_other_families_draw(tmp_path: Path, family: str, options: dict) -> None:
    spec = pyroem.Mixture(2, family, **options)
    data, _ = spec.simulate(200, seed=1, dim=1 if family != "bernoulli" else 4)
    fit = pyroem.fit(spec, data, seed=0)
    paths = write_plots({"fit": fit}, tmp_path)
    for path in paths:
        _assert_drawn(path)


def test_plot_components_needs_a_mixture_and_data() -> None:
    fit = _faithful_fit()
    fit.data = None
    with pytest.raises(SpecError, match="no data to draw"):
        plot_components(fit)

    not_a_mixture = SimpleNamespace(method="map-em", params={"loc": torch.zeros(2)})
    with pytest.raises(SpecError, match="needs a 'weights' parameter"):
        plot_components(not_a_mixture, np.zeros((3, 2)))
