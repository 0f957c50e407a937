"""Linear mixed-effects model by MCMC-EM: time to convergence, and statsmodels' answer.

Fits ``models/mixed_effects.py`` — lme4's ``Reaction ~ Days + (Days | Subject)`` on
``sleepstudy``, by maximum likelihood — with pyroem's MCMC-EM (NUTS E-steps, SAEM by
default, the model's own settings) to convergence, and prints:

- the wall time of the whole ``fit`` call (the first E-step's NUTS warm-up, every
  iteration, the long last E-step, the importance-sampling log-likelihood) and the
  process's CPU time over it, which a busy machine inflates less;
- the estimates next to ``statsmodels``' ``MixedLM.from_formula("Reaction ~ Days",
  groups="Subject", re_formula="~Days").fit(reml=False)`` (fixed effects, random-effect
  covariance, residual variance), with their differences relative to MCMC-EM's Monte
  Carlo spread across ``--seeds`` (when more than one);
- the log-likelihood: pyroem's importance-sampling estimate, the exact value at
  pyroem's estimates (Gaussian integral, by hand), and statsmodels' maximum.

Run ``python bench/bench_mixed_effects.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import runpy
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

MODEL = Path(__file__).resolve().parents[1] / "models" / "mixed_effects.py"
NAMES = ("intercept", "slope", "var(intercept)", "cov", "var(slope)", "residual var")


def _vector(params: dict[str, torch.Tensor]) -> np.ndarray:
    covariance = params["random_effects_covariance"].numpy()
    return np.concatenate(
        [
            params["fixed_effects"].numpy(),
            [covariance[0, 0], covariance[0, 1], covariance[1, 1]],
            [float(params["residual_variance"])],
        ]
    )


def statsmodels_fit(data: dict[str, Any]) -> tuple[np.ndarray, float, float]:
    """statsmodels' ML estimates (same order as :data:`NAMES`), log-likelihood, seconds."""
    import pandas as pd
    import statsmodels.formula.api as smf

    frame = pd.DataFrame(
        {
            "Reaction": data["reaction"].numpy(),
            "Days": data["days"].numpy(),
            "Subject": data["subject"].numpy(),
        }
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = smf.mixedlm("Reaction ~ Days", frame, groups="Subject", re_formula="~Days")
        result = model.fit(reml=False)
    seconds = time.perf_counter() - start
    cov = result.cov_re.values
    estimate = np.concatenate(
        [result.fe_params.values, [cov[0, 0], cov[0, 1], cov[1, 1]], [result.scale]]
    )
    return estimate, float(result.llf), seconds


def run(seeds: list[int], threads: int, options: dict[str, Any]) -> dict[str, Any]:
    """Fit once per seed; print and return the timings and the comparison."""
    torch.set_num_threads(threads)
    torch.set_default_dtype(torch.float64)
    namespace = runpy.run_path(str(MODEL), run_name="bench")
    data = namespace["sleepstudy"]()
    reference, reference_llf, reference_seconds = statsmodels_fit(data)
    estimates, walls, cpus, fits = [], [], [], []
    for seed in seeds:
        wall, cpu = time.perf_counter(), time.process_time()
        fit = namespace["fit"](data, seed=seed, **options)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        fits.append(fit)
        estimates.append(_vector(namespace["to_original_scale"](fit.params, data["centre"])))
    table = np.stack(estimates)
    spread = table.std(0, ddof=1) if len(seeds) > 1 else np.full(len(NAMES), np.nan)
    last = fits[-1]
    print(f"MCMC-EM ({last.schedule}) on sleepstudy, {threads} torch thread(s), seeds {seeds}")
    for seed, fit, wall, cpu in zip(seeds, fits, walls, cpus, strict=True):
        print(
            f"  seed {seed}: {fit.num_iterations} iterations, converged={fit.converged}, "
            f"wall {wall:.1f} s, CPU {cpu:.1f} s, final R-hat "
            f"{fit.final_diagnostics.max_rhat:.3f}"
        )
    print(f"statsmodels MixedLM (reml=False): {reference_seconds:.2f} s")
    print(f"{'':16}{'statsmodels':>14}{'pyroem mean':>14}{'difference':>12}{'MC sd':>10}")
    mean = table.mean(0)
    for i, name in enumerate(NAMES):
        print(
            f"  {name:14}{reference[i]:14.4f}{mean[i]:14.4f}"
            f"{mean[i] - reference[i]:12.4f}{spread[i]:10.4f}"
        )
    estimate = namespace["to_original_scale"](last.params, data["centre"])
    exact = namespace["marginal_log_likelihood"](estimate, data)
    print(
        f"log-likelihood: pyroem {last.log_likelihood():.3f} ± {last.log_likelihood_se:.3f} "
        f"(importance sampling), exact at pyroem's estimate {exact:.3f}, "
        f"statsmodels' maximum {reference_llf:.3f}"
    )
    print(f"median wall time to convergence: {np.median(walls):.1f} s")
    return {
        "wall": walls,
        "cpu": cpus,
        "estimates": table,
        "reference": reference,
        "exact_log_likelihood": exact,
        "reference_log_likelihood": reference_llf,
    }


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--schedule", choices=("saem", "mcem"), default="saem")
    parser.add_argument("--tol", type=float, default=1e-6)
    args = parser.parse_args(argv)
    run(args.seeds, args.threads, {"schedule": args.schedule, "tol": args.tol})


if __name__ == "__main__":
    main()
