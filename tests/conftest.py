"""Test configuration: CPU by default, Triton through its interpreter, Gloo worker pools."""
import os

import torch

# Triton decides at decoration time whether to interpret, so this must precede any import
# of pyowt's kernels. On a GPU machine the kernels run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import pyowt  # noqa: E402,F401
from pyowt.kernels import HAS_TRITON, interpreter_enabled  # noqa: E402

from .workers import PoolCache  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_runtest_logreport(report):
    """With PYOWT_FAILURE_LOG set, append each failure to that file as soon as it is
    reported, so a run stopped by a time limit (the GPU check) still leaves tracebacks.
    Under xdist only the controller writes (workers forward their reports to it)."""
    path = os.environ.get("PYOWT_FAILURE_LOG")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    with open(path, "a") as f:
        f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


@pytest.fixture(scope="session")
def worker_pools():
    pools = PoolCache()
    yield pools
    pools.close()


@pytest.fixture
def run_workers(worker_pools):
    """``run_workers(K, fn, *args, timeout=120)``: fn on K Gloo ranks, results by rank."""
    return worker_pools.run


@pytest.fixture
def triton_device():
    """The device Triton kernels run on here: CUDA, else CPU under ``TRITON_INTERPRET=1``."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not interpreter_enabled():
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    return torch.device("cpu")
