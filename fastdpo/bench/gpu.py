"""``python -m fastdpo.bench gpu``: the GPU check, in minutes on one H100 or H200.

1. Optionally installs the packages it compares against from a folder of wheels (``--wheels``).
2. Builds the CUDA extension once (cached), then runs the gpu-marked tests (``pytest -m gpu``).
3. Runs the three benchmark suites (token_logprobs from logits, a DPO step from hidden states
   and the LM head, log-probs + token-level KL), bf16, forward + backward, at the README's
   shapes and at Llama-3 (V = 128256, H = 4096), Qwen-2.5 (V = 151936, H = 3584) and Gemma-2
   (V = 256000, H = 3584, soft cap 30) sizes with 8192 tokens, against naive torch,
   ``torch.compile``, TRL, Liger's fused-linear DPO and CCE where installed. Every measurement
   is one (provider, case) in a fresh process (``fastdpo.bench._worker``), jobs in priority
   order (the README's shapes first) while the time budget lasts; what is left out is listed.
4. Writes under ``<out>/<gpu>/`` (at most 8 files): ``logprobs``, ``linear``, ``kl`` ``.json`` and
   ``.png``, ``roofline.md`` (the static roofline of the kernels) and ``gpu_check.json``
   (environment, test outcome, plan, skipped jobs and why).

For logits kernels the tables give % of HBM bandwidth; for the fused linear, time / the GEMM floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from fastdpo.bench.providers import Case

# (name, tokens, vocabulary, soft cap) and, for the fused linear, (name, tokens, hidden, vocabulary).
LOGITS_SHAPES = [("README", 2048, 32000, 0.0), ("Llama-3", 8192, 128256, 0.0), ("Gemma-2", 8192, 256000, 30.0),
                 ("Qwen-2.5", 8192, 151936, 0.0)]
LINEAR_SHAPES = [("README", 2048, 512, 32000), ("Llama-3", 8192, 4096, 128256), ("Gemma-2", 8192, 3584, 256000),
                 ("Qwen-2.5", 8192, 3584, 151936)]
KL_SHAPES = [("README", 1024, 32000, 0.0), ("Llama-3", 8192, 128256, 0.0), ("Gemma-2", 8192, 256000, 30.0)]

# Providers per suite, by tier: every model's first tier runs before any second-tier job, so a
# short budget still covers every shape with fastdpo, the floor and the main anchor.
SUITES = {
    "logprobs": ("token_logprobs (logits in)",
                 [["fastdpo-cuda", "floor", "naive"], ["fastdpo-triton", "trl-selective"], ["naive-compile"]]),
    "linear": ("DPO from hidden states + LM head (policy fwd+bwd, reference fwd)",
               [["fastdpo-linear-cuda", "floor-gemm", "floor-gemm-response", "liger-dpo"],
                ["fastdpo-linear-triton", "trl-chunked", "cce-dpo"], ["naive-linear"]]),
    "kl": ("log-probs + token KL (RRPO, TDPO)", [["fastdpo-cuda-kl", "floor-kl", "naive-kl"], ["fastdpo-triton-kl"], []]),
}
MODELS = ("README", "Llama-3", "Gemma-2", "Qwen-2.5")

# What --wheels installs when its module is missing: (import name, pip name).
COMPARED_PACKAGES = [("trl", "trl"), ("liger_kernel", "liger-kernel"), ("cut_cross_entropy", "cut-cross-entropy")]

# Rough seconds per job on an H100 box, to keep the whole check within its budget: a fresh
# process (imports, CUDA context) ~5 s, random logits made on the CPU in blocks (~5e8 values/s),
# and compilation for the providers that compile (torch.compile, Triton's first launch).
_COMPILE_SECONDS = {"naive-compile": 35.0, "fastdpo-triton": 6.0, "fastdpo-linear-triton": 8.0,
                    "fastdpo-triton-kl": 6.0, "trl-chunked": 5.0, "liger-dpo": 8.0, "cce-dpo": 8.0}
MAX_FILES = 8


@dataclasses.dataclass(frozen=True)
class Job:
    suite: str
    provider: str
    case: Case
    model: str  # which shape family ("README", "Llama-3", ...)
    seconds: float  # estimate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m fastdpo.bench gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="results root, a <gpu>/ folder is made in it (default: a fresh "
                    "bench/runs/<gpu>-<date>-<time>/, not under version control)")
    ap.add_argument("--budget-s", type=float, default=465.0,
                    help="wall-clock budget of the whole check in seconds (default: under 8 minutes)")
    ap.add_argument("--tests-budget-s", type=float, default=180.0, help="time limit of the gpu-marked tests")
    ap.add_argument("--wheels", default=None, help="a folder of wheels (pip download) to install missing "
                    "compared packages from: " + ", ".join(p for _, p in COMPARED_PACKAGES))
    ap.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    ap.add_argument("--skip-bench", action="store_true", help="tests (and the roofline table) only")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    return ap.parse_args(argv)


def plan(args: argparse.Namespace) -> list[Job]:
    """Every benchmark job, in the order they run: tier by tier (SUITES), within a tier model by
    model (the README's shapes first), within a model suite by suite."""
    dev, dt, mode = args.device, args.dtype, "fwd+bwd"
    cases: dict[tuple[str, str], Case] = {}
    for name, N, V, cap in LOGITS_SHAPES:
        cases["logprobs", name] = Case(N, V, dt, mode, dev, softcap=cap)
    for name, N, H, V in LINEAR_SHAPES:
        cases["linear", name] = Case(N, V, dt, mode, dev, H=H)
    for name, N, V, cap in KL_SHAPES:
        cases["kl", name] = Case(N, V, dt, mode, dev, kl=True, softcap=cap)
    jobs = []
    for tier in range(3):
        for model in MODELS:
            for suite, (_, tiers) in SUITES.items():
                if (suite, model) in cases:
                    jobs += [Job(suite, p, cases[suite, model], model, _estimate(p, cases[suite, model])) for p in tiers[tier]]
    return jobs


def _estimate(provider: str, case: Case) -> float:
    values = 0 if case.linear else case.N * case.V * (2 if case.kl else 1)
    return 5.0 + values / 5e8 + _COMPILE_SECONDS.get(provider, 0.0)


def fit_budget(jobs: list[Job], seconds: float) -> tuple[list[Job], list[Job]]:
    """Jobs to run in order while their estimates fit in ``seconds``, and the ones left out."""
    keep, drop, used = [], [], 0.0
    for j in jobs:
        if used + j.seconds <= seconds:
            keep.append(j)
            used += j.seconds
        else:
            drop.append(j)
    return keep, drop


def install_from_wheels(folder: str, runner=subprocess.run) -> list[str]:
    """pip-install each compared package that is not importable from ``folder`` (no index), one at a
    time so that one failing leaves the others; returns what happened, one line per package."""
    notes = []
    for module, pip_name in COMPARED_PACKAGES:
        if importlib.util.find_spec(module) is not None:
            notes.append(f"{pip_name}: already installed")
            continue
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(folder), pip_name]
        p = runner(cmd, capture_output=True, text=True)
        if p.returncode == 0:
            notes.append(f"{pip_name}: installed from {folder}")
        else:
            tail = (p.stderr or p.stdout or "").strip().splitlines()[-1:] or [""]
            notes.append(f"{pip_name}: not installed ({tail[0][:160]}); its providers are skipped")
    importlib.invalidate_caches()
    return notes


