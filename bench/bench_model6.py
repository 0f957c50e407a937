"""hmm.py's model_6 (a second-order HMM, ``pyro.markov(history=2)``): where EM stops.

EM is monotone but can stop at a poor stationary point. On synthetic tones of the
shape of hmm.py's data (``--sequences`` × ``--length`` × ``--tones``, three hidden
states), from one start drawn as the program draws it, this prints the final log
joint, iterations and CPU time of:

- plain map-em; map-em with ``n_init`` restarts (the start, then prior draws);
- map-em with ``accelerate="squarem"``, alone and with restarts;
- SVI (Adam, ``TraceEnum_ELBO``; every site is a ``pyro.param``, so no guide) at each
  learning rate, best log joint within ``--max-seconds`` CPU seconds per rate;
- map-em started from SVI's best point.

All on one thread, float64. Run ``python bench/bench_model6.py --help``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import SVI, TraceEnum_ELBO, config_enumerate
from pyro.optim import Adam  # type: ignore[attr-defined]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyroem
from bench.bench_programs import _copy, _prior_start, tone_data
from tests.engines.test_pyro_examples import second_order_hmm


def _fit(args: tuple[Any, ...], init: Any, **options: Any) -> tuple[Any, float]:
    started = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        pyro.clear_param_store()
        fit = pyroem.fit(second_order_hmm, *args, init=init, seed=0, **options)
    return fit, time.process_time() - started


def _svi(
    args: tuple[Any, ...], start: dict[str, torch.Tensor], rate: float, budget: float
) -> tuple[float, dict[str, torch.Tensor], int]:
    """SVI from ``start``; the best log joint, its parameters and the steps taken."""
    pyro.clear_param_store()
    model = config_enumerate(second_order_hmm, default="parallel")
    for name, value in start.items():
        constraint = (
            torch.distributions.constraints.simplex
            if name == "probs_x"
            else torch.distributions.constraints.unit_interval
        )
        pyro.param(name, value.clone(), constraint=constraint)

    def guide(*_: Any) -> None:
        return None

    svi = SVI(model, guide, Adam({"lr": rate}), TraceEnum_ELBO(max_plate_nesting=2))
    best, best_params, steps = -math.inf, _copy(start), 0
    started = time.process_time()
    while time.process_time() - started < budget:
        params = {name: pyro.param(name).detach().clone() for name in start}
        value = -svi.step(*args)
        steps += 1
        if value > best:
            best, best_params = value, params
    return best, best_params, steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=20)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--tones", type=int, default=88)
    parser.add_argument("--n-init", type=int, default=5)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--max-seconds", type=float, default=30.0, help="CPU seconds per rate")
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    args = tone_data(options.sequences, options.length, options.tones)
    start = _prior_start(second_order_hmm, args, 0)
    print(
        f"model_6, {options.sequences} sequences x {options.length} steps x {options.tones} "
        "tones, 3 hidden states, float64, 1 thread, CPU seconds"
    )
    rows = []

    def restarts(seed: int) -> dict[str, torch.Tensor]:
        # Restart 0 (seed 0) is the common start; the others draw as the program does.
        return _copy(start) if seed == 0 else {}

    for label, init, extra in [
        ("map-em", start, {}),
        (f"map-em, n_init={options.n_init}", restarts, {"n_init": options.n_init}),
        ("map-em, squarem", start, {"accelerate": "squarem"}),
        (
            f"map-em, squarem, n_init={options.n_init}",
            restarts,
            {"n_init": options.n_init, "accelerate": "squarem"},
        ),
    ]:
        fit, seconds = _fit(args, init, tol=1e-6, max_iter=3000, **extra)
        rows.append((label, fit.log_joint(), f"{fit.num_iterations} it", seconds))
    best_params: dict[str, torch.Tensor] | None = None
    best = -math.inf
    for rate in options.learning_rates:
        value, params, steps = _svi(args, start, rate, options.max_seconds)
        rows.append((f"SVI Adam lr={rate:g}", value, f"{steps} steps", options.max_seconds))
        if value > best:
            best, best_params = value, params
    fit, seconds = _fit(args, best_params, tol=1e-6, max_iter=3000)
    rows.append(("map-em from SVI's best", fit.log_joint(), f"{fit.num_iterations} it", seconds))
    print("| run | log joint | iterations / steps | CPU s |")
    print("|---|---:|---:|---:|")
    for label, value, count, seconds in rows:
        print(f"| {label} | {value:.2f} | {count} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
