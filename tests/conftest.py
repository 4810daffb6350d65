"""Shared fixtures. Real-data tests take the ``data_dir`` fixture: it resolves ``KEXUE_DATA_DIR`` and, when
the data is missing, fails under ``CI=true`` (so CI can never pass by skipping) and skips elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Under pytest-xdist (the README's test command runs two workers on the two CI cores) each worker computes on one
# thread, so the workers do not fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a CUDA device: skipped where torch sees none (CI), run with ``-m cuda`` on a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


# Skips that mean "a package the test extra installs is missing" (pytest.importorskip, and the kernels' own
# check for triton): under CI=true they fail instead, so CI cannot pass by skipping a broken install.
_MISSING_PACKAGE = ("could not import", "is not installed")


def _fail_missing_package_in_ci(report) -> None:
    if report.skipped and _in_ci():
        text = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if any(s in text for s in _MISSING_PACKAGE):
            report.outcome = "failed"
            report.longrepr = f"under CI a missing package fails the test: {text}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_missing_package_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_missing_package_in_ci(outcome.get_result())


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = os.environ.get("KEXUE_DATA_DIR")
    if not root or not Path(root).is_dir():
        msg = f"real-data test needs KEXUE_DATA_DIR pointing at the datasets (got {root!r})"
        if _in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    return Path(root)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models run faster on it, and do not thrash when the 2 CI cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
