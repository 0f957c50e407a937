"""Scale: batch EM streamed from disk, stepwise EM, and a fit split over processes.

A K-component full-covariance Gaussian mixture on N × D rows written to a ``.npy`` file
(float32 by default, to halve the disk), every fit in a fresh process:

(a) batch MAP-EM streamed from the file: seconds per pass and peak RSS at each N
    (flat in N: the fit holds chunks and the reservoir sample; no per-row values, which
    it computes on demand from the file);
(b) stepwise EM on the smallest N: the gap of the log joint per point to the batch
    optimum after 1 and 2 passes (batch EM's own gap after 1 and 2 iterations beside it);
    with ``--method vb-em``, stochastic VI's ELBO against batch CAVI's;
(c) the same batch fit on 1 and 2 ``torch.distributed`` processes (gloo on 127.0.0.1),
    in float64 with the whole file as the initialisation's sample: seconds per pass and
    the largest relative parameter difference.

    python bench/bench_scale.py                                  # N = 1e6, 1e7; D = K = 16
    python bench/bench_scale.py --rows 200000 1000000 --passes 2 # a small run
    python bench/bench_scale.py --rows 1000000 10000000 --passes 1 --skip b c  # memory

Seconds per pass exclude the first E-step (which includes the initialisation on the
reservoir sample); the scan pass and the final scoring pass are in the total seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_CHILD = r"""
import json, os, sys, time
import numpy as np
import torch
import pyroem

mode, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
K, passes, tol = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
dtype, reservoir, method = sys.argv[7], int(sys.argv[8]), sys.argv[9]
if "WORLD_SIZE" in os.environ:
    torch.distributed.init_process_group("gloo")
rank = int(os.environ.get("RANK", "0"))
# vb-em needs a proper prior: mclust's default.
spec = pyroem.Mixture(K, "gaussian", prior=None if method == "map-em" else "default")
start = time.perf_counter()
result = {}
if mode != "baseline":
    options = dict(seed=0, dtype=dtype, tol=tol, method=method)
    if method == "vb-em":
        options["num_draws"] = 0
    if reservoir:
        options["reservoir_size"] = reservoir
    if mode == "stepwise":
        options.update(stepwise=True, passes=passes, batch_size=1024, kappa=0.7)
    else:
        options.update(max_iter=passes)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        fit = pyroem.fit(spec, path, **options)
    elapsed = np.diff(fit.history.elapsed)
    result = {
        "objective": fit.history.objective.tolist(),
        "num_data": fit.num_data,
        "iterations": fit.num_iterations,
        "seconds_per_pass": float(elapsed.mean()) if elapsed.size else float("nan"),
    }
    if rank == 0:
        np.savez(out, **{key: value.numpy() for key, value in fit.params.items()})
result["seconds"] = time.perf_counter() - start
# VmHWM: this process's own peak. (ru_maxrss is not: Linux carries the parent's peak
# RSS across fork and exec, and the parent wrote the file through a memory map.)
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
result["peak_rss_mb"] = peak / 1024
if rank == 0:
    print(json.dumps(result))
