"""Runs one provider on one case in a fresh process and prints a JSON line.

Peak memory: on Linux the resident high-water mark (VmHWM) is reset after the
inputs exist (``/proc/self/clear_refs``), so the peak minus the resident size
at that moment is the provider's extra memory over its timed runs (warm-up and
compilation included, which is what a training step sees). On CUDA it is
``max_memory_allocated`` over the same span minus the inputs.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run(spec: dict) -> dict:
    from fastdpo.bench.providers import PROVIDERS, Case

    case = Case(**spec["case"])
    prov = PROVIDERS[spec["provider"]]
    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cuda = case.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    step = prov.build(case)
    prepare = getattr(step, "prepare", None)
    mem_ok = _reset_hwm()
    base_kb = _status_kb("VmRSS")
    if cuda:
        base_cuda = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def timed() -> float:
        if prepare is not None:
            prepare()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    for _ in range(spec["warmup"]):
        timed()
    times = [timed() for _ in range(spec["reps"])]
    if cuda:
        extra_mb = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:
        extra_mb = (_status_kb("VmHWM") - base_kb) / 1024 if mem_ok else None
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "min_ms": times[0],
        "max_ms": times[-1],
        "times_ms": times,
        "extra_mb": extra_mb,
    }


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    try:
        out = run(spec)
    except Exception as e:  # reported in the table, never hidden
        out = {"error": f"{type(e).__name__}: {e}"}
    print("RESULT " + json.dumps(out))