def run_tests(seconds: float, root: Path) -> dict:
    """``pytest -m gpu`` over the test suite, within ``seconds``."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(root / "tests")]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, seconds), cwd=root,
                           stdin=subprocess.DEVNULL)
        out = p.stdout + p.stderr
        status = "passed" if p.returncode == 0 else f"failed (exit code {p.returncode})"
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        status = f"timed out after {seconds:.0f}s"
    lines = out.strip().splitlines()
    return {"command": shlex.join(["python", *cmd[1:]]), "status": status, "seconds": round(time.monotonic() - t0, 1),
            "summary": lines[-1] if lines else "", "tail": lines[-30:]}


def hbm_percent(case: Case, ms: float, peak_tbs: float | None) -> float | None:
    """% of HBM bandwidth of a logits-path step: forward reads the logits, backward reads them
    again and writes their gradient (with the KL: both rows read in forward and backward)."""
    if peak_tbs is None or case.linear or not ms:
        return None
    import torch

    from fastdpo.bench.providers import DTYPES

    passes = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[case.mode]
    if case.kl:
        passes = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[case.mode]
    byts = passes * case.N * case.V * torch.finfo(DTYPES[case.dtype]).bits / 8
    return 100.0 * byts / (ms * 1e-3) / (peak_tbs * 1e12)


def annotate(results: list[dict], peak_tbs: float | None) -> list[dict]:
    """Adds ``hbm_pct`` (logits paths) and ``x_floor`` (time / the floor of the same case)."""
    floors = {}
    for r in results:
        if r["provider"] in ("floor", "floor-kl", "floor-gemm") and "median_ms" in r:
            floors[json.dumps(r["case"], sort_keys=True)] = r["median_ms"]
    for r in results:
        if "median_ms" not in r:
            continue
        case = Case(**r["case"])
        r["hbm_pct"] = hbm_percent(case, r["median_ms"], peak_tbs)
        f = floors.get(json.dumps(r["case"], sort_keys=True))
        r["x_floor"] = r["median_ms"] / f if f else None
    return results


def write_results(folder: Path, suites: dict[str, list[dict]], meta: dict, roofline_md: str, summary: dict) -> list[Path]:
    """The check's files in ``folder`` (at most MAX_FILES): per suite JSON (+ PNG where matplotlib
    is installed), roofline.md and gpu_check.json."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, results in suites.items():
        p = folder / f"{name}.json"
        p.write_text(json.dumps({"meta": {**meta, "suite": SUITES[name][0]}, "results": results}, indent=1))
        written.append(p)
        png = _plot(results, folder / f"{name}.png", f"{meta.get('device', '')}: {SUITES[name][0]}")
        if png:
            written.append(png)
    p = folder / "roofline.md"
    p.write_text(roofline_md)
    written.append(p)
    p = folder / "gpu_check.json"
    p.write_text(json.dumps({**summary, "files": [w.name for w in written] + [p.name]}, indent=1))
    written.append(p)
    assert len(written) <= MAX_FILES, written
    return written


