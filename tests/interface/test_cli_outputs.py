"""The ``pyroem`` command: help text, mcmc-em's options, the model-selection table.

The selection table written to ``--out`` must hold the numbers of ``pyroem.fit`` called
with the same options, and its BIC/AIC must follow their formulas from the written
log-likelihood and parameter count; option errors must come before torch is imported.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyroem
from pyroem import cli
from pyroem.datasets import load_faithful

ROOT = Path(__file__).resolve().parents[2]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _option_blocks(text: str) -> list[str]:
    """The help of each option: its line starting with two spaces and a dash, and the
    indented lines that continue it."""
    blocks: list[str] = []
    for line in text.split("options:", 1)[1].splitlines():
        if re.match(r"^  -", line):
            blocks.append(line)
        elif blocks and line.startswith("    "):
            blocks[-1] += " " + line.strip()
    return blocks


@pytest.mark.parametrize("command", ["fit", "compare"])
def test_help_states_each_default_once(capsys: pytest.CaptureFixture[str], command: str) -> None:
    """No ``(default: None)``, no option with two defaults (``(default: faithful)
    (default: None)`` was printed), and the defaults shown are the parser's."""
    code, out, _ = _run(capsys, command, "--help")
    assert code == 0
    blocks = _option_blocks(out)
    assert len(blocks) > 20
    for block in blocks:
        assert "(default: None)" not in block, block
        assert block.count("(default:") <= 1, block
        assert "(default: False)" not in block, block
    text = " ".join(" ".join(block.split()) for block in blocks)
    assert "--seed SEED random seed (default: 0)" in text
    assert "(default: 2)" in text  # --components, not the list [2]
    choices = ",".join(cli.DATASETS)
    assert f"--dataset {{{choices}}} a bundled data set (default: faithful)" in text


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pyroem.errors.ConvergenceWarning")
def test_mcmc_em_options_reach_the_fit(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["--schedule", "mcem", "--num-samples", "8", "--max-samples", "16"]
    argv += ["--final-draws", "12", "--num-chains", "2", "--warmup-steps", "7"]
    code, _, err = _run(
        capsys,
        "fit",
        "--method",
        "mcmc-em",
        *argv,
        "--n-init",
        "1",
        "--max-iter",
        "3",
        "--quiet",
        "--out",
        str(tmp_path),
    )
    assert code == 0, err
    report = json.loads((tmp_path / "params.json").read_text(encoding="utf-8"))
    options = report["options"]
    expected = {"schedule": "mcem", "num_samples": 8, "max_samples": 16, "final_draws": 12}
    assert {key: options[key] for key in expected} == expected
    assert options["num_chains"] == 2 and options["warmup_steps"] == 7
    direct = pyroem.fit(
        pyroem.Mixture(2, "gaussian"),
        load_faithful().data,
        method="mcmc-em",
        n_init=1,
        max_iter=3,
        seed=0,
        schedule="mcem",
        num_samples=8,
        max_samples=16,
        final_draws=12,
        num_chains=2,
        warmup_steps=7,
    )
    for name, value in direct.params.items():
        torch.testing.assert_close(
            torch.tensor(report["params"][name], dtype=value.dtype), value, rtol=0, atol=1e-12
        )


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["fit", "--schedule", "mcem"], r"--schedule applies to --method mcmc-em only"),
        (["fit", "--method", "vb-em", "--final-draws", "5"], r"--final-draws applies to"),
        (["fit", "--num-samples", "50"], r"--num-samples applies to --method nuts and mcmc-em"),
        (
            [
                "fit",
                "--method",
                "mcmc-em",
                "--schedule",
                "mcem",
                "--num-samples",
                "50",
                "--max-samples",
                "10",
            ],
            r"--max-samples \(10\) must be at least --num-samples \(50\)",
        ),
        (["fit", "--method", "mcmc-em", "--max-samples", "10"], r"applies to --schedule mcem"),
        (["fit", "--method", "mcmc-em", "--num-chains", "0"], r"expected a positive integer"),
        (["fit", "--method", "nuts", "--warmup-steps", "-1"], r"expected an integer >= 0"),
        (["fit", "--components", "1..3", "--criterion", "loo"], r"loo needs posterior draws"),
        (["compare", "--methods", "map-em,nuts", "--schedule", "saem"], r"mcmc-em only"),
    ],
)
def test_option_errors_are_one_line_before_torch(argv: list[str], pattern: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    check = (
        "import sys; from pyroem.cli import main; code = main(sys.argv[1:]); "
        "print(code, 'torch' in sys.modules)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", check, *argv], env=env, capture_output=True, text=True
    )
    assert completed.stdout.splitlines()[-1] == "2 False"
    assert completed.stderr.count("\n") == 1, completed.stderr
    assert re.search(pattern, completed.stderr), completed.stderr


