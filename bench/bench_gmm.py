"""Gaussian mixture EM: pyroem against scikit-learn's ``GaussianMixture``.

Both fit the same simulated data from the same starting parameters by maximum
likelihood in float64 (pyroem: ``method="map-em"``, ``prior=None``; scikit-learn:
``reg_covar=0``), with the same ``tol`` and ``max_iter``. The tolerances mean the
same thing: scikit-learn stops when the mean per-sample log-likelihood changes by
less than ``tol``; pyroem (``stop_rule="objective"``) stops when the log joint changes
by less than ``tol`` per data point, and with flat priors the log joint is the log-likelihood plus a
constant (``log Dirichlet(π | 1)``).

Two timings, each the median wall and CPU time of ``--repeats`` runs:

- per iteration: both run exactly ``--iterations`` EM iterations (``tol=0``), and
  the whole ``fit`` call is divided by that number;
- to convergence: the whole ``fit`` call at ``--tol``.

Both ``fit`` calls include their one-off costs: pyroem's scoring of the start and
its final labelling pass; scikit-learn's estimate (then discarded) of parameters
from its initial responsibilities and its final E-step. Torch and the BLAS under
NumPy get the same number of threads (``--threads``, default: 1, then the usable cores).

scikit-learn tests convergence one iteration later than pyroem (its log-likelihood
at iteration ``t`` belongs to the parameters before the ``t``-th M-step), so at the
same tolerance it takes one M-step more; its ``lower_bound_`` is the
log-likelihood at the parameters pyroem returns, and the two are compared, as are
the per-iteration log-likelihoods of the fixed-length runs.

Each case also prints the GFLOP/s an iteration achieves (full and tied: the
``4·N·K·D²`` flops of the whitening and scatter products over the per-iteration CPU
time) beside a GEMM probe (a 2048² torch matmul, float64 and float32) run in the
same process at the same thread count, and the extra peak resident memory of one
fixed-length fit of each library (Linux: the high-water mark reset through
``/proc/self/clear_refs``, minus the resident size before the fit). Run it with
``MALLOC_MMAP_THRESHOLD_=65536`` in the environment, so that freed large blocks go
back to the system and each fit's peak is its own, not hidden in memory an earlier
run left to the allocator.

``--shape NxDxK`` (repeatable) runs several problem sizes; ``--no-convergence``
skips the to-convergence timing (for the large shapes, where only the per-iteration
cost is of interest).

Run ``python bench/bench_gmm.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

import pyroem
from bench.problems import initial_params, simulate

COVARIANCE_TYPES = ("full", "diag", "spherical", "tied")
_HAS_NUM_THREADS = "num_threads" in inspect.signature(pyroem.fit).parameters


def _precisions(covariances: np.ndarray, covariance_type: str) -> np.ndarray:
    if covariance_type in ("full", "tied"):
        return np.linalg.inv(covariances)
    return 1.0 / covariances


def fit_pyroem(
    data: torch.Tensor,
    init: dict[str, np.ndarray],
    covariance_type: str,
    tol: float,
    max_iter: int,
    dtype: torch.dtype = torch.float64,
) -> pyroem.FitResult:
    """Maximum-likelihood MAP-EM (flat priors, float64 unless ``dtype``) from ``init``."""
    spec = pyroem.Mixture(
        len(init["weights"]), "gaussian", covariance_type=covariance_type, prior=None
    )
    start = {key: torch.from_numpy(value) for key, value in init.items()}
    # The thread count the bench runs at, not the fit's default for small problems
    # (older versions have no num_threads and run on torch's setting anyway).
    threads = {"num_threads": torch.get_num_threads()} if _HAS_NUM_THREADS else {}
    return pyroem.fit(
        spec,
        data,
        init=start,
        tol=tol,
        max_iter=max_iter,
        dtype=dtype,
        stop_rule="objective",  # scikit-learn's rule, so that both stop alike
        **threads,
    )


def fit_sklearn(
    data: np.ndarray, init: dict[str, np.ndarray], covariance_type: str, tol: float, max_iter: int
) -> GaussianMixture:
    """scikit-learn's EM (``reg_covar=0``) from ``init``."""
    model = GaussianMixture(
        n_components=len(init["weights"]),
        covariance_type=covariance_type,
        tol=tol,
        reg_covar=0.0,
        max_iter=max_iter,
        n_init=1,
        init_params="random_from_data",
        weights_init=init["weights"],
        means_init=init["means"],
        precisions_init=_precisions(init["covariances"], covariance_type),
        random_state=0,
    )
    return model.fit(data)


