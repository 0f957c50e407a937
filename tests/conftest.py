"""Every test starts from a fixed seed and an empty Pyro parameter store."""

import pyro
import pytest
import torch

# The tests run many tiny linear-algebra calls; one thread avoids contention on small machines.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded_and_clean():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    previous = torch.get_default_dtype()
    yield
    torch.set_default_dtype(previous)
    pyro.clear_param_store()
