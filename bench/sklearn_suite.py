"""Run scikit-learn's own mixture tests and ``check_estimator`` against pyroem's estimators.

The test modules are the ones installed with scikit-learn (``sklearn/mixture/tests``);
nothing is copied. A pytest plugin (this module, loaded with ``-p``) replaces
``sklearn.mixture.GaussianMixture`` and ``BayesianGaussianMixture`` by
:mod:`pyroem.sklearn`'s before pytest imports the test modules, so the names they
import are pyroem's::

    python bench/sklearn_suite.py            # counts for the three modules + check_estimator
    python bench/sklearn_suite.py --original # the same tests on scikit-learn's own classes
    python bench/sklearn_suite.py --checks   # check_estimator only
    python -m pytest -p bench.sklearn_suite --pyargs sklearn.mixture.tests  # plain pytest

``check_estimator`` runs through ``sklearn.utils.estimator_checks.parametrize_with_checks``
in :func:`test_check_estimator`, collected from this file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MODULES = ("test_gaussian_mixture", "test_bayesian_mixture", "test_mixture")
ROOT = Path(__file__).resolve().parent.parent


def _substitute() -> None:
    import sklearn.mixture

    from pyroem.sklearn import BayesianGaussianMixture, GaussianMixture

    sklearn.mixture.GaussianMixture = GaussianMixture  # type: ignore[misc]
    sklearn.mixture.BayesianGaussianMixture = BayesianGaussianMixture  # type: ignore[misc]


def pytest_configure(config: object) -> None:
    """Pytest hook: runs before collection imports any test module."""
    if not os.environ.get("PYROEM_SKLEARN_ORIGINAL"):
        _substitute()


def _estimators() -> list:
    if os.environ.get("PYROEM_SKLEARN_ORIGINAL"):
        from sklearn.mixture import BayesianGaussianMixture, GaussianMixture
    else:
        from pyroem.sklearn import BayesianGaussianMixture, GaussianMixture
    return [GaussianMixture(), BayesianGaussianMixture()]


if "pytest" in sys.modules:
    from sklearn.utils.estimator_checks import parametrize_with_checks

    @parametrize_with_checks(_estimators())
    def test_check_estimator(estimator: object, check: object) -> None:
        check(estimator)  # type: ignore[operator]


def _count(target: list[str], env: dict[str, str]) -> tuple[int, int, str]:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "bench.sklearn_suite",
        "-q",
        "-rN",
        "-p",
        "no:cacheprovider",
        "-W",
        "ignore",
        *target,
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True).stdout
    last = out.strip().splitlines()[-1] if out.strip() else ""
    passed = failed = 0
    for part in last.replace("=", "").split(","):
        words = part.split()
        if len(words) >= 2 and words[0].isdigit():
            if words[1].startswith("passed"):
                passed = int(words[0])
            elif words[1].startswith(("failed", "error")):
                failed += int(words[0])
    return passed, passed + failed, last


def main() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    only_checks = "--checks" in sys.argv
    if "--original" in sys.argv:
        env["PYROEM_SKLEARN_ORIGINAL"] = "1"
    import sklearn

    tests = Path(sklearn.__file__).parent / "mixture" / "tests"
    for name in () if only_checks else MODULES:
        passed, total, line = _count([str(tests / f"{name}.py")], env)
        print(f"{name}: {passed}/{total} passed  ({line})")
    selections = {
        "GaussianMixture": "GaussianMixture and not Bayesian",
        "BayesianGaussianMixture": "BayesianGaussianMixture",
    }
    for name, selection in selections.items():
        target = [f"{__file__}::test_check_estimator", "-k", selection]
        passed, total, line = _count(target, env)
        print(f"check_estimator {name}: {passed}/{total} passed  ({line})")


if __name__ == "__main__":
    main()
