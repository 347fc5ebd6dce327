"""Figures tests measure (fault counts, load rates), shown together at the end of the run.

pytest hides a passing test's output; these lines are what a reader of the CI log wants to see,
so ``tests/conftest.py`` prints them in a "videofarm figures" section of the summary.
"""

from __future__ import annotations

import os

LINES: list[str] = []


def report(line: str) -> None:
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    LINES.append(f"{test}: {line}" if test else line)
    print(line)
