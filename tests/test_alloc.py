import sys

import pytest
import torch

from deployq.alloc import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_keep_freed_memory_applies_once_and_tensors_still_work():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent
    x = torch.randn(1 << 18)
    assert torch.equal((x * 2) / 2, x)
