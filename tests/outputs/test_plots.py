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


def test_forest_aligns_fits_and_gives_each_parameter_entry_a_panel() -> None:
    """vb-em starts from MAP-EM's components swapped, so its marks only sit beside
    MAP-EM's if the forest aligns the fits; MCMC-EM has marks (its θ), its assignments
    none; every panel holds one entry of one parameter over the components."""
    import pandas as pd

    from pyroem.diagnostics import plot_forest

    faithful = pyroem.datasets.load_faithful()
    frame = pd.DataFrame(faithful.data.numpy(), columns=list(faithful.feature_names))
    spec = pyroem.Mixture(2, "gaussian", covariance_type="full")
    map_fit = pyroem.fit(spec, frame, seed=0)
    swapped = {name: value.flip(0) for name, value in map_fit.params.items()}
    fits = {
        "map-em": map_fit,
        "vb-em": pyroem.fit(spec, frame, method="vb-em", init=swapped, seed=0, num_draws=200),
        "mcmc-em": pyroem.fit(spec, frame, method="mcmc-em", seed=0, max_iter=10),
    }
    assert float(fits["vb-em"].params["means"][0, 1] - map_fit.params["means"][0, 1]) > 20
    axes = plot_forest(fits)
    titles = [ax.get_title() for ax in axes]
    assert titles == [
        "weights",
        "means (dim=eruptions)",
        "means (dim=waiting)",
        *(
            f"covariances (dim_row={row}, dim_col={col})"
            for row in ("eruptions", "waiting")
            for col in ("eruptions", "waiting")
        ),
    ]
    for index, ax in enumerate(axes):
        assert not any("assignment" in label.get_text() for label in ax.get_yticklabels())
        marks = sorted(
            (float(line.get_ydata()[0]), float(line.get_xdata()[0]))
            for line in ax.lines
            if line.get_marker() == "o"
        )
        assert len(marks) == 3 * 2  # one per fit and component
        if index < 3:
            # Weights and means: the fits' marks of a component lie side by side.
            spread = max(x for _, x in marks) - min(x for _, x in marks)
            for component in range(2):
                xs = [x for _, x in marks[3 * component : 3 * component + 3]]
                assert max(xs) - min(xs) <= 0.1 * spread
    waiting = sorted(
        x for line in axes[2].lines if line.get_marker() == "o" for x in line.get_xdata()
    )
    np.testing.assert_allclose(
        sorted(map_fit.params["means"][:, 1].tolist() * 3), waiting, atol=1.0
    )


def test_mcmc_em_plots_show_its_parameter_trace(tmp_path: Path) -> None:
    """MCMC-EM's PNGs include its θ trajectory: one panel per parameter, one line per
    entry ending at the final estimate."""
    data = pyroem.datasets.load_faithful().data[:100]
    fit = pyroem.fit(pyroem.Mixture(2, "gaussian"), data, method="mcmc-em", seed=0, max_iter=10)
    paths = write_plots([fit], tmp_path, data)
    assert sorted(p.name for p in paths) == [
        "components-mcmc-em.png",
        "forest.png",
        "objective.png",
        "trace-mcmc-em.png",
    ]
    for path in paths:
        _assert_drawn(path)
    from pyroem.plots import plot_parameter_trace

    axes = plot_parameter_trace(fit)
    assert [ax.get_title().split(" ")[0] for ax in axes] == list(fit.parameter_trace)
    for ax in axes:
        name = ax.get_title().split(" ")[0]
        lines = [line for line in ax.lines if line.get_marker() != "o"]
        assert len(lines) == fit.parameter_trace[name][0].numel()
        finals = sorted(line.get_ydata()[-1] for line in lines)
        np.testing.assert_allclose(finals, sorted(fit.params[name].reshape(-1).tolist()))
    with pytest.raises(SpecError, match="parameter trace"):
        plot_parameter_trace(_faithful_fit())
