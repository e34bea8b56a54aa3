"""``python -m fastdpo.bench``: fastdpo against what users would otherwise run.

Each (provider, case) runs in a fresh process: warm-up (and compilation) first,
then several timed repetitions; the table shows the median with the min-max
spread, the speed-up over naive torch and the ratio to the floor, and the peak
extra memory. Results (``logprobs``, ``linear``, ``kl``: ``.json`` with every
measurement and the command, ``.png`` plots, ``output.txt``) go to a fresh folder
``bench/runs/<device>-<date>-<time>/`` (not under version control), or with
``--out DIR`` to ``DIR/<device>/`` (how the committed ``bench/results/`` are made).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastdpo._version import __version__
from fastdpo.bench.plot import plot_suite
from fastdpo.bench.providers import DTYPES, KL_PROVIDERS, LINEAR_PROVIDERS, LOGPROB_PROVIDERS, Case

CPU_QUICK = [(2048, 32000)]
# Large vocabularies, scaled down on CPU to about the same number of logits
# (Llama-3 128256, Qwen 152064, Gemma 262144).
CPU_FULL = [(2048, 32000), (512, 128256), (448, 152064), (256, 262144)]
GPU_QUICK = [(8192, 32000), (8192, 128256)]
GPU_FULL = [(8192, 32000), (8192, 128256), (8192, 152064), (8192, 262144)]
# Fused linear (N tokens = 2 * pairs * T, H, V): 4 pairs of 256 tokens with H = 512.
# CPU GEMMs are slow (and bf16 ones much slower without native bf16 units), so the
# default CPU sweep is fp32 only; --full adds bf16 and a smaller point.
CPU_LINEAR = [(2048, 512, 32000)]
CPU_LINEAR_FULL = [(512, 256, 32000), (2048, 512, 32000)]
GPU_LINEAR = [(8192, 4096, 128256)]
GPU_LINEAR_FULL = [(8192, 4096, 128256), (8192, 4096, 152064), (8192, 3584, 262144)]
# Token-level KL (policy and reference logits: twice the logits of a token_logprobs case).
CPU_KL = [(1024, 32000)]
GPU_KL = [(8192, 128256)]

# Peak HBM bandwidth (TB/s) by device name, for the "% of peak" column.
HBM_PEAK_TBS = {"h200": 4.8, "h100 nvl": 3.9, "h100 pcie": 2.0, "h100": 3.35, "a100-sxm4-80gb": 2.04,
                "a100 80gb pcie": 1.94, "a100": 1.55, "l40s": 0.864, "a10g": 0.6}


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


def machine_description(device: str) -> str:
    """The machine in words: the accelerator, or the CPU model, its logical CPUs and memory."""
    cpu, mem = platform.processor() or platform.machine(), None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 2**20
                break
    except OSError:
        pass
    host = f"{cpu}, {os.cpu_count()} logical CPUs" + (f", {mem:.0f} GiB RAM" if mem else "")
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB); host: {host}"
    return host


def _source_revision() -> str | None:
    """The git commit of the fastdpo sources being measured (``+`` when they have local changes), if any."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=30)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                "fastdpo", "csrc"], capture_output=True, text=True, timeout=30)
        return rev.stdout.strip() + ("+" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def command_line(argv: list[str], module: str = "fastdpo.bench") -> str:
    """The command that reproduces this run, quoted so that it can be pasted into a shell."""
    return shlex.join(["python", "-m", module, *argv])


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


def _hbm_peak(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device)).lower()
    for key, tbs in HBM_PEAK_TBS.items():
        if key in name:
            return tbs
    return None


def _throughput(case: Case, ms: float) -> str:
    """GPU only: GB/s and % of HBM peak for the logits path (fwd: 1 read, bwd: 1 read +
    1 write, fwd+bwd: 2 reads + 1 write of the logits); TFLOP/s for fused linear."""
    if not case.device.startswith("cuda"):
        return ""
    if case.linear:
        gemms = {"fwd": 2, "bwd": 2, "fwd+bwd": 4}[case.mode]
        return f"{gemms * 2 * case.N * case.H * case.V / (ms * 1e-3) / 1e12:8.1f} TFLOP/s"
    passes = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[case.mode]
    if case.kl:  # policy and reference read in the forward, both again in backward
        passes = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[case.mode]
    gbs = passes * case.N * case.V * torch.finfo(DTYPES[case.dtype]).bits / 8 / (ms * 1e-3) / 1e9
    peak = _hbm_peak(case.device)
    return f"{gbs:8.0f} GB/s" + (f" {100 * gbs / (peak * 1e3):4.0f}% of peak" if peak else "")


