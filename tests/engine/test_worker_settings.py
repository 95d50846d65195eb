"""Threads and workers: one torch thread for a small model on the CPU, one worker per
device or per share of a CPU (docs/deploy.md)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from chaid.config import ConfigError, ModelSettings, ServerSettings, Settings
from chaid.engine.pipeline import torch_threads_for, worker_devices


def settings(model: str, threads: int = 0, device: str = "cpu", **server) -> Settings:
    return dataclasses.replace(Settings(), model=ModelSettings(name=model, device=device),
                               server=ServerSettings(torch_threads=threads, **server))


def test_small_models_get_one_thread_large_ones_torchs_default():
    assert torch_threads_for(settings("tiny-shapes")) == 1
    assert torch_threads_for(settings("tiny-test")) == 1
    assert torch_threads_for(settings("opensora-1.2")) == 0  # 1.1 B parameters: every core
    assert torch_threads_for(settings("tiny-shapes", threads=3)) == 3  # the setting wins


def test_worker_devices():
    assert worker_devices(settings("tiny-test")) == ["cpu"]
    assert worker_devices(settings("tiny-test", cpu_workers=3)) == ["cpu"] * 3
    assert worker_devices(settings("tiny-test", devices=("cpu", "cuda:1"), cpu_workers=2)) == [
        "cpu", "cpu", "cuda:1"]
    if not torch.cuda.is_available():  # auto on a machine without a GPU: the CPU
        assert worker_devices(settings("tiny-test", device="auto")) == ["cpu"]
    for bad in ({"cpu_workers": 0}, {"devices": ("tpu",)}):
        with pytest.raises(ConfigError):
            settings("tiny-test", **bad).validate()
