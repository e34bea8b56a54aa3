"""Static check of the Triton kernels without a GPU: every specialisation the launchers produce,
compiled for sm_80 / sm_90 with Triton's own compiler, its SASS and a count of the main loop.

* :func:`launcher_variants` runs the launchers of ``fastdpo/kernels/triton.py`` on meta tensors
  (no memory, no device) for the shapes, layouts, dtypes and options users pass, records the
  launches instead of running them, and turns each into the specialisation Triton's JIT would
  compile (argument types, 16-divisibility of pointers and integers, constexprs, warps), computed
  by Triton's own argument binder. Equal specialisations are compiled once.
* :func:`loss_path_variants` are those the losses use by default (``dpo_loss``, the fused-linear
  folds, RRPO/TDPO's KL, soft-capped models), at Llama-3's vocabulary.
* :func:`compile_variant` compiles one for an architecture (in a child process without
  ``TRITON_INTERPRET``, which the test suite sets), cached on disk under the fastdpo cache by a
  hash of the kernel source, the Triton version and the specialisation.
* :func:`main_loops` picks each variant's main loops among those ``fastdpo.bench.sass`` finds in
  its SASS (the fast paths: every global access 128-bit), :func:`kernel_profile` and
  :func:`roofline` give ``fastdpo.bench.sass``'s profile and issue / SFU / HBM model of them, which
  ``python -m fastdpo.bench roofline`` prints.

``python -m fastdpo.bench.triton_static`` compiles every launcher variant and reports problems.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = (80, 90)
_ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
_KERNEL_MODULE = "fastdpo.kernels.triton_logprobs"


# --------------------------------------------------------------------------- variants


@dataclasses.dataclass(frozen=True)
class Variant:
    """One specialisation of one kernel, as Triton's JIT would compile it."""

    kernel: str  # function name in fastdpo.kernels.triton_logprobs
    dtype: str  # logits dtype (fp32 / bf16 / fp16), "-" for kernels without logits
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    signature: tuple  # ((argument, Triton type), ...) of the non-constexpr arguments
    divisible: tuple  # arguments specialised as divisible by 16 (pointers: 16-byte aligned)
    label: str  # short human name
    path: str = ""  # loss paths that launch it by default ("" if none)
    bytes_per_elem: float = 0.0  # HBM bytes the kernel moves per vocabulary position
    loops: tuple = ()  # positions one thread handles per iteration of each main loop
    vector: bool = False  # its main loops must read rows with 128-bit loads

    @property
    def key(self) -> tuple:
        return (self.kernel, self.constexprs, self.num_warps, self.signature, self.divisible)

    def constexpr(self, name, default=None):
        return dict(self.constexprs).get(name, default)

    def spec(self) -> dict:
        return {"kernel": self.kernel, "constexprs": [list(c) for c in self.constexprs], "num_warps": self.num_warps,
                "signature": [list(s) for s in self.signature], "divisible": list(self.divisible)}


def _kernel_source_hash() -> str:
    import importlib.util

    spec = importlib.util.find_spec(_KERNEL_MODULE)
    return hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()


_jit_functions: dict = {}
_binders: dict = {}


def _jit_function(kernel):
    """The kernel as a JITFunction (under TRITON_INTERPRET=1 ``triton.jit`` returns an
    interpreter object; its Python function and decorator options rebuild the JITFunction)."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    if id(kernel) not in _jit_functions:
        kwargs = {k: v for k, v in getattr(kernel, "kwargs", {}).items() if v is not None}
        _jit_functions[id(kernel)] = (kernel, JITFunction(kernel.fn, **kwargs))
    return _jit_functions[id(kernel)][1]


def _specialise(kernel, args, meta):
    """(signature, constexprs, divisible, num_warps) Triton's JIT derives from a launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jf = _jit_function(kernel)
    name = jf.fn.__name__
    if name not in _binders:
        backend = make_backend(GPUTarget("cuda", 90, 32))
        _binders[name] = (jf, create_function_from_signature(jf.signature, jf.params, backend))
    jf, binder = _binders[name]
    _, spec, options = binder(*args, **meta)
    sig, cons, div = [], [], []
    for p, (ty, attr) in zip(jf.params, spec):
        if ty == "constexpr":
            cons.append((p.name, attr))
        else:
            sig.append((p.name, ty))
            if isinstance(attr, str) and "D" in attr:
                div.append(p.name)
    return tuple(sig), tuple(cons), tuple(div), int(options.get("num_warps", 4))


