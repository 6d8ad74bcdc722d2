"""Run this folder's tests with one torch thread (restored afterwards).

On a small, shared CPU the OpenMP barrier of a second thread costs more than it saves for the many
small tensor operations in these tests (measured ~8x slower under load); results do not depend on it.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
