"""Figures tests measure (fault counts, load rates), shown together at the end of the run.

pytest hides a passing test's output; these lines are what a reader of the CI log wants to see,
so ``tests/conftest.py`` prints them in a "videofarm figures" section of the summary.
"""

from __future__ import annotations

import math
import os

import numpy as np

LINES: list[str] = []


def report(line: str) -> None:
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    LINES.append(f"{test}: {line}" if test else line)
    print(line)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two 8-bit images or frame stacks (inf when they are equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
