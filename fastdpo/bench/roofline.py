"""``python -m fastdpo.bench roofline``: a static roofline of every GPU kernel variant the losses use.

No GPU is needed. The CUDA extension's ``.so`` (built by :mod:`fastdpo._build`) is disassembled
for sm_90 with ``cuobjdump``, the Triton kernels are compiled for sm_90 by
:mod:`fastdpo.bench.triton_static`; :mod:`fastdpo.bench.sass` finds each kernel's main loop(s)
and counts instructions, MUFU ops and bytes moved per iteration. Per variant the table gives:

* bytes per element: HBM bytes per logits element (vocabulary entry of one token), all rows
  read and written (policy, reference, gradient);
* instructions and MUFU ops per element, from the main loop(s);
* the issue ceiling (every instruction at one per scheduler per clock) and the SFU ceiling (MUFU
  at 16 per SM per clock) as a multiple of the HBM rate, at H100 and H200 rates; the tighter one
  is the kernel's ceiling. ``>= 1.25x`` at H100 rates leaves the kernel memory-bound with room;
* resident warps per SM from registers, shared memory and block size.

Rates (``sass.H100``, ``sass.H200``): 132 SMs at 1.98 GHz, so 33.5 T thread-instructions/s and
4.18 T MUFU ops/s; HBM 3.35 TB/s (H100 SXM) and 4.8 TB/s (H200). Expect about 0.8x of a ceiling
in practice; the model ignores latency, which the resident warps column is a hint for.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

from fastdpo.bench import sass

GPUS = (sass.H100, sass.H200)
MIN_HEADROOM = 1.25  # the tighter ceiling / the memory time, at H100 rates
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_CXX_DTYPE = {"fp32": "float", "bf16": "__nv_bfloat16", "fp16": "__half"}
_CAP_MODE = {"fp32": 1, "bf16": 2, "fp16": 2}


@dataclasses.dataclass(frozen=True)
class CudaVariant:
    """One specialisation of a CUDA kernel, as one loss path runs it.

    ``kernel`` is the kernel's name and ``template`` its template arguments as ``c++filt`` prints
    them (``{T}`` stands for the element type, ``{C}`` for the soft-cap mode the element type gets:
    2, the table, for bf16/fp16; 1, the math, for fp32); ``rows`` are the rows of logits-sized data
    moved per vocabulary entry (HBM bytes per element = rows x element size). ``loops`` picks the
    main loops this path runs where a kernel has several: ``"rows=R"`` keeps those that store
    128-bit vectors and load R rows per row stored (the backward's plain and KL paths).
    ``default``: a variant the losses use by default, held to the 1.25x headroom."""

    label: str
    path: str
    kernel: str
    template: str
    rows: int
    loops: str | None = None
    backward: bool = False
    default: bool = True


_FWD, _BWD = "logprobs_fwd_kernel", "logprobs_bwd_kernel"

# The kernels of csrc/cuda/logprobs_cuda.cu (x 3 element types): logprobs_fwd_kernel<stats, cap,
# mode, T> with cap 0 none / 1 math / 2 table and mode 0 policy / 1 + reference / 2 + KL;
# logprobs_bwd_kernel<cap, kl, T, Args>.
CUDA_VARIANTS: tuple[CudaVariant, ...] = (
    CudaVariant("fwd", "token_logprobs", _FWD, "false, 0, 0, {T}", 1),
    CudaVariant("fwd + ref", "fused_logprobs(ref_logits=), linear ref fold", _FWD, "false, 0, 1, {T}", 2),
    CudaVariant("fwd stats", "linear_dpo_loss policy fold", _FWD, "true, 0, 0, {T}", 1),
    CudaVariant("fwd stats + ref", "dpo_loss", _FWD, "true, 0, 1, {T}", 2),
    CudaVariant("fwd KL", "fused_logprobs(kl=True)", _FWD, "false, 0, 2, {T}", 2),
    CudaVariant("fwd stats + KL", "rrpo / tdpo", _FWD, "true, 0, 2, {T}", 2),
    CudaVariant("fwd cap", "token_logprobs(softcap=)", _FWD, "false, {C}, 0, {T}", 1),
    CudaVariant("fwd cap + ref", "fused_logprobs(softcap=, ref_logits=)", _FWD, "false, {C}, 1, {T}", 2),
    CudaVariant("fwd stats + cap", "linear_dpo_loss policy fold (softcap)", _FWD, "true, {C}, 0, {T}", 1),
    CudaVariant("fwd stats + cap + ref", "dpo_loss(softcap=)", _FWD, "true, {C}, 1, {T}", 2),
    CudaVariant("fwd cap + KL", "fused_logprobs(softcap=, kl=True)", _FWD, "false, {C}, 2, {T}", 2),
    CudaVariant("fwd stats + cap + KL", "rrpo / tdpo (softcap)", _FWD, "true, {C}, 2, {T}", 2),
    CudaVariant("bwd", "every loss", _BWD, "0, false, {T}, fastdpo::cuda::BwdArgs", 2, "rows=1", True),
    CudaVariant("bwd cap", "softcap", _BWD, "1, false, {T}, fastdpo::cuda::BwdArgs", 2, "rows=1", True),
    CudaVariant("bwd KL", "rrpo / tdpo", _BWD, "0, true, {T}, fastdpo::cuda::BwdKLArgs", 3, "rows=2", True),
    CudaVariant("bwd cap + KL", "rrpo / tdpo (softcap)", _BWD, "1, true, {T}, fastdpo::cuda::BwdKLArgs", 3,
                "rows=2", True),
    # fp16 with softcap > 56 (a table that would not fit in shared memory) takes the math soft cap.
    CudaVariant("fwd stats + cap (no table)", "fp16 softcap > 56", _FWD, "true, 1, 0, {T}", 1, default=False),
    CudaVariant("fwd stats + cap + ref (no table)", "fp16 softcap > 56", _FWD, "true, 1, 1, {T}", 2, default=False),
)


def select_loops(loops: list[sass.Loop], rule: str | None) -> list[sass.Loop]:
    """The main loops a variant runs (see CudaVariant.loops)."""
    if rule is None:
        return loops
    rows = int(rule.split("=", 1)[1])
    return [lp for lp in loops if lp.stores.get(16) and lp.loads.get(16) == rows * lp.stores[16]]


@dataclasses.dataclass
class Row:
    backend: str
    label: str
    path: str
    dtype: str
    kernel: str
    loops: list[str]
    model: sass.Roofline | None
    regs: int = 0
    shared: int = 0
    local: int = 0
    threads: int = 0
    warps: int = 0
    error: str | None = None
    default: bool = True  # held to MIN_HEADROOM

    def ceiling(self, gpu: sass.GPU = sass.H100) -> float:
        return self.model.ceilings(gpu)["ceiling"] if self.model else 0.0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.model:
            d["ceilings"] = {g.name: self.model.ceilings(g) for g in GPUS}
        return d


def _short(demangled: str) -> str:
    return demangled.replace("fastdpo::cuda::(anonymous namespace)::", "").replace("fastdpo::cuda::", "").replace(
        "void ", "")


def cuda_library(build: bool = True) -> Path:
    """The CUDA extension's library for this checkout's sources (built into the cache if needed)."""
    from fastdpo import _build

    return _build.build_extension("cuda") if build else Path()


@functools.lru_cache(maxsize=8)  # a built library never changes (its cache entry is named by its sources)
def cuda_kernels(lib: str | Path, arch: str = "sm_90") -> dict[str, dict]:
    """Demangled kernel name -> {"mangled", "instrs", "res" (resource usage), "threads" (launch bound)}."""
    text = sass.library_sass(lib, arch)
    parsed = sass.parse_sass(text)
    res = sass.resource_usage(lib).get(arch, {})
    bounds = sass.launch_bounds(lib, arch)
    names = sass.demangle(list(parsed))
    return {names[m]: {"mangled": m, "instrs": ins, "res": res.get(m, {}), "threads": bounds.get(m, 0)}
            for m, ins in parsed.items()}


def find_kernel(kernels: dict[str, dict], name: str, template: str) -> str | None:
    want = f"{name}<{template}>("
    hits = [k for k in kernels if want in k]
    return hits[0] if len(hits) == 1 else None


def cuda_rows(lib: str | Path | None = None, dtypes=("bf16", "fp16", "fp32"),
              variants: tuple[CudaVariant, ...] = CUDA_VARIANTS) -> list[Row]:
    """One row per (variant, element type) of the CUDA extension."""
    lib = cuda_library() if lib is None else lib
    kernels = cuda_kernels(lib, "sm_90")
    rows = []
    for dt in dtypes:
        for v in variants:
            if not v.default and dt == "fp32":
                continue  # the no-table soft cap is fp32's default one, listed above
            tmpl = v.template.format(T=_CXX_DTYPE[dt], C=_CAP_MODE[dt])
            key = find_kernel(kernels, v.kernel, tmpl)
            row = Row("cuda", v.label, v.path, dt, f"{v.kernel}<{tmpl}>", [], None, default=v.default)
            if key is None:
                row.error = f"kernel {v.kernel}<{tmpl}> not found (or ambiguous) in {lib}"
                rows.append(row)
                continue
            k = kernels[key]
            loops = select_loops(sass.main_loops(k["instrs"]), v.loops)
            res = k["res"]
            threads = k["threads"] or 256
            prof = sass.KernelProfile(_short(key), loops, res.get("REG", 0), res.get("SHARED", 0), res.get("LOCAL", 0),
                                      threads)
            row.kernel, row.loops = _short(key), [lp.summary() for lp in loops]
            row.regs, row.shared, row.local, row.threads = prof.regs, prof.shared, prof.local, threads
            row.warps = sass.resident_warps(prof.regs, prof.shared, threads)
            try:
                row.model = sass.roofline(prof, DTYPE_BYTES[dt], v.rows * DTYPE_BYTES[dt])
            except ValueError as e:
                row.error = str(e)
            rows.append(row)
    return rows


def _attr(obj, *names, default=None):
    for n in names:
        if hasattr(obj, n):
            return getattr(obj, n)
    return default


def _dtype_name(dt) -> str:
    s = str(dt).replace("torch.", "")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(s, s)


def triton_rows(all_variants: bool = False) -> tuple[list[Row], str | None]:
    """Rows for the Triton kernels through :mod:`fastdpo.bench.triton_static`, or ([], why not)."""
    try:
        from fastdpo.bench import triton_static
    except ImportError as e:
        return [], f"Triton rows skipped: fastdpo.bench.triton_static is not available ({e})"
    variants = triton_static.launcher_variants() if all_variants else triton_static.loss_path_variants()
    rows = []
    for v in variants:
        dt = _dtype_name(_attr(v, "dtype", default="?"))
        label = _attr(v, "label", default=str(v))
        row = Row("triton", label, str(_attr(v, "path", default="")), dt, str(_attr(v, "kernel", default="")), [], None)
        try:
            c = triton_static.compile_variant(v, arch=90)
            threads = int(c.num_warps) * 32
            # the variant's fast-path loops (its kernels also hold loops for rows aligned differently)
            prof = triton_static.kernel_profile(v, c)
            row.loops = [lp.summary() for lp in prof.loops]
            row.regs, row.shared, row.threads = prof.regs, prof.shared, threads
            row.warps = sass.resident_warps(prof.regs, prof.shared, threads)
            bpe = float(_attr(v, "bytes_per_element", "hbm_bytes_per_element", "bytes_per_elem", "hbm_bytes"))
            row.model = sass.roofline(prof, DTYPE_BYTES.get(dt, 2), bpe)
        except Exception as e:  # a variant that does not compile or profile is reported, not hidden
            row.error = f"{type(e).__name__}: {e}"
        rows.append(row)
    return rows, None


def failures(rows: list[Row], minimum: float = MIN_HEADROOM, gpu: sass.GPU = sass.H100) -> list[str]:
    """Rows whose tighter ceiling is below ``minimum`` x the memory time (or that failed)."""
    bad = []
    for r in rows:
        if not r.default:
            continue
        if r.error or r.model is None:
            bad.append(f"{r.backend} {r.dtype} {r.label}: {r.error or 'no model'}")
        elif r.ceiling(gpu) < minimum:
            c = r.model.ceilings(gpu)
            bad.append(f"{r.backend} {r.dtype} {r.label}: {c['ceiling']:.2f}x ({c['bound']}-bound) < {minimum}x")
    return bad


def format_table(rows: list[Row]) -> str:
    """A markdown table; ceilings are multiples of the HBM rate (1.00x = exactly keeps up)."""
    hdr = ("| backend | dtype | variant | path | B/elem | instr/elem | MUFU/elem | H100 issue | H100 SFU | "
           "H100 ceiling | H200 ceiling | regs | warps/SM |")
    ncol = hdr.count("|") - 1
    out = [hdr, "|" + " --- |" * ncol]
    for r in rows:
        if r.error or r.model is None:
            out.append(f"| {r.backend} | {r.dtype} | {r.label} | {r.path} | error: {r.error} |" + " |" * (ncol - 5))
            continue
        m = r.model
        h1, h2 = m.ceilings(sass.H100), m.ceilings(sass.H200)
        flag = "" if h1["ceiling"] >= MIN_HEADROOM else (" **<1.25**" if r.default else " (not a default path)")
        out.append(
            f"| {r.backend} | {r.dtype} | {r.label} | {r.path} | {m.bytes_per_elem:g} | {m.instr_per_elem:.1f} | "
            f"{m.mufu_per_elem:.2f} | {h1['issue']:.2f}x | {h1['sfu']:.2f}x | {h1['ceiling']:.2f}x ({h1['bound']}){flag} "
            f"| {h2['ceiling']:.2f}x | {r.regs} | {r.warps} |")
    return "\n".join(out)


def format_loops(rows: list[Row]) -> str:
    lines = []
    for r in rows:
        lines.append(f"{r.backend} {r.dtype} {r.label}: {r.kernel}")
        lines += [f"    {s}" for s in r.loops] or ["    (no main loop)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastdpo.bench roofline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="cuda,triton", help="comma-separated: cuda, triton")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--lib", default=None, help="a CUDA extension .so to read instead of building this checkout's")
    ap.add_argument("--all-triton", action="store_true", help="every Triton launcher specialisation, not only the "
                    "ones the losses use")
    ap.add_argument("--loops", action="store_true", help="also print each kernel's main loop(s)")
    ap.add_argument("--json", default=None, help="write the rows to this JSON file")
    ap.add_argument("--check", action="store_true", help=f"exit 1 when a variant is below {MIN_HEADROOM}x at H100 "
                    "rates")
    args = ap.parse_args(argv)
    backends = set(args.backends.split(","))
    dtypes = tuple(d for d in args.dtypes.split(",") if d)
    rows: list[Row] = []
    notes = []
    if "cuda" in backends:
        try:
            rows += cuda_rows(args.lib, dtypes)
        except Exception as e:
            notes.append(f"CUDA rows skipped: {type(e).__name__}: {str(e).splitlines()[0]}")
    if "triton" in backends:
        trows, note = triton_rows(args.all_triton)
        rows += [r for r in trows if r.dtype in dtypes]
        if note:
            notes.append(note)
    print(f"Static roofline from sm_90 SASS. Rates: {sass.H100.name} {sass.H100.hbm_tbs} TB/s, "
          f"{sass.H200.name} {sass.H200.hbm_tbs} TB/s; {sass.H100.sms} SMs at {sass.H100.clock_ghz} GHz: "
          f"{sass.H100.issue_rate / 1e12:.1f} T instr/s, {sass.H100.sfu_rate / 1e12:.2f} T MUFU/s. "
          "Ceilings are multiples of the HBM rate.\n")
    print(format_table(rows))
    for n in notes:
        print("\n" + n)
    if args.loops:
        print("\n" + format_loops(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [r.as_dict() for r in rows], "notes": notes}, indent=1,
                                              default=str))
    bad = failures(rows)
    if bad:
        print(f"\n{len(bad)} variant(s) below {MIN_HEADROOM}x at H100 rates:\n  " + "\n  ".join(bad))
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
