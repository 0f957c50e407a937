"""Stepwise EM against batch EM per pass over the data: the gap to the batch optimum's
log joint per data point after each pass, on overlapping Gaussian clusters (where
batch EM needs many iterations).

    python bench/stepwise_gap.py                      # N = 200 000, D = 8, K = 4
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import pyroem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--components", type=int, default=4)
    parser.add_argument("--passes", type=int, default=3)
    options = parser.parse_args()
    rng = np.random.default_rng(0)
    num, dim, clusters = options.rows, options.dim, options.components
    centres = rng.normal(scale=1.2, size=(clusters, dim))
    data = centres[rng.integers(clusters, size=num)] + rng.normal(size=(num, dim))
    spec = pyroem.Mixture(clusters, "gaussian", prior=None)
    start = time.perf_counter()
    batch = pyroem.fit(spec, data, seed=0, tol=1e-10)
    seconds = time.perf_counter() - start
    optimum = batch.log_joint()
    passes = options.passes
    print(f"batch EM: {batch.num_iterations} iterations, {seconds:.1f} s")
    gaps = (optimum - batch.history.objective[1 : passes + 1]) / num
    print(f"gap to the optimum per point after passes 1..{passes}:")
    print(f"{'batch EM':>28}: {np.array2string(gaps, precision=4)}")
    for kappa, size in ((0.7, 256), (0.7, 1024), (0.6, 1024), (1.0, 1024)):
        start = time.perf_counter()
        fit = pyroem.fit(
            spec, data, seed=0, stepwise=True, batch_size=size, kappa=kappa, passes=passes, tol=0.0
        )
        seconds = time.perf_counter() - start
        gaps = (optimum - fit.history.objective[1:]) / num
        label = f"stepwise κ={kappa} b={size}"
        print(f"{label:>28}: {np.array2string(gaps, precision=4)} ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
