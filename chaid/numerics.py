"""How a model's arithmetic rounds: as upstream OpenSora 1.2's inference does, or exactly.

OpenSora 1.2 runs inference with the whole DiT and VAE cast to bfloat16, and a few numbers
pass through that dtype on the way, which the released weights were trained through (the
DiT trained in bf16 too). ``Numerics.UPSTREAM`` reproduces each of those roundings;
``Numerics.EXACT`` keeps them in float32. In float32 the two differ only in the schedule's
frame rule (see :func:`chaid.engine.sampler.upstream_schedule`). docs/opensora.md lists
every rule and why it was chosen.

Where the rules live (one owner each):

* the timestep cast and the rotary frequencies: :class:`chaid.models.stdit3.STDiT3`;
* the schedule (sizes held as model-dtype tensors, the frame rule):
  :mod:`chaid.engine.sampler`;
* the VAE's scale and shift: :class:`chaid.models.opensora_vae.OpenSoraVAE`;
* the sizes the DiT's position embedding sees: :func:`as_seen`, applied by the pipeline.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class Numerics(enum.StrEnum):
    # As upstream's inference script runs the model: timesteps, rotary frequencies, video
    # sizes and the VAE's scale/shift held in the model dtype; upstream's frame rule.
    UPSTREAM = "upstream"
    # float32 for every one of those numbers; the schedule counts the real latent frames.
    EXACT = "exact"


# The setting's values: "auto" is the preset's own (ModelSpec.numerics).
NUMERICS_CHOICES = ("auto", *(n.value for n in Numerics))


def as_seen(value: float, dtype: torch.dtype) -> float:
    """``value`` as a tensor of ``dtype`` holds it: upstream's inference builds the video's
    height, width, frame count and fps as model-dtype tensors, so in bfloat16 a 480p width
    of 854 is 856 (integers above 256 keep 8 significant bits)."""
    import torch  # here, so that the settings can name the choices without torch

    return float(torch.tensor(float(value), dtype=torch.float64).to(dtype).item())
