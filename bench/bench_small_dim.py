"""Small-dimension Gaussian mixtures per EM iteration: pyroem, scikit-learn, memory bound.

For each ``NxDxK`` shape and covariance type, in one process and at one thread count:

- pyroem: CPU seconds of each MAP-EM iteration (M-step then E-step, ``--dtype``, flat
  priors), read by a per-iteration callback; min/median/max over ``--iterations``;
- scikit-learn: CPU seconds of each ``_e_step`` + ``_m_step`` pair of a
  ``GaussianMixture`` on the same data from the same start (``reg_covar=0``);
- the memory bound: the bytes of the data (``N·D`` elements, read once an iteration)
  over the bandwidth of a memcpy probe (a 256 MiB ``copy_``, counted as read + write,
  best of 10) run in the same process; "passes" is pyroem's median iteration over it.

Run ``OMP_NUM_THREADS=1 python bench/bench_small_dim.py --threads 1 2``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
import warnings

import numpy as np
import torch
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

import pyroem
from bench.problems import initial_params, simulate


def memcpy_bandwidth(megabytes: int = 256, repeats: int = 10) -> float:
    """Bytes per second of a large ``copy_`` (read + write), best of ``repeats``."""
    source = torch.ones(megabytes * 2**20 // 8, dtype=torch.float64)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 8 / best


def pyroem_iterations(
    data: np.ndarray,
    init: dict[str, np.ndarray],
    covariance_type: str,
    iterations: int,
    dtype: torch.dtype = torch.float64,
) -> list[float]:
    """CPU seconds of each iteration of a fixed-length MAP-EM fit."""
    stamps: list[float] = []
    spec = pyroem.Mixture(
        len(init["weights"]), "gaussian", covariance_type=covariance_type, prior=None
    )
    start = {key: torch.from_numpy(value) for key, value in init.items()}
    stamps.append(time.process_time())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fixed number of iterations: no convergence
        pyroem.fit(
            spec,
            torch.from_numpy(data),
            init=start,
            tol=0.0,
            max_iter=iterations,
            dtype=dtype,
            num_threads=torch.get_num_threads(),
            callback=lambda _: stamps.append(time.process_time()),
        )
    # The first stamp precedes the start's scoring: the iterations lie between the others.
    return [later - earlier for earlier, later in itertools.pairwise(stamps[1:])]


def sklearn_iterations(
    data: np.ndarray, init: dict[str, np.ndarray], covariance_type: str, iterations: int
) -> list[float]:
    """CPU seconds of each E-step + M-step of scikit-learn's ``GaussianMixture``."""
    covariances = init["covariances"]
    precisions = (
        np.linalg.inv(covariances) if covariance_type in ("full", "tied") else 1 / covariances
    )
    model = GaussianMixture(
        n_components=len(init["weights"]),
        covariance_type=covariance_type,
        reg_covar=0.0,
        max_iter=1,
        weights_init=init["weights"],
        means_init=init["means"],
        precisions_init=precisions,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(data)
    times = []
    for _ in range(iterations):
        start = time.process_time()
        _, log_resp = model._e_step(data)
        model._m_step(data, log_resp)
        times.append(time.process_time() - start)
    return times


def _spread(values: list[float]) -> str:
    return "/".join(f"{1e3 * v:.1f}" for v in (min(values), statistics.median(values), max(values)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", action="append", default=None, help="NxDxK (repeatable); default 1e6x2x3"
    )
    parser.add_argument("--covariance-type", nargs="+", default=["full", "diag", "tied"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype", choices=["float64", "float32"], default="float64", help="both libraries' data"
    )
    args = parser.parse_args(argv)
    shapes = args.shape or ["1e6x2x3"]
    for threads in args.threads:
        torch.set_num_threads(threads)
        with threadpool_limits(threads):
            bandwidth = memcpy_bandwidth()
            print(f"threads={threads} memcpy {bandwidth / 1e9:.1f} GB/s")
            for shape in shapes:
                num, dim, count = (int(float(part)) for part in shape.split("x"))
                for covariance_type in args.covariance_type:
                    data = simulate(num, dim, count, covariance_type, args.seed)
                    init = initial_params(data, count, covariance_type, args.seed)
                    data = data.astype(args.dtype)
                    ours = pyroem_iterations(
                        data, init, covariance_type, args.iterations, getattr(torch, args.dtype)
                    )
                    theirs = sklearn_iterations(data, init, covariance_type, args.iterations)
                    bound = data.nbytes / bandwidth
                    print(
                        f"  {shape} {covariance_type:5s} CPU ms/iteration min/median/max "
                        f"pyroem {_spread(ours)}  scikit-learn {_spread(theirs)}  "
                        f"ratio {statistics.median(ours) / statistics.median(theirs):.2f}  "
                        f"passes {statistics.median(ours) / bound:.1f}"
                    )


if __name__ == "__main__":
    main()
