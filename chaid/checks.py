"""Range and type checks of single values, shared by every layer that validates input.

The protocol checks request parameters, the engine checks requests made in process, the
settings check configuration values, and the command lines check flags: all with these
functions, so a bound reads the same everywhere ("steps must be in 1..200, not 500"). Each
takes the exception type to raise (InputError by default), because the same check is a bad
request to the engine, a bad setting to the configuration and a bad flag to a command line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from chaid.errors import InputError

ErrorFactory = Callable[[str], Exception]


def check_int(name: str, value: Any, low: int, high: int,
              error: ErrorFactory = InputError) -> int:
    """``value`` if it is an int (not a bool) in ``low..high``, else ``error(message)``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{name} must be an integer, not {type(value).__name__}")
    if not low <= value <= high:
        raise error(f"{name} must be in {low}..{high}, not {value}")
    return value


def check_number(name: str, value: Any, low: float, high: float, *, open_low: bool = False,
                 error: ErrorFactory = InputError) -> float:
    """``value`` as a float if it is a finite number in ``[low, high]`` (``(low, high]``
    with ``open_low``), else ``error(message)``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise error(f"{name} must be a number, not {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise error(f"{name} must be a finite number, not {value}")
    if value > high or value < low or (open_low and value == low):
        raise error(f"{name} must be in {'(' if open_low else '['}{low}, {high}], not {value}")
    return value


def check_choice(name: str, value: Any, options: Iterable[str],
                 error: ErrorFactory = InputError) -> str:
    """``value`` if it is one of ``options``, else ``error(message)`` listing them."""
    options = tuple(options)
    if not isinstance(value, str) or value not in options:
        raise error(f"{name} must be one of {', '.join(options)}, not {value!r}")
    return value
