"""Argument parsing shared by the command-line tools."""

from __future__ import annotations

from chaid.checks import check_int
from chaid.errors import ChaidError


def int_list(flag: str, text: str, low: int, high: int, *, empty: bool = False) -> list[int]:
    """Comma-separated integers of ``flag``, each in low..high; ChaidError names the flag.

    ``empty`` allows an empty list (an empty string).
    """
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ChaidError(f"{flag} takes comma-separated integers, not {text!r}") from None
    if not values and not empty:
        raise ChaidError(f"{flag} needs at least one value; values must be in {low}..{high}")
    for value in values:
        check_int(f"{flag} values", value, low, high, ChaidError)
    return values
