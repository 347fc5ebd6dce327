"""Shared fixtures: tiny models built once per test session."""

from __future__ import annotations

import os

import pytest

# One torch thread per process: on 2 shared cores more threads are slower, not faster.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from farm.render.tiny import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("models") / "wan-tiny", experts=1)


@pytest.fixture(scope="session")
def tiny_model_2x_dir(tmp_path_factory):
    from farm.render.tiny import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("models") / "wan-tiny-2x", experts=2)


@pytest.fixture(scope="session")
def tiny_spec(tiny_model_dir):
    from farm.render.tiny import tiny_spec

    return tiny_spec(tiny_model_dir, experts=1)


@pytest.fixture(scope="session")
def tiny_spec_2x(tiny_model_2x_dir):
    from farm.render.tiny import tiny_spec

    return tiny_spec(tiny_model_2x_dir, experts=2)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests.figures import LINES

    if LINES:
        terminalreporter.section("videofarm figures")
        for line in LINES:
            terminalreporter.write_line(line)
