"""Request limits: the bounds of every generation request, in one place.

Two tiers. The **ceilings** hold everywhere, in process (``chaid generate``, the pipeline)
and through the daemon: no supported model's memory plan fits more. The daemon's
:class:`RequestLimits` are its configured bounds (``[server]`` settings, defaults below):
they may be lowered to cap the device time one client can take, never raised above the
ceilings (the settings refuse that). The protocol checks requests against the daemon's
limits; the engine checks every request against the ceilings.
"""

from __future__ import annotations

from dataclasses import dataclass

# Prompts longer than this are never meaningful to a text encoder whose context is a few
# hundred tokens, and would only cost tokenizer time.
MAX_PROMPT_CHARS = 2000
# Frames and sides beyond these would not fit any supported model's memory plan.
MAX_FRAMES = 512
MAX_SIDE = 2048
# No video autoencoder here downsamples by less than 8: a smaller side has no latent.
MIN_SIDE = 8
# Frame rates beyond this are no video anyone plays back.
MAX_FPS = 240
# More steps than this buys nothing for a rectified-flow sampler and only ties up the device.
MAX_STEPS = 1000
# Guidance far beyond the usual 1..15 saturates every pixel; refuse it as a likely typo.
MAX_CFG_SCALE = 100.0
# Seeds are drawn by torch.Generator.manual_seed, which takes a signed 64-bit integer.
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class RequestLimits:
    """The bounds a daemon enforces on request parameters (its ``[server]`` settings)."""

    # Longest prompt (characters).
    max_prompt_chars: int = MAX_PROMPT_CHARS
    # Frames, sides and steps: they cap the device time and memory one request takes.
    max_frames: int = 256
    max_side: int = 1024
    max_steps: int = 200
    # Longest per-request deadline (queue wait + generation), in seconds.
    max_deadline_s: float = 900.0


DEFAULT_LIMITS = RequestLimits()
