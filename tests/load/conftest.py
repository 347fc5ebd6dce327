"""Load tests: real `farm up` plus locust in a subprocess (minutes, not seconds)."""

from __future__ import annotations


def pytest_configure(config) -> None:
    # Registered here so `-m load` / `-m "not load"` work under --strict-markers.
    config.addinivalue_line("markers", "load: a locust run against a real farm (about 2-3 minutes)")
