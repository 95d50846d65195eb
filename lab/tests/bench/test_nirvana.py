"""NIRVANA-VID's harness: prompt similarity to the step a run continues from."""

import pytest
import torch

from chaid.engine.pipeline import GenerationRequest
from chaid.errors import InputError
from chaid_lab.baselines.nirvana import NirvanaSettings, substituted_request

PROMPT = "a red circle moving left over a grassy field"


def test_nirvana_similarity_to_start_step():
    s = NirvanaSettings().validate()
    assert [s.start_step(c) for c in (0.99, 0.95, 0.92, 0.87, 0.81, 0.76, 0.7)] == [
        25,
        25,
        20,
        15,
        10,
        5,
        None,
    ]
    assert s.min_similarity == 0.75
    with pytest.raises(InputError):
        NirvanaSettings(bands=((0.8, 10), (0.9, 20))).validate()
    with pytest.raises(InputError):
        NirvanaSettings(bands=((0.9, 12),)).validate()
    latents = {k: torch.full((4, 4, 4, 4), float(k)) for k in s.capture_steps}
    req = GenerationRequest(PROMPT, steps=8, capture_steps=(2,))
    hit = substituted_request(req, latents, 0.91, s)
    assert hit is not None and hit.start_step == 20 and hit.steps == 30
    assert hit.capture_steps == () and torch.equal(hit.start_latent, latents[20])
    assert substituted_request(req, latents, 0.5, s) is None
    with pytest.raises(InputError):
        substituted_request(req, {5: latents[5]}, 0.99, s)
