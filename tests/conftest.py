"""Session-wide test settings."""

import pytest
import torch
from hypothesis import settings

# Hypothesis fails an example that takes over 200 ms: a timing assert, which a loaded
# machine trips (a pure-function gate test did beside a benchmark on both cores). The
# suite states no speed in its tests; the benchmarks do.
settings.register_profile("deployq", deadline=None)
settings.load_profile("deployq")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # The tests use tiny tensors: a second intra-op thread only adds contention on a
    # busy 2-core machine (measured 10-50x slower small kernels with 2 threads).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
