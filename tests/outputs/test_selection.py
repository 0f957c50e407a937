"""Choosing the number of components, against scikit-learn's BIC."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

import pyroem
from pyroem.errors import SpecError
from pyroem.outputs.selection import choose_components, parse_components


def test_bic_table_and_choice_match_scikit_learn() -> None:
    data = pyroem.datasets.load_faithful().data
    spec = pyroem.Mixture(1, "gaussian", covariance_type="full", prior=None)
    choice = choose_components(spec, data, range(1, 4), n_init=5, seed=0, tol=1e-10)
    reference = []
    for k in range(1, 4):
        model = GaussianMixture(
            k,
            covariance_type="full",
            reg_covar=0,
            tol=1e-10,
            n_init=10,
            max_iter=2000,
            random_state=0,
        ).fit(data.numpy())
        reference.append(model.bic(data.numpy()))
    # Both run EM to a 1e-10 per-point tolerance from several starts and reach the same
    # optima (K <= 3 on this data; from K = 4 on, local optima differ between runs), so BIC
    # agrees far below any difference between candidates (> 10 units).
    np.testing.assert_allclose(choice.table["bic"].to_numpy(), reference, rtol=1e-6)
    assert choice.best == int(np.argmin(reference)) + 1 == 2
    assert choice.table["chosen"].sum() == 1 and bool(choice.table.loc[2, "chosen"])
    assert sorted(choice.fits) == [1, 2, 3]
    assert choice.fits[3].num_components == 3


def test_aic_picks_the_lowest_aic() -> None:
    data = pyroem.datasets.load_faithful().data
    spec = pyroem.Mixture(1, "gaussian", covariance_type="diag")
    choice = choose_components(spec, data, [1, 2, 3], criterion="aic", seed=0)
    assert choice.best == int(choice.table["aic"].idxmin())
    expected = [-2 * f.log_likelihood() + 2 * f.num_parameters for f in choice.fits.values()]
    np.testing.assert_allclose(choice.table["aic"].to_numpy(), expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1..6", [1, 2, 3, 4, 5, 6]), ("2,3,5", [2, 3, 5]), ("4", [4]), ("3..3", [3])],
)
def test_parse_components(text: str, expected: list[int]) -> None:
    assert parse_components(text) == expected


@pytest.mark.parametrize("text", ["0..3", "a..b", "", "2,x", "-1"])
def test_parse_components_rejects(text: str) -> None:
    with pytest.raises(SpecError, match=r"range like 1\.\.6"):
        parse_components(text)


def test_bad_options_are_named() -> None:
    data = pyroem.datasets.load_faithful().data
    spec = pyroem.Mixture(2, "gaussian")
    with pytest.raises(SpecError, match="criterion must be one of"):
        choose_components(spec, data, [1, 2], criterion="dic")
    with pytest.raises(SpecError, match="needs posterior draws"):
        choose_components(spec, data, [1, 2], criterion="loo")
    with pytest.raises(SpecError, match="cannot carry over"):
        choose_components(pyroem.Mixture(2, weights_prior=[1.0, 2.0]), data, [1, 2])
    with pytest.raises(SpecError, match="components is empty"):
        choose_components(spec, data, [])


def test_loo_picks_the_fewest_components_within_one_standard_error() -> None:
    """On Old Faithful, K=3's elpd_loo edges out K=2's by far less than the standard
    error of their difference; the one-standard-error rule keeps K=2. The table's
    differences are ArviZ's own (az.compare on the same fits)."""
    import arviz as az

    data = pyroem.datasets.load_faithful().data
    spec = pyroem.Mixture(2, "gaussian", covariance_type="full")
    choice = choose_components(spec, data, [1, 2, 3], criterion="loo", method="vb-em", seed=0)
    table = choice.table
    reference = az.compare({str(k): fit.to_arviz() for k, fit in choice.fits.items()})
    for k in (1, 2, 3):
        assert table.loc[k, "elpd_diff"] == pytest.approx(reference.loc[str(k), "elpd_diff"])
        assert table.loc[k, "dse"] == pytest.approx(reference.loc[str(k), "dse"])
    assert table["elpd_loo"].idxmax() == 3
    assert table.loc[2, "elpd_diff"] < table.loc[2, "dse"]
    assert table.loc[1, "elpd_diff"] > table.loc[1, "dse"]
    assert choice.best == 2
    assert list(table["chosen"]) == [False, True, False]
    assert "one standard error" in choice.rule
