"""Session-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # The tests use tiny tensors: a second intra-op thread only adds contention on a
    # busy 2-core machine (measured 10-50x slower small kernels with 2 threads).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
