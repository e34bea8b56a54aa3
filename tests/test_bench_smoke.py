"""The benchmark CLI end to end on a tiny shape: table, JSON, plot, skip notes."""

from __future__ import annotations

import json
import subprocess
import sys

import torch


def test_bench_cli_tiny(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "fastdpo.bench", "--shapes", "16x300", "--linear-shapes", "512x16x300", "--kl-shapes",
         "16x300", "--reps", "2", "--warmup", "1", "--providers",
         "fastdpo-cpu,fastdpo-cpu-inplace,fastdpo-triton,naive,floor,fastdpo-linear-cpu,naive-linear,floor-gemm,"
         "fastdpo-cpu-kl,naive-kl,floor-kl",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "== fwd+bwd fp32 N=16 V=300" in out and "== fwd+bwd bf16 N=16 V=300" in out
    for name in ("fastdpo-cpu ", "fastdpo-cpu-inplace", "naive ", "floor "):
        assert name in out
    if fastdpo_triton_unavailable():
        assert "skipped fastdpo-triton:" in out
    [folder] = list(tmp_path.iterdir())
    data = json.loads((folder / "logprobs.json").read_text())
    got = {(r["provider"], r["case"]["dtype"]) for r in data["results"]}
    assert ("fastdpo-cpu", "fp32") in got and ("naive", "bf16") in got
    assert all(r["median_ms"] > 0 for r in data["results"] if r["provider"] != "floor")
    assert all(r["extra_mb"] is not None for r in data["results"])
    assert (folder / "logprobs.png").stat().st_size > 10_000
    assert "== linear fwd+bwd fp32 N=512 H=16 V=300" in out
    lin = json.loads((folder / "linear.json").read_text())
    assert {r["provider"] for r in lin["results"]} == {"fastdpo-linear-cpu", "naive-linear", "floor-gemm"}
    assert all("error" not in r for r in lin["results"])
    assert "== kl fwd+bwd fp32 N=16 V=300" in out and "fastest fastdpo (fastdpo-cpu-kl)" in out
    kl = json.loads((folder / "kl.json").read_text())
    assert {r["provider"] for r in kl["results"]} == {"fastdpo-cpu-kl", "naive-kl", "floor-kl"}
    assert all("error" not in r and r["median_ms"] > 0 for r in kl["results"])
    assert (folder / "kl.png").stat().st_size > 10_000


def fastdpo_triton_unavailable() -> bool:
    from fastdpo import _backends

    return _backends.unavailable_reason(_backends.Backend.TRITON, torch.device("cpu")) is not None
