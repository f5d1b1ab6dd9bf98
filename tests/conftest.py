import os

import pyro
import pytest
import torch

# pytest-xdist's workers share the cores: each takes its share of torch's threads, or two workers
# of two threads each on two cores slow every test several times over
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORKERS))


@pytest.fixture(autouse=True)
def fresh_pyro_state():
    """Every test starts from an empty param store, validation on and a fixed seed."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def binary_batch(n: int, x_dim: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.rand(n, x_dim, generator=g), generator=g)


def continuous_batch(n: int, x_dim: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, x_dim, generator=g)
