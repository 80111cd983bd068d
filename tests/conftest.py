"""Shared test setup: hypothesis profiles, and tests marked ``gpu`` run only where a CUDA device is visible."""

from __future__ import annotations

import os
import signal

import pytest
from hypothesis import settings

# CI draws the same examples on every run, so its verdict can be reproduced; developers' runs draw new ones each
# time and so keep finding rare counterexamples (fixed ones are pinned with @example).
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        type=int,
        default=0,
        metavar="N",
        help="run each fuzz family (tests/fuzz) with N times its CI number of inputs, drawing new ones",
    )


def pytest_configure(config: pytest.Config) -> None:
    # A suite started in the background by a non-interactive shell (`cmd &`, nohup) inherits Ctrl-C ignored, and so
    # would every command the tests start: they then could not show how Ctrl-C ends them. Python's own handler here
    # becomes the default action in each child.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    soak = config.getoption("--soak")
    if soak:
        os.environ["KVBM_SOAK"] = str(soak)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    # probed only when GPU tests were collected: importing cupy costs a second
    from kvbm_builder.storage import cuda_available, cuda_unavailable_reason

    if cuda_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {cuda_unavailable_reason()}")
    for item in gpu_items:
        item.add_marker(skip)
