"""The ``pyroem`` command: fit a mixture to a CSV file or a bundled data set.

::

    pyroem fit                                    # Old Faithful, 2 full-covariance Gaussians
    pyroem fit --dataset iris --components 3 --covariance-type diag
    pyroem fit --data my.csv --columns x,y --components 4 --prior none --out results/
    pyroem fit --data 'part-*.npy' --components 16 --out results/   # streamed, any size
    torchrun --nproc_per_node 2 -m pyroem fit --data 'part-*.npy'   # split over 2 processes
    pyroem fit --components 1..6                  # choose K by BIC (or --criterion loo)
    pyroem fit --method vb-em --plots plots/      # any method; PNG plots
    pyroem fit --data 'part-*.npy' --stepwise --passes 2 --batch-size 4096   # stepwise EM
    pyroem compare --methods map-em,vb-em,nuts    # one model, several methods, one table

A bare ``pyroem`` (or ``pyroem`` followed by options only) runs ``pyroem fit``.
``python -m pyroem`` is the same command.

``--data`` is one CSV file read into memory, or data streamed chunk by chunk (memory
does not grow with the rows; :mod:`pyroem.sources`): a ``.npy`` or ``.parquet`` file, a
glob of ``.npy``/``.csv``/``.parquet`` files (quoted: ``'part-*.parquet'``) or a folder of
them. A streamed fit prints one line per pass over the data. ``--stepwise`` fits by
stepwise (online) EM (:mod:`pyroem.engines.stepwise`; under ``--method vb-em``, stochastic
VI): ``--passes`` passes of minibatches of ``--batch-size`` rows with step sizes
``(t + 2)^-kappa``, on a CSV file read into memory or on streamed data. Launched by ``torchrun``
(``WORLD_SIZE`` > 1 in the environment), the fit is split over the processes
(:mod:`pyroem.engines.distributed`): each reads its shard, and rank 0 alone prints and writes.

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
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyroem import __version__
from pyroem.errors import DataError, PyroEMError, SpecError
from pyroem.outputs.component_counts import CRITERIA, parse_components

# Whatever imports torch (fitting, data sets, plots, sources) is imported inside the
# function that needs it, so that --help and a bad argument are answered without waiting
# for torch and Pyro (tests/interface/test_cli.py checks that neither is imported then).
if TYPE_CHECKING:
    import torch

    from pyroem.model.mixture import Mixture

__all__ = ["build_parser", "main"]

# The command line is parsed and checked before torch and Pyro are imported (seconds),
# so its choices are spelled out here; a test holds them to the package's own lists.
#: The methods (``pyroem.METHODS``).
METHODS = ("map-em", "vb-em", "mcmc-em", "nuts")
#: The component families (``pyroem.model.families.FAMILIES``).
FAMILY_NAMES = ("bernoulli", "categorical", "exponential", "gaussian", "poisson")
#: The bundled data sets (``pyroem.datasets.available_datasets()``).
DATASETS = ("faithful", "iris", "discoveries", "verbagg", "sleepstudy", "airquality")

#: The data set ``pyroem fit`` uses when given neither ``--data`` nor ``--dataset``.
DEFAULT_DATASET = "faithful"

#: Seconds between progress lines when stderr is not a terminal (a log, a pipe, CI).
HEARTBEAT_SECONDS = 10.0

#: NUTS defaults of the command: about a minute on the bundled data on one core.
NUTS_DEFAULTS = {"num_chains": 2, "warmup_steps": 300, "num_samples": 300}

#: mcmc-em's defaults (``pyroem.engines.mcmc_em.MCMC_EM_OPTIONS``) for its options here.
MCMC_EM_DEFAULTS = {
    "num_samples": 100,
    "warmup_steps": 200,
    "num_chains": 4,
    "schedule": "saem",
    "max_samples": 20000,
    "final_draws": 1000,
}
#: mcmc-em's schedules.
MCMC_EM_SCHEDULES = ("saem", "mcem")
#: The options that only mcmc-em takes (the sampling ones also apply to nuts).
_MCMC_EM_ONLY = ("schedule", "max_samples", "burn_in", "final_draws")
_SAMPLING = ("num_samples", "warmup_steps", "num_chains")
#: Stepwise EM's defaults (``pyroem.engines.streamed.fit_mixture_large``), for the help.
STEPWISE_DEFAULTS = {"batch_size": 1024, "kappa": 0.7, "passes": 5}
#: The methods that fit by stepwise EM (vb-em: stochastic VI).
STEPWISE_METHODS = ("map-em", "vb-em")
#: The options that only ``--stepwise`` takes.
_STEPWISE_ONLY = ("batch_size", "kappa", "passes", "no_shuffle")

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


def _kappa(text: str) -> float:
    """``--kappa``: a number in (0.5, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.5 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"expected a number in (0.5, 1] (step sizes (t + 2)^-kappa must sum to infinity "
            f"while their squares do not); got {text!r}"
        )
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