def gemm_probe(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a ``size²`` torch matmul at the current thread count (median CPU time)."""
    left = torch.randn(size, size, dtype=dtype)
    right = torch.randn(size, size, dtype=dtype)
    left @ right  # warm-up
    times = []
    for _ in range(repeats):
        cpu = time.process_time()
        left @ right
        times.append(time.process_time() - cpu)
    return 2 * size**3 / statistics.median(times) / 1e9


def _status_kib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return float("nan")


def peak_extra_mib(run: Callable[[], Any]) -> float:
    """Peak resident memory of ``run()`` above the resident size before it, MiB (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets the high-water mark VmHWM to the current RSS
    except OSError:
        return float("nan")
    before = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - before) / 1024


def iteration_flops(num_data: int, dim: int, num_components: int, covariance_type: str) -> float:
    """Flops of an iteration's matrix products: whitening ``2NKD²`` and scatter ``2NKD²``
    (full, tied); the diagonal forms' ``≈ 6NKD``."""
    if covariance_type in ("full", "tied"):
        return 4.0 * num_data * num_components * dim * dim
    return 6.0 * num_data * num_components * dim


# Each run's CPU seconds per repeat, from the last median_times call.
CPU_TIMES: dict[str, list[float]] = {}


def _spread(values: list[float]) -> str:
    """``min/median/max``."""
    return "/".join(f"{v:.3f}" for v in (min(values), statistics.median(values), max(values)))


def _load() -> str:
    """The 1-, 5- and 15-minute load averages (Linux), or ``?``."""
    try:
        with open("/proc/loadavg") as handle:
            return " ".join(handle.read().split()[:3])
    except OSError:
        return "?"


def median_times(
    runs: dict[str, Callable[[], Any]], repeats: int
) -> dict[str, tuple[float, float, Any]]:
    """Median wall and CPU (process) seconds of ``repeats`` calls of each run, and its last result.

    The runs take turns within each repeat, so a change in the machine's load
    affects them alike. CPU time is the steadier number on a shared machine.
    """
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            results[name] = run()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    CPU_TIMES.clear()
    CPU_TIMES.update({name: [c for _, c in pairs] for name, pairs in times.items()})
    return {
        name: (
            statistics.median(w for w, _ in pairs),
            statistics.median(c for _, c in pairs),
            results[name],
        )
        for name, pairs in times.items()
    }


def compare(
    num_data: int,
    dim: int,
    num_components: int,
    covariance_type: str,
    *,
    tol: float,
    max_iter: int,
    iterations: int,
    repeats: int,
    seed: int,
    convergence: bool = True,
    float32: bool = False,
) -> dict[str, float]:
    """Time and cross-check both libraries on one problem; print and return the numbers
    (``float32``: pyroem's float32 fit too, beside the float64 ones)."""
    data = simulate(num_data, dim, num_components, covariance_type, seed)
    tensor = torch.from_numpy(data)
    init = initial_params(data, num_components, covariance_type, seed)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SklearnConvergenceWarning)
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fixed_runs = {
            "pyroem": lambda: fit_pyroem(tensor, init, covariance_type, 0.0, iterations),
            "sklearn": lambda: fit_sklearn(data, init, covariance_type, 0.0, iterations),
        }
        if float32:
            fixed_runs["pyroem float32"] = lambda: fit_pyroem(
                tensor, init, covariance_type, 0.0, iterations, torch.float32
            )
        fixed = median_times(fixed_runs, repeats)
        # Per repeat, the two libraries' runs took turns: their ratio, repeat by repeat.
        cpu_ratios = [a / b for a, b in zip(CPU_TIMES["pyroem"], CPU_TIMES["sklearn"], strict=True)]
        single = CPU_TIMES.get("pyroem float32", [])
        speedups = [a / b for a, b in zip(CPU_TIMES["pyroem"], single, strict=False)]
        runs = {
            "pyroem": lambda: fit_pyroem(tensor, init, covariance_type, tol, max_iter),
            "sklearn": lambda: fit_sklearn(data, init, covariance_type, tol, max_iter),
        }
        converged = median_times(runs if convergence else {}, repeats)
        peaks = {
            "pyroem": peak_extra_mib(
                lambda: fit_pyroem(tensor, init, covariance_type, 0.0, iterations)
            ),
            "sklearn": peak_extra_mib(
                lambda: fit_sklearn(data, init, covariance_type, 0.0, iterations)
            ),
        }
    if not convergence:  # the fixed-length runs stand in
        converged = fixed
    ours_fixed, ours_fixed_cpu, ours_run = fixed["pyroem"]
    theirs_fixed, theirs_fixed_cpu, theirs_run = fixed["sklearn"]
    ours_conv, ours_conv_cpu, ours = converged["pyroem"]
    theirs_conv, theirs_conv_cpu, theirs = converged["sklearn"]

    # Per-iteration agreement: both record the log-likelihood at θ_0 … θ_{T-1}
    # (scikit-learn keeps the trace from version 1.7 on).
    ours_trace = ours_run.history.log_likelihood[:iterations] / num_data
    theirs_trace = np.asarray(getattr(theirs_run, "lower_bounds_", np.nan))
    trace_diff = float(np.max(np.abs(ours_trace - theirs_trace) / np.abs(theirs_trace)))
    ours_ll = ours.log_likelihood()
    theirs_ll = float(theirs.lower_bound_) * num_data
    final_diff = abs(ours_ll - theirs_ll) / abs(theirs_ll)

    per_iter_ratio = ours_fixed / theirs_fixed
    per_iter_cpu_ratio = ours_fixed_cpu / theirs_fixed_cpu
    conv_ratio = ours_conv / theirs_conv
    conv_cpu_ratio = ours_conv_cpu / theirs_conv_cpu
    flops = iteration_flops(num_data, dim, num_components, covariance_type)
    ours_gflops = flops * iterations / ours_fixed_cpu / 1e9
    theirs_gflops = flops * iterations / theirs_fixed_cpu / 1e9
    print(
        f"[{covariance_type}] N={num_data} D={dim} K={num_components} tol={tol:g} "
        f"threads={torch.get_num_threads()} (medians of {repeats} runs)"
    )
    print(
        f"  per iteration ({iterations} its)  wall: "
        f"pyroem {1e3 * ours_fixed / iterations:8.2f} ms   "
        f"sklearn {1e3 * theirs_fixed / iterations:8.2f} ms   ratio {per_iter_ratio:.3f}"
    )
    print(
        f"                           cpu:  pyroem {1e3 * ours_fixed_cpu / iterations:8.2f} ms   "
        f"sklearn {1e3 * theirs_fixed_cpu / iterations:8.2f} ms   ratio {per_iter_cpu_ratio:.3f}"
    )
    print(f"  cpu ratio per repeat     min/median/max {_spread(cpu_ratios)}   load {_load()}")
    if speedups:
        single_cpu = statistics.median(single) / iterations
        print(
            f"  pyroem float32 cpu       {1e3 * single_cpu:8.2f} ms per iteration; float64/float32 "
            f"per repeat min/median/max {_spread(speedups)}"
        )
    print(f"  GFLOP/s (cpu time)       pyroem {ours_gflops:8.2f}      sklearn {theirs_gflops:8.2f}")
    print(
        f"  extra peak RSS           pyroem {peaks['pyroem']:8.1f} MiB  "
        f"sklearn {peaks['sklearn']:8.1f} MiB  (one {iterations}-iteration fit each)"
    )
    if not convergence:
        print(f"  per-iteration log-likelihood max rel. diff {trace_diff:.2e}")
        return {
            "per_iteration_ratio": per_iter_ratio,
            "per_iteration_cpu_ratio": per_iter_cpu_ratio,
            "pyroem_gflops": ours_gflops,
            "sklearn_gflops": theirs_gflops,
            "pyroem_peak_mib": peaks["pyroem"],
            "sklearn_peak_mib": peaks["sklearn"],
            "trace_relative_difference": trace_diff,
        }
    print(
        f"  to convergence           wall: pyroem {ours_conv:8.3f} s    "
        f"sklearn {theirs_conv:8.3f} s    ratio {conv_ratio:.3f}"
    )
    print(
        f"                           cpu:  pyroem {ours_conv_cpu:8.3f} s    "
        f"sklearn {theirs_conv_cpu:8.3f} s    ratio {conv_cpu_ratio:.3f}"
    )
    print(
        f"  iterations               pyroem {ours.num_iterations:8d}      "
        f"sklearn {theirs.n_iter_:8d}      converged {ours.converged}/{theirs.converged_}"
    )
    print(
        f"  final log-likelihood     pyroem {ours_ll:.10f}   sklearn {theirs_ll:.10f}   "
        f"rel. diff {final_diff:.2e}"
    )
    print(f"  per-iteration log-likelihood max rel. diff {trace_diff:.2e}")
    return {
        "per_iteration_ratio": per_iter_ratio,
        "per_iteration_cpu_ratio": per_iter_cpu_ratio,
        "convergence_ratio": conv_ratio,
        "convergence_cpu_ratio": conv_cpu_ratio,
        "final_relative_difference": final_diff,
        "trace_relative_difference": trace_diff,
        "pyroem_gflops": ours_gflops,
        "sklearn_gflops": theirs_gflops,
        "pyroem_peak_mib": peaks["pyroem"],
        "sklearn_peak_mib": peaks["sklearn"],
    }