def _fmt_table(results: list[dict], cases: list[Case]) -> str:
    lines = []
    hdr = f"{'provider':<22}{'median ms':>11}{'min-max ms':>17}{'vs naive':>10}{'vs floor':>10}{'extra MB':>10}"
    for case in cases:
        rows = [r for r in results if r["case"] == dataclasses.asdict(case)]
        lines += ["", f"== {case.label()} ({case.device})", hdr]
        by = {r["provider"]: r for r in rows}
        naive = (by.get("naive") or by.get("naive-linear") or by.get("naive-kl") or {}).get("median_ms")
        floor = (by.get("floor") or by.get("floor-gemm") or by.get("floor-kl") or {}).get("median_ms")
        for r in rows:
            if "error" in r:
                lines.append(f"{r['provider']:<22}  error: {r['error'][:90]}")
                continue
            m = r["median_ms"]
            vs_naive = f"{naive / m:.2f}x" if naive else "-"
            vs_floor = f"{m / floor:.2f}" if floor else "-"
            extra = "-" if r.get("extra_mb") is None else f"{r['extra_mb']:.0f}"
            spread = f"{r['min_ms']:.1f}-{r['max_ms']:.1f}"
            lines.append(f"{r['provider']:<22}{m:>11.1f}{spread:>17}{vs_naive:>10}{vs_floor:>10}{extra:>10}"
                         f"  {_throughput(case, m)}".rstrip())
        ok = [r for r in rows if "error" not in r]
        ours = [r for r in ok if r["kind"] == "fastdpo"]
        anchors = [r for r in ok if r["kind"] == "anchor"]
        if ours and anchors:
            best = min(ours, key=lambda r: r["median_ms"])
            ratios = ", ".join(f"{a['median_ms'] / best['median_ms']:.2f}x vs {a['provider']}" for a in anchors)
            lines.append(f"fastest fastdpo ({best['provider']}): {ratios}")
            resp = by.get("floor-gemm-response")
            if resp and "error" not in resp:
                lines.append(f"  ... {best['median_ms'] / resp['median_ms']:.2f}x the GEMMs over the response tokens "
                             "only (floor-gemm-response)")
    return "\n".join(lines)


def _available(family, wanted, device):
    providers, notes = [], []
    for p in family:
        if wanted is not None and p.name not in wanted:
            continue
        reason = p.unavailable(device)
        if reason is None:
            providers.append(p)
        else:
            notes.append(f"skipped {p.name}: {reason.splitlines()[0]}")
    return providers, notes


def _run_suite(name, what, family, cases, args, dev_name, out: Path, meta: dict) -> bool:
    wanted = set(args.providers.split(",")) if args.providers else None
    providers, notes = _available(family, wanted, args.device)
    jobs = [(p, c) for c in cases for p in providers]
    if not jobs:
        return True
    print(f"\n### {what}")
    for n in notes:
        print("  " + n)
    results, t0 = [], time.monotonic()
    for i, (p, c) in enumerate(jobs, 1):
        msg = f"[{i}/{len(jobs)}] {c.label():<44} {p.name:<22} {time.monotonic() - t0:5.0f}s elapsed"
        sys.stdout.write(f"\r{msg}" if sys.stdout.isatty() else f"{msg}\n")
        sys.stdout.flush()
        res = _run_one(p.name, c, args.warmup, args.reps)
        results.append({"provider": p.name, "kind": p.kind, "case": dataclasses.asdict(c), **res})
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    print(_fmt_table(results, cases))
    meta = {**meta, "suite": name, "notes": notes, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    problem = plot_suite(results, cases, family, out / f"{name}.png",
                         f"{what}\n{meta['machine']}, torch {meta['torch']}, {meta['threads']} threads")
    print(f"results: {out / (name + '.json')}")
    print(problem or f"plot:    {out / (name + '.png')}")
    return not any("error" in r for r in results)


def run_meta(module: str, argv: list[str], device: str, machine_device: str | None = None) -> dict:
    """What a benchmark run records about itself: device folder name, machine, versions, revision and the
    command that reproduces it (``python -m <module> <argv>``, shell-quoted); ``machine_device`` names the
    device the machine description is for (default: ``device``)."""
    return {"device": device_name(device), "machine": machine_description(machine_device or device),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "fastdpo": __version__, "revision": _source_revision(),
            "command": command_line(argv, module)}


@contextlib.contextmanager
def teed_output(out: Path):
    """stdout also written to ``out/output.txt`` while the block runs."""
    stdout, tee = sys.stdout, _Tee(sys.stdout, out / "output.txt")
    sys.stdout = tee
    try:
        yield
    finally:
        sys.stdout = stdout
        tee.close()


class _Tee:
    """stdout, also recorded in ``output.txt`` (without the carriage-return progress line of a terminal)."""

    def __init__(self, stream, path: Path):
        self.stream, self.file = stream, open(path, "w")

    def write(self, text: str) -> int:
        self.stream.write(text)
        if not text.startswith("\r"):
            self.file.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def close(self) -> None:
        self.file.close()


def _output_folder(out: str | None, dev_name: str) -> Path:
    if out is not None:
        folder = Path(out) / dev_name
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for k in range(100):
        folder = Path("bench") / "runs" / (f"{dev_name}-{stamp}" + (f"-{k}" if k else ""))
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"fastdpo.bench: cannot make a fresh folder for {dev_name}-{stamp} in bench/runs")


