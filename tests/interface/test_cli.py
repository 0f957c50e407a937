"""The ``pyroem`` command line: wiring of every option, output files, exit codes.

``pyroem fit`` is checked end to end in-process through ``main([...])`` and once
as a real ``python -m pyroem`` subprocess. Parameters written by the command must
equal those of ``pyroem.fit`` called with the same options (the wiring), and the
log-likelihood it prints must match scikit-learn's maximum-likelihood fit (an
independent reference). Bad input must end with exit code 2 and one line on stderr.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture
from tqdm import tqdm

import pyroem
from pyroem import cli, em
from pyroem.datasets import load_dataset, load_faithful

ROOT = Path(__file__).resolve().parents[2]
OUTPUT_FILES = ("params.json", "history.csv", "assignments.csv", "fit.npz")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``main(argv)`` in-process; returns (exit code, stdout, stderr)."""
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _printed_log_likelihood(stdout: str) -> float:
    match = re.search(r"^\s*log-likelihood\s+(\S+)\s*$", stdout, flags=re.MULTILINE)
    assert match is not None, stdout
    return float(match.group(1))


def _reference_fit(
    dataset: str = "faithful",
    *,
    family: str = "gaussian",
    covariance_type: str | None = None,
    components: int = 2,
    prior: Any = "default",
    weights_prior: float = 1.0,
    n_init: int = 10,
    tol: float = 1e-6,
    max_iter: int = 1000,
    seed: int = 0,
    dtype: str = "float64",
) -> pyroem.FitResult:
    """``pyroem.fit`` called directly with the options the CLI documents as defaults."""
    spec = pyroem.Mixture(
        components,
        family,
        covariance_type=covariance_type,
        weights_prior=weights_prior,
        prior=prior,
    )
    return pyroem.fit(
        spec,
        load_dataset(dataset).data,
        n_init=n_init,
        tol=tol,
        max_iter=max_iter,
        seed=seed,
        dtype=dtype,
    )


def _read_csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def _assert_params_equal(written: dict[str, Any], result: pyroem.FitResult) -> None:
    """Parameters from params.json equal ``result.params`` bit for bit."""
    params = result.params
    assert set(written) == set(params)
    for name, value in params.items():
        loaded = torch.tensor(written[name], dtype=value.dtype)
        assert torch.equal(loaded, value), name


# ----------------------------------------------------------------------------
# The default command
# ----------------------------------------------------------------------------


