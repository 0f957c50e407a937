"""Peak memory of a Mixture's k-means++ initialisation.

For each data size, a fresh process imports pyroem, simulates Gaussian data
``(N, dim)`` in float64, binds the family (default prior resolved), then runs
``initial_params`` (k-means++ seeding, nearest-centre labels, one M-step). The
peak resident set size above the level reached before the initialisation is
reported next to the data's own size (the peak is reset through
``/proc/self/clear_refs`` just before, so Linux only). The initialisation keeps, besides the
data, two length-``N`` vectors (k-means++ distances, labels) and
``O(chunk_size · K · dim)`` per chunk, so the excess should stay near
``16 · N`` bytes whatever ``K``.

glibc's malloc may keep freed chunk buffers resident (its mmap threshold grows
after the first large free), which shows as extra peak RSS that is not live
memory; ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment turns that off.

Measured on 2 CPU cores, dim 8, K 6, excess peak RSS over the data's 61 MB
(N = 1e6) and 244 MB (N = 4e6): before chunking 589 MB and 2352 MB (k-means++),
658 MB at N = 1e6 (k-means); after, with ``MALLOC_MMAP_THRESHOLD_=131072``,
49 MB and 93 MB (k-means++), 49 MB and 95 MB (k-means).

Run ``python bench/init_memory.py`` in a checkout (or with ``PYTHONPATH`` set to
another checkout to measure that one); ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def _status_mb(field: str) -> float:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Start the peak (VmHWM) again from the current RSS (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def _child(num_data: int, dim: int, num_components: int, init: str) -> None:
    import torch

    import pyroem
    from pyroem.engines.initialization import initial_params

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(num_data, dim, generator=generator, dtype=torch.float64)
    data[: num_data // 2] += 5.0
    spec = pyroem.Mixture(num_components)
    family = spec.bind(data)
    _reset_peak()
    before = _status_mb("VmRSS")
    initial_params(spec, family, data, init, torch.Generator().manual_seed(1))
    after = _status_mb("VmHWM")
    print(
        json.dumps(
            {
                "num_data": num_data,
                "data_mb": data.numel() * 8 / 2**20,
                "rss_before_mb": before,
                "excess_mb": after - before,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 4e6])
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--components", type=int, default=6)
    parser.add_argument("--init", default="kmeans++", choices=["kmeans++", "kmeans"])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child, args.dim, args.components, args.init)
        return
    print(f"init={args.init} dim={args.dim} K={args.components}")
    print(f"{'N':>10} {'data MB':>9} {'excess peak MB':>15} {'excess / data':>14}")
    for size in args.sizes:
        command = [
            sys.executable,
            __file__,
            "--child",
            str(int(size)),
            "--dim",
            str(args.dim),
            "--components",
            str(args.components),
            "--init",
            args.init,
        ]
        row = json.loads(subprocess.run(command, capture_output=True, check=True, text=True).stdout)
        ratio = row["excess_mb"] / row["data_mb"]
        print(
            f"{row['num_data']:>10} {row['data_mb']:>9.1f} {row['excess_mb']:>15.1f} {ratio:>14.2f}"
        )


if __name__ == "__main__":
    main()
