"""tbps.threads.torch_threads: the count inside the block, and the old one back after it."""

import pytest
import torch

from tbps.threads import torch_threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_sets_the_count_inside_and_restores_it(two_threads):
    with torch_threads(1) as found:
        assert found == 2 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_restores_the_count_when_the_block_raises(two_threads):
    with pytest.raises(KeyError), torch_threads(1):
        raise KeyError("x")
    assert torch.get_num_threads() == 2


def test_never_below_one_thread(two_threads):
    with torch_threads(0):
        assert torch.get_num_threads() == 1
    with torch_threads(-3):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
