"""Forward-compatible CUDA builds and the compute-capability check, proven without a GPU.

The CUDA library embeds PTX for the newest (non arch-specific) architecture it builds, so GPUs newer
than every built architecture JIT-compile it; ``unavailable_reason`` compares the device's compute
capability (mocked here) with what was built; ``auto`` then falls back with one warning and an
explicit ``backend="cuda"`` raises, naming the built architectures and ``FASTDPO_CUDA_ARCHS``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import fastdpo
from fastdpo import _backends, _build

needs_toolkit = pytest.mark.skipif(
    not torch.version.cuda or _build.cuda_home() is None,
    reason="needs a CUDA build of torch and a CUDA toolkit (nvcc) to compile the extension",
)


@pytest.mark.parametrize("archs, want", [
    ("80;90", "8.0;9.0+PTX"),
    ("90;80", "9.0+PTX;8.0"),
    ("80;86;90;100", "8.0;8.6;9.0;10.0+PTX"),
    ("80;90a", "8.0+PTX;9.0a"),  # arch-specific PTX is not forward-compatible: the newest generic one is embedded
    ("90a", "9.0a;9.0+PTX"),
    ("120", "12.0+PTX"),
])
def test_the_newest_architecture_is_built_with_ptx(monkeypatch, archs, want):
    monkeypatch.setenv("FASTDPO_CUDA_ARCHS", archs)
    assert _build.torch_arch_list() == want


@pytest.mark.parametrize("archs, cc, ok", [
    ("80;90", (8, 0), True), ("80;90", (8, 6), True), ("80;90", (8, 9), True), ("80;90", (9, 0), True),
    ("80;90", (10, 0), True), ("80;90", (12, 0), True),  # newer than every built arch: the compute_90 PTX
    ("80;90", (7, 5), False), ("80;90", (6, 1), False),  # below sm_80
    ("90", (8, 0), False), ("90", (8, 6), False), ("90", (9, 0), True), ("90", (10, 0), True),
    ("80;90a", (9, 0), True), ("80;90a", (10, 0), True), ("90a", (9, 0), True), ("90a", (12, 0), True),
])
def test_compute_capability_against_the_built_architectures(monkeypatch, archs, cc, ok):
    monkeypatch.setenv("FASTDPO_CUDA_ARCHS", archs)
    problem = _build.cuda_arch_problem(*cc)
    assert (problem is None) == ok, problem
    if not ok:
        assert f"{cc[0]}.{cc[1]}" in problem and "FASTDPO_CUDA_ARCHS" in problem and archs in problem


@pytest.fixture
def fake_gpu(monkeypatch):
    """A visible GPU of a chosen compute capability, fresh backend caches, no extension loading."""
    cc = {"value": (8, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc["value"])
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "12.8")
    monkeypatch.setattr(_build, "cuda_home", lambda: "/usr/local/cuda")
    loaded = []
    monkeypatch.setattr(_build, "load_extension", lambda which: loaded.append(which) or "/nonexistent/fastdpo_cuda.so")
    for name in ("_resolved", "_reasons"):
        monkeypatch.setattr(_backends, name, {})
    for name in ("_build_failed", "_warned"):
        monkeypatch.setattr(_backends, name, set())
    monkeypatch.delenv("FASTDPO_BACKEND", raising=False)
    return cc, loaded


def test_a_gpu_the_library_cannot_run_on_falls_back_with_one_warning(fake_gpu, monkeypatch):
    cc, loaded = fake_gpu
    monkeypatch.setenv("FASTDPO_CUDA_ARCHS", "90")
    cc["value"] = (8, 6)
    dev = torch.device("cuda")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = [_backends.resolve("auto", dev) for _ in range(3)]
    assert got[0] is not _backends.Backend.CUDA and len(set(got)) == 1
    msgs = [str(x.message) for x in w if "falling back" in str(x.message)]
    assert len(msgs) == 1 and "8.6" in msgs[0] and "sm_90" in msgs[0] and "FASTDPO_CUDA_ARCHS" in msgs[0], msgs
    assert loaded == []  # nothing is built for a GPU it cannot run on
    with pytest.raises(fastdpo.BackendUnavailableError, match=r"(?s)sm_90.*FASTDPO_CUDA_ARCHS"):
        _backends.resolve("cuda", dev)


def test_a_gpu_newer_than_every_built_architecture_uses_the_ptx(fake_gpu, monkeypatch):
    cc, loaded = fake_gpu
    monkeypatch.setenv("FASTDPO_CUDA_ARCHS", "80;90")
    cc["value"] = (12, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backends.resolve("auto", torch.device("cuda")) is _backends.Backend.CUDA
    assert loaded == ["cuda"]


def test_a_gpu_older_than_sm80_is_refused(fake_gpu, monkeypatch):
    cc, _ = fake_gpu
    monkeypatch.setenv("FASTDPO_CUDA_ARCHS", "80;90")
    cc["value"] = (7, 5)
    with pytest.raises(fastdpo.BackendUnavailableError, match=r"(?s)7\.5.*8\.0"):
        _backends.resolve("cuda", torch.device("cuda"))


@needs_toolkit
def test_the_built_library_embeds_ptx_for_the_newest_architecture(monkeypatch):
    """cuobjdump on the .so the suite builds: SASS for sm_80 and sm_90 and PTX for compute_90."""
    from fastdpo.bench import sass

    monkeypatch.setenv("FASTDPO_CUDA_ARCHS", "80;90")
    path = _build.build_extension("cuda")
    ptx = sass.embedded_ptx(path)
    assert ptx and all("sm_90" in p or "compute_90" in p for p in ptx), ptx
    archs = set(sass.resource_usage(path))
    assert {"sm_80", "sm_90"} <= archs, archs
    log = Path(path).parent.parent / (Path(path).parent.name + ".log")
    if log.is_file():  # built in this cache: the PTX target was requested from nvcc
        assert "code=compute_90" in log.read_text()
