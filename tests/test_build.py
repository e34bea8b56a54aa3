"""The JIT build cache: concurrent builders, corrupt entries, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_BUILD_AND_RUN = """
import torch
from fastdpo import _build
_build.load_extension("cpu")
x = torch.randn(1, 2, 9); y = torch.tensor([[1, 2]])
print("logp", torch.ops.fastdpo.logprobs_fwd(x, y, None, -100, 1.0, 0.0, False)[0].sum().item())
"""


def _env(cache: Path | None) -> dict:
    env = dict(os.environ)
    if cache is not None:
        env["FASTDPO_CACHE_DIR"] = str(cache)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_concurrent_builds_leave_one_good_entry_and_corruption_is_rebuilt(tmp_path):
    from fastdpo import _build

    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen([sys.executable, "-c", _BUILD_AND_RUN], env=_env(cache), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "logp" in out
    # exactly one compile happened; the other process waited for it
    assert sum(e.count("fastdpo: built fastdpo_cpu") for _, e in outs) == 1
    entries = [d for d in cache.iterdir() if d.is_dir()]
    assert len(entries) == 1 and not any(".tmp-" in d.name for d in entries)
    spec = _build.EXTENSIONS["cpu"]
    assert _build._entry_ok(entries[0], spec)

    # a truncated library is detected and rebuilt on the next use
    lib = _build._lib_path(entries[0], spec)
    lib.write_bytes(lib.read_bytes()[:1000])
    assert not _build._entry_ok(entries[0], spec)
    p = subprocess.run([sys.executable, "-c", _BUILD_AND_RUN], env=_env(cache), capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr
    assert "fastdpo: built fastdpo_cpu" in p.stderr
    assert _build._entry_ok(entries[0], spec)


def test_failed_build_in_auto_warns_once_and_falls_back(tmp_path):
    code = """
import warnings, torch, fastdpo
from fastdpo import _build
def broken(which):
    raise _build.BuildError("fastdpo: building the fastdpo_cpu extension failed", "/tmp/x.log")
_build.load_extension = broken
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    for _ in range(3):
        lp = fastdpo.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]))
print("warnings", sum("falling back" in str(x.message) for x in w), "log" in str(w[0].message))
print("message:", w[0].message)
try:
    fastdpo.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), backend="cpu")
except fastdpo.BackendUnavailableError as e:
    print("explicit raises", "build log" in str(e))
"""
    p = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "warnings 1 True" in p.stdout
    assert "explicit raises True" in p.stdout
    for words in ("falling back to the next usable backend of cpu/torch", "What this costs",  # what the fallback costs
                  "naive log_softmax + gather", "slower than the native kernel", "backend='cpu'"):
        assert words in p.stdout, p.stdout


def test_cli_info_reports_backends():
    p = subprocess.run([sys.executable, "-m", "fastdpo", "info"], env=_env(None),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    for word in ("torch ", "backends on cpu", "cpu     usable", "auto -> cpu"):
        assert word in p.stdout


def test_bad_cuda_arch_is_a_clear_error(monkeypatch):
    from fastdpo import _build

    monkeypatch.setenv("FASTDPO_CUDA_ARCHS", "80;hopper")
    with pytest.raises(_build.BuildError, match="hopper"):
        _build.cuda_archs()
