"""Fixtures shared by the Shapes tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Small tensors: one thread avoids OpenMP start-up and spinning on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
