"""The torch thread default: one thread for a small model on the CPU (docs/deploy.md)."""

from __future__ import annotations

import dataclasses

from chaid.config import ModelSettings, ServerSettings, Settings
from chaid.engine.pipeline import torch_threads_for


def settings(model: str, threads: int = 0, device: str = "cpu") -> Settings:
    return dataclasses.replace(Settings(), model=ModelSettings(name=model, device=device),
                               server=ServerSettings(torch_threads=threads))


def test_small_models_get_one_thread_large_ones_torchs_default():
    assert torch_threads_for(settings("tiny-shapes")) == 1
    assert torch_threads_for(settings("tiny-test")) == 1
    assert torch_threads_for(settings("opensora-1.2")) == 0  # 1.1 B parameters: every core
    assert torch_threads_for(settings("tiny-shapes", threads=3)) == 3  # the setting wins
