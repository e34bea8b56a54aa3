"""The benchmark CLI end to end on a tiny shape, run as a new user runs it in a fresh checkout: table, JSON,
plots, skip notes, a fresh output folder outside version control (the checkout stays clean), and the
recorded command pastes back into a shell."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastdpo
from fastdpo.bench import __main__ as bench

ROOT = Path(fastdpo.__file__).resolve().parents[1]


def _git(repo, *args) -> str:
    p = subprocess.run(["git", "-C", str(repo), "-c", "user.name=fastdpo", "-c", "user.email=fastdpo@localhost",
                        *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _fresh_checkout(tmp_path) -> Path:
    """This checkout's files (tracked and untracked, minus the ignored ones) committed to a new repository."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    repo = tmp_path / "checkout"
    for rel in _git(ROOT, "ls-files", "-co", "--exclude-standard", "-z").split("\0"):
        if rel and (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "snapshot")
    return repo


def test_main_job_writes_a_fresh_folder_and_leaves_the_checkout_clean(tmp_path):
    repo = _fresh_checkout(tmp_path)
    args = ["--shapes", "16x300", "--linear-shapes", "512x16x300", "--kl-shapes", "16x300", "--reps", "2",
            "--warmup", "1", "--providers",
            "fastdpo-cpu,fastdpo-cpu-inplace,fastdpo-triton,fastdpo-torch,naive,floor,fastdpo-linear-cpu,naive-linear,"
            "floor-gemm,fastdpo-cpu-kl,naive-kl,floor-kl"]
    env = dict(os.environ, PYTHONPATH=str(repo))
    p = subprocess.run([sys.executable, "-m", "fastdpo.bench", *args], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert _git(repo, "status", "--porcelain") == ""  # nothing committed changed, nothing new outside bench/runs
    m = re.search(r"^results folder: (bench/runs/(\S+))/$", out, re.M)
    assert m, out
    folder = repo / m.group(1)
    assert folder.parent == repo / "bench" / "runs" and m.group(2).startswith(bench.device_name("cpu") + "-")
    assert f"all results in {m.group(1)}/" in out

    assert "== fwd+bwd fp32 N=16 V=300" in out and "== fwd+bwd bf16 N=16 V=300" in out
    for name in ("fastdpo-cpu ", "fastdpo-cpu-inplace", "fastdpo-torch ", "naive ", "floor "):
        assert name in out
    if fastdpo_triton_unavailable():
        assert "skipped fastdpo-triton:" in out
    data = json.loads((folder / "logprobs.json").read_text())
    assert data["meta"]["command"] == bench.command_line(args)
    assert shlex.split(data["meta"]["command"])[3:] == args
    for key in ("machine", "torch", "threads", "fastdpo", "revision", "date"):
        assert data["meta"][key], key
    got = {(r["provider"], r["case"]["dtype"]) for r in data["results"]}
    assert ("fastdpo-cpu", "fp32") in got and ("naive", "bf16") in got
    assert {r["kind"] for r in data["results"] if r["provider"] == "fastdpo-torch"} == {"reference"}
    assert all(r["median_ms"] > 0 for r in data["results"] if r["provider"] != "floor")
    assert all(r["extra_mb"] is not None for r in data["results"])
    assert "fastest fastdpo (fastdpo-cpu" in out  # the torch reference is never "the fastest fastdpo"
    assert "== linear fwd+bwd fp32 N=512 H=16 V=300" in out
    lin = json.loads((folder / "linear.json").read_text())
    assert {r["provider"] for r in lin["results"]} == {"fastdpo-linear-cpu", "naive-linear", "floor-gemm"}
    assert all("error" not in r for r in lin["results"])
    assert "== kl fwd+bwd fp32 N=16 V=300" in out and "fastest fastdpo (fastdpo-cpu-kl)" in out
    kl = json.loads((folder / "kl.json").read_text())
    assert {r["provider"] for r in kl["results"]} == {"fastdpo-cpu-kl", "naive-kl", "floor-kl"}
    assert all("error" not in r and r["median_ms"] > 0 for r in kl["results"])
    for name in ("logprobs", "linear", "kl"):
        assert (folder / f"{name}.png").stat().st_size > 10_000
    assert (folder / "output.txt").read_text().count("== ") == out.count("== ")


def test_out_writes_into_a_device_folder(tmp_path):
    folder = bench._output_folder(str(tmp_path / "set"), "cpu-x")
    assert folder == tmp_path / "set" / "cpu-x" and folder.is_dir()


def test_recorded_command_keeps_empty_and_spaced_arguments():
    argv = ["--shapes", "", "--linear-shapes", "2048x512x32000", "--out", "a folder/x", "--providers", "a;b"]
    cmd = bench.command_line(argv)
    assert cmd == "python -m fastdpo.bench --shapes '' --linear-shapes 2048x512x32000 --out 'a folder/x' " \
                  "--providers 'a;b'"
    assert shlex.split(cmd)[3:] == argv


def test_every_provider_has_one_style_shared_across_suites():
    from fastdpo.bench.providers import KL_PROVIDERS, LINEAR_PROVIDERS, LOGPROB_PROVIDERS, PROVIDERS, STYLES

    colors = [s.color for s in STYLES.values()]
    assert len(set(colors)) == len(colors)  # one colour, one implementation
    for p in PROVIDERS.values():
        assert p.style in STYLES.values() and p.display
    impl = {p.name: p.impl or p.name for p in PROVIDERS.values()}
    assert impl["fastdpo-linear-cpu"] == impl["fastdpo-cpu-kl"] == impl["fastdpo-cpu"]
    assert impl["naive-linear"] == impl["naive-kl"] == impl["naive"]
    refs = [p for p in LOGPROB_PROVIDERS + LINEAR_PROVIDERS + KL_PROVIDERS if p.kind == "reference"]
    assert {p.name for p in refs} == {"fastdpo-torch", "fastdpo-torch-kl"}
    assert all("reference" in p.display and p.style.hatch for p in refs)


def fastdpo_triton_unavailable() -> bool:
    from fastdpo import _backends

    return _backends.unavailable_reason(_backends.Backend.TRITON, torch.device("cpu")) is not None


def test_diagnostics_overhead_pairs_the_steps_and_records_the_command(tmp_path):
    """python -m fastdpo.bench.overhead: interleaved pairs of the plain and the diagnostics step, the median of
    their per-pair ratios as the overhead, written with the command that made it."""
    args = ["--shape", "64x16x300", "--seq", "8", "--pairs", "3", "--warmup", "0", "--out", str(tmp_path / "o")]
    p = subprocess.run([sys.executable, "-m", "fastdpo.bench.overhead", *args], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    [path] = (tmp_path / "o").glob("*/overhead.json")
    data = json.loads(path.read_text())
    assert shlex.split(data["meta"]["command"]) == ["python", "-m", "fastdpo.bench.overhead", *args]
    t = data["times_ms"]
    assert len(t["plain"]) == len(t["diagnostics"]) == len(data["ratios"]) == 3
    assert data["ratios"] == pytest.approx([d / q for q, d in zip(t["plain"], t["diagnostics"])])
    assert data["overhead"] == pytest.approx(sorted(data["ratios"])[1] - 1)
    assert data["case"] == {"N": 64, "H": 16, "V": 300, "T": 8, "dtype": "fp32", "backend": "cpu"}
    assert (path.parent / "output.txt").read_text().count("overhead") >= 1
    bad = subprocess.run([sys.executable, "-m", "fastdpo.bench.overhead", "--shape", "64x16"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "--shape must be NxHxV" in bad.stderr
