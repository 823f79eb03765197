"""A module-scoped autouse fixture for test modules made of many tiny CPU ops (import it to use it)."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Hundreds of tiny ops per image or prompt: a second intra-op thread only adds synchronisation,
    # which makes them several times slower on a busy 2-core machine, never faster.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
