"""The measured figures of README.md and docs/ (and the table of bench/results/README.md), rendered from the
committed result files, so that every number they quote comes from a file, a command and one named machine.

    python bench/readme_figures.py            # rewrite the generated blocks in place
    python bench/readme_figures.py --check    # exit 1 (and show the difference) when they are out of date

Each generated block sits between ``<!-- figures:NAME ... -->`` and ``<!-- /figures:NAME -->``. The result
files are those ``python bench/remeasure.py`` writes: ``bench/results/main/<device>/`` (the main job),
``bench/results/fused-linear-bf16/<device>/``, ``bench/results/packed/<device>/`` (packed vs padded batches),
``bench/results/diagnostics-overhead/<device>/`` and ``bench/results/timings.json`` (how long the README's
commands take).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MAIN, LINEAR_BF16, PACKED, DIAGNOSTICS = "main", "fused-linear-bf16", "packed", "diagnostics-overhead"
README = ROOT / "README.md"
RESULTS_README = RESULTS / "README.md"
PACKING_DOC, DIAGNOSTICS_DOC = ROOT / "docs" / "packing.md", ROOT / "docs" / "diagnostics.md"


class FiguresError(RuntimeError):
    """The result files cannot back the README's figures (missing, or from different machines)."""


def _result(set_name: str, suite: str) -> tuple[dict, Path]:
    folders = sorted(d for d in (RESULTS / set_name).glob("*") if (d / f"{suite}.json").is_file())
    if len(folders) != 1:
        raise FiguresError(f"bench/results/{set_name}/ must hold exactly one <device>/{suite}.json, found "
                           f"{[str(f.relative_to(ROOT)) for f in folders]} (python bench/remeasure.py makes it)")
    return json.loads((folders[0] / f"{suite}.json").read_text()), folders[0]


def _timings() -> dict:
    path = RESULTS / "timings.json"
    if not path.is_file():
        raise FiguresError("bench/results/timings.json is missing (python bench/remeasure.py makes it)")
    return json.loads(path.read_text())


def _rows(data: dict, dtype: str, N: int | None = None) -> dict:
    """provider -> result of the fwd+bwd case of ``dtype`` (the one shape of the file, or ``N``)."""
    hits = [r for r in data["results"] if r["case"]["mode"] == "fwd+bwd" and r["case"]["dtype"] == dtype
            and "error" not in r and (N is None or r["case"]["N"] == N)]
    shapes = {(r["case"]["N"], r["case"]["V"], r["case"].get("H", 0)) for r in hits}
    if len(shapes) > 1:
        raise FiguresError(f"several shapes for {dtype} in one result file: {sorted(shapes)}")
    return {r["provider"]: r for r in hits}


def _ms(r) -> str:
    if r is None:
        return "—"
    m = r["median_ms"]
    return f"{m:.1f} ms" if m < 1000 else f"{m:.0f} ms"


def _mb(r) -> str:
    return "—" if r is None or r.get("extra_mb") is None else f"{r['extra_mb']:.0f} MB"


def _ratio(a, b, suffix="×") -> str:
    return "" if a is None or b is None else f"{a['median_ms'] / b['median_ms']:.2f}{suffix}"


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _machine(meta: dict) -> str:
    # Files written before the benchmark recorded the machine in words name the device folder only.
    if not meta.get("machine"):
        return f"`{meta['device']}` (torch {meta['torch']}, {meta['threads']} threads)"
    return f"{meta['machine']} (`{meta['device']}`; torch {meta['torch']}, {meta['threads']} threads)"


def _provenance(meta: dict) -> str:
    rev = f" at {meta['revision']}" if meta.get("revision") else ""
    return (f"fastdpo {meta['fastdpo']}{rev}, " if meta.get("fastdpo") else "") + meta["date"]


def _link(folder: Path, base: Path | None = None) -> str:
    """A markdown link to ``folder`` from a file in the folder ``base`` (default: the checkout root)."""
    rel = folder.relative_to(ROOT).as_posix()
    up = "../" * len((base or ROOT).relative_to(ROOT).parts)
    return f"[{rel}/]({up}{rel}/)"


def _one_machine(*metas: dict) -> None:
    machines = {(m["device"], m.get("machine")) for m in metas}
    if len({d for d, _ in machines}) != 1 or len({m for _, m in machines if m}) > 1:
        raise FiguresError(f"the README's figures must come from one machine, got {sorted(machines)}; rerun "
                           "python bench/remeasure.py")


