"""Scoring new data under a fitted mixture keeps no copy of the data: beyond its outputs,
the peak memory of ``score_samples`` and ``predict`` stays far below the data's size."""

from __future__ import annotations

import gc
import os
import warnings

import numpy as np
import pytest

import pyroem

pytestmark = pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc peak memory"
)


def _resident_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        text = status.read()
    return int(text.split(f"{field}:")[1].split()[0]) / 1024


@pytest.mark.parametrize("what", ["score_samples", "predict"])
def test_scoring_does_not_copy_the_data(what: str) -> None:
    generator = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = pyroem.fit(
            pyroem.Mixture(2, covariance_type="full"), generator.normal(size=(500, 8)), seed=0
        )
    data = generator.normal(size=(1_200_000, 8))  # 73 MiB
    data_mib = data.nbytes / 2**20
    getattr(fit, what)(data[:1000])  # one-off allocations (kernels, workspace)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the high-water mark to the current resident size
    before = _resident_mib("VmRSS")
    out = getattr(fit, what)(data)
    extra = _resident_mib("VmHWM") - before - out.numel() * out.element_size() / 2**20
    # Chunk temporaries (a few MiB, whatever N), boolean NaN masks (1/8 of the data) and
    # predict's (N, K) log-responsibilities (1/4 here) are allowed; a copy of the data is not.
    assert extra < 0.5 * data_mib, (extra, data_mib)
