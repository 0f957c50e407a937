"""The prior a fit used, shown and saved with its numbers (not ``mean=None`` or
``scale='resolution'``).

The saved prior is checked against what the fit maximised: SciPy's Inverse-Wishart,
multivariate normal and Dirichlet densities at the saved parameters, under the saved
prior, give the fit's ``log_joint - log_likelihood``. mclust's prior (vb-em) is checked
against its formulas (Fraley & Raftery 2007) computed with NumPy.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import dirichlet, invwishart, multivariate_normal

import pyroem
from pyroem import cli
from pyroem.datasets import load_faithful


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _printed_prior(text: str) -> dict[str, object]:
    """The fields of the first ``NormalInverseWishart(...)`` printed in ``text``."""
    start = text.index("NormalInverseWishart(")
    depth, end = 0, start
    for end in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        if text[end] == ")" and depth == 0:
            break
    call = ast.parse(text[start : end + 1], mode="eval").body
    assert isinstance(call, ast.Call)
    return {keyword.arg or "": ast.literal_eval(keyword.value) for keyword in call.keywords}


def _assert_printed_equals_saved(printed: dict[str, object], saved: dict[str, object]) -> None:
    for name in ("mean", "mean_precision", "dof", "scale", "weight"):
        np.testing.assert_allclose(
            np.asarray(printed[name], dtype=float), np.asarray(saved[name]), rtol=1e-3, atol=0
        )


def test_repr_of_the_default_prior_names_it() -> None:
    text = repr(pyroem.Mixture(2, "gaussian"))
    assert "None" not in text and "'resolution'" not in text
    assert "prior='default' (weak" in text
    assert "prior='mclust' (Fraley-Raftery" in repr(pyroem.Mixture(2, "gaussian", prior="mclust"))


def test_saved_and_printed_prior_is_the_prior_map_em_used(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = _run(capsys, "fit", "--n-init", "2", "--out", str(tmp_path))
    assert code == 0, err
    report = json.loads((tmp_path / "params.json").read_text(encoding="utf-8"))
    prior = report["model"]["family"]["prior"]
    assert all(
        value is not None and not isinstance(value, str)
        for value in prior.values()
        if value != "NormalInverseWishart"
    )
    assert report["declared_model"]["family"]["prior"]["scale"] == "resolution"
    params = report["params"]
    log_prior = dirichlet.logpdf(np.asarray(params["weights"]), [1.0, 1.0])
    for mean, covariance in zip(params["means"], params["covariances"], strict=True):
        covariance = np.asarray(covariance)
        log_prior += prior["weight"] * (
            invwishart.logpdf(covariance, df=prior["dof"], scale=np.asarray(prior["scale"]))
            + multivariate_normal.logpdf(mean, prior["mean"], covariance / prior["mean_precision"])
        )
    scores = report["scores"]
    np.testing.assert_allclose(
        log_prior, scores["log_joint"] - scores["log_likelihood"], rtol=1e-9, atol=1e-9
    )
    _assert_printed_equals_saved(_printed_prior(out), prior)
    # The saved model reproduces the fit's prior: fit again from it.
    again = pyroem.fit(
        pyroem.Mixture.from_config(report["model"]), load_faithful().data, n_init=2, seed=0
    )
    assert again.log_joint() == pytest.approx(scores["log_joint"], rel=1e-12)


def test_saved_and_printed_prior_of_vb_em_is_mclusts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """vb-em needs a proper prior: the default becomes mclust's, and the output says so
    with its numbers."""
    code, out, err = _run(
        capsys, "fit", "--method", "vb-em", "--n-init", "1", "--out", str(tmp_path)
    )
    assert code == 0, err
    prior = json.loads((tmp_path / "params.json").read_text(encoding="utf-8"))["model"]
    prior = prior["family"]["prior"]
    data = load_faithful().data.numpy()
    num_components, dim = 2, data.shape[1]
    np.testing.assert_allclose(prior["mean"], data.mean(0), rtol=1e-12)
    assert prior["mean_precision"] == 0.01 and prior["dof"] == dim + 2
    np.testing.assert_allclose(
        prior["scale"], np.cov(data.T) / num_components ** (2 / dim), rtol=1e-12
    )
    assert prior["weight"] == 1.0
    _assert_printed_equals_saved(_printed_prior(out), prior)