def test_bare_command_fits_old_faithful_with_two_full_gaussians(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, bare, err = _run(capsys)
    assert code == 0
    assert err == ""
    assert bare.splitlines()[0] == "data: faithful (272 rows x 2 columns: eruptions, waiting)"
    assert "converged          True" in bare
    expected = _reference_fit(covariance_type="full")
    for weight in expected.params["weights"].tolist():
        assert f"{weight:8.4f}" in bare
    assert _printed_log_likelihood(bare) == pytest.approx(expected.log_likelihood(), abs=1e-6)

    # `pyroem`, `pyroem fit` and the defaults spelled out are one command.
    spelled = (
        "fit --dataset faithful --family gaussian --covariance-type full --components 2 "
        "--method map-em --prior default --weights-prior 1 --n-init 10 --max-iter 1000 "
        "--tol 1e-6 --seed 0 --dtype float64"
    ).split()
    for argv in (["fit"], spelled):
        code, out, err = _run(capsys, *argv)
        assert (code, err) == (0, "")
        assert out == bare


def test_options_without_subcommand_run_fit(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("--dataset", "iris", "--components", "3", "--n-init", "2")
    with_fit = _run(capsys, "fit", *argv)
    without = _run(capsys, *argv)
    assert with_fit[0] == 0
    assert without == with_fit
    assert "data: iris (150 rows x 4 columns: sepal_length" in with_fit[1]


@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical", "tied"])
def test_printed_log_likelihood_matches_sklearn(
    capsys: pytest.CaptureFixture[str], covariance_type: str
) -> None:
    """With --prior none the fit is maximum likelihood, as in scikit-learn (reg_covar=0)."""
    code, out, err = _run(capsys, "fit", "--prior", "none", "--covariance-type", covariance_type)
    assert (code, err) == (0, "")
    data = load_faithful().data.numpy()
    reference = GaussianMixture(
        n_components=2,
        covariance_type=covariance_type,
        n_init=10,
        tol=1e-10,
        reg_covar=0.0,
        max_iter=1000,
        random_state=0,
    ).fit(data)
    expected = reference.score(data) * data.shape[0]
    assert _printed_log_likelihood(out) == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------
# Output files, via a real subprocess
# ----------------------------------------------------------------------------


def test_python_m_pyroem_writes_readable_outputs(tmp_path: Path) -> None:
    out_dir = tmp_path / "results"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-m", "pyroem", "fit", "--dataset", "faithful", "--out", str(out_dir)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    assert completed.stdout.startswith("data: faithful")
    assert "pyroem map-em fit of Mixture(num_components=2" in completed.stdout
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(OUTPUT_FILES)

    expected = _reference_fit(covariance_type="full")
    data = load_faithful().data

    report = json.loads((out_dir / "params.json").read_text(encoding="utf-8"))
    _assert_params_equal(report["params"], expected)
    scores = report["scores"]
    assert scores == {
        "log_likelihood": expected.log_likelihood(),
        "log_joint": expected.log_joint(),
        "bic": expected.bic(),
        "aic": expected.aic(),
        "converged": expected.converged,
        "num_iterations": expected.num_iterations,
    }
    assert report["data"] == {
        "source": "faithful",
        "num_data": 272,
        "columns": ["eruptions", "waiting"],
    }
    assert _printed_log_likelihood(completed.stdout) == pytest.approx(
        scores["log_likelihood"], abs=1e-6
    )

    header, rows = _read_csv_rows(out_dir / "history.csv")
    assert header == ["iteration", "objective", "log_likelihood", "elapsed"]
    table = np.array(rows, dtype=np.float64)
    assert table[:, 0].tolist() == list(range(scores["num_iterations"] + 1))
    np.testing.assert_array_equal(table[:, 1], expected.history.objective)
    np.testing.assert_array_equal(table[:, 2], expected.history.log_likelihood)
    assert table[-1, 1] == scores["log_joint"]
    assert np.all(np.diff(table[:, 1]) >= 0), "MAP-EM objective decreased"
    assert np.all(np.diff(table[:, 3]) >= 0), "elapsed time went backwards"

    header, rows = _read_csv_rows(out_dir / "assignments.csv")
    assert header == ["row", "label", "responsibility"]
    assert [int(r[0]) for r in rows] == list(range(272))
    proba = expected.predict_proba(data)
    assert [int(r[1]) for r in rows] == proba.argmax(-1).tolist()
    np.testing.assert_array_equal(
        np.array([float(r[2]) for r in rows]), proba.max(-1).values.numpy()
    )

    with np.load(out_dir / "fit.npz", allow_pickle=False) as archive:
        assert "meta" in archive.files
    loaded = pyroem.load(out_dir / "fit.npz")
    _assert_params_equal(report["params"], loaded)
    assert loaded.log_likelihood() == scores["log_likelihood"]


@pytest.mark.parametrize(
    ("argv", "options"),
    [
        (
            "--dataset iris --components 3 --covariance-type diag --seed 3 --n-init 2".split(),
            {"dataset": "iris", "components": 3, "covariance_type": "diag", "seed": 3, "n_init": 2},
        ),
        (
            ["--dataset", "discoveries", "--family", "poisson", "--prior", "none", "--tol", "1e-9"],
            {"dataset": "discoveries", "family": "poisson", "prior": None, "tol": 1e-9},
        ),
        (
            "--dataset verbagg --family bernoulli --components 3 --n-init 2 --weights-prior 2.5"
            " --max-iter 500".split(),
            {
                "dataset": "verbagg",
                "family": "bernoulli",
                "components": 3,
                "n_init": 2,
                "weights_prior": 2.5,
                "max_iter": 500,
            },
        ),
        (
            ["--dataset", "verbagg", "--family", "categorical", "--n-init", "1", "--seed", "7"],
            {"dataset": "verbagg", "family": "categorical", "n_init": 1, "seed": 7},
        ),
        (
            ["--family", "exponential", "--components", "3", "--max-iter", "40"],
            {"family": "exponential", "components": 3, "max_iter": 40},
        ),
        (
            ["--covariance-type", "tied", "--dtype", "float32", "--n-init", "3"],
            {"covariance_type": "tied", "dtype": "float32", "n_init": 3},
        ),
        (
            ["--covariance-type", "spherical", "--prior", "none", "--seed", "11"],
            {"covariance_type": "spherical", "prior": None, "seed": 11},
        ),
    ],
    ids=["iris-diag", "poisson-flat", "bernoulli", "categorical", "exponential", "f32", "sph"],
)
def test_every_option_reaches_fit(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    argv: list[str],
    options: dict[str, Any],
) -> None:
    code, out, err = _run(capsys, "fit", *argv, "--out", str(tmp_path))
    assert code == 0, err
    expected = _reference_fit(**options)
    report = json.loads((tmp_path / "params.json").read_text(encoding="utf-8"))
    _assert_params_equal(report["params"], expected)
    assert report["declared_model"] == expected.spec.to_config()
    assert report["model"] == {
        **expected.spec.to_config(),
        "family": expected.family.explicit().to_config(),
    }
    assert report["scores"]["log_joint"] == expected.log_joint()
    assert f"{expected.log_likelihood():.6f}" in out
    if not expected.converged:
        assert err.startswith("pyroem: warning: EM did not converge")
    else:
        assert err == ""


def test_csv_input_with_selected_columns(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A CSV file with a text column fits like the bundled data once --columns picks."""
    data = load_faithful().data.tolist()
    path = tmp_path / "geyser.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "waiting", "eruptions"])
        for n, (eruptions, waiting) in enumerate(data):
            writer.writerow([f"e{n}", repr(waiting), repr(eruptions)])
    code, from_csv, err = _run(capsys, "fit", "--data", str(path), "--columns", "eruptions,waiting")
    assert (code, err) == (0, "")
    assert from_csv.splitlines()[0] == (f"data: {path} (272 rows x 2 columns: eruptions, waiting)")
    code, bundled, _ = _run(capsys, "fit")
    assert from_csv.splitlines()[1:] == bundled.splitlines()[1:]

    code, out, err = _run(capsys, "fit", "--columns", "waiting")
    assert code == 0
    assert out.splitlines()[0] == "data: faithful (272 rows x 1 columns: waiting)"
    assert _printed_log_likelihood(out) == pytest.approx(
        pyroem.fit(
            pyroem.Mixture(2), load_faithful().data[:, 1:], n_init=10, seed=0
        ).log_likelihood(),
        abs=1e-6,
    )


def test_quiet_prints_nothing_and_creates_the_output_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_dir = tmp_path / "deep" / "er"
    assert _run(capsys, "fit", "--quiet", "--out", str(out_dir)) == (0, "", "")
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(OUTPUT_FILES)


def test_output_directory_that_is_a_file_is_an_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory")
    code, _, err = _run(capsys, "fit", "--quiet", "--out", str(blocker))
    assert code == 1
    assert err.count("\n") == 1
    assert err.startswith("pyroem: error: cannot write the output files")


def test_output_directory_is_checked_before_fitting(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory that cannot take the outputs is an error before any fit runs."""
    import pyroem.api

    def no_fit(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("fitted before checking --out")

    monkeypatch.setattr(pyroem.api, "fit", no_fit)
    monkeypatch.setattr(cli, "fit", no_fit, raising=False)
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory")
    for command in (["fit"], ["compare", "--methods", "map-em"]):
        for option in ("--out", "--plots"):
            code, _, err = _run(capsys, *command, option, str(blocker / "sub"))
            assert code == 1
            assert err.startswith("pyroem: error: cannot write the output files")


# ----------------------------------------------------------------------------
# Warnings, progress, help
# ----------------------------------------------------------------------------


def test_convergence_warning_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "fit", "--max-iter", "2")
    assert code == 0
    assert "converged          False after 2 iterations" in out
    assert err.count("\n") == 1
    assert re.fullmatch(
        r"pyroem: warning: EM did not converge in 2 iterations \(.*\); raise max_iter.*\n", err
    )


def test_progress_bar_on_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _, err = _run(capsys, "fit", "--n-init", "2")
    assert code == 0
    assert "map-em restart 1/2" in err
    assert "map-em restart 2/2" in err
    assert _run(capsys, "fit", "--n-init", "2", "--quiet") == (0, "", "")


def test_progress_off_the_terminal_is_a_periodic_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off a terminal (a log, a pipe) a run shorter than the interval prints nothing on
    stderr; a longer one prints its progress as whole lines (no carriage returns), at
    most one per interval, naming the iteration, the objective and the rate."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    code, _, err = _run(capsys, "fit", "--n-init", "1")
    assert (code, err) == (0, "")
    monkeypatch.setattr(cli, "HEARTBEAT_SECONDS", 0.0)
    # A bar refreshes at most every 0.1 s: refresh at every iteration, so a fast fit
    # still shows its progress (the heartbeat, not the bar's timing, is under test).
    monkeypatch.setattr(em, "tqdm", functools.partial(tqdm, mininterval=0.0, miniters=1))
    code, _, err = _run(capsys, "fit", "--n-init", "2")
    assert code == 0
    lines = err.splitlines()
    assert lines and "\r" not in err
    assert any(
        re.search(r"map-em restart 2/2.*\d+/\d+.*it/s.*objective=-1\d{3}", line) for line in lines
    )
    assert sys.stderr.isatty() is False and not isinstance(sys.stderr, cli._Heartbeat)


def test_nuts_defaults_are_short_and_printed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """NUTS runs 2 chains x (300 + 300) steps by default (about a minute on the bundled
    data; it was 4 x (500 + 1000)), and says so before it starts."""
    args = cli.build_parser().parse_args(["fit", "--method", "nuts"])
    nuts = cli._fit_options(args, "nuts")
    assert (nuts["num_chains"], nuts["warmup_steps"], nuts["num_samples"]) == (2, 300, 300)
    seen = {}

    def fake_fit(spec: Any, data: Any, **options: Any) -> Any:
        seen.update(options)
        raise pyroem.SpecError("stop here")

    monkeypatch.setattr(pyroem.api, "fit", fake_fit)
    code, out, _ = _run(capsys, "fit", "--method", "nuts")
    assert code == 2
    assert out.startswith("nuts: 2 chains x (300 warm-up + 300 draws)")
    assert (seen["num_chains"], seen["warmup_steps"], seen["num_samples"]) == (2, 300, 300)
    assert "device" not in seen


def test_device_and_threads_reach_the_fit(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = {}

    def fake_fit(spec: Any, data: Any, **options: Any) -> Any:
        seen.update(options)
        raise pyroem.SpecError("stop here")

    monkeypatch.setattr(pyroem.api, "fit", fake_fit)
    code, _, err = _run(capsys, "fit", "--device", "cpu", "--threads", "3")
    assert code == 2 and "stop here" in err
    assert seen["device"] == "cpu" and seen["num_threads"] == 3
    code, _, err = _run(capsys, "fit", "--threads", "0")
    assert code == 2 and "--threads" in err


@pytest.mark.parametrize("argv", [["--help"], ["fit", "--help"], ["--version"]])
def test_help_and_version_exit_zero(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 0
    assert err == ""
    assert "usage: pyroem" in out or out.startswith("pyroem ")


# ----------------------------------------------------------------------------
# Bad input: exit code 2 and one line naming the problem
# ----------------------------------------------------------------------------


def _assert_one_line_error(code: int, out: str, err: str, pattern: str) -> None:
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    assert err.startswith("pyroem: error: ")
    assert re.search(pattern, err), err


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("a,b\n1,2\n3,abc\n", r"column 'b' row 2 \(line 3\) holds 'abc'"),
        ("a,b\n1,2\n3\n4,5\n", r"row 2 \(line 3\) has 1 fields but the header has 2"),
        ("a,b\n1,2\n3,4,5\n", r"row 2 \(line 3\) has 3 fields"),
        ("a,b\n1,2\n3,NaN\n", r"row 2 \(line 3\) column 'b' is missing \('NaN'\)"),
        ("a,b\n1,2\n,4\n", r"row 2 \(line 3\) column 'a' is missing"),
        ("a,b\n1,2\n3,inf\n", r"column 'b' holds 'inf'; values must be finite"),
        ("a,b\n", r"header row but no data rows"),
        ("", r"is empty"),
    ],
    ids=["text", "short-row", "long-row", "nan", "empty-cell", "inf", "no-rows", "empty-file"],
)
def test_bad_csv_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str, pattern: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    code, out, err = _run(capsys, "fit", "--data", str(path))
    _assert_one_line_error(code, out, err, pattern)
    assert str(path) in err


def test_missing_csv_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "nowhere.csv"
    code, out, err = _run(capsys, "fit", "--data", str(path))
    _assert_one_line_error(code, out, err, r"no such file")
    assert str(path) in err


def test_singular_covariance_without_prior(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Two clusters of repeated points: flat-prior covariances are singular."""
    path = tmp_path / "repeated.csv"
    rows = [(0, 0)] * 10 + [(10, 0)] * 10 + [(10, 1)] * 10
    path.write_text("x,y\n" + "".join(f"{x},{y}\n" for x, y in rows), encoding="utf-8")
    code, out, err = _run(capsys, "fit", "--data", str(path), "--prior", "none")
    _assert_one_line_error(code, out, err, r"(singular|collapsed).*use a prior")
    assert _run(capsys, "fit", "--data", str(path), "--quiet") == (0, "", "")


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--family", "poisson"], r"poisson family needs non-negative integer counts"),
        (["--family", "bernoulli"], r"bernoulli family needs binary 0/1 data"),
        (["--components", "1000"], r"num_components=1000 exceeds the number of data points"),
        (["--n-init", "0"], r"n_init must be an integer >= 1"),
        (["--tol", "-1"], r"tol must be a non-negative number"),
        (["--weights-prior", "-1"], r"weights_prior must be positive"),
        (["--columns", "waiting,depth"], r"no column 'depth'"),
        (["--columns", ","], r"names no column"),
        (
            ["--dataset", "discoveries", "--family", "poisson", "--covariance-type", "diag"],
            r"covariance_type applies to the gaussian family only",
        ),
    ],
)
def test_bad_options_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], pattern: str
) -> None:
    code, out, err = _run(capsys, "fit", *argv)
    _assert_one_line_error(code, out, err, pattern)


@pytest.mark.parametrize(
    "argv",
    [
        ["fit", "--dataset", "nope"],
        ["fit", "--dataset", "iris", "--data", "x.csv"],
        ["fit", "--components", "two"],
        ["fit", "--components", "0"],
        ["fit", "--components", "3..x"],
        ["compare", "--methods", "map-em,gibbs"],
        ["fit", "--family", "student"],
        ["fit", "--data"],
        ["frobnicate"],
        ["--bogus"],
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert out == ""
    # One line, as the README promises; the usage is one --help away.
    assert err.count("\n") == 1
    assert re.fullmatch(
        r"pyroem( fit| compare)?: error: .+ \(see 'pyroem( fit| compare)? --help'\)\n", err
    )


def test_argument_errors_answer_before_torch_is_imported() -> None:
    """Arguments are parsed and checked before torch and Pyro are imported: a bad
    argument or --help answers in well under a second (it took ~10 s importing them)."""
    import time

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    check = (
        "import sys; from pyroem.cli import main; code = main(sys.argv[1:]); "
        "print(code, 'torch' in sys.modules, 'pyro' in sys.modules)"
    )
    for argv in (["fit", "--components", "0"], ["fit", "--help"], ["compare", "--method", "x"]):
        completed = subprocess.run(
            [sys.executable, "-c", check, *argv], env=env, capture_output=True, text=True
        )
        assert completed.stdout.splitlines()[-1] == f"{0 if '--help' in argv else 2} False False"
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "pyroem", "fit", "--components", "0"],
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    assert completed.returncode == 2
    assert "components '0'" in completed.stderr
    assert elapsed < 1.0


def test_components_range_chooses_by_bic(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = _run(
        capsys, "fit", "--components", "1..3", "--n-init", "3", "--out", str(tmp_path)
    )
    assert code == 0, err
    data = load_faithful().data
    bics = [_reference_fit(components=k, n_init=3).bic() for k in (1, 2, 3)]
    best = int(np.argmin(bics)) + 1
    assert f"number of components by bic: {best}" in out
    for bic in bics:
        assert f"{bic:.4f}"[:8] in out
    report = json.loads((tmp_path / "params.json").read_text(encoding="utf-8"))
    assert report["model"]["num_components"] == best
    assert len(report["params"]["weights"]) == best
    assert data.shape[0] == report["data"]["num_data"]


def test_plots_option_writes_pngs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = _run(capsys, "fit", "--n-init", "1", "--plots", str(tmp_path))
    assert code == 0, err
    for name in ("objective.png", "components-map-em.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert f"to {tmp_path}" in out


def test_compare_prints_and_writes_one_table(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_dir, plot_dir = tmp_path / "out", tmp_path / "plots"
    code, out, err = _run(
        capsys,
        "compare",
        "--methods",
        "map-em,vb-em,nuts",
        "--n-init",
        "2",
        "--num-samples",
        "60",
        "--warmup-steps",
        "60",
        "--num-chains",
        "2",
        "--out",
        str(out_dir),
        "--plots",
        str(plot_dir),
    )
    assert code == 0, err
    expected = _reference_fit(n_init=2)
    assert f"{expected.log_likelihood():.6g}" in out
    assert "objective = map-em: log joint; vb-em: ELBO; nuts: log joint of the draws" in out
    with open(out_dir / "comparison.csv", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][1:] == ["map-em"] * 3 + ["vb-em"] * 3 + ["nuts"] * 3
    means = {row[0]: row[1:] for row in rows}["means[1, 1]"]
    assert float(means[0]) == pytest.approx(float(expected.params["means"][1, 1]))
    assert (out_dir / "comparison.txt").read_text(encoding="utf-8").strip() in out
    for name in ("objective.png", "forest.png", "components-nuts.png"):
        assert (plot_dir / name).read_bytes()[:4] == b"\x89PNG"


def test_compare_keeps_its_results_when_a_plot_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table is printed and written before plotting; a plot that raises ends the
    command with status 1 and one line naming the failure, and loses nothing."""
    import pyroem.plots

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no display")

    monkeypatch.setattr(pyroem.plots, "plot_objective", broken)
    plot_dir = tmp_path / "plots"
    argv = ["compare", "--methods", "map-em,vb-em", "--n-init", "1", "--plots", str(plot_dir)]
    code, out, err = _run(capsys, *argv)
    assert code == 1
    assert err.count("\n") == 1
    assert err.startswith("pyroem: error: plotting failed (RuntimeError: no display)")
    expected = _reference_fit(n_init=1)
    assert f"{expected.log_likelihood():.6g}" in out
    with open(plot_dir / "comparison.csv", encoding="utf-8") as handle:
        rows = {row[0]: row[1:] for row in csv.reader(handle)}
    assert float(rows["means[1, 1]"][0]) == pytest.approx(float(expected.params["means"][1, 1]))
    out_dir = tmp_path / "out"
    code, out, err = _run(capsys, *argv, "--out", str(out_dir))
    assert code == 1 and f"written to {out_dir}" in err
    assert (out_dir / "comparison.txt").read_text(encoding="utf-8").strip() in out


def test_choices_spelled_out_in_the_cli_are_the_package_lists() -> None:
    from pyroem.datasets import available_datasets
    from pyroem.model.families import FAMILIES

    assert cli.METHODS == pyroem.METHODS
    assert cli.FAMILY_NAMES == tuple(sorted(FAMILIES))
    assert cli.DATASETS == tuple(available_datasets())


def test_inference_nc_is_labelled_by_column(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = _run(capsys, "fit", "--method", "vb-em", "--n-init", "1", "--out", str(tmp_path))
    assert code == 0, err
    from pyroem.diagnostics import from_netcdf

    idata = from_netcdf(tmp_path / "inference.nc")
    assert list(idata.posterior.coords["dim"].values) == ["eruptions", "waiting"]
    assert idata.posterior.sizes["chain"] == 4
    report = json.loads((tmp_path / "params.json").read_text(encoding="utf-8"))
    np.testing.assert_allclose(
        idata.point_estimate["means"].sel(dim="waiting").values,
        np.asarray(report["params"]["means"])[:, 1],
    )


def test_compare_reads_the_components_forms_of_fit(capsys: pytest.CaptureFixture[str]) -> None:
    """``compare --components`` is read as fit reads it (a range: see
    ``test_cli_outputs.py``); one number fits that K."""
    code, out, err = _run(
        capsys, "compare", "--components", "3", "--methods", "map-em", "--n-init", "1"
    )
    assert code == 0, err
    assert "Mixture(num_components=3" in out


def test_headerless_csv_is_an_error_naming_the_header(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A numeric first row would silently become the column names (and the fit then
    fail on something unrelated); it is a one-line error naming the remedy."""
    path = tmp_path / "numbers.csv"
    path.write_text("1.5,2.0\n2.5,3.0\n3.5,1.0\n4.0,2.5\n", encoding="utf-8")
    code, out, err = _run(capsys, "fit", "--data", str(path))
    _assert_one_line_error(code, out, err, r"first row \(1\.5, 2\.0\) is numbers.*add a header row")


def test_binary_data_get_a_family_hint(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(
        capsys,
        "fit",
        "--dataset",
        "verbagg",
        "--n-init",
        "1",
        "--max-iter",
        "1",
        "--covariance-type",
        "diag",
    )
    assert code == 0, err
    assert "pyroem: warning: every value is 0 or 1; for binary data use --family bernoulli\n" in err
    code, _, err = _run(capsys, "fit", "--dataset", "faithful", "--n-init", "1")
    assert "--family" not in err


def test_import_pyroem_is_light_and_every_public_name_resolves() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    check = (
        "import sys, pyroem; light = 'torch' not in sys.modules; "
        "missing = [n for n in pyroem.__all__ if getattr(pyroem, n, None) is None]; "
        "print(light, missing, callable(pyroem.diagnostics.loo), "
        "callable(pyroem.outputs.alignment.align))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True, check=False
    )
    assert completed.stdout.split("\n")[-2] == "True [] True True", completed.stderr