_NO_DEFAULT = (None, False, argparse.SUPPRESS)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown once: not for options whose help already states the default, nor
    for options without one (``None``) or flags (``False``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or any(action.default is none for none in _NO_DEFAULT):
            return text
        return super()._get_help_string(action)


def _non_negative(text: str) -> int:
    """An integer >= 0 (``--warmup-steps``, ``--burn-in``)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0; got {text!r}")
    return value


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
    source.add_argument(
        "--data",
        metavar="PATH",
        help="numeric CSV file with a header row (read into memory), or data to stream: a "
        ".npy/.parquet file, a quoted glob ('part-*.npy') or a folder of .npy/.csv/.parquet "
        "files",
    )
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
        type=_positive,
        metavar="N",
        help="draws: per chain (nuts), per E-step at the start (mcmc-em) (default: "
        f"nuts {NUTS_DEFAULTS['num_samples']}, mcmc-em {MCMC_EM_DEFAULTS['num_samples']})",
    )
    shared.add_argument(
        "--warmup-steps",
        type=_non_negative,
        metavar="N",
        help="warm-up steps: per chain (nuts), of each E-step chain for continuous latents "
        f"(mcmc-em) (default: nuts {NUTS_DEFAULTS['warmup_steps']}, mcmc-em "
        f"{MCMC_EM_DEFAULTS['warmup_steps']})",
    )
    shared.add_argument(
        "--num-chains",
        type=_positive,
        metavar="N",
        help=f"chains: of nuts, of each mcmc-em E-step (default: nuts "
        f"{NUTS_DEFAULTS['num_chains']}, mcmc-em {MCMC_EM_DEFAULTS['num_chains']})",
    )
    shared.add_argument(
        "--schedule",
        choices=MCMC_EM_SCHEDULES,
        help="mcmc-em: 'saem' (stochastic approximation of the statistics) or 'mcem' "
        f"(Monte Carlo EM, draws growing per E-step) (default: {MCMC_EM_DEFAULTS['schedule']})",
    )
    shared.add_argument(
        "--max-samples",
        type=_positive,
        metavar="N",
        help="mcmc-em with --schedule mcem: most draws per E-step "
        f"(default: {MCMC_EM_DEFAULTS['max_samples']})",
    )
    shared.add_argument(
        "--burn-in",
        type=_non_negative,
        metavar="N",
        help="mcmc-em with --schedule saem: last burn-in iteration (step size 1) "
        "(default: chosen from the parameters' changes)",
    )
    shared.add_argument(
        "--final-draws",
        type=_positive,
        metavar="N",
        help="mcmc-em: draws of the last E-step, at the final parameters "
        f"(default: {MCMC_EM_DEFAULTS['final_draws']})",
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
        formatter_class=_HelpFormatter,
    )
    fit_parser.add_argument(
        "--components",
        type=_components,
        default="2",
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
        help="write " + ", ".join(_OUTPUT_FILES) + " to DIR (rows numbered from 0); with "
        "several --components also selection.csv and selection.json (the model-selection "
        "table)",
    )
    fit_parser.add_argument(
        "--stepwise",
        action="store_true",
        help="fit by stepwise (online) EM: running sufficient statistics updated from "
        "minibatches, for data too large to pass over many times (map-em; vb-em: "
        "stochastic VI)",
    )
    fit_parser.add_argument(
        "--batch-size",
        type=_positive,
        metavar="N",
        help=f"--stepwise: rows per minibatch (default: {STEPWISE_DEFAULTS['batch_size']})",
    )
    fit_parser.add_argument(
        "--kappa",
        type=_kappa,
        metavar="K",
        help="--stepwise: step-size exponent, step t has weight (t + 2)^-K, K in (0.5, 1] "
        f"(default: {STEPWISE_DEFAULTS['kappa']})",
    )
    fit_parser.add_argument(
        "--passes",
        type=_positive,
        metavar="N",
        help="--stepwise: passes over the data (--max-iter and --tol do not apply) "
        f"(default: {STEPWISE_DEFAULTS['passes']})",
    )
    fit_parser.add_argument(
        "--no-shuffle",
        action="store_true",
        help="--stepwise on a CSV file read into memory: visit the rows in file order "
        "(default: a fresh random order each pass; streamed data are read in their order)",
    )
    fit_parser.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="write the fit's state to PATH as it runs (and on Ctrl-C); see --resume",
    )
    fit_parser.add_argument(
        "--checkpoint-every",
        type=_checkpoint_every,
        default=10,
        metavar="N",
        help="write the checkpoint every N iterations, or every N seconds as e.g. 30s",
    )
    fit_parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from --checkpoint if the file exists (the same command line gives "
        "the same result as an uninterrupted run)",
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
        formatter_class=_HelpFormatter,
    )
    compare_parser.add_argument(
        "--components",
        type=_components,
        default="2",
        metavar="K",
        help="number of mixture components, or candidates (1..6 or 2,3,5): K is then "
        "chosen by --criterion with the first of --methods, and the methods are compared "
        "at that K",
    )
    compare_parser.add_argument(
        "--criterion",
        default="bic",
        choices=CRITERIA,
        help="how several --components are chosen between ('loo' needs vb-em or nuts "
        "first in --methods)",
    )
    compare_parser.add_argument(
        "--methods",
        type=_methods,
        default=list(METHODS),
        metavar="A,B,...",
        help="comma-separated methods to compare (default: all of " + ",".join(METHODS) + ")",
    )
    compare_parser.add_argument(
        "--out",
        metavar="DIR",
        help="write comparison.csv and comparison.txt to DIR; with several --components "
        "also selection.csv and selection.json (the model-selection table)",
    )
    return parser


def _checkpoint_every(text: str) -> int | str:
    """``--checkpoint-every``: iterations as an integer, or seconds as ``30s``."""
    return int(text) if text.strip().isdigit() else text


def _checkpoint_options(args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint options of :func:`pyroem.fit` from ``pyroem fit``'s command line."""
    if args.checkpoint is None:
        if args.resume:
            raise SpecError("--resume needs --checkpoint PATH, the file to resume from")
        return {}
    if len(args.components) > 1:
        raise SpecError(
            "--checkpoint holds one fit, but several --components fit one model each; "
            "choose K first, then fit it with --checkpoint"
        )
    return {
        "checkpoint": args.checkpoint,
        "checkpoint_every": args.checkpoint_every,
        "resume": args.resume,
    }


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
        _check_args(args)
    except SpecError as err:
        _say("error", f"{err} (see 'pyroem {args.command} --help')")
        return 2
    if _rank() > 0:
        args.quiet = True  # rank 0 prints and writes
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
        _leave_process_group()


def _leave_process_group() -> None:
    """Under a launcher, wait for every rank and leave the process group the fit joined,
    so no rank exits while another still talks to it (gloo aborts the process then)."""
    torch = sys.modules.get("torch")
    if not _launched() or torch is None:
        return
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _check_args(args: argparse.Namespace) -> None:
    """Check how the options go together, before anything heavy is imported.

    Raises:
        SpecError: an option of a method that does not run, or values that contradict.
    """
    args.command = args.command or "fit"
    methods = args.methods if args.command == "compare" else [args.method]
    given = [name for name in _MCMC_EM_ONLY if getattr(args, name) is not None]
    if given and "mcmc-em" not in methods:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        verb = "applies" if len(given) == 1 else "apply"
        raise SpecError(f"{flags} {verb} to --method mcmc-em only; got {', '.join(methods)}")
    given = [name for name in _SAMPLING if getattr(args, name) is not None]
    if given and not {"mcmc-em", "nuts"} & set(methods):
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        verb = "applies" if len(given) == 1 else "apply"
        raise SpecError(
            f"{flags} {verb} to --method nuts and mcmc-em only; got {', '.join(methods)}"
        )
    if "mcmc-em" in methods:
        if args.schedule != "mcem" and args.max_samples is not None:
            raise SpecError("--max-samples applies to --schedule mcem only")
        if args.schedule == "mcem" and args.burn_in is not None:
            raise SpecError("--burn-in applies to --schedule saem only")
        options = _mcmc_em_options(args)
        if options.get("max_samples", MCMC_EM_DEFAULTS["max_samples"]) < options.get(
            "num_samples", MCMC_EM_DEFAULTS["num_samples"]
        ):
            raise SpecError(
                f"--max-samples ({options['max_samples']}) must be at least --num-samples "
                f"({options.get('num_samples', MCMC_EM_DEFAULTS['num_samples'])})"
            )
    if args.command == "fit":
        _check_stepwise(args)
    if len(args.components) > 1 and args.criterion == "loo" and methods[0] not in ("vb-em", "nuts"):
        raise SpecError(
            f"--criterion loo needs posterior draws, which {methods[0]} does not give; "
            "choose K with --method vb-em or nuts (first in compare's --methods), or "
            "--criterion bic"
        )


def _check_stepwise(args: argparse.Namespace) -> None:
    """``--stepwise`` with a method that has it, and its options only with it.

    Raises:
        SpecError: naming the flag and what to change.
    """
    given = [name for name in _STEPWISE_ONLY if getattr(args, name) not in (None, False)]
    if given and not args.stepwise:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        verb = "applies" if len(given) == 1 else "apply"
        raise SpecError(f"{flags} {verb} to --stepwise only; add --stepwise, or leave {flags} out")
    if args.stepwise and args.method not in STEPWISE_METHODS:
        raise SpecError(
            f"--stepwise runs --method map-em (stepwise EM) or vb-em (stochastic VI) on "
            f"closed-form statistics; got --method {args.method}: choose map-em or vb-em, or "
            "leave out --stepwise"
        )
    if args.stepwise and args.checkpoint is not None:
        raise SpecError("--checkpoint is not written for --stepwise fits: leave out one of them")


def _stepwise_options(args: argparse.Namespace) -> dict[str, Any]:
    """The stepwise options of :func:`pyroem.fit` from ``pyroem fit``'s command line."""
    if args.command != "fit" or not args.stepwise:
        return {}
    options: dict[str, Any] = {"stepwise": True}
    for name in ("batch_size", "kappa", "passes"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.no_shuffle:
        options["shuffle"] = False
    return options


def _mcmc_em_options(args: argparse.Namespace) -> dict[str, Any]:
    """mcmc-em's options given on the command line (the rest: its defaults)."""
    names = (*_SAMPLING, *_MCMC_EM_ONLY)
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


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


def _rank() -> int:
    """This process's rank when a launcher (``torchrun``) started several, else 0."""
    return int(os.environ.get("RANK", "0")) if _launched() else 0


def _launched() -> bool:
    """Whether a launcher started this process as one of several (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


_STREAMED = (".npy", ".csv", ".parquet")


def _streamed_files(args: argparse.Namespace) -> list[str] | None:
    """The files of a streamed ``--data`` (anything but one CSV file), checked before
    torch is imported; ``None`` for data read into memory.

    Raises:
        DataError: no such file, a glob matching nothing, a folder without data files, a
            file of another kind, ``.parquet`` without pyarrow, or ``--columns`` (which
            selects columns of one CSV file).
    """
    import glob
    import importlib.util

    path = args.data
    if path is None:
        return None
    if os.path.isfile(path) and path.lower().endswith(".csv"):
        return None
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, name)
            for name in os.listdir(path)
            if os.path.splitext(name)[1].lower() in _STREAMED
        )
        if not files:
            raise DataError(f"--data {path}: the folder holds no {', '.join(_STREAMED)} file")
    elif glob.has_magic(path):
        files = sorted(glob.glob(path))
        if not files:
            raise DataError(f"--data {path!r}: no file matches the pattern")
    elif os.path.exists(path):
        files = [path]
    else:
        raise DataError(f"--data {path}: no such file; check the path")
    other = [name for name in files if os.path.splitext(name)[1].lower() not in _STREAMED]
    if other:
        raise DataError(
            f"--data {path}: {other[0]} is not a {', '.join(_STREAMED)} file; pyroem streams "
            "those kinds (convert the file, or narrow the pattern)"
        )
    if any(name.lower().endswith(".parquet") for name in files) and (
        importlib.util.find_spec("pyarrow") is None
    ):
        raise DataError(f"--data {path}: reading .parquet files needs pyarrow: pip install pyarrow")
    if args.columns is not None:
        raise DataError(
            "--columns selects columns of one CSV file read into memory; streamed data "
            f"({path}) is fitted on all its columns: write the columns to fit to the files"
        )
    return files


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


def _check_data_file(path: str | None) -> None:
    """Read ``--data``'s first row (light: no torch): the file must exist and be UTF-8
    text, and its first row must name the columns.

    Raises:
        DataError: naming the file and the remedy (exit status 2).
    """
    if path is None:
        return
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            first = next((row for row in csv.reader(handle) if any(c.strip() for c in row)), [])
    except FileNotFoundError:
        raise DataError(f"cannot read {path}: no such file; check the path") from None
    except IsADirectoryError:
        raise DataError(f"cannot read {path}: it is a directory; pass a CSV file") from None
    except UnicodeDecodeError:
        raise DataError(f"cannot read {path}: not UTF-8 text; save it as a UTF-8 CSV") from None
    except (OSError, csv.Error) as err:
        message = " ".join(str(err).split())
        raise DataError(f"cannot read {path}: {message}; check the file is a CSV file") from None
    _check_header(path, [name.strip() for name in first])


def _check_header(path: str, names: Sequence[str]) -> None:
    """Raise if the column names read from ``path`` are all numbers (no header row)."""
    if names and all(_is_number(name) for name in names):
        raise DataError(
            f"{path}: the first row ({', '.join(names[:4])}"
            f"{', ...' if len(names) > 4 else ''}) is numbers, but it is read as the "
            "column names; add a header row naming the columns (e.g. x0,x1,...)"
        )


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
        _check_header(args.data, names)
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


def _describe(name: str, num_rows: int, names: Sequence[str]) -> str:
    """One line naming the data: source, shape and columns."""
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return f"data: {name} ({num_rows} rows x {len(names)} columns: {shown})"


def _pass_line(iteration: Any) -> None:
    """A streamed fit's progress: one line on stderr per pass over the data."""
    print(
        f"pass {iteration.iteration}: objective {iteration.objective:.6f} "
        f"({iteration.elapsed:.1f} s)",
        file=sys.stderr,
        flush=True,
    )


def _spec(args: argparse.Namespace, num_components: int) -> Mixture:
    """The mixture the command line describes, with ``num_components`` components."""
    from pyroem.model.mixture import Mixture

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
        name: NUTS_DEFAULTS[name] if getattr(args, name) is None else getattr(args, name)
        for name in _SAMPLING
    }
    em = {"n_init": args.n_init, "tol": args.tol, "max_iter": args.max_iter}
    if method == "mcmc-em":
        em.update(_mcmc_em_options(args))
    em.update(_stepwise_options(args))
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
        nuts = _fit_options(args, "nuts")
        print(
            f"nuts: {nuts['num_chains']} chains x ({nuts['warmup_steps']} warm-up + "
            f"{nuts['num_samples']} draws); more with --num-chains, --warmup-steps, "
            "--num-samples",
            flush=True,
        )


def _warn(caught: list[warnings.WarningMessage]) -> None:
    """Each distinct warning once, as one line."""
    for message in dict.fromkeys(str(warning.message) for warning in caught):
        _say("warning", message)


def _fit_command(args: argparse.Namespace) -> int:
    """``pyroem fit``: load, fit (choosing K if several are given), report, write."""
    files = _streamed_files(args)
    if files is not None and args.plots is not None:
        raise DataError("--plots draws the data, so it needs one CSV file read into memory")
    # The output directories and the data file are checked before torch is imported.
    if _rank() == 0:
        _check_writable(args.out, args.plots)
    if files is None:
        _check_data_file(args.data)
    from pyroem.api import fit
    from pyroem.outputs.selection import choose_components

    candidates = args.components
    options = _fit_options(args, args.method)
    checkpoint = _checkpoint_options(args)
    data: Any
    if files is None:
        data, name, names = _load_data(args)
        _family_hint(args, data)
    else:
        data, name = args.data, args.data
        # One line per pass instead of a bar that a pass would hold still.
        options.update(progress=False, callback=None if args.quiet else _pass_line)
    if _launched():
        options["distributed"] = True
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
            result = fit(
                _spec(args, candidates[0]), data, method=args.method, **options, **checkpoint
            )
    if files is not None:
        names = tuple(f"x{column}" for column in range(result.family.dim))
    if _rank() > 0:
        return 0
    _warn(caught)
    if not args.quiet:
        print(_describe(name, result.num_data, names))
        if len(candidates) > 1:
            print(f"number of components by {args.criterion}: {choice.best} ({choice.rule})")
            print(choice.table.to_string())
            print()
        print(result.summary())
    if args.out is not None:
        out = Path(args.out)
        declared = _spec(args, choice.best if len(candidates) > 1 else candidates[0])
        written = _write_outputs(
            out,
            result,
            data if files is None else None,
            source=name,
            feature_names=names,
            declared=declared,
        )
        if len(candidates) > 1:
            written += _write_selection(out, choice, args.method)
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
    if _streamed_files(args) is not None:
        raise DataError(
            "compare fits the data with every method, and only map-em streams data: give "
            "one CSV file, or fit streamed data with 'pyroem fit'"
        )
    _check_writable(args.out, args.plots)
    _check_data_file(args.data)
    from pyroem.api import fit
    from pyroem.outputs.comparison import compare, format_comparison
    from pyroem.outputs.selection import choose_components

    data, name, names = _load_data(args)
    _family_hint(args, data)
    _nuts_note(args, args.methods)
    fits = {}
    choice = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        if len(args.components) > 1:
            # K is chosen first, with the first method; the others fit that K.
            first = args.methods[0]
            choice = choose_components(
                _spec(args, 1),
                data,
                args.components,
                criterion=args.criterion,
                method=first,
                **_fit_options(args, first),
            )
            fits[first] = choice.fits[choice.best]
        spec = _spec(args, args.components[0] if choice is None else choice.best)
        for method in args.methods:
            if method not in fits:
                fits[method] = fit(spec, data, method=method, **_fit_options(args, method))
        table = compare(fits)
    _warn(caught)
    text = format_comparison(table)
    if not args.quiet:
        print(_describe(name, data.shape[0], names))
        if choice is not None:
            print(
                f"number of components by {args.criterion} with {args.methods[0]}: "
                f"{choice.best} ({choice.rule})"
            )
            print(choice.table.to_string())
            print()
        print(f"model: {spec!r}")
        print(text)
    # The table is saved before any plot is drawn: to --out, else beside the plots.
    target = args.out if args.out is not None else args.plots
    if target is not None:
        out = Path(target)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "comparison.csv")
        (out / "comparison.txt").write_text(text + "\n", encoding="utf-8")
        written = ["comparison.csv", "comparison.txt"]
        if choice is not None:
            written += _write_selection(out, choice, args.methods[0])
        if not args.quiet:
            print(f"wrote {', '.join(written)} to {out}")
    if args.plots is not None:
        return _plots(args, fits, data, names, saved=target)
    return 0


