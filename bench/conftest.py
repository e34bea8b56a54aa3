import pytest
import torch

from fastdpo.bench.providers import KL_PROVIDERS, LINEAR_PROVIDERS, LOGPROB_PROVIDERS


def pytest_generate_tests(metafunc):
    if "logprob_provider" in metafunc.fixturenames:
        metafunc.parametrize("logprob_provider", LOGPROB_PROVIDERS, ids=lambda p: p.name)
    if "linear_provider" in metafunc.fixturenames:
        metafunc.parametrize("linear_provider", LINEAR_PROVIDERS, ids=lambda p: p.name)
    if "kl_provider" in metafunc.fixturenames:
        metafunc.parametrize("kl_provider", KL_PROVIDERS, ids=lambda p: p.name)


def run_benchmark(benchmark, step, device, extra):
    """Time ``step`` with pytest-benchmark; ``step.prepare`` (backward-only mode) runs untimed."""
    prepare = getattr(step, "prepare", None)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def setup():
        if prepare is not None:
            prepare()
        sync()

    def run():
        step()
        sync()

    benchmark.extra_info.update(extra)
    benchmark.pedantic(run, setup=setup, rounds=5, warmup_rounds=1)


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