def _loop_model(kernel: str, cons: dict, num_warps: int) -> tuple:
    """The main loops of ``kernel`` to count, as (positions one thread handles per iteration,
    128-bit loads per iteration): each iteration reads a block of two [LANES, VEC] tiles per row
    (see ``fastdpo/kernels/triton_logprobs.py``). Kernels without a per-element loop: ()."""
    per = 2 * cons.get("VEC", 1)
    if kernel == "logprobs_fwd_kernel":
        if cons["KL"]:
            return ((per, 4),)  # policy and reference rows together
        return ((per, 2),) * (2 if cons["HAS_REF"] else 1)  # the policy row, then the reference row
    if kernel == "logprobs_bwd_kernel":
        return ((per, 4 if cons["HAS_KL"] else 2),)
    if kernel in ("lse_fold_kernel", "tile_grad_kernel"):
        return ((per, 2),)
    return ()


def _dtype_name(t) -> str:
    import torch

    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(t.dtype, "-")


@dataclasses.dataclass(frozen=True)
class _Case:
    """One call of a launcher: what a user (or a loss) passes."""

    op: str  # fwd, bwd, fold, tile_grad, segment_sum
    dtype: str
    V: int
    layout: str  # contig, slice ([:, :-1]), shift ([:, 1:]: base moved by V), tile (fused-linear), i64
    rows: int = 2048
    stats: bool = False
    ref: bool = False
    kl: bool = False
    softcap: float = 0.0
    temperature: float = 1.0
    inplace: bool = False
    path: str = ""


