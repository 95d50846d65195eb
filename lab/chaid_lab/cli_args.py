"""Argument parsing shared by the command-line tools."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

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


def add_sampler_args(parser: argparse.ArgumentParser, *, temporal_guidance: bool = True) -> None:
    """The sampler's options (``[sampler]`` settings) as flags: --eta and --eta-until, and
    --temporal-guidance where ``temporal_guidance``."""
    if temporal_guidance:
        parser.add_argument("--temporal-guidance", type=float, default=0.0,
                            help="temporal guidance scale (sampler.temporal_guidance; default"
                                 " 0: off)")
    parser.add_argument("--eta", type=float,
                        help="share of fresh noise per step (sampler.eta; default: the model's)")
    parser.add_argument("--eta-until", type=float,
                        help="steps at t at or below this are Euler steps (sampler.eta_until;"
                             " default: the model's)")


def sampler_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags of :func:`add_sampler_args` as :class:`chaid.engine.pipeline.Pipeline`
    keyword arguments, checked by the daemon's own rules for the ``[sampler]`` settings
    (ConfigError, a ChaidError, names the setting)."""
    from chaid.config import SamplerSettings, Settings

    fields = {"eta": args.eta, "eta_until": args.eta_until}
    if hasattr(args, "temporal_guidance"):
        fields["temporal_guidance"] = args.temporal_guidance
    dataclasses.replace(Settings(), sampler=SamplerSettings(**fields)).validate()
    return fields