"""


def _write(path: Path, num: int, dim: int, clusters: int, dtype: str) -> None:
    """``num × dim`` rows around ``clusters`` centres, written 1e5 rows at a time."""
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=5.0, size=(clusters, dim))
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(num, dim))
    for begin in range(0, num, 100_000):
        rows = min(100_000, num - begin)
        labels = rng.integers(clusters, size=rows)
        array[begin : begin + rows] = centres[labels] + rng.normal(size=(rows, dim))
    array.flush()
    del array


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(mode: str, path: Path, out: Path, options: argparse.Namespace, **extra: object) -> dict:
    """One fit in fresh processes (``processes`` of them under one process group)."""
    processes = int(extra.get("processes", 1))
    passes = int(extra.get("passes", options.passes))
    tol = float(extra.get("tol", 0.0))
    dtype = str(extra.get("dtype", options.dtype))
    reservoir = int(extra.get("reservoir", 0))
    method = str(extra.get("method", "map-em"))
    args = [
        sys.executable,
        "-c",
        _CHILD,
        mode,
        str(path),
        str(out),
        str(options.components),
        str(passes),
        str(tol),
        dtype,
        str(reservoir),
        method,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(options.threads)}
    if processes == 1:
        done = subprocess.run(args, capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError(done.stderr[-2000:])
        return json.loads(done.stdout.strip().splitlines()[-1])
    port = str(_free_port())
    children = []
    for rank in range(processes):
        group = {"RANK": str(rank), "WORLD_SIZE": str(processes), "LOCAL_RANK": str(rank)}
        group.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        children.append(
            subprocess.Popen(
                args,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**env, **group},
            )
        )
    outputs = [child.communicate() for child in children]
    for child, (_, err) in zip(children, outputs, strict=True):
        if child.returncode:
            raise RuntimeError(err[-2000:])
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def _max_difference(left: Path, right: Path) -> float:
    a, b = np.load(left), np.load(right)
    return max(float(np.max(np.abs(a[key] - b[key]) / np.max(np.abs(b[key])))) for key in a.files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--components", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--passes", type=int, default=2, help="batch EM passes timed in (a), (c)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--folder", help="where the .npy files go (default: a temporary folder)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("a", "b", "c"))
    parser.add_argument(
        "--optimum-iterations", type=int, default=500, help="(b): batch EM's iterations"
    )
    parser.add_argument(
        "--method",
        default="map-em",
        choices=("map-em", "vb-em"),
        help="(b): map-em (stepwise EM) or vb-em (stochastic VI against batch CAVI)",
    )
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=options.folder) as name:
        folder = Path(name)
        print(
            f"K = {options.components} full covariance, D = {options.dim}, {options.dtype}, "
            f"{options.threads} thread(s) per process"
        )
        base = _run("baseline", folder / "none.npy", folder / "none.npz", options)
        print(f"baseline (import pyroem): peak RSS {base['peak_rss_mb']:.0f} MB")
        paths = {}
        for num in options.rows:
            paths[num] = folder / f"x{num}.npy"
            _write(paths[num], num, options.dim, options.components, options.dtype)
        if "a" not in options.skip:
            print("\n(a) batch EM streamed from .npy")
            print(f"{'N':>10} {'file MB':>8} {'s/pass':>8} {'total s':>8} {'peak RSS MB':>12}")
            for num, path in paths.items():
                got = _run("batch", path, folder / "a.npz", options)
                size = path.stat().st_size / 2**20
                print(
                    f"{num:>10} {size:>8.0f} {got['seconds_per_pass']:>8.2f} "
                    f"{got['seconds']:>8.1f} {got['peak_rss_mb']:>12.0f}"
                )
        small = paths[min(paths)]
        num = min(paths)
        if "b" not in options.skip:
            what = "stepwise EM" if options.method == "map-em" else "stochastic VI"
            print(f"\n(b) {what} ({options.method}, kappa 0.7, batch 1024) on N = {num}")
            batch = _run(
                "batch",
                small,
                folder / "b.npz",
                options,
                passes=options.optimum_iterations,
                tol=1e-9,
                method=options.method,
            )
            optimum = batch["objective"][-1]
            steps = _run(
                "stepwise", small, folder / "s.npz", options, passes=2, method=options.method
            )
            batch_gap = [(optimum - value) / num for value in batch["objective"][1:3]]
            step_gap = [(optimum - value) / num for value in steps["objective"][1:3]]
            print(
                f"batch optimum: {batch['iterations']} iterations ({batch['seconds']:.0f} s); "
                f"its last change per point {(optimum - batch['objective'][-2]) / num:.2g}"
            )
            objective = "log joint" if options.method == "map-em" else "ELBO"
            print(f"gap of the {objective} per point after 1, 2 passes:")
            # (batch EM may converge within the first iteration: fewer entries)
            print("  batch       " + ", ".join(f"{gap:.4g}" for gap in batch_gap))
            print("  stepwise    " + ", ".join(f"{gap:.4g}" for gap in step_gap))
        if "c" not in options.skip:
            # In float64, with the whole file as the initialisation's sample: the fits
            # must agree to round-off (a sample of a larger file is drawn per shard).
            print(
                f"\n(c) torch.distributed (gloo), N = {num}, {options.passes} passes, "
                "computed in float64"
            )
            exact = {"dtype": "float64", "reservoir": num}
            one = _run("batch", small, folder / "one.npz", options, **exact)
            two = _run("batch", small, folder / "two.npz", options, processes=2, **exact)
            difference = _max_difference(folder / "two.npz", folder / "one.npz")
            print(
                f"1 process: {one['seconds_per_pass']:.2f} s/pass; 2 processes: "
                f"{two['seconds_per_pass']:.2f} s/pass (ratio "
                f"{one['seconds_per_pass'] / two['seconds_per_pass']:.2f}); "
                f"largest relative parameter difference {difference:.2g}"
            )


if __name__ == "__main__":
    main()