def _shape(text: str) -> tuple[int, int, int]:
    """``"100000x64x8"`` (``1e5x64x8`` too) → ``(N, D, K)``."""
    try:
        num, dim, components = (int(float(part)) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NxDxK, e.g. 1e5x64x8; got {text!r}") from None
    return num, dim, components


def main(argv: list[str] | None = None) -> None:
    """Parse options and run the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-data", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--components", type=int, default=6)
    parser.add_argument(
        "--covariance-type", choices=(*COVARIANCE_TYPES, "all"), default="full", help="or 'all'"
    )
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--iterations", type=int, default=20, help="for the per-iteration time")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shape",
        type=_shape,
        action="append",
        help="NxDxK, repeatable (e.g. --shape 1e5x64x8 --shape 1e6x16x16); "
        "overrides --num-data, --dim and --components",
    )
    parser.add_argument(
        "--no-convergence",
        dest="convergence",
        action="store_false",
        help="skip the to-convergence timing",
    )
    parser.add_argument(
        "--float32",
        action="store_true",
        help="also time pyroem in float32 and print its speed-up over float64",
    )
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, len(os.sched_getaffinity(0))],
        help="thread counts to run, each in turn (default: 1 and the usable cores)",
    )
    args = parser.parse_args(argv)

    kinds = COVARIANCE_TYPES if args.covariance_type == "all" else (args.covariance_type,)
    shapes = args.shape or [(args.num_data, args.dim, args.components)]
    for threads in dict.fromkeys(args.threads):
        torch.set_num_threads(threads)
        with threadpool_limits(limits=threads):
            print(
                f"GEMM probe (torch 2048² matmul, {threads} thread(s), CPU time): "
                f"float64 {gemm_probe(torch.float64):.1f} GFLOP/s, "
                f"float32 {gemm_probe(torch.float32):.1f} GFLOP/s"
            )
            for num_data, dim, num_components in shapes:
                for kind in kinds:
                    compare(
                        num_data,
                        dim,
                        num_components,
                        kind,
                        tol=args.tol,
                        max_iter=args.max_iter,
                        iterations=args.iterations,
                        repeats=args.repeats,
                        seed=args.seed,
                        convergence=args.convergence,
                        float32=args.float32,
                    )


if __name__ == "__main__":
    main()
