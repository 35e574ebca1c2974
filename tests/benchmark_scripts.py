"""What the tests of benchmarks/*.py share: where the scripts are, the environment they run in, and
the check of a measured figure. The scripts always run in subprocesses: importing one would register
its datasets in the test process, and the contract tests loop over every registered dataset."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def one_thread_env() -> dict[str, str]:
    # one thread: small models on a 2-core machine beside other processes (tests/conftest.py)
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def positive(value: Any) -> bool:
    """A measured figure: a finite number above zero (not a bool, not NaN)."""
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )
