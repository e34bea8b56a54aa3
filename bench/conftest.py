"""pytest-benchmark suites over the same providers as ``python -m fastdpo.bench``.

By default each suite runs its quick set (the README's shapes, forward + backward);
``--bench-full`` runs every shape, dtype and mode (hours on a 2-core CPU).
"""

import pytest
import torch

from fastdpo.bench.providers import KL_PROVIDERS, LINEAR_PROVIDERS, LOGPROB_PROVIDERS


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true", default=False,
                     help="every shape, dtype and mode of the benchmark suites (default: the quick set)")


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_generate_tests(metafunc):
    if "logprob_provider" in metafunc.fixturenames:
        metafunc.parametrize("logprob_provider", LOGPROB_PROVIDERS, ids=lambda p: p.name)
    if "linear_provider" in metafunc.fixturenames:
        metafunc.parametrize("linear_provider", LINEAR_PROVIDERS, ids=lambda p: p.name)
    if "kl_provider" in metafunc.fixturenames:
        metafunc.parametrize("kl_provider", KL_PROVIDERS, ids=lambda p: p.name)
    if "shape" in metafunc.fixturenames:
        # each suite module defines SHAPES = {device: [(name, shape), ...]}, QUICK and FULL = {shapes, dtypes, modes}
        mod = metafunc.module
        grid = mod.FULL if metafunc.config.getoption("--bench-full") else mod.QUICK
        shapes = [(name, shape) for name, shape in mod.SHAPES[_device()] if name in grid["shapes"]]
        metafunc.parametrize("mode", grid["modes"])
        metafunc.parametrize("dtype", grid["dtypes"])
        metafunc.parametrize("shape", [s for _, s in shapes], ids=[n for n, _ in shapes])


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
    return _device()
