import os

import pyro
import pytest
import torch

# pytest-xdist's workers share the cores: each takes its share of torch's threads, or two workers
# of two threads each on two cores slow every test several times over
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORKERS))


def pytest_addoption(parser):
    what = "where tests that take the device fixture build their models and data: cpu (default), cuda or cuda:N"
    parser.addoption("--device", default="cpu", help=what)


def pytest_collection_modifyitems(items):
    """A test that takes the ``device`` fixture carries the ``device`` marker, so that
    ``-m device --device cuda`` selects every test that honours the option (benchmarks/gpu_check.py)."""
    for item in items:
        parametrized = getattr(item, "callspec", None) is not None and "device" in item.callspec.params
        if "device" in getattr(item, "fixturenames", ()) and not parametrized:
            item.add_marker(pytest.mark.device)


@pytest.fixture
def device(request) -> torch.device:
    """The ``--device`` of the run, checked here (a GPU that is missing is one clear error)."""
    from pyro_vae.runtime import resolve_device

    return resolve_device(request.config.getoption("--device"))


def rng_state(device: torch.device) -> torch.Tensor:
    """The state of the generator that draws on ``device`` (the CPU's or that GPU's)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


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
