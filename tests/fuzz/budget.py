"""How many inputs each fuzz family draws: a fixed, derandomized number in CI, many fresh ones under ``--soak N``.

Every family decorates its property with ``@fuzz(2000)`` (its CI count); ``pytest tests/fuzz --soak 50`` runs it
with 50 times as many inputs, drawn anew, and prints nothing but failures.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings

F = TypeVar("F", bound=Callable[..., Any])

#: The most inputs of one family that CI draws; the issue asks for at least 2,000.
CI_INPUTS = 2000


def soak_factor() -> int:
    return int(os.environ.get("KVBM_SOAK", "0") or 0)


def fuzz(ci_inputs: int = CI_INPUTS) -> Callable[[F], F]:
    """Hypothesis settings for one fuzz family: ``ci_inputs`` derandomized inputs, or ``soak_factor()`` times as many
    fresh ones."""
    factor = soak_factor()
    return settings(
        max_examples=ci_inputs * factor if factor else ci_inputs,
        derandomize=not factor,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        print_blob=True,
    )