def _table(rows, groups, cells) -> list[str]:
    """Markdown rows ``| label | cells(name, group) for each group |`` (rows without any figure left out)."""
    out = []
    for label, name in rows:
        c = [x for by in groups for x in cells(name, by)]
        if any(x not in ("", "—") for x in c):
            out.append(f"| {label} | " + " | ".join(c) + " |")
    return out


# ---------------------------------------------------------------------------------------------------- blocks

def block_logprobs() -> str:
    data, folder = _result(MAIN, "logprobs")
    meta = data["meta"]
    fp32, bf16 = _rows(data, "fp32"), _rows(data, "bf16")
    any_row = next(iter(fp32.values()))
    N, V = any_row["case"]["N"], any_row["case"]["V"]
    rows = [("fastdpo `cpu`", "fastdpo-cpu"), ("fastdpo `cpu`, `inplace_backward=True`", "fastdpo-cpu-inplace"),
            ("fastdpo `torch` backend (the reference; the fallback when the native build fails)", "fastdpo-torch"),
            ("naive `log_softmax().gather()` + autograd", "naive"),
            ("`torch.compile` of the naive version", "naive-compile"),
            ("TRL `selective_log_softmax`", "trl-selective")]
    out = [f"`token_logprobs` forward + backward, N = {N} tokens, V = {V}, on {_machine(meta)}, by the "
           f"main-job command `{meta['command']}` ({_provenance(meta)}; every measurement in {_link(folder)}):",
           "",
           "| | fp32 time | vs naive | vs TRL `selective_log_softmax` | extra memory | bf16 time | vs naive | vs TRL "
           "| extra memory |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def cells(name, by):
        r = by.get(name)
        return [_ms(r), "1.00×" if name == "naive" and r else _ratio(by.get("naive"), r),
                "" if name in ("naive", "trl-selective") else _ratio(by.get("trl-selective"), r), _mb(r)]

    out += _table(rows, (fp32, bf16), cells)
    gib = {dt: N * V * b / 2**20 for dt, b in (("fp32", 4), ("bf16", 2))}
    out += ["", f"The extra memory of the default path is the one `[N, V]` gradient buffer ({gib['fp32']:.0f} MiB in "
            f"fp32, {gib['bf16']:.0f} MiB in bf16); with `inplace_backward=True` it is none."]
    return "\n".join(out)


def block_linear() -> str:
    d32, f32 = _result(MAIN, "linear")
    d16, f16 = _result(LINEAR_BF16, "linear")
    _one_machine(d32["meta"], d16["meta"])
    r32, r16 = _rows(d32, "fp32"), _rows(d16, "bf16")
    case = next(iter(r32.values()))["case"]
    N, H, V, T = case["N"], case["H"], case["V"], case["T"]
    out = [f"A DPO step from hidden states and the LM head (sigmoid loss; policy forward + backward and reference "
           f"forward), B = {N // (2 * T)} pairs of T = {T} tokens (the first quarter of each sequence is prompt), "
           f"H = {H}, V = {V}, on {_machine(d32['meta'])}. fp32 comes from the main job "
           f"(`{d32['meta']['command']}`, {_provenance(d32['meta'])}), bf16 from",
           "", "```bash", d16["meta"]["command"], "```", "",
           f"({_provenance(d16['meta'])}). Every measurement in {_link(f32)} and {_link(f16)}:", "",
           "| | fp32 time | vs 4 GEMMs | peak extra memory | bf16 time | vs 4 GEMMs | peak extra memory |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    rows = [("fastdpo `linear_dpo_loss` (cpu)", "fastdpo-linear-cpu"), ("naive full logits + autograd", "naive-linear"),
            ("TRL `ChunkedLogProbFunction`", "trl-chunked"), ("Liger `LigerFusedLinearDPOLoss`", "liger-dpo"),
            ("the 4 GEMMs (policy logits, both gradients, reference logits)", "floor-gemm"),
            ("the same 4 GEMMs over response tokens only", "floor-gemm-response")]

    def cells(name, by):
        r = by.get(name)
        vs = _ratio(r, by.get("floor-gemm"), "")
        if name == "fastdpo-linear-cpu" and r and by.get("floor-gemm-response"):
            vs += f" ({_ratio(r, by['floor-gemm-response'], '')} of the response-token GEMMs)"
        return [_ms(r), vs, _mb(r)]

    out += _table(rows, (r32, r16), cells)
    ours32, ours16 = r32.get("fastdpo-linear-cpu"), r16.get("fastdpo-linear-cpu")
    naive32, naive16 = r32.get("naive-linear"), r16.get("naive-linear")
    parts = []
    if ours32 and r32.get("trl-chunked") and r32.get("liger-dpo"):
        parts.append(f"fastdpo is {_ratio(r32['trl-chunked'], ours32)} faster than TRL's chunked function and "
                     f"{_ratio(r32['liger-dpo'], ours32)} faster than Liger in fp32"
                     + (f" ({_ratio(r16['trl-chunked'], ours16)} and {_ratio(r16['liger-dpo'], ours16)} in bf16)"
                        if ours16 and r16.get("trl-chunked") and r16.get("liger-dpo") else ""))
    if ours32 and naive32 and ours16 and naive16:
        parts.append(f"with {100 * ours32['extra_mb'] / naive32['extra_mb']:.0f}% (fp32) and "
                     f"{100 * ours16['extra_mb'] / naive16['extra_mb']:.0f}% (bf16) of the naive version's peak extra "
                     "memory (the default budget of 2^24 logits on CPU)")
    if parts:
        out += ["", ", ".join(parts) + ". It skips prompt and padding tokens, which is how it can beat the all-token "
                "GEMM floor."]
    return "\n".join(out)


def block_kl() -> str:
    data, folder = _result(MAIN, "kl")
    meta = data["meta"]
    fp32, bf16 = _rows(data, "fp32"), _rows(data, "bf16")
    case = next(iter(fp32.values()))["case"]
    out = [f"Per-token log-probs plus the full-vocabulary KL of the reference to the policy "
           f"(`fused_logprobs(..., ref_logits=..., kl=True)`), forward + backward with both upstream gradients "
           f"non-zero on every token, N = {case['N']} tokens, V = {case['V']}, on {_machine(meta)}, by the main-job "
           f"command `{meta['command']}` ({_provenance(meta)}; every measurement in {_link(folder)}):",
           "",
           "| | fp32 time | vs naive | extra memory | bf16 time | vs naive | extra memory |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    rows = [("fastdpo `cpu`", "fastdpo-cpu-kl"), ("fastdpo `torch` backend (the reference)", "fastdpo-torch-kl"),
            ("naive (two `log_softmax`es, the KL sum, autograd; as RRPO's and TDPO's code)", "naive-kl"),
            ("floor (read both logits twice, write the gradient)", "floor-kl")]

    def cells(name, by):
        r = by.get(name)
        return [_ms(r), "" if name == "floor-kl" else _ratio(by.get("naive-kl"), r), _mb(r)]

    out += _table(rows, (fp32, bf16), cells)
    return "\n".join(out)


def _step(t: dict, name: str, like: dict) -> dict | None:
    """The successful step ``name`` of timings.json (measured on the machine of ``like``), or None."""
    step = t["steps"].get(name)
    if step is None or step.get("returncode") != 0:
        return None
    _one_machine(step, like)
    return step


def _took(step: dict | None) -> str:
    return "(not measured yet)" if step is None else _minutes(step["seconds"])


def block_durations() -> str:
    t = _timings()
    main, _ = _result(MAIN, "logprobs")
    meta = main["meta"]

    def took(name: str, what: str) -> str:
        step = _step(t, name, meta)
        return f"{what} {_took(step)}" + (f" (`{step['command']}`)" if step else "")

    return (f"On {_machine(meta)}: {took('tests', 'the tests take')}, {took('main', 'the main job')} and "
            f"{took('bench-quick', 'the quick pytest-benchmark set')}, measured by `python bench/remeasure.py` as "
            "every figure below.")


def block_build() -> str:
    t = _timings()
    main, _ = _result(MAIN, "logprobs")
    cpu = _step(t, "build-cpu", main["meta"])
    text = f"about {_took(cpu)} for the CPU extension"
    cuda = _step(t, "build-cuda", main["meta"])
    if cuda is not None and not cuda.get("skipped"):
        text += f" and {_took(cuda)} for the CUDA one"
    return text + f" on {main['meta']['machine']}, as measured by `python bench/remeasure.py`"


def _packed_rows(data: dict) -> list[tuple[str, dict, dict]]:
    """``(step label, padded, packed)`` of each measured case of packed.json, in the file's order."""
    by: dict[str, dict] = {}
    for r in data["results"]:
        if "error" not in r:
            by.setdefault(r["case"], {})[r["layout"]] = r
    out = []
    for layouts in by.values():
        if set(layouts) != {"padded", "packed"}:
            continue
        spec = layouts["packed"]["spec"]
        if spec["suite"] == "e2e":
            label = f"tiny Llama (H = {spec['hidden']}, {spec['layers']} layers), `FastDPOTrainer`"
        else:
            label = {"logits": "LM head + `dpo_loss`", "linear": "`linear_dpo_loss`"}[spec["method"]]
        out.append((label, layouts["padded"], layouts["packed"]))
    if not out:
        raise FiguresError("packed.json holds no case measured in both layouts")
    return out


def _speedup(padded: dict, packed: dict) -> str:
    # As python -m fastdpo.bench.packed reports it: both layouts see the same batches in the same order, so
    # the median of the per-step ratios.
    return f"{statistics.median(p / q for p, q in zip(padded['times_ms'], packed['times_ms'])):.2f}×"


def _packed_setting(data: dict) -> str:
    rows = [r for r in data["results"] if "error" not in r and r["spec"]["suite"] == "loss"] or [
        r for r in data["results"] if "error" not in r]
    pad = next(r for r in rows if r["layout"] == "padded")
    spec = pad["spec"]
    return (f"{spec['pairs']} pairs per batch from seed {spec['seed']} (the first batch is "
            f"{100 * (1 - pad['real_tokens'] / pad['tokens']):.0f}% padding), V = {spec['vocab']}, {spec['dtype']}")


def block_packed() -> str:
    data, folder = _result(PACKED, "packed")
    meta = data["meta"]
    out = [f"{_packed_setting(data)}, on {_machine(meta)}, by `{meta['command']}` ({_provenance(meta)}; every "
           f"measurement in {_link(folder)}):", "",
           "| step | padded positions → packed tokens | speed-up | peak extra memory |", "| --- | --- | --- | --- |"]
    for label, pad, pk in _packed_rows(data):
        out.append(f"| {label} | {pad['tokens']:.0f} → {pk['tokens']:.0f} | {_speedup(pad, pk)} | "
                   f"{pad['extra_mb']:.0f} → {pk['extra_mb']:.0f} MB |")
    return "\n".join(out)


def block_packed_details() -> str:
    data, folder = _result(PACKED, "packed")
    meta = data["meta"]
    out = [f"{_packed_setting(data)}, on {_machine(meta)}, by", "", "```bash", meta["command"], "```", "",
           f"({_provenance(meta)}; every measurement in {_link(folder, PACKING_DOC.parent)}):", "",
           "| case | padded positions | packed tokens | padded step | packed step | speed-up | peak extra memory, "
           "padded → packed |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, pad, pk in _packed_rows(data):
        out.append(f"| {label} | {pad['tokens']:.0f} | {pk['tokens']:.0f} | {pad['median_ms'] / 1000:.1f} s | "
                   f"{pk['median_ms'] / 1000:.1f} s | {_speedup(pad, pk)} | {pad['extra_mb']:.0f} → "
                   f"{pk['extra_mb']:.0f} MB ({pk['extra_mb'] / pad['extra_mb']:.2f}) |")
    return "\n".join(out)


def _diagnostics() -> tuple[dict, Path]:
    data, folder = _result(DIAGNOSTICS, "overhead")
    if data.get("case", {}).get("dtype") != "fp32" or not data.get("ratios"):
        raise FiguresError(f"{folder.relative_to(ROOT)}/overhead.json needs the fp32 step's paired times "
                           "(python -m fastdpo.bench.overhead)")
    return data, folder


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def block_diagnostics() -> str:
    data, folder = _diagnostics()
    main, _ = _result(MAIN, "linear")
    _one_machine(data["meta"], main["meta"])
    c, m = data["case"], data["median_ms"]
    return (f"turning them on costs {_pct(data['overhead'])} of the fused-linear fp32 DPO step (B = "
            f"{c['N'] // (2 * c['T'])} pairs of T = {c['T']}, H = {c['H']}, V = {c['V']}: {m['plain']:.0f} ms → "
            f"{m['diagnostics']:.0f} ms, medians of {len(data['ratios'])} interleaved pairs, on "
            f"{data['meta']['machine']}; [docs/diagnostics.md](docs/diagnostics.md#cost))")


def block_diagnostics_cost() -> str:
    data, folder = _diagnostics()
    meta, c, t = data["meta"], data["case"], data["times_ms"]
    N, H, V, T = c["N"], c["H"], c["V"], c["T"]
    r = data["ratios"]
    return "\n".join([
        f"The fused-linear fp32 DPO step (policy forward + backward, reference forward), B = {N // (2 * T)} pairs "
        f"of T = {T} tokens, H = {H}, V = {V}, on {_machine(meta)}, by", "", "```bash", meta["command"], "```", "",
        f"({_provenance(meta)}; every measurement in {_link(folder, DIAGNOSTICS_DOC.parent)}):", "",
        "| | median | min-max |", "| --- | --- | --- |",
        *(f"| {label} | {statistics.median(t[k]):.0f} ms | {min(t[k]):.0f}-{max(t[k]):.0f} ms |"
          for label, k in (("`diagnostics=False`", "plain"), ("`diagnostics=True`", "diagnostics"))),
        "",
        f"Diagnostics add {_pct(data['overhead'])} to the step: the median over {len(r)} interleaved pairs of "
        f"adjacent steps of the time with them over the time without (per pair from {_pct(min(r) - 1)} to "
        f"{_pct(max(r) - 1)}: the machine's speed drifts between steps; the pairing keeps the drift out of the "
        "median)."])


def block_sets() -> str:
    rows = ["| folder | machine | command | date |", "| --- | --- | --- | --- |"]
    for set_name, suites in ((MAIN, ("logprobs", "linear", "kl")), (LINEAR_BF16, ("linear",)), (PACKED, ("packed",)),
                             (DIAGNOSTICS, ("overhead",))):
        data, folder = _result(set_name, suites[0])
        meta = data["meta"]
        rows.append(f"| `{folder.relative_to(RESULTS).as_posix()}/` ({', '.join(s + '.json' for s in suites)}) | "
                    f"{meta.get('machine') or meta['device']}, torch {meta['torch']}, {meta['threads']} threads | "
                    f"`{meta['command']}` | {meta['date']} |")
    t = _timings()
    for name, step in t["steps"].items():
        rows.append(f"| `timings.json`: {name} (wall time: {_minutes(step['seconds'])}, exit {step['returncode']}) | "
                    f"{step['machine']} | `{step['command']}` | {step['date']} |")
    return "\n".join(rows)


BLOCKS = {README: {"durations": block_durations, "build": block_build, "logprobs": block_logprobs,
                   "linear": block_linear, "kl": block_kl, "packed": block_packed, "diagnostics": block_diagnostics},
          PACKING_DOC: {"packed": block_packed_details},
          DIAGNOSTICS_DOC: {"diagnostics": block_diagnostics_cost},
          RESULTS_README: {"sets": block_sets}}

_MARK = re.compile(r"(<!-- figures:(\w[\w-]*)[^>]*-->)(.*?)(<!-- /figures:\2 -->)", re.S)


def render(text: str, blocks: dict) -> str:
    seen = set()

    def sub(m):
        name = m.group(2)
        if name not in blocks:
            raise FiguresError(f"unknown figures block {name!r}")
        seen.add(name)
        body = blocks[name]()
        inline = "\n" not in m.group(3)
        return m.group(1) + (body if inline else "\n" + body + "\n") + m.group(4)

    out = _MARK.sub(sub, text)
    missing = set(blocks) - seen
    if missing:
        raise FiguresError(f"blocks {sorted(missing)} have no <!-- figures:NAME --> marker")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only report whether the files are up to date")
    args = ap.parse_args(argv)
    stale = []
    for path, blocks in BLOCKS.items():
        text = path.read_text()
        new = render(text, blocks)
        if new == text:
            continue
        if args.check:
            stale.append(path)
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), str(path),
                                                       "rendered"))
        else:
            path.write_text(new)
            print(f"updated {path.relative_to(ROOT)}")
    if stale:
        print(f"\nout of date: {[str(p.relative_to(ROOT)) for p in stale]}; run python bench/readme_figures.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
