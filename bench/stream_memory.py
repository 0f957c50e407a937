"""Peak memory of a Gaussian-mixture MAP-EM fit: streamed from a ``.npy`` file versus
the same data loaded into memory, at two data sizes.

Each fit runs in a fresh process, which reports its peak resident set size (RSS); a
process that only imports pyroem gives the baseline. The data (``D`` float64 columns,
``K`` well-separated clusters) are written chunk by chunk to a temporary directory.

    python bench/stream_memory.py                  # N = 1e6 and 4e6, D = 8, K = 4
    python bench/stream_memory.py --sizes 100000 400000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_CHILD = r"""
import json, sys, time
import numpy as np
import pyroem
mode, path = sys.argv[1], sys.argv[2]
K, iters, chunk = (int(value) for value in sys.argv[3:6])
spec = pyroem.Mixture(K, "gaussian", prior=None)
start = time.perf_counter()
if mode == "baseline":
    out = {}
else:
    source = np.load(path) if mode == "memory" else path
    fit = pyroem.fit(spec, source, seed=0, max_iter=iters, tol=0.0, chunk_size=chunk)
    out = {"log_likelihood": fit.log_likelihood(), "iterations": fit.num_iterations}
out["seconds"] = time.perf_counter() - start
# VmHWM: this process's own peak (ru_maxrss carries the parent's across fork and exec).
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
out["peak_rss_mb"] = peak / 1024
print(json.dumps(out))
"""


def _write(path: Path, num: int, dim: int, clusters: int, seed: int = 0) -> None:
    """``num × dim`` float64 rows, written 1e5 rows at a time."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=8.0, size=(clusters, dim))
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(num, dim))
    for begin in range(0, num, 100_000):
        rows = min(100_000, num - begin)
        labels = rng.integers(clusters, size=rows)
        array[begin : begin + rows] = centres[labels] + rng.normal(size=(rows, dim))
    array.flush()
    del array


def _run(mode: str, path: Path, clusters: int, iters: int, chunk: int) -> dict:
    args = [sys.executable, "-c", _CHILD, mode, str(path), str(clusters), str(iters), str(chunk)]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--components", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=65536)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        base = _run("baseline", Path(folder) / "none", options.components, 0, 1)
        print(f"baseline (import pyroem): peak RSS {base['peak_rss_mb']:.0f} MB")
        print(
            f"{'N':>10} {'data MB':>8} {'in-memory MB':>13} {'streamed MB':>12} "
            f"{'ratio':>6} {'s/iter mem':>10} {'s/iter str':>10} {'|Δ loglik|':>10}"
        )
        for num in options.sizes:
            path = Path(folder) / f"x{num}.npy"
            _write(path, num, options.dim, options.components)
            settings = (options.components, options.iterations, options.chunk_size)
            memory = _run("memory", path, *settings)
            stream = _run("stream", path, *settings)
            size_mb = num * options.dim * 8 / 2**20
            print(
                f"{num:>10} {size_mb:>8.0f} {memory['peak_rss_mb']:>13.0f} "
                f"{stream['peak_rss_mb']:>12.0f} "
                f"{memory['peak_rss_mb'] / stream['peak_rss_mb']:>6.2f} "
                f"{memory['seconds'] / max(memory['iterations'], 1):>10.2f} "
                f"{stream['seconds'] / max(stream['iterations'], 1):>10.2f} "
                f"{abs(memory['log_likelihood'] - stream['log_likelihood']):>10.2e}"
            )
            path.unlink()


if __name__ == "__main__":
    main()