def _fitted_family(result: Any) -> Any:
    """The bound family (prior resolved) a mixture fit used, or ``None``."""
    family = None if result.mixture is None else result.mixture.family
    return family if family is not None and family.resolved is not None else None


def _write_selection(out: Path, choice: Any, method: str) -> list[str]:
    """Write the model-selection table of several ``--components``: ``selection.csv``
    (one row per number of components) and ``selection.json`` (the table, the criterion,
    the rule and the choice).

    Returns:
        The names of the files written.
    """
    out.mkdir(parents=True, exist_ok=True)
    choice.table.to_csv(out / "selection.csv")
    rows = [
        {"num_components": int(k), **{key: _plain(value) for key, value in row.items()}}
        for k, row in choice.table.iterrows()
    ]
    report = {
        "criterion": choice.criterion,
        "method": method,
        "rule": choice.rule,
        "chosen": int(choice.best),
        "table": rows,
    }
    (out / "selection.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return ["selection.csv", "selection.json"]


def _plain(value: Any) -> Any:
    """A table cell as a JSON value (NumPy scalars to Python numbers, NaN to null)."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and value != value:
        return None
    return value


def _write_outputs(
    out: Path,
    result: Any,
    data: torch.Tensor | None,
    *,
    source: str,
    feature_names: Sequence[str],
    declared: Mixture | None = None,
) -> list[str]:
    """Write ``params.json``, ``history.csv``, ``assignments.csv`` and either ``fit.npz``
    (a fit :func:`pyroem.load` reads back) or, for methods with posterior draws,
    ``inference.nc`` (ArviZ ``InferenceData``) to ``out``.

    Args:
        out: the output directory (created if missing).
        result: the fit.
        data: the training data, ``(num_data, dim)``; ``None``: streamed from ``source``.
        source: the data's name (file path, pattern or bundled data set).
        feature_names: the ``dim`` column names.
        declared: the mixture as the command line declared it (``"declared_model"``;
            ``"model"`` holds it with the prior's numbers the fit used).

    Returns:
        The names of the files written.
    """
    out.mkdir(parents=True, exist_ok=True)
    family = _fitted_family(result)
    spec = None if result.mixture is None else result.mixture.spec
    declared = spec if declared is None else declared
    model = None
    if spec is not None:
        # The prior as the fit used it: every number resolved from the data (the
        # declaration, e.g. prior="default", is under "declared_model").
        model = spec.to_config()
        if family is not None:
            model = {**model, "family": family.explicit().to_config()}
    report: dict[str, Any] = {
        "data": {
            "source": source,
            "num_data": int(result.num_data if data is None else data.shape[0]),
            "columns": list(feature_names),
        },
        "model": model,
        "declared_model": None if declared is None else declared.to_config(),
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

    if data is None:
        from pyroem.sources import open_source

        streamed = open_source(source, 65536)
        assert streamed is not None
        blocks: Any = (result.predict_proba(chunk) for chunk in streamed)
    elif result.kind == "mixture":
        blocks = [result.predict_proba(data)]
    else:
        blocks = [result.marginals["assignment"]]
    with open(out / "assignments.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "label", "responsibility"])
        row = 0
        for probabilities in blocks:
            best = probabilities.max(-1)
            for label, value in zip(best.indices.tolist(), best.values.tolist(), strict=True):
                writer.writerow([row, label, value])
                row += 1

    written = ["params.json", "history.csv", "assignments.csv"]
    if result.draws:
        columns = list(feature_names)
        coords = {dim: columns for dim in ("dim", "dim_row", "dim_col")}
        # A fit of a streamed source keeps no data: its draws' pointwise log-likelihood
        # (draws x rows) is left out of inference.nc.
        pointwise = result.kind != "mixture" or result.data is not None
        result.to_arviz(coords=coords, log_likelihood=pointwise).to_netcdf(
            str(out / "inference.nc")
        )
        written.append("inference.nc")
    if result.kind == "mixture":
        result.save(out / "fit.npz")
        written.append("fit.npz")
    return written
