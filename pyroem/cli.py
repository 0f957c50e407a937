"""The ``pyroem`` command: fit a mixture to a CSV file or a bundled data set.

::

    pyroem fit                                    # Old Faithful, 2 full-covariance Gaussians
    pyroem fit --dataset iris --components 3 --covariance-type diag
    pyroem fit --data my.csv --columns x,y --components 4 --prior none --out results/

A bare ``pyroem`` (or ``pyroem`` followed by options only) runs ``pyroem fit``.
``python -m pyroem`` is the same command.

Exit status: 0 on success; 2 for a bad command line or bad input (one line on
stderr, ``pyroem: error: …``, never a traceback); 1 if the output files could not
be written. Warnings (for example EM stopping at ``--max-iter``) are printed as
one line each, ``pyroem: warning: …``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch

from pyroem import __version__
from pyroem.api import METHODS, fit
from pyroem.datasets import available_datasets, load_dataset, read_csv
from pyroem.errors import DataError, PyroEMError
from pyroem.results import FitResult
from pyroem.spec.families import FAMILIES
from pyroem.spec.mixture import Mixture

__all__ = ["build_parser", "main"]

#: The data set ``pyroem fit`` uses when given neither ``--data`` nor ``--dataset``.
DEFAULT_DATASET = "faithful"

#: ``num_data · num_components · n_init`` from which a fit counts as long, so its
#: progress bar is shown even when stderr is not a terminal.
_LONG_FIT = 10_000_000

_OUTPUT_FILES = ("params.json", "history.csv", "assignments.csv", "fit.npz")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pyroem`` command (subcommand ``fit``)."""
    parser = argparse.ArgumentParser(
        prog="pyroem",
        description="Expectation-Maximization for mixture models, built on Pyro.",
        epilog="A bare 'pyroem' runs 'pyroem fit' on the bundled Old Faithful data.",
    )
    parser.add_argument("--version", action="version", version=f"pyroem {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    fit_parser = commands.add_parser(
        "fit",
        help="fit a mixture model and print a summary",
        description=(
            "Fit a finite mixture by MAP-EM and print a summary table. Without --data or "
            f"--dataset it fits the bundled '{DEFAULT_DATASET}' data (Old Faithful) with two "
            "full-covariance Gaussian components."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = fit_parser.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="CSV", help="numeric CSV file with a header row")
    source.add_argument(
        "--dataset",
        choices=available_datasets(),
        help=f"a bundled data set (default: {DEFAULT_DATASET})",
    )
    fit_parser.add_argument(
        "--columns",
        metavar="A,B,...",
        help="comma-separated names of the columns to fit (default: all)",
    )
    fit_parser.add_argument(
        "--family", default="gaussian", choices=sorted(FAMILIES), help="component family"
    )
    fit_parser.add_argument(
        "--covariance-type",
        choices=("full", "diag", "spherical", "tied"),
        help="gaussian covariance structure (default: full)",
    )
    fit_parser.add_argument(
        "--components", type=int, default=2, metavar="K", help="number of mixture components"
    )
    fit_parser.add_argument("--method", default="map-em", choices=METHODS, help="EM variant")
    fit_parser.add_argument(
        "--prior",
        default="default",
        choices=("default", "none"),
        help="'default': weak data-scaled conjugate prior; 'none': maximum likelihood",
    )
    fit_parser.add_argument(
        "--weights-prior",
        type=float,
        default=1.0,
        metavar="ALPHA",
        help="Dirichlet concentration of the mixing weights (1 is flat)",
    )
    fit_parser.add_argument(
        "--n-init", type=int, default=10, metavar="N", help="restarts; the best is kept"
    )
    fit_parser.add_argument(
        "--max-iter", type=int, default=1000, metavar="N", help="most EM iterations per restart"
    )
    fit_parser.add_argument(
        "--tol",
        type=float,
        default=1e-6,
        help="convergence tolerance on the objective change per data point",
    )
    fit_parser.add_argument("--seed", type=int, default=0, help="random seed")
    fit_parser.add_argument(
        "--dtype", default="float64", choices=("float64", "float32"), help="floating precision"
    )
    fit_parser.add_argument(
        "--out",
        metavar="DIR",
        help="write " + ", ".join(_OUTPUT_FILES) + " to DIR (rows numbered from 0)",
    )
    fit_parser.add_argument(
        "--quiet", action="store_true", help="print nothing but warnings and errors"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pyroem`` command.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for a bad command line or bad input,
        1 if the output files could not be written.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (
        args_list[0].startswith("-") and args_list[0] not in ("-h", "--help", "--version")
    ):
        args_list.insert(0, "fit")
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
    try:
        return _fit_command(args)
    except (PyroEMError, ValueError) as err:
        _say("error", str(err))
        return 2
    except OSError as err:
        _say("error", f"cannot write the output files: {err}")
        return 1
    except KeyboardInterrupt:
        _say("error", "interrupted")
        return 130


def _say(kind: str, message: str) -> None:
    """Print ``pyroem: <kind>: <message>`` on one line of stderr."""
    print(f"pyroem: {kind}: {' '.join(message.split())}", file=sys.stderr)


def _load_data(args: argparse.Namespace) -> tuple[torch.Tensor, str, tuple[str, ...]]:
    """The data matrix, a name for it, and its column names."""
    columns = None
    if args.columns is not None:
        columns = [name.strip() for name in args.columns.split(",") if name.strip()]
        if not columns:
            raise DataError(f"--columns {args.columns!r} names no column; use --columns a,b")
    if args.data is not None:
        data, names = read_csv(args.data, columns)
        return data, args.data, names
    dataset = load_dataset(args.dataset or DEFAULT_DATASET)
    data, names = dataset.data, dataset.feature_names
    if columns is not None:
        missing = [name for name in columns if name not in names]
        if missing:
            raise DataError(
                f"data set {dataset.name!r} has no column {missing[0]!r}; available columns: "
                + ", ".join(repr(name) for name in names)
            )
        data = data[:, [names.index(name) for name in columns]]
        names = tuple(columns)
    return data, dataset.name, names


def _describe(name: str, data: torch.Tensor, names: Sequence[str]) -> str:
    """One line naming the data: source, shape and columns."""
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return f"data: {name} ({data.shape[0]} rows x {data.shape[1]} columns: {shown})"


def _fit_command(args: argparse.Namespace) -> int:
    """``pyroem fit``: load, fit, report, write."""
    data, name, names = _load_data(args)
    spec = Mixture(
        args.components,
        args.family,
        covariance_type=args.covariance_type,
        weights_prior=args.weights_prior,
        prior=None if args.prior == "none" else "default",
    )
    work = data.shape[0] * args.components * max(args.n_init, 1)
    progress = not args.quiet and (sys.stderr.isatty() or work >= _LONG_FIT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = cast(
            FitResult,
            fit(
                spec,
                data,
                method=args.method,
                n_init=args.n_init,
                tol=args.tol,
                max_iter=args.max_iter,
                seed=args.seed,
                dtype=args.dtype,
                progress=progress,
            ),
        )
    for message in dict.fromkeys(str(warning.message) for warning in caught):
        _say("warning", message)
    if not args.quiet:
        print(_describe(name, data, names))
        print(result.summary())
    if args.out is not None:
        out = Path(args.out)
        _write_outputs(out, result, data, source=name, feature_names=names)
        if not args.quiet:
            print(f"wrote {', '.join(_OUTPUT_FILES)} to {out}")
    return 0


def _write_outputs(
    out: Path,
    result: FitResult,
    data: torch.Tensor,
    *,
    source: str,
    feature_names: Sequence[str],
) -> None:
    """Write ``params.json``, ``history.csv``, ``assignments.csv`` and ``fit.npz`` to ``out``.

    Args:
        out: the output directory (created if missing).
        result: the fit.
        data: the training data, ``(num_data, dim)``.
        source: the data's name (file path or bundled data set).
        feature_names: the ``dim`` column names.
    """
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "data": {
            "source": source,
            "num_data": int(data.shape[0]),
            "columns": list(feature_names),
        },
        "model": result.spec.to_config(),
        "method": result.method,
        "options": result.options,
        "params": {key: value.tolist() for key, value in result.params.items()},
        "scores": {
            "log_likelihood": result.log_likelihood(),
            "log_joint": result.log_joint(),
            "bic": result.bic(),
            "aic": result.aic(),
            "converged": bool(result.converged),
            "num_iterations": int(result.num_iterations),
        },
    }
    (out / "params.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    history = result.history
    with open(out / "history.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["iteration", "objective", "log_likelihood", "elapsed"])
        for step, values in enumerate(
            zip(history.objective, history.log_likelihood, history.elapsed, strict=True)
        ):
            writer.writerow([step, *(float(value) for value in values)])

    responsibility = result.predict_proba(data).max(-1).values
    with open(out / "assignments.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "label", "responsibility"])
        for row, (label, value) in enumerate(
            zip(result.labels.tolist(), responsibility.tolist(), strict=True)
        ):
            writer.writerow([row, label, value])

    result.save(out / "fit.npz")
