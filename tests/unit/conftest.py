"""Unit tests run tiny models: one torch thread is fastest and immune to OpenMP spinning
when the machine is busy (2 threads on 2 loaded cores measured 10-20x slower)."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
