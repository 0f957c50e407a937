"""ruff (lint and format) and mypy are part of the test suite."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyroem", "tests", "models", "bench"]


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)


@pytest.mark.parametrize(
    "command",
    [
        ("ruff", "check", *SOURCES),
        ("ruff", "format", "--check", *SOURCES),
    ],
    ids=["ruff-check", "ruff-format"],
)
def test_ruff(command: tuple[str, ...]) -> None:
    # Prefer the ruff installed beside this interpreter (the test extra), then PATH.
    beside = Path(sys.executable).with_name("ruff")
    executable = str(beside) if beside.exists() else shutil.which("ruff") or "ruff"
    result = _run(executable, *command[1:])
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy() -> None:
    result = _run(sys.executable, "-m", "mypy", "pyroem")
    assert result.returncode == 0, result.stdout + result.stderr