def main(argv: list[str] | None = None) -> int:
    sub = sys.argv[1:] if argv is None else argv
    if sub and sub[0] in ("roofline", "gpu"):  # python -m fastdpo.bench roofline|gpu ...
        import importlib

        return importlib.import_module(f"fastdpo.bench.{sub[0]}").main(sub[1:])
    ap = argparse.ArgumentParser(prog="python -m fastdpo.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--full", action="store_true", help="all modes (fwd, bwd, fwd+bwd) and large vocabularies")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--linear-dtypes", default=None, help="fused-linear dtypes (default: fp32 on a CPU quick sweep, "
                    "else --dtypes)")
    ap.add_argument("--shapes", default=None, help="token_logprobs shapes NxV, e.g. '2048x32000,512x128256'")
    ap.add_argument("--linear-shapes", default=None, help="fused-linear shapes NxHxV ('' to skip), e.g. '2048x512x32000'")
    ap.add_argument("--kl-shapes", default=None, help="token-level KL shapes NxV ('' to skip), e.g. '1024x32000'")
    ap.add_argument("--providers", default=None, help="comma-separated subset of providers")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None,
                    help="write into OUT/<device>/ (e.g. bench/results/<set> to refresh the committed results); "
                         "default: a fresh bench/runs/<device>-<date>-<time>/, not under version control")
    args = ap.parse_args(argv)

    gpu = args.device.startswith("cuda")
    parse = lambda text: [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]  # noqa: E731
    if args.shapes is not None:
        shapes = parse(args.shapes)
    else:
        shapes = (GPU_FULL if args.full else GPU_QUICK) if gpu else (CPU_FULL if args.full else CPU_QUICK)
    if args.linear_shapes is not None:
        lshapes = parse(args.linear_shapes)
    else:
        lshapes = (GPU_LINEAR_FULL if args.full else GPU_LINEAR) if gpu else (CPU_LINEAR_FULL if args.full else CPU_LINEAR)
    modes = ["fwd", "bwd", "fwd+bwd"] if args.full else ["fwd+bwd"]
    dtypes = args.dtypes.split(",")
    cases = [Case(N, V, dt, m, args.device) for (N, V) in shapes for dt in dtypes for m in modes]
    ldtypes = (args.linear_dtypes or ("fp32" if not gpu and not args.full else args.dtypes)).split(",")
    lcases = [Case(N, V, dt, m, args.device, H=H) for (N, H, V) in lshapes for dt in ldtypes for m in modes]
    kshapes = parse(args.kl_shapes) if args.kl_shapes is not None else (GPU_KL if gpu else CPU_KL)
    kcases = [Case(N, V, dt, m, args.device, kl=True) for (N, V) in kshapes for dt in dtypes for m in modes]

    dev_name = device_name(args.device)
    out = _output_folder(args.out, dev_name)
    with teed_output(out):
        ok = _sweep(args, argv, gpu, dev_name, out, cases, lcases, kcases)
    print(f"\nall results in {out}/")
    return 0 if ok else 1


def _sweep(args, argv, gpu, dev_name, out, cases, lcases, kcases) -> bool:
    argv = list(sys.argv[1:] if argv is None else argv)
    meta = run_meta("fastdpo.bench", argv, args.device)
    print(f"fastdpo.bench on {dev_name}: {meta['machine']} (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    print(f"command: {meta['command']}")
    print(f"results folder: {out}/")
    if not gpu:
        print("CPU sizes are scaled down to fit the machine; large-vocabulary cases keep N*V near 65M logits.")
    print("Each measurement runs in a fresh process: warm-up/compile, then median of "
          f"{args.reps} runs. Timings on a shared machine are noisy: compare within one run.")
    ok = _run_suite("logprobs", "token_logprobs (logits in)", LOGPROB_PROVIDERS, cases, args, dev_name, out, meta)
    ok &= _run_suite("linear", "DPO from hidden states + LM head (policy fwd+bwd, reference fwd)", LINEAR_PROVIDERS,
                     lcases, args, dev_name, out, meta)
    ok &= _run_suite("kl", "log-probs + token KL (RRPO, TDPO)", KL_PROVIDERS, kcases,
                     args, dev_name, out, meta)
    print("\nvs naive: speed-up over plain torch with autograd (log_softmax().gather(); for fused linear the full "
          "logits); vs floor: time / the unavoidable work (logits path: reading the logits and writing their "
          "gradient; fused linear: the 4 GEMMs over every token, as the naive version does them; "
          "floor-gemm-response: the same over the non-ignored tokens only, which fastdpo restricts itself to; "
          "token-level KL: reading policy and reference logits twice and writing the gradient); "
          "extra MB: peak memory beyond the inputs.")
    return ok


if __name__ == "__main__":
    sys.exit(main())