def _logits(case: _Case, dtype):
    """Meta tensor [B, T, V] with the case's strides and base alignment (as the op layer passes it)."""
    import torch

    V = case.V
    if case.layout == "tile":
        return torch.empty(1, case.rows, V, dtype=dtype, device="meta")
    if case.layout == "i64":  # a batch whose sequence stride exceeds 2^31 elements
        T = (2**31) // V + 1
        return torch.empty(2, T, V, dtype=dtype, device="meta")
    B = 4
    T = max(case.rows // B, 1)
    if case.layout == "contig":
        return torch.empty(B, T, V, dtype=dtype, device="meta")
    full = torch.empty(B, T + 1, V, dtype=dtype, device="meta")
    return full[:, :-1] if case.layout == "slice" else full[:, 1:]


def _record(case: _Case) -> list:
    """The launches the launcher makes for ``case`` (recorded, not run)."""
    import torch

    from fastdpo.kernels import triton as tk

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(case.dtype, torch.float32)
    rec: list = []
    tk._recorder = rec
    try:
        if case.op in ("fwd", "bwd"):
            x = _logits(case, dt)
            B, T, V = x.shape
            y = torch.empty(B, T, dtype=torch.int64, device="meta")
            r = _logits(case, dt) if (case.ref or case.kl) else None
            if case.op == "fwd":
                tk._fwd(x, y, r, -100, case.temperature, case.softcap, case.stats, case.kl)
            else:
                g = torch.empty(B, T, device="meta")
                out = x if case.inplace else tk._like_phase(x)
                tk._bwd(g, x, y, g, out, -100, case.temperature, case.softcap, g if case.kl else None, r,
                        g if case.kl else None)
        elif case.op == "fold":
            tile = torch.empty(case.rows, case.V, dtype=dt, device="meta")
            y = torch.empty(case.rows, dtype=torch.int64, device="meta")
            m = torch.empty(case.rows, device="meta")
            tk.lse_fold(tile, y, 0, m, m, m, case.temperature, case.softcap or None)
        elif case.op == "tile_grad":
            tile = torch.empty(case.rows, case.V, dtype=dt, device="meta")
            y = torch.empty(case.rows, dtype=torch.int64, device="meta")
            m = torch.empty(case.rows, device="meta")
            tk.tile_grad_(tile, y, 0, m, m, case.temperature, case.softcap or None)
        elif case.op == "segment_sum":
            values = torch.empty(case.rows, device="meta")
            offsets = torch.empty(case.V + 1, dtype=torch.int64, device="meta")  # case.V segments
            tk.segment_sum(values, offsets)
        else:
            raise ValueError(case.op)
    finally:
        tk._recorder = None
    return rec


VOCABS = (1, 7, 4097, 32000, 50257, 128256, 262144)
DTYPES = ("fp32", "bf16", "fp16")
# Soft caps: none, Gemma-2's 30 at T = 1, and 30 at T = 0.5 (cap / T = 60).
CAPS = ((0.0, 1.0), (30.0, 1.0), (30.0, 0.5))


def _cases() -> list[_Case]:
    """What the launchers are called with: every dtype, vocabulary and option combination, in the
    layouts users and the losses pass (contiguous, TRL's ``logits[:, :-1]``, a view moved by one
    row, fused-linear tiles, a batch with 64-bit strides), plus few-token batches."""
    out = []
    for dt in DTYPES:
        for V in VOCABS:
            for layout in ("contig", "slice", "shift", "tile", "i64"):
                for cap, temp in CAPS:
                    for stats in (False, True):
                        for ref, kl in ((False, False), (True, False), (True, True)):
                            out.append(_Case("fwd", dt, V, layout, stats=stats, ref=ref, kl=kl, softcap=cap,
                                             temperature=temp))
                    for kl in (False, True):
                        for inplace in (False, True):
                            out.append(_Case("bwd", dt, V, layout, kl=kl, ref=kl, softcap=cap, temperature=temp,
                                             inplace=inplace))
            for rows in (1, 64, 256):  # few tokens: the vocabulary split
                for stats, ref, kl in ((True, True, False), (False, True, True)):
                    out.append(_Case("fwd", dt, V, "contig", rows=rows, stats=stats, ref=ref, kl=kl))
            for cap, temp in CAPS:
                out.append(_Case("fold", dt, V, "tile", rows=16, softcap=cap, temperature=temp))
                out.append(_Case("tile_grad", dt, V, "tile", rows=16, softcap=cap, temperature=temp))
    out.append(_Case("segment_sum", "-", 64, "contig", rows=4096))
    return out


# The default loss paths at Llama-3's vocabulary and a training batch (8 sequences of 1024 tokens
# as TRL passes them: logits[:, :-1]); fused-linear tiles of 1 GiB of logits.
_PATH_V = 128256
_PATH_ROWS = 8192


def _path_cases() -> list[_Case]:
    out = []
    for dt in DTYPES:
        tile_rows = (1 << 30) // (_PATH_V * _ITEMSIZE[dt])
        for cap, tag in ((0.0, ""), (30.0, ", soft cap 30")):
            kw = dict(softcap=cap)
            out += [
                _Case("fwd", dt, _PATH_V, "slice", _PATH_ROWS, stats=True, ref=True, path=f"dpo_loss forward{tag}",
                      **kw),
                _Case("bwd", dt, _PATH_V, "slice", _PATH_ROWS, path=f"dpo_loss backward{tag}", **kw),
                _Case("fwd", dt, _PATH_V, "slice", _PATH_ROWS, stats=True, ref=True, kl=True,
                      path=f"rrpo/tdpo forward (KL){tag}", **kw),
                _Case("bwd", dt, _PATH_V, "slice", _PATH_ROWS, ref=True, kl=True,
                      path=f"rrpo/tdpo backward (KL){tag}", **kw),
                _Case("fwd", dt, _PATH_V, "tile", tile_rows, stats=True, path=f"linear fold, policy{tag}", **kw),
                _Case("fwd", dt, _PATH_V, "tile", tile_rows, path=f"linear fold, reference{tag}", **kw),
                _Case("fwd", dt, _PATH_V, "tile", tile_rows, stats=True, ref=True, kl=True,
                      path=f"linear fold, KL{tag}", **kw),
                _Case("bwd", dt, _PATH_V, "tile", tile_rows, inplace=True, path=f"linear tile gradient{tag}", **kw),
                _Case("bwd", dt, _PATH_V, "tile", tile_rows, inplace=True, ref=True, kl=True,
                      path=f"linear tile gradient, KL{tag}", **kw),
            ]
    return out


def _variant(case: _Case, launch) -> Variant:
    kernel, grid, args, meta = launch
    sig, cons, div, nw = _specialise(kernel, args, {k: v for k, v in meta.items()})
    name = _jit_function(kernel).fn.__name__
    c = dict(cons)
    isz = _ITEMSIZE.get(case.dtype, 4)
    rows = {"logprobs_fwd_kernel": 1 + bool(c.get("HAS_REF")), "logprobs_bwd_kernel": 2 + bool(c.get("HAS_KL")),
            "lse_fold_kernel": 1, "tile_grad_kernel": 2}.get(name, 0)  # rows read + written per position
    loops = _loop_model(name, c, nw)
    flags = [k for k, v in cons if v is True]
    extra = "".join(f" {k}={c[k]}" for k in ("CAP", "SEGS") if c.get(k))
    flags = [f for f in flags if f != "FAST"]  # every variant compiled for a GPU has it
    label = f"{name.replace('_kernel', '')} {case.dtype} {'+'.join(flags) or 'plain'}{extra}{'' if nw == 8 else f' w{nw}'}"
    return Variant(name, case.dtype if case.op != "segment_sum" else "-", cons, nw, sig, div, label, case.path,
                   float(isz * rows), loops, bool(loops))


def _collect(cases) -> list[Variant]:
    seen: dict = {}
    for case in cases:
        for launch in _record(case):
            v = _variant(case, launch)
            if v.key in seen:
                old = seen[v.key]
                if v.path and v.path not in old.path.split("; "):
                    seen[v.key] = dataclasses.replace(old, path="; ".join(p for p in (old.path, v.path) if p))
            else:
                seen[v.key] = v
    return list(seen.values())


def launcher_variants() -> list[Variant]:
    """Every distinct specialisation the Triton launchers produce for the shapes, layouts, dtypes
    and options of :func:`_cases` (each compiled once)."""
    return _collect(_cases() + _path_cases())


def loss_path_variants() -> list[Variant]:
    """The specialisations the losses launch by default (``path`` says which) that stream the
    vocabulary (the split's combine kernel, also launched, works per row)."""
    return [v for v in _collect(_path_cases()) if v.path and v.loops]


# --------------------------------------------------------------------------- compiling


@dataclasses.dataclass
class Compiled:
    variant: Variant
    arch: int
    cubin: bytes
    n_regs: int
    n_spills: int  # spill stores + loads, bytes (ptxas)
    local: int  # local memory (stack frame), bytes
    shared: int
    num_warps: int
    ptxas_log: str

    sass: str  # nvdisasm listing (kept in the cache entry)


def _cache_dir() -> Path:
    from fastdpo import _build

    return _build.cache_root() / "triton-static"


def _entry_key(v: Variant, arch: int) -> str:
    import triton

    blob = json.dumps({"src": _kernel_source_hash(), "triton": triton.__version__, "arch": arch, **v.spec()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _load_entry(v: Variant, arch: int) -> Compiled | None:
    d = _cache_dir() / _entry_key(v, arch)
    try:
        meta = json.loads((d / "meta.json").read_text())
        cubin = (d / "kernel.cubin").read_bytes()
        sass_text = (d / "kernel.sass").read_text()
    except (OSError, ValueError):
        return None
    if hashlib.sha256(cubin).hexdigest() != meta.get("sha256"):
        return None
    return Compiled(v, arch, cubin, meta["n_regs"], meta["n_spills"], meta["local"], meta["shared"],
                    meta["num_warps"], meta["ptxas_log"], sass_text)


def compile_variant(v: Variant, arch: int = 90) -> Compiled:
    """Compile ``v`` for ``sm_<arch>`` (cached on disk by source hash, Triton version and specialisation)."""
    got = _load_entry(v, arch)
    if got is None:
        compile_variants([v], (arch,))
        got = _load_entry(v, arch)
        if got is None:
            raise RuntimeError(f"fastdpo: compiling {v.label} for sm_{arch} left no cache entry")
    return got


def compile_variants(variants, archs=ARCHS, jobs: int | None = None, progress: bool = True) -> list[Compiled]:
    """Compile every (variant, arch) not cached yet, in ``jobs`` child processes, and return all."""
    todo = [(v, a) for v in variants for a in archs if _load_entry(v, a) is None]
    if todo:
        jobs = max(1, min(jobs or os.cpu_count() or 1, 4, len(todo)))
        t0 = time.time()
        if progress:
            print(f"fastdpo: compiling {len(todo)} Triton kernel specialisations ({jobs} processes) ...",
                  file=sys.stderr, flush=True)
        procs = []
        with tempfile.TemporaryDirectory() as tmp:
            # Triton's own cache would skip ptxas, whose report gives registers and spills.
            env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
            env["TRITON_CACHE_DIR"] = str(Path(tmp) / "triton-cache")
            for j in range(jobs):
                part = todo[j::jobs]
                f = Path(tmp) / f"jobs{j}.json"
                f.write_text(json.dumps([{"arch": a, "key": _entry_key(v, a), **v.spec()} for v, a in part]))
                procs.append(subprocess.Popen([sys.executable, "-m", "fastdpo.bench.triton_static", "--worker",
                                               str(f)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              text=True))
            outs = [p.communicate()[0] for p in procs]
        failed = [o for p, o in zip(procs, outs) if p.returncode != 0]
        if failed:
            raise RuntimeError("fastdpo: compiling Triton kernels failed:\n" + failed[0][-4000:])
        if progress:
            print(f"fastdpo: compiled in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    out = []
    for v in variants:
        for a in archs:
            got = _load_entry(v, a)
            if got is None:
                raise RuntimeError(f"fastdpo: no compiled entry for {v.label} sm_{a}")
            out.append(got)
    return out


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _worker(job_file: str) -> None:
    """Child process: compile the jobs of ``job_file`` into the cache (no TRITON_INTERPRET here)."""
    import contextlib
    import importlib
    import io

    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastdpo.bench import sass

    mod = importlib.import_module(_KERNEL_MODULE)
    for job in json.loads(Path(job_file).read_text()):
        fn = getattr(mod, job["kernel"])
        sig = {n: t for n, t in job["signature"]}
        cons = {n: v for n, v in job["constexprs"]}
        for n in cons:
            sig[n] = "constexpr"
        sig = {n: sig[n] for n in fn.arg_names}
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in job["divisible"]}
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            ck = triton.compile(ASTSource(fn, sig, cons, attrs), target=GPUTarget("cuda", job["arch"], 32),
                                options={"num_warps": job["num_warps"]})
        text = log.getvalue()
        regs = [int(m) for m in _PTXAS.findall(text)]
        spills = _SPILL.findall(text)
        cubin = ck.asm["cubin"]
        meta = {"n_regs": max(regs) if regs else -1,
                "n_spills": sum(int(a) + int(b) for _, a, b in spills) if spills else 0,
                "local": max((int(s) for s, _, _ in spills), default=0), "shared": int(ck.metadata.shared),
                "num_warps": int(ck.metadata.num_warps), "ptxas_log": text[-2000:],
                "sha256": hashlib.sha256(cubin).hexdigest()}
        if meta["n_regs"] < 0:
            raise RuntimeError(f"no ptxas register report for {job['kernel']}:\n{text[-1000:]}")
        d = _cache_dir() / job["key"]
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=".tmp-"))
        (tmp / "kernel.sass").write_text(sass.disassemble(cubin))
        (tmp / "kernel.cubin").write_bytes(cubin)
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, d)
        except OSError:  # another process wrote it first: same content
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- main loops (fastdpo.bench.sass)


def _is_vector_loop(lp) -> bool:
    """All global loads and stores 128-bit, at least one load: a fast path's loop (the kernels also
    hold masked partial blocks and loops for rows aligned differently, with narrower accesses)."""
    return bool(lp.loads) and set(lp.loads) == {16} and set(lp.stores) <= {16}


def main_loops(v: Variant, sass_text: str) -> list:
    """The main loops of ``v`` (``fastdpo.bench.sass.Loop``), matched to ``v.loops`` by their
    128-bit loads per iteration; raises when one is missing."""
    from fastdpo.bench import sass

    instrs = next(iter(sass.parse_sass(sass_text).values()), [])
    cands = [lp for lp in sass.innermost(sass.find_loops(instrs)) if _is_vector_loop(lp)]
    picked = []
    for _, nldg in v.loops:
        hit = [lp for lp in cands if lp not in picked and lp.loads[16] == nldg]
        if not hit:
            raise AssertionError(f"{v.label}: no main loop with {nldg} 128-bit loads in the SASS "
                                 f"(vector loops: {[lp.summary() for lp in cands]})")
        picked.append(hit[0])
    return picked


def kernel_profile(v: Variant, c: Compiled):
    """``fastdpo.bench.sass.KernelProfile`` of a compiled variant: its main loops and resources."""
    from fastdpo.bench import sass

    return sass.KernelProfile(v.kernel, main_loops(v, c.sass), c.n_regs, c.shared, c.local, 32 * c.num_warps)


def roofline(v: Variant, c: Compiled):
    """Instructions, MUFU ops and HBM bytes per vocabulary position (``fastdpo.bench.sass.Roofline``)."""
    from fastdpo.bench import sass

    prof = kernel_profile(v, c)
    model = sass.roofline(prof, _ITEMSIZE[v.dtype], v.bytes_per_elem)
    # the loop model and the SASS agree: per iteration set, the loops cover v.loops' positions
    rows = v.bytes_per_elem / _ITEMSIZE[v.dtype]
    elems = sum(lp.elements(_ITEMSIZE[v.dtype]) for lp in prof.loops) / rows
    assert all(elems == per for per, _ in v.loops), (v.label, elems, [lp.summary() for lp in prof.loops])
    return model


def loop_barriers(v: Variant, c: Compiled) -> int:
    """Barriers and shuffles in the main loops (0: the lanes merge once per row, after the loop)."""
    return sum(1 for lp in main_loops(v, c.sass) for i in lp.instrs if i.base in ("BAR", "SHFL"))


def loop_stores_128(v: Variant, c: Compiled) -> bool:
    """Whether the main loops store (the backward's gradient) and only with 128-bit stores."""
    loops = main_loops(v, c.sass)
    return all(lp.stores and set(lp.stores) == {16} for lp in loops)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastdpo.bench.triton_static",
                                description="Compile every Triton launcher specialisation for sm_80 and sm_90 "
                                            "(cached) and report spills, local memory and main loops; the roofline "
                                            "table is `python -m fastdpo.bench roofline`.")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        _worker(a.worker)
        return 0
    variants = launcher_variants()
    bad = []
    for c in compile_variants(variants):
        if c.n_spills or c.local:
            bad.append(f"{c.variant.label} sm_{c.arch}: {c.n_spills} B spilled, {c.local} B local")
        if c.variant.loops:
            try:
                main_loops(c.variant, c.sass)
            except AssertionError as e:
                bad.append(f"{c.variant.label} sm_{c.arch}: {e}")
    print(f"{len(variants)} Triton kernel specialisations x sm_{'/sm_'.join(map(str, ARCHS))}: "
          f"{'all clean' if not bad else f'{len(bad)} problem(s)'}")
    for b in bad:
        print("  " + b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