def _selection(path: Path) -> tuple[list[dict[str, str]], dict]:
    with open(path / "selection.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return rows, json.loads((path / "selection.json").read_text(encoding="utf-8"))


def _check_table(rows: list[dict[str, str]], report: dict, num_data: int) -> int:
    """The table's numbers against ``pyroem.fit`` and the BIC/AIC formulas; the chosen K."""
    assert [int(row["num_components"]) for row in rows] == [1, 2, 3]
    assert [entry["num_components"] for entry in report["table"]] == [1, 2, 3]
    for row, entry in zip(rows, report["table"], strict=True):
        k = int(row["num_components"])
        direct = pyroem.fit(pyroem.Mixture(k, "gaussian"), load_faithful().data, n_init=2, seed=0)
        log_likelihood, params = float(row["log_likelihood"]), int(row["num_parameters"])
        assert math.isclose(log_likelihood, direct.log_likelihood(), rel_tol=1e-12)
        assert params == k - 1 + k * (2 + 3)  # weights, means, full covariances (D = 2)
        bic = -2 * log_likelihood + params * math.log(num_data)
        assert math.isclose(float(row["bic"]), bic, rel_tol=1e-12)
        assert math.isclose(float(row["aic"]), -2 * log_likelihood + 2 * params, rel_tol=1e-12)
        assert entry["bic"] == pytest.approx(float(row["bic"]), rel=1e-12)
    bics = [float(row["bic"]) for row in rows]
    best = bics.index(min(bics)) + 1
    assert [row["chosen"] for row in rows] == [str(k == best) for k in (1, 2, 3)]
    assert report["chosen"] == best and report["criterion"] == "bic"
    assert report["rule"] == "the lowest BIC"
    return best


def test_fit_writes_the_selection_table(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = _run(
        capsys, "fit", "--components", "1..3", "--n-init", "2", "--out", str(tmp_path)
    )
    assert code == 0, err
    rows, report = _selection(tmp_path)
    best = _check_table(rows, report, load_faithful().data.shape[0])
    assert report["method"] == "map-em"
    assert "selection.csv, selection.json" in out
    written = json.loads((tmp_path / "params.json").read_text(encoding="utf-8"))
    assert written["model"]["num_components"] == best


def test_compare_takes_a_range_and_writes_the_selection_table(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``compare --components 1..3`` (refused before) chooses K with the first method,
    compares the methods at that K and writes the selection table beside the comparison."""
    code, out, err = _run(
        capsys,
        "compare",
        "--components",
        "1..3",
        "--methods",
        "map-em",
        "--n-init",
        "2",
        "--out",
        str(tmp_path),
    )
    assert code == 0, err
    rows, report = _selection(tmp_path)
    best = _check_table(rows, report, load_faithful().data.shape[0])
    assert f"number of components by bic with map-em: {best}" in out
    assert f"Mixture(num_components={best}" in out
    assert (tmp_path / "comparison.csv").exists()


@pytest.mark.parametrize("command", ["fit", "compare"])
@pytest.mark.parametrize("case", ["missing", "headerless", "out-under-a-file"])
def test_data_file_and_out_are_checked_before_torch(
    tmp_path: Path, command: str, case: str
) -> None:
    """A missing or headerless data file and an unwritable --out answer before torch is
    imported (they took the ~10 s import first), in one line."""
    numbers = tmp_path / "numbers.csv"
    numbers.write_text("1.5,2.0\n2.5,3.0\n3.5,1.0\n", encoding="utf-8")
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    argv, code, pattern = {
        "missing": (["--data", str(tmp_path / "no.csv")], 2, r"no such file; check the path"),
        "headerless": (["--data", str(numbers)], 2, r"first row \(1\.5, 2\.0\) is numbers"),
        "out-under-a-file": (["--out", str(blocker / "out")], 1, r"cannot write"),
    }[case]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    check = (
        "import sys; from pyroem.cli import main; code = main(sys.argv[1:]); "
        "print(code, 'torch' in sys.modules)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", check, command, *argv], env=env, capture_output=True, text=True
    )
    assert completed.stdout.splitlines()[-1] == f"{code} False"
    assert completed.stderr.count("\n") == 1, completed.stderr
    assert re.search(pattern, completed.stderr), completed.stderr
