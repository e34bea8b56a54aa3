import pytest
import torch

from fastdpo.bench.providers import LOGPROB_PROVIDERS


def pytest_generate_tests(metafunc):
    if "provider" in metafunc.fixturenames:
        metafunc.parametrize("provider", LOGPROB_PROVIDERS, ids=lambda p: p.name)


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
