"""torch's CPU thread count for a block of work, restored after it."""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run the block with ``n`` (at least 1) torch intra-op threads, then restore the count found
    before, which it yields. The count is only set where it changes."""
    import torch

    before = torch.get_num_threads()
    n = max(1, int(n))
    if n != before:
        torch.set_num_threads(n)
    try:
        yield before
    finally:
        if n != before:
            torch.set_num_threads(before)
