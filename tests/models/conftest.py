"""Model tests train small networks: one torch thread each, since pytest-xdist runs two workers on two cores
and more threads per worker only contend for them."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
