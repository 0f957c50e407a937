"""Gaussian mixture EM in pomegranate (1.x), per iteration, on bench_gmm's problems.

pomegranate needs its own environment (it pins its own torch), so this script imports
neither pyroem nor scikit-learn; compare its per-iteration times with
``bench/bench_gmm.py`` run on the same ``--shape`` and ``--seed`` (the same data and
starting parameters: means at distinct random data points, the data covariance,
equal weights), on the same machine. Setup, as used for the README's numbers::

    python -m venv /tmp/pomvenv
    /tmp/pomvenv/bin/pip install torch==2.13.0   # the CPU build first
    /tmp/pomvenv/bin/pip install pomegranate
    PYTHONPATH=. /tmp/pomvenv/bin/python bench/bench_pomegranate.py --shape 1e5x64x8

Both sides of a comparison run float64 full covariances for exactly ``--iterations``
EM iterations (pomegranate: ``tol=-inf``); times are medians of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from pomegranate.distributions import Normal
from pomegranate.gmm import GeneralMixtureModel

from bench.problems import initial_params, simulate


def fit_pomegranate(data: torch.Tensor, init: dict[str, np.ndarray], iterations: int) -> float:
    """Fit from ``init`` for ``iterations`` iterations; the final log-likelihood."""
    components = [
        Normal(
            means=torch.from_numpy(mean.copy()),
            covs=torch.from_numpy(covariance.copy()),
            covariance_type="full",
        )
        for mean, covariance in zip(init["means"], init["covariances"], strict=True)
    ]
    model = GeneralMixtureModel(
        components,
        priors=torch.from_numpy(init["weights"].copy()),
        max_iter=iterations,
        tol=-float("inf"),
    )
    model.fit(data)
    return float(model.log_probability(data).sum())


def main(argv: list[str] | None = None) -> None:
    """Parse options, time and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", required=True, help="NxDxK, repeatable")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for shape in args.shape:
            num, dim, components = (int(float(part)) for part in shape.lower().split("x"))
            data = simulate(num, dim, components, "full", args.seed)
            init = initial_params(data, components, "full", args.seed)
            tensor = torch.from_numpy(data)
            walls, cpus = [], []
            for _ in range(args.repeats):
                wall, cpu = time.perf_counter(), time.process_time()
                log_likelihood = fit_pomegranate(tensor, init, args.iterations)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            per = [1e3 * t / args.iterations for t in cpus]
            print(
                f"[pomegranate full] N={num} D={dim} K={components} threads={threads}: per "
                f"iteration cpu median {statistics.median(per):.1f} ms (min {min(per):.1f}, "
                f"max {max(per):.1f}), wall median "
                f"{1e3 * statistics.median(walls) / args.iterations:.1f} ms; "
                f"final log-likelihood {log_likelihood:.6f}"
            )


if __name__ == "__main__":
    main()
