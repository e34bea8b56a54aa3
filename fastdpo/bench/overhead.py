"""What the training-dynamics diagnostics cost: the fused-linear DPO step with and without ``diagnostics=True``.

    python -m fastdpo.bench.overhead                 # the README's CPU shape, 15 interleaved pairs of steps
    python -m fastdpo.bench.overhead --device cuda   # on a GPU (the cuda backend)

Both steps are the main job's ``fastdpo-linear-<backend>`` and ``fastdpo-linear-<backend>-diag`` providers
(sigmoid DPO from hidden states and the LM head: policy forward + backward, reference forward), built once
in one process on the same inputs. After the warm-up the steps alternate (ABBA order within each pair of
pairs, so neither always runs second), and the overhead is the median over the pairs of
``time(diagnostics) / time(plain) - 1``. On a shared machine whose speed drifts between runs (separate
processes measured the same step at 1.5 s and 2.0 s minutes apart), pairing adjacent steps keeps the drift
out of the ratio. Results go to ``overhead.json`` and ``output.txt`` in a fresh git-ignored
``bench/runs/<device>-<date>-<time>/``, or ``OUT/<device>/`` with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def measure(case, backend: str, pairs: int, warmup: int) -> dict:
    """Times (ms) of ``pairs`` interleaved plain / diagnostics steps and the median per-pair overhead."""
    from fastdpo.bench.providers import PROVIDERS

    names = {"plain": f"fastdpo-linear-{backend}", "diagnostics": f"fastdpo-linear-{backend}-diag"}
    steps = {k: PROVIDERS[n].build(case) for k, n in names.items()}
    sync = torch.cuda.synchronize if case.device == "cuda" else (lambda: None)

    def timed(k):
        sync()
        t0 = time.perf_counter()
        steps[k]()
        sync()
        return 1e3 * (time.perf_counter() - t0)

    for _ in range(warmup):
        for k in steps:
            timed(k)
    times = {k: [] for k in steps}
    for i in range(pairs):
        order = ("plain", "diagnostics") if i % 2 == 0 else ("diagnostics", "plain")
        for k in order:
            times[k].append(timed(k))
    ratios = [d / p for p, d in zip(times["plain"], times["diagnostics"])]
    return {"providers": names, "times_ms": times, "median_ms": {k: statistics.median(v) for k, v in times.items()},
            "ratios": ratios, "overhead": statistics.median(ratios) - 1.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastdpo.bench.overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backend", default=None, help="fastdpo backend (default: cpu on CPU, cuda on a GPU)")
    ap.add_argument("--shape", default="2048x512x32000", help="NxHxV: tokens (2 x pairs x T), hidden, vocabulary")
    ap.add_argument("--seq", type=int, default=256, help="T, tokens per sequence")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--pairs", type=int, default=15, help="timed pairs of steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps of each kind first")
    ap.add_argument("--out", default=None, help="write into OUT/<device>/ (e.g. bench/results/diagnostics-overhead); "
                    "default: a fresh bench/runs/<device>-<date>-<time>/, not under version control")
    args = ap.parse_args(argv)
    try:
        N, H, V = (int(x) for x in args.shape.lower().split("x"))
    except ValueError:
        ap.error(f"--shape must be NxHxV, e.g. 2048x512x32000; got {args.shape!r}")
    if args.pairs < 1 or args.warmup < 0:
        ap.error("--pairs must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skip: --device cuda needs a CUDA GPU (none visible)")
        return 0

    from fastdpo.bench.__main__ import _output_folder, run_meta, teed_output
    from fastdpo.bench.providers import Case

    backend = args.backend or args.device
    case = Case(N=N, V=V, dtype=args.dtype, mode="fwd+bwd", device=args.device, H=H, T=args.seq)
    meta = run_meta("fastdpo.bench.overhead", list(sys.argv[1:] if argv is None else argv), args.device)
    out = _output_folder(args.out, meta["device"])
    with teed_output(out):
        print(f"fastdpo.bench.overhead on {meta['device']}: {meta['machine']} (torch {meta['torch']}, "
              f"{meta['threads']} threads)\ncommand: {meta['command']}\n{case.label()}, {args.pairs} interleaved "
              f"pairs after {args.warmup} warm-up step(s) of each")
        res = measure(case, backend, args.pairs, args.warmup)
        m = res["median_ms"]
        print(f"plain {m['plain']:.1f} ms, diagnostics=True {m['diagnostics']:.1f} ms (medians); overhead "
              f"{100 * res['overhead']:+.2f}% (median of the per-pair ratios, min {100 * (min(res['ratios']) - 1):+.2f}%"
              f", max {100 * (max(res['ratios']) - 1):+.2f}%)")
        meta["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
        case_d = {"N": N, "H": H, "V": V, "T": args.seq, "dtype": args.dtype, "backend": backend}
        (out / "overhead.json").write_text(json.dumps({"meta": meta, "case": case_d, **res}, indent=1))
        print(f"results: {out / 'overhead.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