def _plot(results: list[dict], path: Path, title: str) -> Path | None:
    """One bar per (case, provider): median time, labelled with % of HBM or x floor."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in results if "median_ms" in r]
    if not ok:
        return None
    cases = list(dict.fromkeys(Case(**r["case"]).label() for r in ok))
    provs = list(dict.fromkeys(r["provider"] for r in ok))
    from fastdpo.bench.providers import PROVIDERS  # one colour and name per implementation, as in every plot
    fig, ax = plt.subplots(figsize=(3 + 2.4 * len(cases), 4.8))
    width = 0.8 / len(provs)
    for i, prov in enumerate(provs):
        labelled = False
        for j, lab in enumerate(cases):
            hit = [r for r in ok if r["provider"] == prov and Case(**r["case"]).label() == lab]
            if not hit:
                continue
            r = hit[0]
            x = j + i * width
            p = PROVIDERS[prov]
            ax.bar(x, r["median_ms"], width, color=p.style.color, hatch=p.style.hatch, edgecolor="0.35",
                   label=None if labelled else p.display)
            labelled = True
            note = f"{r['hbm_pct']:.0f}%" if r.get("hbm_pct") else (f"{r['x_floor']:.2f}x" if r.get("x_floor") else "")
            if note:
                ax.text(x, r["median_ms"], note, ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([c.replace(" N=", "\nN=") for c in cases], fontsize=7)
    ax.set_ylabel("time per step, median (ms, log scale)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "trl", "liger_kernel", "cut_cross_entropy", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001  (absent or without a version: recorded as such)
            env[mod] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jobs = plan(args)
    if args.dry_run:
        keep, _ = fit_budget(jobs, args.budget_s - (0 if args.skip_tests else args.tests_budget_s) - 20)
        print(f"plan: {len(jobs)} benchmark jobs (~{sum(j.seconds for j in jobs):.0f}s if all ran); with "
              f"{args.budget_s:.0f}s in all and the tests taking their {args.tests_budget_s:.0f}s, about "
              f"{len(keep)} run (the others are listed as left out); '+' marks them")
        for j in jobs:
            mark = "+" if j in keep else " "
            print(f" {mark} {j.suite:<9} {j.model:<9} {j.case.label():<46} {j.provider:<22} ~{j.seconds:.0f}s")
        return 0
    import torch

    from fastdpo import _build
    from fastdpo.bench import __main__ as bench
    from fastdpo.bench import roofline

    t0 = time.monotonic()
    if not (args.device.startswith("cuda") and torch.cuda.is_available()):
        print("fastdpo.bench gpu: no CUDA GPU is visible (use --dry-run to see the plan)", file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parents[2]
    dev_name = bench.device_name(args.device)
    out = bench._output_folder(args.out, dev_name)
    notes = install_from_wheels(args.wheels) if args.wheels else []
    for n in notes:
        print("wheels: " + n)
    print(f"fastdpo.bench gpu on {dev_name} (torch {torch.__version__}); results in {out}/")
    try:
        _build.build_extension("cuda")  # once, before anything is timed
    except Exception as e:  # reported; the cuda providers then say why they are skipped
        notes.append(f"CUDA extension: {str(e).splitlines()[0]}")
    tests = {"status": "skipped (--skip-tests)"}
    if not args.skip_tests:
        budget = min(args.tests_budget_s, args.budget_s - (time.monotonic() - t0))
        print(f"\n### gpu-marked tests (limit {budget:.0f}s)")
        tests = run_tests(budget, root)
        print(f"  {tests['status']}: {tests['summary']} ({tests['seconds']}s)")
    ran: dict[str, list[dict]] = {name: [] for name in SUITES}
    skipped: list[str] = []
    if not args.skip_bench:
        from fastdpo.bench.providers import PROVIDERS

        reasons: dict[str, str | None] = {}
        for j in jobs:
            if j.provider not in reasons:
                reasons[j.provider] = PROVIDERS[j.provider].unavailable(args.device)
        runnable = [j for j in jobs if reasons[j.provider] is None]
        skipped += [f"{p}: {r.splitlines()[0]}" for p, r in reasons.items() if r]
        for j in runnable:
            left = args.budget_s - (time.monotonic() - t0) - 20  # 20 s for writing results
            if j.seconds > left:
                skipped.append(f"{j.provider} on {j.case.label()}: time budget")
                continue
            print(f"[{time.monotonic() - t0:5.0f}s] {j.suite:<9} {j.case.label():<46} {j.provider}")
            res = bench._run_one(j.provider, j.case, args.warmup, args.reps)
            ran[j.suite].append({"provider": j.provider, "kind": PROVIDERS[j.provider].kind, "model": j.model,
                                 "case": dataclasses.asdict(j.case), **res})
        peak = bench._hbm_peak(args.device)
        for name, results in ran.items():
            annotate(results, peak)
            cases = list(dict.fromkeys(Case(**r["case"]) for r in results))
            if cases:
                print(f"\n### {SUITES[name][0]}\n" + bench._fmt_table(results, cases))
    try:
        roof = roofline.format_table(roofline.cuda_rows() + roofline.triton_rows()[0])
    except Exception as e:  # the roofline needs cuobjdump; say so instead of failing the check
        roof = f"roofline unavailable: {type(e).__name__}: {e}"
    meta = {"device": dev_name, "command": bench.command_line(["gpu", *(sys.argv[1:] if argv is None else argv)]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), **_environment(args.device)}
    summary = {"meta": meta, "tests": tests, "wheels": notes, "skipped": skipped,
               "jobs": sum(len(v) for v in ran.values()), "seconds": round(time.monotonic() - t0, 1)}
    files = write_results(out, {k: v for k, v in ran.items() if v}, meta, roof + "\n", summary)
    for s in skipped:
        print("skipped " + s)
    print(f"\n{len(files)} files in {out}/ after {time.monotonic() - t0:.0f}s")
    ok = tests.get("status", "").startswith(("passed", "skipped")) and not any(
        "error" in r for v in ran.values() for r in v)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
