"""The CPU-side parts of the GPU check (``python -m fastdpo.bench gpu``): arguments, the plan of
what it runs, the time budget, installing compared packages from wheels, and writing results."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types

import pytest
import torch

from fastdpo.bench import gpu
from fastdpo.bench.providers import PROVIDERS, Case


def test_arguments_and_defaults():
    a = gpu.parse_args([])
    assert a.out is None and a.dtype == "bf16" and a.budget_s < 8 * 60 and a.wheels is None
    a = gpu.parse_args(["--wheels", "/w", "--budget-s", "300", "--skip-tests", "--reps", "3"])
    assert a.wheels == "/w" and a.budget_s == 300 and a.skip_tests and a.reps == 3
    with pytest.raises(SystemExit):
        gpu.parse_args(["--dtype", "int8"])


def test_plan_covers_the_readme_and_model_shapes_with_every_compared_provider():
    jobs = gpu.plan(gpu.parse_args([]))
    by = {(j.suite, j.model): j.case for j in jobs}
    assert (by["logprobs", "README"].N, by["logprobs", "README"].V) == (2048, 32000)
    assert (by["linear", "README"].N, by["linear", "README"].H, by["linear", "README"].V) == (2048, 512, 32000)
    assert (by["kl", "README"].N, by["kl", "README"].V) == (1024, 32000)
    llama = by["linear", "Llama-3"]
    assert (llama.N, llama.H, llama.V) == (8192, 4096, 128256) and llama.N % (2 * llama.T) == 0
    assert by["logprobs", "Qwen-2.5"].V == 151936 and by["linear", "Qwen-2.5"].V == 151936
    gemma = by["logprobs", "Gemma-2"]
    assert (gemma.V, gemma.softcap) == (256000, 30.0) and by["kl", "Gemma-2"].softcap == 30.0
    assert all(j.case.dtype == "bf16" and j.case.mode == "fwd+bwd" and j.case.device == "cuda" for j in jobs)
    provs = {j.provider for j in jobs}
    assert {"naive", "naive-compile", "trl-selective", "trl-chunked", "liger-dpo", "cce-dpo", "fastdpo-cuda",
            "fastdpo-linear-cuda", "fastdpo-cuda-kl", "floor-gemm", "floor"} <= provs
    assert provs <= set(PROVIDERS)
    # every model's first tier runs before any second-tier job
    tier = {p: t for suite in gpu.SUITES.values() for t, ps in enumerate(suite[1]) for p in ps}
    assert [tier[j.provider] for j in jobs] == sorted(tier[j.provider] for j in jobs)
    first = [j for j in jobs if tier[j.provider] == 0]
    assert [j.model for j in first][:3] == ["README"] * 3 and first[-1].model == "Qwen-2.5"
    assert len({(j.suite, j.provider, j.case) for j in jobs}) == len(jobs)


def test_budget_keeps_jobs_in_order_while_they_fit():
    c = Case(8, 16, "bf16", "fwd+bwd", "cuda")
    jobs = [gpu.Job("logprobs", f"p{i}", c, "README", s) for i, s in enumerate([10, 20, 30, 5])]
    keep, drop = gpu.fit_budget(jobs, 36)
    assert [j.provider for j in keep] == ["p0", "p1", "p3"] and [j.provider for j in drop] == ["p2"]
    big = gpu.plan(gpu.parse_args([]))
    keep, drop = gpu.fit_budget(big, 120)
    assert sum(j.seconds for j in keep) <= 120 and drop and len(keep) + len(drop) == len(big)
    pos = [big.index(j) for j in keep]
    assert pos == sorted(pos) and pos[0] == 0


def test_install_from_wheels_runs_pip_offline_for_missing_packages_only(monkeypatch, tmp_path):
    present = {"trl"}
    monkeypatch.setattr(gpu.importlib.util, "find_spec", lambda m: object() if m in present else None)
    calls = []

    def runner(cmd, **kw):
        calls.append(cmd)
        ok = "liger-kernel" in cmd
        return types.SimpleNamespace(returncode=0 if ok else 1, stdout="", stderr="" if ok else "ERROR: No matching "
                                     "distribution found for cut-cross-entropy")

    notes = gpu.install_from_wheels(str(tmp_path), runner)
    assert [c[-1] for c in calls] == ["liger-kernel", "cut-cross-entropy"]
    assert all(c[1:5] == ["-m", "pip", "install", "--no-index"] and str(tmp_path) in c for c in calls)
    assert notes[0] == "trl: already installed" and "installed from" in notes[1]
    assert "not installed (ERROR: No matching distribution" in notes[2] and "skipped" in notes[2]


def _result(provider, case, ms, kind="fastdpo"):
    return {"provider": provider, "kind": kind, "model": "README", "case": dataclasses.asdict(case), "median_ms": ms,
            "min_ms": ms, "max_ms": ms, "times_ms": [ms], "extra_mb": 1.0}


def test_annotate_gives_percent_of_hbm_and_times_the_floor():
    c = Case(1000, 1000, "bf16", "fwd+bwd", "cuda")
    k = Case(1000, 1000, "bf16", "fwd+bwd", "cuda", kl=True)
    lin = Case(512, 1000, "bf16", "fwd+bwd", "cuda", H=64)
    res = gpu.annotate([_result("fastdpo-cuda", c, 1.0), _result("floor", c, 0.5, "floor"),
                        _result("fastdpo-cuda-kl", k, 2.0), _result("fastdpo-linear-cuda", lin, 3.0),
                        _result("floor-gemm", lin, 2.0, "floor")], peak_tbs=3.35)
    # 3 passes of 1e6 bf16 values in 1 ms: 6 GB/s... as a share of 3.35 TB/s
    assert res[0]["hbm_pct"] == pytest.approx(100 * 3 * 1e6 * 2 / 1e-3 / 3.35e12)
    assert res[0]["x_floor"] == pytest.approx(2.0)
    assert res[2]["hbm_pct"] == pytest.approx(100 * 5 * 1e6 * 2 / 2e-3 / 3.35e12)
    assert res[3]["hbm_pct"] is None and res[3]["x_floor"] == pytest.approx(1.5)
    assert gpu.annotate([_result("naive", c, 1.0)], None)[0]["hbm_pct"] is None


def test_results_are_written_in_at_most_eight_files(tmp_path):
    c = Case(64, 300, "bf16", "fwd+bwd", "cuda", softcap=30.0)
    lin = Case(512, 300, "bf16", "fwd+bwd", "cuda", H=16)
    k = Case(64, 300, "bf16", "fwd+bwd", "cuda", kl=True)
    suites = {"logprobs": gpu.annotate([_result("fastdpo-cuda", c, 1.0), _result("naive", c, 3.0, "anchor")], 3.35),
              "linear": gpu.annotate([_result("fastdpo-linear-cuda", lin, 2.0), _result("floor-gemm", lin, 1.8)], None),
              "kl": [_result("fastdpo-cuda-kl", k, 1.0), {"provider": "naive-kl", "kind": "anchor",
                                                          "case": dataclasses.asdict(k), "error": "OOM"}]}
    meta = {"device": "nvidia-h100-80gb-hbm3", "command": "python -m fastdpo.bench gpu"}
    summary = {"meta": meta, "tests": {"status": "passed"}, "skipped": ["trl-chunked: trl is not installed"]}
    files = gpu.write_results(tmp_path / "nvidia-h100", suites, meta, "| table |\n", summary)
    names = sorted(f.name for f in files)
    assert len(files) <= gpu.MAX_FILES
    assert {"logprobs.json", "linear.json", "kl.json", "roofline.md", "gpu_check.json"} <= set(names)
    data = json.loads((tmp_path / "nvidia-h100" / "logprobs.json").read_text())
    assert data["meta"]["device"] == "nvidia-h100-80gb-hbm3" and data["results"][0]["hbm_pct"] > 0
    assert Case(**data["results"][0]["case"]).softcap == 30.0
    check = json.loads((tmp_path / "nvidia-h100" / "gpu_check.json").read_text())
    assert check["skipped"] == summary["skipped"] and sorted(check["files"]) == names
    assert (tmp_path / "nvidia-h100" / "roofline.md").read_text() == "| table |\n"
    pytest.importorskip("matplotlib")
    assert (tmp_path / "nvidia-h100" / "logprobs.png").stat().st_size > 5000


def test_dry_run_prints_the_plan_without_a_gpu():
    p = subprocess.run([sys.executable, "-m", "fastdpo.bench", "gpu", "--dry-run"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert "benchmark jobs" in p.stdout and "V=256000 cap=30" in p.stdout and "H=4096 V=128256" in p.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the whole check")
def test_without_a_gpu_the_check_says_so():
    p = subprocess.run([sys.executable, "-m", "fastdpo.bench", "gpu"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "no CUDA GPU is visible" in p.stderr


def test_soft_capped_cases_run_through_the_providers():
    """The soft cap reaches fastdpo as its option and the other providers as capped logits."""
    from fastdpo.bench import _worker

    case = Case(16, 300, "fp32", "fwd+bwd", "cpu", softcap=5.0)
    for name in ("fastdpo-cpu", "naive"):
        out = _worker.run({"provider": name, "case": dataclasses.asdict(case), "warmup": 0, "reps": 1})
        assert out["median_ms"] > 0
    x = torch.randn(4, 50) * 20
    y = torch.randint(0, 50, (4,))
    import fastdpo
    from fastdpo.bench import providers

    naive = providers._softcapped(providers._naive, 5.0)(x, y)
    ours = providers._softcapped(providers._fastdpo("cpu", "cpu"), 5.0)(x, y)
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, fastdpo.token_logprobs(x, y, softcap=5.0), atol=0, rtol=0)
    assert providers._softcapped(providers._naive, 0.0) is providers._naive
