"""``pyroem.compare``: one table of several fits, components aligned."""

from __future__ import annotations

import numpy as np
import pytest

import pyroem
from pyroem.diagnostics import loo
from pyroem.errors import SpecError


@pytest.fixture(scope="module")
def fits() -> dict:
    data = pyroem.datasets.load_faithful().data
    spec = pyroem.Mixture(2, "gaussian", covariance_type="full")
    map_fit = pyroem.fit(spec, data, seed=0)
    # Start CAVI from the MAP estimate with its components in the other order, so the
    # table only lines up if compare aligns them.
    swapped = {name: value.flip(0) for name, value in map_fit.params.items()}
    vb_fit = pyroem.fit(spec, data, method="vb-em", init=swapped, seed=0, num_draws=400)
    return {"map": map_fit, "vb": vb_fit}


def test_estimates_are_aligned_and_intervals_are_draw_quantiles(fits: dict) -> None:
    table = pyroem.compare(fits, interval=0.9)
    map_fit, vb_fit = fits["map"], fits["vb"]
    # vb-em's components came out in the swapped order ...
    assert float((vb_fit.params["means"][0] - map_fit.params["means"][1]).abs().max()) < 1.0
    # ... and the table shows them in the MAP fit's order.
    for k in range(2):
        for d in range(2):
            row = f"means[{k}, {d}]"
            assert table.loc[row, ("map", "estimate")] == pytest.approx(
                float(map_fit.params["means"][k, d])
            )
            assert table.loc[row, ("vb", "estimate")] == pytest.approx(
                float(vb_fit.params["means"][1 - k, d])
            )
            draws = vb_fit.draws["means"][..., 1 - k, d].reshape(-1).numpy()
            low, high = np.quantile(draws, [0.05, 0.95])
            assert table.loc[row, ("vb", "lower")] == pytest.approx(low)
            assert table.loc[row, ("vb", "upper")] == pytest.approx(high)
            assert np.isnan(table.loc[row, ("map", "lower")])
    # MAP and the variational mean are close on 272 points with a weak prior.
    map_means = table.loc[[f"means[{k}, 1]" for k in range(2)], ("map", "estimate")]
    vb_means = table.loc[[f"means[{k}, 1]" for k in range(2)], ("vb", "estimate")]
    np.testing.assert_allclose(map_means.to_numpy(), vb_means.to_numpy(), atol=0.5)


def test_scores(fits: dict) -> None:
    table = pyroem.compare(fits)
    for label, fit in fits.items():
        assert table.loc["log_likelihood", (label, "estimate")] == pytest.approx(
            fit.log_likelihood()
        )
        assert table.loc["objective", (label, "estimate")] == fit.history.objective[-1]
        assert table.loc["iterations", (label, "estimate")] == fit.num_iterations
        assert table.loc["runtime_s", (label, "estimate")] == fit.runtime > 0
    # LOO only where there are posterior draws, and it is ArviZ's value.
    assert np.isnan(table.loc["elpd_loo", ("map", "estimate")])
    assert table.loc["elpd_loo", ("vb", "estimate")] == pytest.approx(loo(fits["vb"]).elpd_loo)
    assert table.attrs["objectives"] == {"map": "log joint", "vb": "ELBO"}
    text = pyroem.format_comparison(table)
    assert "objective = map: log joint; vb: ELBO" in text
    assert "[" in text.split("means[0, 0]")[1].splitlines()[0]


def test_sequence_labels_and_errors(fits: dict) -> None:
    table = pyroem.compare([fits["map"], fits["map"]], align=False)
    assert list(dict.fromkeys(table.columns.get_level_values(0))) == ["map-em", "map-em (2)"]
    with pytest.raises(SpecError, match="at least one fit"):
        pyroem.compare([])
    with pytest.raises(SpecError, match=r"interval must be in \(0, 1\)"):
        pyroem.compare(fits, interval=1.5)
