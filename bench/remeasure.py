"""Re-measure every figure README.md and docs/ quote, on this machine, and render them in.

    python bench/remeasure.py                       # everything (about an hour on a 2-core CPU)
    python bench/remeasure.py --reps 1 --warmup 0   # a quicker check of the pipeline (noisier figures)
    python bench/remeasure.py --steps main,render   # some steps only (the others keep their last results)

Run it from the checkout root on a quiet machine (nothing else running). Steps, in order:

- ``tests``: the test suite, ``python -m pytest -q`` (timed only; first, while the committed results, their
  timings and the README still agree);
- ``build-cpu``, ``build-cuda``: ``python -m fastdpo build cpu|cuda`` into an empty cache (first-use compile time);
- ``bench-quick``: the quick pytest-benchmark set, ``python -m pytest bench/ --benchmark-only`` (timed only);
- ``main``: the main job, ``python -m fastdpo.bench --out bench/results/main`` (logits-in, fused-linear fp32 and
  token-KL tables);
- ``linear-bf16``: the bf16 fused-linear step (one timed step each: the bf16 anchors take minutes per step on CPU);
- ``packed``: packed vs padded batches, ``python -m fastdpo.bench.packed --reps 5 --out bench/results/packed``
  (loss level and a tiny Llama end to end);
- ``diagnostics``: the fused-linear fp32 step with and without ``diagnostics=True`` in interleaved pairs
  (``python -m fastdpo.bench.overhead --out bench/results/diagnostics-overhead``), the overhead the README and
  docs/diagnostics.md quote;
- ``render``: ``python bench/readme_figures.py`` fills the figures of README.md and docs/ in from the files above.

Each measured step's command (quoted with ``shlex.join``, as it can be pasted back), wall time and exit
status go to ``bench/results/timings.json``; the benchmark JSON files record their own command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LINEAR_SHAPE = "2048x512x32000"


def steps(warmup: int | None = None, reps: int | None = None) -> dict[str, list[str]]:
    """Each step's command; ``warmup`` / ``reps`` (when given) replace the main and packed
    steps' own."""
    def counts(default_warmup: int | None, default_reps: int | None) -> list[str]:
        w, r = default_warmup if warmup is None else warmup, default_reps if reps is None else reps
        return ([] if w is None else ["--warmup", str(w)]) + ([] if r is None else ["--reps", str(r)])

    # The tests run first: they check the README against the committed results and timings, which every
    # later step replaces (the build steps' timings included).
    return {
        "tests": ["python", "-m", "pytest", "-q"],
        "build-cpu": ["python", "-m", "fastdpo", "build", "cpu"],
        "build-cuda": ["python", "-m", "fastdpo", "build", "cuda"],
        "bench-quick": ["python", "-m", "pytest", "bench/", "--benchmark-only", "-q"],
        "main": ["python", "-m", "fastdpo.bench", *counts(None, None), "--out", "bench/results/main"],
        "linear-bf16": ["python", "-m", "fastdpo.bench", "--shapes", "", "--kl-shapes", "", "--linear-shapes",
                        LINEAR_SHAPE, "--linear-dtypes", "bf16", "--warmup", "0", "--reps", "1", "--out",
                        "bench/results/fused-linear-bf16"],
        "packed": ["python", "-m", "fastdpo.bench.packed", *counts(None, 5), "--out", "bench/results/packed"],
        "diagnostics": ["python", "-m", "fastdpo.bench.overhead", "--out", "bench/results/diagnostics-overhead"],
    }


# The result sets a step replaces (removed first, so that one device folder remains).
REPLACES = {"main": RESULTS / "main", "linear-bf16": RESULTS / "fused-linear-bf16", "packed": RESULTS / "packed",
            "diagnostics": RESULTS / "diagnostics-overhead"}


def _run(name: str, cmd: list[str], env: dict) -> dict:
    print(f"\n=== {name}: {shlex.join(cmd)}", flush=True)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, *cmd[1:]] if cmd[0] == "python" else cmd, cwd=ROOT, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.monotonic() - t0
    log = ROOT / "bench" / "runs" / "remeasure" / f"{name}.log"  # git-ignored
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(p.stdout)
    sys.stdout.write(p.stdout[-4000:])
    print(f"=== {name}: exit {p.returncode} after {seconds:.0f} s (full output: {log.relative_to(ROOT)})", flush=True)
    return {"command": shlex.join(cmd), "seconds": round(seconds, 1), "returncode": p.returncode,
            "skipped": p.stdout.lstrip().startswith("skip")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions of the main and packed "
                    "steps (default: the main job's own, 5 for the packed one)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up runs of the main and packed steps "
                    "(default: their own)")
    ap.add_argument("--steps", default=None, help="comma-separated subset of: " + ", ".join([*steps(), "render"]))
    args = ap.parse_args(argv)
    plan = steps(args.warmup, args.reps)
    asked = list(plan) + ["render"] if args.steps is None else args.steps.split(",")
    unknown = set(asked) - set(plan) - {"render"}
    if unknown:
        ap.error(f"unknown steps {sorted(unknown)}")
    wanted = [name for name in [*plan, "render"] if name in asked]  # always in the order above

    sys.path.insert(0, str(ROOT))
    import torch

    from fastdpo import _version
    from fastdpo.bench.__main__ import _source_revision, device_name, machine_description

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = RESULTS / "timings.json"
    old = json.loads(path.read_text()) if path.is_file() else {"steps": {}}
    meta = {"device": device_name(device), "machine": machine_description(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "fastdpo": _version.__version__, "revision": _source_revision(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": shlex.join(["python", "bench/remeasure.py",
                                                                               *(argv or sys.argv[1:])])}
    timings = {"meta": meta, "steps": dict(old.get("steps", {}))}
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    failed = []
    for name in wanted:
        if name == "render":
            continue
        step_env = dict(env)
        cache = None
        if name.startswith("build-"):
            cache = tempfile.mkdtemp(prefix="fastdpo-build-")  # an empty cache: the first-use compile
            step_env["FASTDPO_CACHE_DIR"] = cache
        if name in REPLACES and REPLACES[name].exists():
            shutil.rmtree(REPLACES[name])
        try:
            timings["steps"][name] = {**_run(name, plan[name], step_env),
                                      **{k: meta[k] for k in ("device", "machine", "revision")},
                                      "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        finally:
            if cache:
                shutil.rmtree(cache, ignore_errors=True)
        if timings["steps"][name]["returncode"] != 0:
            failed.append(name)
        path.write_text(json.dumps(timings, indent=1) + "\n")
    if "render" in wanted:
        import runpy

        if runpy.run_path(str(ROOT / "bench" / "readme_figures.py"))["main"]([]) != 0:
            failed.append("render")
    if failed:
        print(f"\nfailed steps: {failed}")
        return 1
    print(f"\ndone: {path.relative_to(ROOT)}, "
          + ", ".join(f"{REPLACES[n].relative_to(ROOT)}/" for n in wanted if n in REPLACES)
          + ", README.md and the docs figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
