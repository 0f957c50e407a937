"""``pyroem fit --stepwise``: the command line's stepwise EM is the Python API's, on a
CSV file read into memory and on streamed .npy files, and reaches the batch optimum
within the step-size schedule's noise; a method without stepwise EM, or a stepwise
option without ``--stepwise``, is a usage error before torch is imported."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

import pyroem
from pyroem.cli import main
from pyroem.engines.stepwise import step_size

WEIGHTS = np.array([0.3, 0.3, 0.4])
BATCH, KAPPA, PASSES = 100, 0.7, 3
STEPWISE = [
    "--stepwise",
    "--batch-size",
    str(BATCH),
    "--kappa",
    str(KAPPA),
    "--passes",
    str(PASSES),
]
COMMON = ["--components", "3", "--prior", "none", "--n-init", "1", "--seed", "1", "--quiet"]


def _blobs(num: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    centres = np.array([[-6.0, 0.0], [0.0, 6.0], [6.0, 0.0]])
    return centres[rng.choice(3, size=num, p=WEIGHTS)] + rng.normal(size=(num, 2))


def _params(out: Path) -> dict[str, np.ndarray]:
    report = json.loads((out / "params.json").read_text())
    return {key: np.array(value) for key, value in report["params"].items()}


@pytest.mark.parametrize("kind", ["csv", "npy"])
def test_cli_stepwise_fit_is_the_api_fit_and_reaches_the_batch_optimum(kind, tmp_path):
    data = _blobs(4000)
    if kind == "csv":
        path = tmp_path / "x.csv"
        np.savetxt(path, data, delimiter=",", header="a,b", comments="", fmt="%.17g")
    else:
        folder = tmp_path / "parts"
        folder.mkdir()
        for index, rows in enumerate(np.array_split(data, 2)):
            np.save(folder / f"part-{index}.npy", rows)
        path = folder / "part-*.npy"
    out = tmp_path / "out"
    assert main(["fit", "--data", str(path), *COMMON, *STEPWISE, "--out", str(out)]) == 0
    report = json.loads((out / "params.json").read_text())
    assert report["options"]["stepwise"] is True
    assert report["options"]["batch_size"] == BATCH
    assert report["options"]["kappa"] == KAPPA
    assert report["scores"]["num_iterations"] == PASSES

    # The Python API's stepwise fit on the same data and options: the same numbers.
    api = pyroem.fit(
        pyroem.Mixture(3, "gaussian", prior=None),
        data if kind == "csv" else str(path),
        seed=1,
        n_init=1,
        tol=1e-6,
        stepwise=True,
        batch_size=BATCH,
        kappa=KAPPA,
        passes=PASSES,
    )
    mine = _params(out)
    for key, value in api.params.items():
        np.testing.assert_array_equal(mine[key], value.numpy())

    # Batch EM's optimum (scikit-learn), within the schedule's noise: the tolerance of
    # tests/engines/test_stepwise.py (5 standard deviations of the iterates averaged
    # after the first pass, whose step sizes are at most γ at t0 = N / b).
    gmm = GaussianMixture(3, reg_covar=0.0, tol=1e-12, max_iter=1000, random_state=0).fit(data)
    gamma = step_size(len(data) // BATCH, KAPPA)
    pi_min = 0.3
    order = np.argsort(mine["means"][:, 0])
    theirs = np.argsort(gmm.means_[:, 0])
    np.testing.assert_allclose(
        mine["means"][order],
        gmm.means_[theirs],
        rtol=0,
        atol=5 * math.sqrt(gamma / 2 / (BATCH * pi_min)),
    )
    np.testing.assert_allclose(
        mine["weights"][order],
        gmm.weights_[theirs],
        rtol=0,
        atol=5 * math.sqrt(gamma / 2 * pi_min * (1 - pi_min) / BATCH),
    )
    np.testing.assert_allclose(
        mine["covariances"][order],
        gmm.covariances_[theirs],
        rtol=0,
        atol=5 * math.sqrt(gamma / (BATCH * pi_min)),
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stepwise", "--method", "nuts"], "--stepwise runs --method map-em"),
        (["--stepwise", "--method", "mcmc-em"], "got --method mcmc-em"),
        (["--batch-size", "10"], "--batch-size applies to --stepwise only"),
        (["--kappa", "0.8", "--passes", "2"], "--kappa, --passes apply to --stepwise only"),
        (["--stepwise", "--kappa", "0.4"], "expected a number in (0.5, 1]"),
        (["--stepwise", "--checkpoint", "c.npz"], "--checkpoint is not written for --stepwise"),
    ],
)
def test_stepwise_usage_errors_come_before_torch_is_imported(extra, message):
    program = (
        "import sys; from pyroem.cli import main; code = main(sys.argv[1:]); "
        "print(code, 'torch' in sys.modules)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", program, "fit", *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.stdout.split() == ["2", "False"], completed.stderr
    assert message in completed.stderr


def test_stepwise_defaults_in_the_help_are_the_api_defaults():
    import inspect

    from pyroem.cli import STEPWISE_DEFAULTS
    from pyroem.engines.streamed import fit_mixture_large

    parameters = inspect.signature(fit_mixture_large).parameters
    assert STEPWISE_DEFAULTS == {name: parameters[name].default for name in STEPWISE_DEFAULTS}


def test_cli_stochastic_vi_on_streamed_files_writes_its_outputs(tmp_path):
    # A streamed vb-em fit keeps no data: inference.nc is written without the draws'
    # pointwise log-likelihood instead of failing after the fit.
    folder = tmp_path / "parts"
    folder.mkdir()
    for index, rows in enumerate(np.array_split(_blobs(1000), 2)):
        np.save(folder / f"part-{index}.npy", rows)
    out = tmp_path / "out"
    options = [*COMMON[:2], *COMMON[4:]]  # vb-em needs a prior: the default one
    command = ["fit", "--data", str(folder / "part-*.npy"), *options, *STEPWISE]
    assert main([*command, "--method", "vb-em", "--out", str(out)]) == 0
    import arviz as az

    inference = az.from_netcdf(str(out / "inference.nc"))
    assert "posterior" in inference.groups()
    assert "log_likelihood" not in inference.groups()
    weights = np.sort(inference.posterior["weights"].mean(("chain", "draw")).values)
    np.testing.assert_allclose(weights, np.sort(WEIGHTS), atol=0.05)
