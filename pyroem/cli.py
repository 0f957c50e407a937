"""The ``pyroem`` command: fit a mixture to a CSV file or a bundled data set.

::

    pyroem fit                                    # Old Faithful, 2 full-covariance Gaussians
    pyroem fit --dataset iris --components 3 --covariance-type diag
    pyroem fit --data my.csv --columns x,y --components 4 --prior none --out results/
    pyroem fit --components 1..6                  # choose K by BIC (or --criterion loo)
    pyroem fit --method vb-em --plots plots/      # any method; PNG plots
    pyroem compare --methods map-em,vb-em,nuts    # one model, several methods, one table

A bare ``pyroem`` (or ``pyroem`` followed by options only) runs ``pyroem fit``.
``python -m pyroem`` is the same command.

Exit status: 0 on success; 2 for a bad command line or bad input (one line on
stderr, ``pyroem: error: …``, never a traceback); 1 if the output files could not
be written or a plot failed (the results are printed and written before any plot
is drawn, so a failing plot loses nothing). Warnings (for example EM stopping at
``--max-iter``) are printed as one line each, ``pyroem: warning: …``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyroem import __version__
from pyroem.errors import DataError, PyroEMError, SpecError
from pyroem.selection import CRITERIA, parse_components

if TYPE_CHECKING:
    import torch

    from pyroem.spec.mixture import Mixture

__all__ = ["build_parser", "main"]

# The command line is parsed and checked before torch and Pyro are imported (seconds),
# so its choices are spelled out here; a test holds them to the package's own lists.
#: The methods (``pyroem.METHODS``).
METHODS = ("map-em", "vb-em", "mcmc-em", "nuts")
#: The component families (``pyroem.spec.families.FAMILIES``).
FAMILY_NAMES = ("bernoulli", "categorical", "exponential", "gaussian", "poisson")
#: The bundled data sets (``pyroem.datasets.available_datasets()``).
DATASETS = ("faithful", "iris", "discoveries", "verbagg", "sleepstudy", "airquality")

#: The data set ``pyroem fit`` uses when given neither ``--data`` nor ``--dataset``.
DEFAULT_DATASET = "faithful"

#: Seconds between progress lines when stderr is not a terminal (a log, a pipe, CI).
HEARTBEAT_SECONDS = 10.0

#: NUTS defaults of the command: about a minute on the bundled data on one core.
NUTS_DEFAULTS = {"num_chains": 2, "warmup_steps": 300, "num_samples": 300}

_OUTPUT_FILES = (
    "params.json",
    "history.csv",
    "assignments.csv",
    "fit.npz (map-em, vb-em)",
    "inference.nc (methods with draws)",
)


def _components(text: str) -> list[int]:
    """``--components``: one number, a range ``1..6`` or a list ``2,3,5``."""
    try:
        return parse_components(text)
    except SpecError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _positive(text: str) -> int:
    """A positive integer (``--threads``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


def _methods(text: str) -> list[str]:
    """``--methods``: comma-separated method names."""
    methods = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in methods if name not in METHODS]
    if not methods or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown method {unknown[0] if unknown else text!r}; choose from {','.join(METHODS)}"
        )
    return list(dict.fromkeys(methods))


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is in ``--help``)."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pyroem`` command (subcommand ``fit``)."""
    parser = _Parser(
        prog="pyroem",
        description="Expectation-Maximization for mixture models, built on Pyro.",
        epilog="A bare 'pyroem' runs 'pyroem fit' on the bundled Old Faithful data.",
    )
    parser.add_argument("--version", action="version", version=f"pyroem {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    shared = _Parser(add_help=False)
    source = shared.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="CSV", help="numeric CSV file with a header row")
    source.add_argument(
        "--dataset",
        choices=DATASETS,
        help=f"a bundled data set (default: {DEFAULT_DATASET})",
    )
    shared.add_argument(
        "--columns",
        metavar="A,B,...",
        help="comma-separated names of the columns to fit (default: all)",
    )
    shared.add_argument(
        "--family", default="gaussian", choices=FAMILY_NAMES, help="component family"
    )
    shared.add_argument(
        "--covariance-type",
        choices=("full", "diag", "spherical", "tied"),
        help="gaussian covariance structure (default: full)",
    )
    shared.add_argument(
        "--prior",
        default="default",
        choices=("default", "mclust", "none"),
        help="'default': weak prior that only prevents collapse; 'mclust': Fraley-Raftery "
        "(gaussian); 'none': maximum likelihood",
    )
    shared.add_argument(
        "--weights-prior",
        type=float,
        default=1.0,
        metavar="ALPHA",
        help="Dirichlet concentration of the mixing weights (1 is flat)",
    )
    shared.add_argument(
        "--n-init", type=int, default=10, metavar="N", help="restarts; the best is kept"
    )
    shared.add_argument(
        "--max-iter", type=int, default=1000, metavar="N", help="most EM iterations per restart"
    )
    shared.add_argument(
        "--tol",
        type=float,
        default=1e-6,
        help="convergence tolerance on the objective change per data point",
    )
    shared.add_argument("--seed", type=int, default=0, help="random seed")
    shared.add_argument(
        "--dtype", default="float64", choices=("float64", "float32"), help="floating precision"
    )
    shared.add_argument(
        "--device", metavar="DEVICE", help="torch device for the fit, e.g. cuda (default: cpu)"
    )
    shared.add_argument(
        "--threads",
        type=_positive,
        metavar="N",
        help="torch threads for the fit (default: 1 for a small problem, else torch's default)",
    )
    shared.add_argument(
        "--plots",
        metavar="DIR",
        help="write PNG plots to DIR (compare without --out also writes its table there)",
    )
    shared.add_argument(
        "--num-samples",
        type=int,
        default=NUTS_DEFAULTS["num_samples"],
        metavar="N",
        help="nuts: draws per chain",
    )
    shared.add_argument(
        "--warmup-steps",
        type=int,
        default=NUTS_DEFAULTS["warmup_steps"],
        metavar="N",
        help="nuts: warm-up steps per chain",
    )
    shared.add_argument(
        "--num-chains",
        type=int,
        default=NUTS_DEFAULTS["num_chains"],
        metavar="N",
        help="nuts: chains",
    )
    shared.add_argument(
        "--quiet", action="store_true", help="print nothing but warnings and errors"
    )

    fit_parser = commands.add_parser(
        "fit",
        parents=[shared],
        help="fit a mixture model and print a summary",
        description=(
            "Fit a finite mixture and print a summary table. Without --data or "
            f"--dataset it fits the bundled '{DEFAULT_DATASET}' data (Old Faithful) with two "
            "full-covariance Gaussian components by MAP-EM. Several --components (1..6) "
            "fit each and choose one by --criterion."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    fit_parser.add_argument(
        "--components",
        type=_components,
        default=[2],
        metavar="K",
        help="number of mixture components, or candidates to choose from (1..6 or 2,3,5)",
    )
    fit_parser.add_argument("--method", default="map-em", choices=METHODS, help="EM variant")
    fit_parser.add_argument(
        "--criterion",
        default="bic",
        choices=CRITERIA,
        help="how several --components are chosen between ('loo' needs vb-em or nuts)",
    )
    fit_parser.add_argument(
        "--out",
        metavar="DIR",
        help="write " + ", ".join(_OUTPUT_FILES) + " to DIR (rows numbered from 0)",
    )

    compare_parser = commands.add_parser(
        "compare",
        parents=[shared],
        help="fit one model with several methods and print a comparison table",
        description=(
            "Fit one mixture with several methods and print one table: scores, runtime, "
            "iterations and every parameter with its credible interval, components aligned "
            "across methods."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    compare_parser.add_argument(
        "--components",
        type=_components,
        default=[2],
        metavar="K",
        help="number of mixture components (one; the forms of fit --components are read, "
        "and a range or list is an error naming 'fit --components' to choose K first)",
    )
    compare_parser.add_argument(
        "--methods",
        type=_methods,
        default=list(METHODS),
        metavar="A,B,...",
        help="comma-separated methods to compare (default: all of " + ",".join(METHODS) + ")",
    )
    compare_parser.add_argument(
        "--out", metavar="DIR", help="write comparison.csv and comparison.txt to DIR"
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
    if not args.quiet and not sys.stderr.isatty():
        sys.stderr = _Heartbeat(sys.stderr)
    try:
        if args.command == "compare":
            return _compare_command(args)
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
    finally:
        if isinstance(sys.stderr, _Heartbeat):
            sys.stderr = sys.stderr.stream


class _Heartbeat:
    """stderr when it is not a terminal: a progress bar's carriage-return refreshes
    become one line every ``HEARTBEAT_SECONDS`` (iteration, objective, rate), so a log
    shows the run is alive without thousands of refreshes; other text passes through."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        # Set by the first progress refresh: the first line comes one interval later,
        # so a run shorter than that stays silent.
        self._last: float | None = None

    def write(self, text: str) -> int:
        if "\r" not in text:
            return int(self.stream.write(text))
        states = [part.strip() for part in text.split("\r") if part.strip()]
        now = time.monotonic()
        if self._last is None:
            self._last = now
        elif states and now - self._last >= HEARTBEAT_SECONDS:
            self.stream.write(states[-1] + "\n")
            self.stream.flush()
            self._last = now
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _check_writable(*directories: str | None) -> None:
    """Create the output directories and check they take files, before any fitting.

    Raises:
        OSError: a directory cannot be created or written (exit status 1).
    """
    for directory in directories:
        if directory is None:
            continue
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{path} is not writable")


def _say(kind: str, message: str) -> None:
    """Print ``pyroem: <kind>: <message>`` on one line of stderr."""
    print(f"pyroem: {kind}: {' '.join(message.split())}", file=sys.stderr)


def _load_data(args: argparse.Namespace) -> tuple[torch.Tensor, str, tuple[str, ...]]:
    """The data matrix, a name for it, and its column names."""
    from pyroem.datasets import load_dataset, read_csv

    columns = None
    if args.columns is not None:
        columns = [name.strip() for name in args.columns.split(",") if name.strip()]
        if not columns:
            raise DataError(f"--columns {args.columns!r} names no column; use --columns a,b")
    if args.data is not None:
        data, names = read_csv(args.data, columns)
        if all(_is_number(name) for name in names):
            raise DataError(
                f"{args.data}: the first row ({', '.join(names[:4])}"
                f"{', ...' if len(names) > 4 else ''}) is numbers, but it is read as the "
                "column names; add a header row naming the columns (e.g. x0,x1,...)"
            )
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


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _family_hint(args: argparse.Namespace, data: torch.Tensor) -> None:
    """Warn when gaussian components meet data of another kind (all 0/1, or counts)."""
    if args.family != "gaussian" or args.quiet:
        return
    if bool(((data == 0) | (data == 1)).all()):
        _say("warning", "every value is 0 or 1; for binary data use --family bernoulli")
    elif bool((data == data.round()).all() and (data >= 0).all()) and data.shape[1] == 1:
        _say("warning", "every value is a count (an integer >= 0); --family poisson may fit")


def _describe(name: str, data: torch.Tensor, names: Sequence[str]) -> str:
    """One line naming the data: source, shape and columns."""
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return f"data: {name} ({data.shape[0]} rows x {data.shape[1]} columns: {shown})"


def _spec(args: argparse.Namespace, num_components: int) -> Mixture:
    """The mixture the command line describes, with ``num_components`` components."""
    from pyroem.spec.mixture import Mixture

    return Mixture(
        num_components,
        args.family,
        covariance_type=args.covariance_type,
        weights_prior=args.weights_prior,
        prior=None if args.prior == "none" else args.prior,
    )


def _fit_options(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The options of :func:`pyroem.fit` for ``method`` from the command line."""
    progress = not args.quiet
    nuts = {
        "num_samples": args.num_samples,
        "warmup_steps": args.warmup_steps,
        "num_chains": args.num_chains,
    }
    em = {"n_init": args.n_init, "tol": args.tol, "max_iter": args.max_iter}
    return {
        **(nuts if method == "nuts" else em),
        "seed": args.seed,
        "dtype": args.dtype,
        "progress": progress,
        **({"device": args.device} if args.device is not None else {}),
        "num_threads": args.threads,
    }


def _nuts_note(args: argparse.Namespace, methods: Sequence[str]) -> None:
    """Say which NUTS settings run (before the run, which takes the longest)."""
    if "nuts" in methods and not args.quiet:
        print(
            f"nuts: {args.num_chains} chains x ({args.warmup_steps} warm-up + "
            f"{args.num_samples} draws); more with --num-chains, --warmup-steps, "
            "--num-samples",
            flush=True,
        )


def _warn(caught: list[warnings.WarningMessage]) -> None:
    """Each distinct warning once, as one line."""
    for message in dict.fromkeys(str(warning.message) for warning in caught):
        _say("warning", message)


def _fit_command(args: argparse.Namespace) -> int:
    """``pyroem fit``: load, fit (choosing K if several are given), report, write."""
    from pyroem.api import fit
    from pyroem.selection import choose_components

    _check_writable(args.out, args.plots)
    data, name, names = _load_data(args)
    _family_hint(args, data)
    candidates = args.components
    options = _fit_options(args, args.method)
    _nuts_note(args, [args.method])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        if len(candidates) > 1:
            choice = choose_components(
                _spec(args, 1),
                data,
                candidates,
                criterion=args.criterion,
                method=args.method,
                **options,
            )
            result = choice.fits[choice.best]
        else:
            result = fit(_spec(args, candidates[0]), data, method=args.method, **options)
    _warn(caught)
    if not args.quiet:
        print(_describe(name, data, names))
        if len(candidates) > 1:
            print(f"number of components by {args.criterion}: {choice.best} ({choice.rule})")
            print(choice.table.to_string())
            print()
        print(result.summary())
    if args.out is not None:
        out = Path(args.out)
        written = _write_outputs(out, result, data, source=name, feature_names=names)
        if not args.quiet:
            print(f"wrote {', '.join(written)} to {out}")
    if args.plots is not None:
        return _plots(args, {result.method: result}, data, names, saved=args.out)
    return 0


def _plots(
    args: argparse.Namespace,
    fits: dict[str, Any],
    data: torch.Tensor,
    names: Sequence[str],
    *,
    saved: str | None,
) -> int:
    """Write the plots; a failure is reported on one line (exit status 1) without
    losing the results, which are printed and written before any plot is drawn."""
    from pyroem.plots import write_plots

    try:
        paths = write_plots(fits, args.plots, data, feature_names=names)
    except Exception as err:  # any plotting failure is reported, not raised
        where = f"written to {saved}" if saved is not None else "printed above"
        _say(
            "error",
            f"plotting failed ({type(err).__name__}: {err}); the results were {where}",
        )
        return 1
    if not args.quiet:
        print(f"wrote {', '.join(path.name for path in paths)} to {args.plots}")
    return 0


def _compare_command(args: argparse.Namespace) -> int:
    """``pyroem compare``: fit one model with every method, print and write one table."""
    from pyroem.api import fit
    from pyroem.comparison import compare, format_comparison

    if len(args.components) > 1:
        raise SpecError(
            f"compare fits one model, so --components takes one number; got "
            f"{','.join(map(str, args.components))}. Choose K first with "
            f"'pyroem fit --components {args.components[0]}..{args.components[-1]}', "
            "then compare at that K"
        )
    num_components = args.components[0]
    _check_writable(args.out, args.plots)
    data, name, names = _load_data(args)
    _family_hint(args, data)
    spec = _spec(args, num_components)
    _nuts_note(args, args.methods)
    fits = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        for method in args.methods:
            fits[method] = fit(spec, data, method=method, **_fit_options(args, method))
        table = compare(fits)
    _warn(caught)
    text = format_comparison(table)
    if not args.quiet:
        print(_describe(name, data, names))
        print(f"model: {spec!r}")
        print(text)
    # The table is saved before any plot is drawn: to --out, else beside the plots.
    target = args.out if args.out is not None else args.plots
    if target is not None:
        out = Path(target)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "comparison.csv")
        (out / "comparison.txt").write_text(text + "\n", encoding="utf-8")
        if not args.quiet:
            print(f"wrote comparison.csv, comparison.txt to {out}")
    if args.plots is not None:
        return _plots(args, fits, data, names, saved=target)
    return 0


def _write_outputs(
    out: Path,
    result: Any,
    data: torch.Tensor,
    *,
    source: str,
    feature_names: Sequence[str],
) -> list[str]:
    """Write ``params.json``, ``history.csv``, ``assignments.csv`` and either ``fit.npz``
    (a fit :func:`pyroem.load` reads back) or, for methods with posterior draws,
    ``inference.nc`` (ArviZ ``InferenceData``) to ``out``.

    Args:
        out: the output directory (created if missing).
        result: the fit.
        data: the training data, ``(num_data, dim)``.
        source: the data's name (file path or bundled data set).
        feature_names: the ``dim`` column names.

    Returns:
        The names of the files written.
    """
    from pyroem.results import FitResult

    out.mkdir(parents=True, exist_ok=True)
    spec = getattr(result, "spec", None)
    report: dict[str, Any] = {
        "data": {
            "source": source,
            "num_data": int(data.shape[0]),
            "columns": list(feature_names),
        },
        "model": spec.to_config() if spec is not None else None,
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

    if isinstance(result, FitResult):
        probabilities = result.predict_proba(data)
    else:
        probabilities = result.marginals["assignment"]
    best = probabilities.max(-1)
    with open(out / "assignments.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "label", "responsibility"])
        for row, (label, value) in enumerate(
            zip(best.indices.tolist(), best.values.tolist(), strict=True)
        ):
            writer.writerow([row, label, value])

    written = ["params.json", "history.csv", "assignments.csv"]
    if result.draws:
        columns = list(feature_names)
        coords = {dim: columns for dim in ("dim", "dim_row", "dim_col")}
        result.to_arviz(coords=coords).to_netcdf(str(out / "inference.nc"))
        written.append("inference.nc")
    if isinstance(result, FitResult):
        result.save(out / "fit.npz")
        written.append("fit.npz")
    return written
