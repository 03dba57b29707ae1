"""Test session setup.

- No GPU: Triton kernels run through the interpreter on CPU (``TRITON_INTERPRET=1``).
- ``device`` fixture: every test that takes it runs once per device present ("cpu" always, "cuda" when a GPU
  exists). On a GPU machine "cpu" exercises the compiled CPU paths (C++ extension, PyTorch) and "cuda" the
  Triton/CUDA kernels; on a CPU machine "cpu" runs the Triton kernels under the interpreter.
- Tests that run on CUDA are marked ``gpu`` automatically, so ``pytest -m gpu`` selects exactly them.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """The device a test runs on (parametrized over every device present)."""
    return torch.device(request.param)


def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("device") == "cuda":
            item.add_marker(pytest.mark.gpu)
