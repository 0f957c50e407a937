"""``pyroem fit --data`` with streamed sources (.npy files, a glob, a folder): checked
before torch is imported, fitted pass by pass with one progress line per pass, equal to
the same data read into memory; under ``torchrun`` the fit is split over the processes
and rank 0 alone prints and writes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from pyroem.cli import main


def _blobs(num: int) -> np.ndarray:
    rng = np.random.default_rng(5)
    centres = np.array([[-5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    return centres[rng.choice(3, size=num)] + rng.normal(size=(num, 2))


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Path, np.ndarray]:
    data = _blobs(600)
    folder = tmp_path / "parts"
    folder.mkdir()
    for index, rows in enumerate(np.array_split(data, 3)):
        np.save(folder / f"part-{index}.npy", rows)
    return folder, data


ARGS = ["--components", "3", "--prior", "none", "--n-init", "1", "--tol", "1e-10"]


def _params(out: Path) -> dict[str, np.ndarray]:
    report = json.loads((out / "params.json").read_text())
    return {key: np.array(value) for key, value in report["params"].items()}


def test_a_glob_of_npy_files_is_streamed_pass_by_pass_to_the_maximum_likelihood_fit(
    parts, tmp_path, capsys
):
    folder, data = parts
    out = tmp_path / "out"
    code = main(["fit", "--data", str(folder / "part-*.npy"), *ARGS, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "params.json").read_text())
    assert report["data"]["num_data"] == 600
    passes = [line for line in captured.err.splitlines() if line.startswith("pass ")]
    assert len(passes) == report["scores"]["num_iterations"]
    assert (
        captured.out.splitlines()[0]
        == f"data: {folder / 'part-*.npy'} (600 rows x 2 columns: x0, x1)"
    )
    # The same maximum-likelihood fit scikit-learn finds from the same means.
    params = _params(out)
    reference = GaussianMixture(
        3, tol=1e-12, reg_covar=0, max_iter=1000, means_init=params["means"]
    ).fit(data)
    order = np.argsort(reference.means_[:, 0])
    mine = np.argsort(params["means"][:, 0])
    np.testing.assert_allclose(params["means"][mine], reference.means_[order], atol=1e-6)
    np.testing.assert_allclose(
        params["covariances"][mine], reference.covariances_[order], atol=1e-6
    )
    labels = np.loadtxt(out / "assignments.csv", delimiter=",", skiprows=1)[:, 1]
    assert labels.shape == (600,)
    np.testing.assert_array_equal(
        np.argsort(mine)[labels.astype(int)], np.argsort(order)[reference.predict(data)]
    )
    # A folder of the files is the same source.
    again = tmp_path / "again"
    assert main(["fit", "--data", str(folder), *ARGS, "--out", str(again), "--quiet"]) == 0
    for key, value in _params(out).items():
        np.testing.assert_array_equal(_params(again)[key], value)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "{folder}/nothing-*.npy"], "no file matches"),
        (["--data", "{folder}/missing.npy"], "no such file"),
        (["--data", "{folder}/notes.txt"], "is not a .npy, .csv, .parquet file"),
        (["--data", "{folder}/part-*.npy", "--columns", "x0"], "--columns selects columns"),
        (["--data", "{folder}/part-*.npy", "--plots", "{folder}/plots"], "--plots draws"),
    ],
)
def test_streamed_data_is_checked_before_torch_is_imported(parts, extra, message):
    folder, _ = parts
    (folder / "notes.txt").write_text("1,2\n")
    argv = [item.format(folder=folder) for item in ["fit", *extra]]
    program = (
        "import sys; from pyroem.cli import main; code = main(sys.argv[1:]); "
        "print(code, 'torch' in sys.modules)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", program, *argv], capture_output=True, text=True, timeout=120
    )
    assert completed.stdout.split() == ["2", "False"], completed.stderr
    assert completed.stderr.count("\n") == 1
    assert message in completed.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_torchrun_splits_the_cli_fit_over_two_processes(parts, tmp_path):
    folder, _ = parts
    single, split = tmp_path / "single", tmp_path / "split"
    pattern = str(folder / "part-*.npy")
    assert main(["fit", "--data", pattern, *ARGS, "--out", str(single), "--quiet"]) == 0
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "pyroem",
        "fit",
        "--data",
        pattern,
        *ARGS,
        "--out",
        str(split),
    ]
    completed = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    # Rank 0 alone prints.
    assert completed.stdout.count("data: ") == 1
    report = json.loads((split / "params.json").read_text())
    assert report["options"]["processes"] == 2
    for key, value in _params(single).items():
        np.testing.assert_allclose(_params(split)[key], value, rtol=0, atol=1e-10)
    np.testing.assert_allclose(
        np.loadtxt(split / "assignments.csv", delimiter=",", skiprows=1),
        np.loadtxt(single / "assignments.csv", delimiter=",", skiprows=1),
        rtol=0,
        atol=1e-10,
    )
