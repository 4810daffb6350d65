"""The fused-kernel tests: marked ``kernels`` (run with ``pytest -m kernels``; the default run leaves them out).

Without a GPU the kernels run in Triton's interpreter, which must be switched on before the kernels are first
imported: the fixture below sets ``TRITON_INTERPRET=1`` for these tests only, ahead of their first import.
"""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.kernels)


@pytest.fixture(autouse=True)
def _interpreter_without_a_gpu(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
