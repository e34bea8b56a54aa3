"""``python -m fastdpo.bench``: fastdpo against what users would otherwise run.

Each (provider, case) runs in a fresh process: warm-up (and compilation) first,
then several timed repetitions; the table shows the median with the min-max
spread, the speed-up over naive torch and the ratio to the floor, and the peak
extra memory. Results go to ``<out>/<device>/logprobs.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastdpo.bench.providers import LOGPROB_PROVIDERS, Case

CPU_QUICK = [(2048, 32000)]
# Large vocabularies, scaled down on CPU to about the same number of logits
# (Llama-3 128256, Qwen 152064, Gemma 262144).
CPU_FULL = [(2048, 32000), (512, 128256), (448, 152064), (256, 262144)]
GPU_QUICK = [(8192, 32000), (8192, 128256)]
GPU_FULL = [(8192, 32000), (8192, 128256), (8192, 152064), (8192, 262144)]


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        model = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1]
                    break
        except OSError:
            pass
        name = f"cpu-{model}-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _run_one(provider: str, case: Case, warmup: int, reps: int) -> dict:
    spec = {"provider": provider, "case": dataclasses.asdict(case), "warmup": warmup, "reps": reps}
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(
        [sys.executable, "-m", "fastdpo.bench._worker", json.dumps(spec)],
        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
    )
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"error": f"worker exited with {p.returncode}: {' | '.join(tail)}"}


def _fmt_table(results: list[dict], cases: list[Case]) -> str:
    lines = []
    hdr = f"{'provider':<22}{'median ms':>11}{'min-max ms':>17}{'vs naive':>10}{'vs floor':>10}{'extra MB':>10}"
    for case in cases:
        rows = [r for r in results if r["case"] == dataclasses.asdict(case)]
        lines += ["", f"== {case.label()} ({case.device})", hdr]
        by = {r["provider"]: r for r in rows}
        naive = by.get("naive", {}).get("median_ms")
        floor = by.get("floor", {}).get("median_ms")
        for r in rows:
            if "error" in r:
                lines.append(f"{r['provider']:<22}  error: {r['error'][:90]}")
                continue
            m = r["median_ms"]
            vs_naive = f"{naive / m:.2f}x" if naive else "-"
            vs_floor = f"{m / floor:.2f}" if floor else "-"
            extra = "-" if r.get("extra_mb") is None else f"{r['extra_mb']:.0f}"
            spread = f"{r['min_ms']:.1f}-{r['max_ms']:.1f}"
            lines.append(f"{r['provider']:<22}{m:>11.1f}{spread:>17}{vs_naive:>10}{vs_floor:>10}{extra:>10}")
    return "\n".join(lines)


def _plot(results: list[dict], cases: list[Case], path: Path, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    providers = [p.name for p in LOGPROB_PROVIDERS if any(r["provider"] == p.name and "error" not in r
                                                         for r in results)]
    fig, axes = plt.subplots(1, 2, figsize=(6 + 2.2 * len(cases), 4.8))
    width = 0.8 / max(1, len(providers))
    for ax, key, ylabel in ((axes[0], "median_ms", "time per step, median (ms)"),
                            (axes[1], "extra_mb", "peak extra memory (MB)")):
        for i, prov in enumerate(providers):
            vals = []
            for case in cases:
                hit = [r for r in results if r["provider"] == prov and r["case"] == dataclasses.asdict(case)
                       and "error" not in r]
                vals.append((hit[0].get(key) or 0.0) if hit else 0.0)
            ax.bar([c + i * width for c in range(len(cases))], vals, width, label=prov)
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
        ax.set_xticklabels([c.label().replace(" N=", "\nN=") for c in cases], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("token_logprobs: time (lower is better)")
    axes[1].set_title("memory beyond the inputs (lower is better)")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastdpo.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--full", action="store_true", help="all modes (fwd, bwd, fwd+bwd) and large vocabularies")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--shapes", default=None, help="override the sweep, e.g. '2048x32000,512x128256'")
    ap.add_argument("--providers", default=None, help="comma-separated subset of providers")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="bench/results", help="results root (a <device>/ folder is made in it)")
    args = ap.parse_args(argv)

    gpu = args.device.startswith("cuda")
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    else:
        shapes = (GPU_FULL if args.full else GPU_QUICK) if gpu else (CPU_FULL if args.full else CPU_QUICK)
    modes = ["fwd", "bwd", "fwd+bwd"] if args.full else ["fwd+bwd"]
    cases = [Case(N, V, dt, mode, args.device) for (N, V) in shapes for dt in args.dtypes.split(",") for mode in modes]
    wanted = set(args.providers.split(",")) if args.providers else None

    dev_name = device_name(args.device)
    print(f"fastdpo.bench on {dev_name} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    if not gpu:
        print("CPU sizes are scaled down to fit the machine; large-vocabulary cases keep N*V near 65M logits.")
    print("Each measurement runs in a fresh process: warm-up/compile, then median of "
          f"{args.reps} runs. Timings on a shared machine are noisy: compare within one run.")
    providers, notes = [], []
    for p in LOGPROB_PROVIDERS:
        if wanted is not None and p.name not in wanted:
            continue
        reason = p.unavailable(args.device)
        if reason is None:
            providers.append(p)
        else:
            notes.append(f"skipped {p.name}: {reason.splitlines()[0]}")
    for n in notes:
        print("  " + n)

    jobs = [(p, c) for c in cases for p in providers]
    results, t0 = [], time.monotonic()
    for i, (p, c) in enumerate(jobs, 1):
        msg = f"[{i}/{len(jobs)}] {c.label():<36} {p.name:<22} {time.monotonic() - t0:5.0f}s"
        sys.stdout.write(f"\r{msg}" if sys.stdout.isatty() else f"{msg}\n")
        sys.stdout.flush()
        res = _run_one(p.name, c, args.warmup, args.reps)
        results.append({"provider": p.name, "kind": p.kind, "case": dataclasses.asdict(c), **res})
    if sys.stdout.isatty():
        sys.stdout.write("\n")

    print(_fmt_table(results, cases))
    print("\nvs naive: speed-up over log_softmax().gather() with autograd; vs floor: time / (the logits' "
          "unavoidable reads and writes); extra MB: peak resident memory beyond the inputs.")
    out = Path(args.out) / dev_name
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": dev_name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "command": "python -m fastdpo.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "notes": notes, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / "logprobs.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    problem = _plot(results, cases, out / "logprobs.png", f"{dev_name}, torch {torch.__version__}")
    print(f"\nresults: {out / 'logprobs.json'}")
    print(problem or f"plot:    {out / 'logprobs.png'}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
