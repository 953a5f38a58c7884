"""Shared fixtures for the unit tests."""
import pytest
import torch


@pytest.fixture(scope='module')
def one_thread():
    "Tiny models and matrices: one CPU thread is faster than several (no OpenMP start-up, immune to busy cores); restored afterwards."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
