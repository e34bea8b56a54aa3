"""The SASS main-loop profiler and the roofline model (fastdpo.bench.sass), on hand-written
listings and on small kernels compiled with nvcc where the right answer is known."""

from __future__ import annotations

import pytest

from fastdpo import _build
from fastdpo.bench import sass


def _listing(body: list[str], name: str = "kern", labels: bool = False) -> str:
    """A one-kernel listing in cuobjdump's format (hex branch targets) or nvdisasm's (labels).
    ``body`` lines are instructions; "L:" marks the next instruction as the target ``L``."""
    out = [f"\t\tFunction : {name}"] if not labels else [f".text.{name}:"]
    addr, marks, pend = 0, {}, []
    rows = []
    for line in body:
        if line.endswith(":"):
            pend.append(line[:-1])
            continue
        for p in pend:
            marks[p] = addr
        rows.append((addr, line, list(pend)))
        pend = []
        addr += 0x10
    for a, line, labs in rows:
        if labels:
            out += [f".L_{lab}:" for lab in labs]
        for lab, where in marks.items():
            tok = f"->{lab}"
            if tok in line:
                line = line.replace(tok, f"`(.L_{lab})" if labels else f"{where:#x}")
        out.append(f"        /*{a:04x}*/                   {line} ;   /* 0x000fe20000000f00 */")
    return "\n".join(out) + "\n"


LOOP = [
    "MOV R1, c[0x0][0x28]",
    "ISETP.GE.AND P0, PT, R0, R3, PT",
    "@P0 BRA ->end",
    "head:",
    "LDG.E.128.CONSTANT R4, desc[UR4][R2.64]",
    "FMUL R4, R4, 1.4426950216293334961",
    "MUFU.EX2 R4, R4",
    "FADD R8, R8, R4",
    "IADD3 R2, P1, R2, 0x1000, RZ",
    "ISETP.NE.AND P0, PT, R2, R9, PT",
    "@P0 BRA ->head",
    "end:",
    "STG.E desc[UR4][R10.64], R8",
    "EXIT",
    "self:",
    "BRA ->self",
    "NOP",
]


@pytest.mark.parametrize("labels", [False, True], ids=["cuobjdump", "nvdisasm"])
def test_loop_body_counts_on_a_hand_written_listing(labels):
    ks = sass.parse_sass(_listing(LOOP, labels=labels))
    ins = ks["kern"]
    assert [i.target for i in ins if i.base == "BRA"] == [0xA0, 0x30, 0xC0]
    loops = sass.find_loops(ins)
    assert [(lp.start, lp.end) for lp in loops] == [(0x30, 0x90), (0xC0, 0xC0)]
    [main] = sass.main_loops(ins)  # the trap loop at the end moves no memory
    assert (main.start, main.end) == (0x30, 0x90)
    assert main.n_instr == 7 and main.n_mufu == 1 and dict(main.mufu) == {"EX2": 1}
    assert dict(main.loads) == {16: 1} and main.load_bytes == 16 and not main.stores
    assert main.elements(2) == 8 and main.elements(4) == 4
    assert main.n_cond_branches == 0


def _unrolled(c: int, mufu_per_load: int = 1) -> list[str]:
    body = []
    for k in range(c):
        body += [f"LDG.E.128.CONSTANT R{4 + 4 * k}, desc[UR4][R2.64+{k * 0x800:#x}]"]
        body += [f"MUFU.EX2 R{4 + 4 * k}, R{4 + 4 * k}"] * mufu_per_load
        body += [f"FADD R30, R30, R{4 + 4 * k}"]
    return body


def test_unroll_remainder_is_dropped_but_passes_split_by_a_reduction_are_kept():
    rem = ["r:"] + _unrolled(1) + ["IADD3 R2, P1, R2, 0x800, RZ", "@P0 BRA ->r"]
    big = ["b:"] + _unrolled(4) + ["IADD3 R2, P1, R2, 0x2000, RZ", "@P0 BRA ->b"]
    one_pass = sass.main_loops(sass.parse_sass(_listing(rem + big + ["EXIT"]))["kern"])
    assert [dict(lp.loads) for lp in one_pass] == [{16: 4}]
    # a block reduction between them: two passes (e.g. the policy row, then the reference row)
    two = sass.main_loops(sass.parse_sass(_listing(rem + ["SHFL.DOWN PT, R5, R30, 0x10, 0x1f"] + big +
                                                   ["EXIT"]))["kern"])
    assert [dict(lp.loads) for lp in two] == [{16: 1}, {16: 4}]
    prof = sass.KernelProfile("k", two)
    instr, mufu, _, elems = prof.per_element(2, rows=2)
    assert elems == (8 + 32) / 2
    assert instr == pytest.approx((two[0].n_instr + two[1].n_instr) / elems)
    assert mufu == pytest.approx(5 / elems)


def test_store_only_loops_are_not_main_loops_when_a_loop_reads():
    fill = ["f:", "STG.E.128 desc[UR4][R2.64], RZ", "IADD3 R2, P1, R2, 0x1000, RZ", "@P0 BRA ->f"]
    grad = ["g:", "LDG.E.128 R4, desc[UR4][R6.64]", "MUFU.EX2 R4, R4", "STG.E.128 desc[UR4][R8.64], R4",
            "@P0 BRA ->g"]
    [lp] = sass.main_loops(sass.parse_sass(_listing(fill + ["BAR.SYNC.DEFER_BLOCKING 0x0"] + grad))["kern"])
    assert dict(lp.loads) == {16: 1} and dict(lp.stores) == {16: 1} and lp.elements(2) == 16
    assert [dict(x.stores) for x in sass.main_loops(sass.parse_sass(_listing(fill))["kern"])] == [{16: 1}]


def test_memory_widths_and_kinds():
    assert sass._mem_width("LDG.E.128.CONSTANT") == 16
    assert sass._mem_width("STG.E.U16") == 2 and sass._mem_width("LDG.E.64") == 8 and sass._mem_width("STG.E") == 4
    assert sass._mem_kind("LDS.64") == "shared" and sass._mem_kind("STL") == "local" and sass._mem_kind("LDC") is None


# --------------------------------------------------------------------------- roofline model


def test_roofline_arithmetic_at_h100_rates():
    h = sass.H100
    assert h.issue_rate == pytest.approx(132 * 4 * 32 * 1.98e9) and h.issue_rate == pytest.approx(33.45e12, rel=1e-3)
    assert h.sfu_rate == pytest.approx(h.issue_rate / 8)
    # bf16 forward over one row: 2 bytes per element, 16 instructions, 2 MUFU ops
    c = sass.Roofline(2, 16, 2).ceilings(h)
    mem = 2 / 3.35e12
    assert c["issue"] == pytest.approx(mem / (16 / (132 * 128 * 1.98e9)))
    assert c["sfu"] == pytest.approx(mem / (2 / (132 * 16 * 1.98e9)))
    assert c["ceiling"] == min(c["issue"], c["sfu"]) and c["bound"] == ("issue" if c["issue"] <= c["sfu"] else "sfu")
    assert 1.24 < c["sfu"] < 1.25  # two MUFU ops per bf16 element are just short of 1.25x
    # H200: same SMs and clock, faster HBM -> lower ceilings as a multiple of its bandwidth
    assert sass.Roofline(2, 16, 2).ceilings(sass.H200)["ceiling"] == pytest.approx(c["ceiling"] * 3.35 / 4.8)
    assert sass.Roofline(2, 0, 0).ceilings(h)["ceiling"] == float("inf")


@pytest.mark.parametrize("regs,shared,threads,warps", [
    (32, 0, 256, 64),  # the register file holds all 64 warps
    (64, 0, 256, 32),
    (40, 0, 256, 48),  # 1280 registers per warp: 12 warps per scheduler, 6 blocks of 8
    (255, 0, 128, 8),
    (32, 100 * 1024, 256, 16),  # two blocks' shared memory per SM
    (16, 0, 32, 32),  # at most 32 blocks per SM
])
def test_resident_warps(regs, shared, threads, warps):
    assert sass.resident_warps(regs, shared, threads) == warps


# --------------------------------------------------------------------------- compiled kernels

needs_nvcc = pytest.mark.skipif(_build.cuda_home() is None, reason="needs nvcc (a CUDA toolkit)")


def _tools_ok():
    try:
        sass.tool("nvdisasm")
        sass.tool("cuobjdump")
        return True
    except FileNotFoundError:
        return False


needs_tools = pytest.mark.skipif(not _tools_ok(), reason="needs nvdisasm and cuobjdump (CUDA toolkit or triton)")

# One pass: a float4 per iteration and exactly two ex2.approx per iteration, unrolling off.
EXP_LOOP = r"""
__global__ void __launch_bounds__(128) k(const float4* __restrict__ x, float* out, int n) {
  float s = 0.f;
#pragma unroll 1
  for (int i = threadIdx.x; i < n; i += 128) {
    const float4 v = x[i];
    float a, b;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(a) : "f"(v.x));
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(b) : "f"(v.y));
    s += a + b + v.z * v.w;
  }
  out[threadIdx.x] = s;
}
"""

# bf16 row scaled by 2 with one 128-bit load and one 128-bit store per iteration.
BF16_SCALE = r"""
#include <cuda_bf16.h>
__global__ void __launch_bounds__(256) k(const uint4* __restrict__ x, uint4* __restrict__ y, int n) {
#pragma unroll 1
  for (int i = threadIdx.x; i < n; i += 256) {
    uint4 v = x[i];
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int j = 0; j < 4; ++j) h[j] = __hmul2(h[j], __float2bfloat162_rn(2.f));
    y[i] = v;
  }
}
"""

# The compiler's own unrolling (a remainder loop, then a loop over 4 float4 at once), then a
# block reduction and a second pass over another array.
TWO_PASSES = r"""
__global__ void __launch_bounds__(128) k(const float4* __restrict__ x, const float4* __restrict__ r, float* out, int n) {
  __shared__ float sm[128];
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += 128) { const float4 v = x[i]; s += __expf(v.x) + v.y * v.z * v.w; }
  sm[threadIdx.x] = s;
  __syncthreads();
  float t = sm[(threadIdx.x + 1) % 128];
#pragma unroll 1
  for (int i = threadIdx.x; i < n; i += 128) { const float4 v = r[i]; t += v.x * v.y * v.z * v.w; }
  out[threadIdx.x] = t;
}
"""


def _kernel(src: str):
    cubin = sass.nvcc_cubin(src)
    [(name, ins)] = sass.parse_sass(sass.disassemble(cubin)).items()
    return cubin, ins


@needs_nvcc
@needs_tools
def test_compiled_loop_with_two_exps_per_float4(tmp_path):
    cubin, ins = _kernel(EXP_LOOP)
    [lp] = sass.main_loops(ins)
    assert lp.n_mufu == 2 and dict(lp.mufu) == {"EX2": 2}
    assert dict(lp.loads) == {16: 1} and not lp.stores and lp.elements(4) == 4
    assert lp.n_instr >= 8  # load, 2 MUFU, FFMA/FADD chain, induction, compare, branch
    prof = sass.KernelProfile("k", [lp])
    instr, mufu, _, elems = prof.per_element(4, rows=1)
    assert elems == 4 and mufu == 0.5 and instr == lp.n_instr / 4
    path = tmp_path / "k.cubin"
    path.write_bytes(cubin)
    assert sass.launch_bounds(path) == {"_Z1kPK6float4Pfi": 128}
    [res] = sass.resource_usage(path).values()  # a cubin's listing names no architecture
    assert res["_Z1kPK6float4Pfi"]["LOCAL"] == 0 and res["_Z1kPK6float4Pfi"]["REG"] > 0


@needs_nvcc
@needs_tools
def test_compiled_bf16_loop_stores_128_bit_vectors():
    _, ins = _kernel(BF16_SCALE)
    [lp] = sass.main_loops(ins)
    assert dict(lp.loads) == {16: 1} and dict(lp.stores) == {16: 1}
    assert any(i.op.startswith("STG.E.128") for i in lp.instrs)
    assert lp.elements(2) == 16 and lp.n_mufu == 0
    assert sass.KernelProfile("k", [lp]).per_element(2, rows=2)[3] == 8  # 8 bf16 read + 8 written


@needs_nvcc
@needs_tools
def test_compiled_unrolled_pass_and_second_pass():
    _, ins = _kernel(TWO_PASSES)
    loops = sass.main_loops(ins)
    assert len(loops) == 2, [lp.summary() for lp in loops]
    first, second = loops
    assert first.loads[16] >= 2 and first.n_mufu == first.loads[16]  # the unrolled body, one exp per float4
    assert dict(second.loads) == {16: 1} and second.n_mufu == 0
    assert all(lp.start > 0 for lp in loops) and first.end < second.start


# --------------------------------------------------------------------------- the roofline table


def _row(instr, mufu, bpe=2.0, label="fwd"):
    from fastdpo.bench import roofline

    return roofline.Row("cuda", label, "token_logprobs", "bf16", "k", [], sass.Roofline(bpe, instr, mufu), 32, 0, 0,
                        256, 64)


def test_roofline_table_flags_variants_below_the_headroom():
    from fastdpo.bench import roofline

    ok, slow = _row(8.0, 1.0), _row(30.0, 1.0, label="slow")
    table = roofline.format_table([ok, slow])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[1].count("---") == lines[0].count("|") - 1
    assert "**<1.25**" in lines[3] and "**<1.25**" not in lines[2]
    assert ok.ceiling() == pytest.approx(min(sass.H100.issue_rate / 8, sass.H100.sfu_rate) * 2 / 3.35e12)
    bad = roofline.failures([ok, slow])
    assert len(bad) == 1 and "slow" in bad[0] and "issue-bound" in bad[0]
    err = roofline.Row("cuda", "gone", "p", "bf16", "k", [], None, error="kernel not found")
    assert roofline.failures([err]) == ["cuda bf16 gone: kernel not found"]
    assert "error: kernel not found" in roofline.format_table([err])


def test_roofline_says_when_the_triton_side_is_absent(monkeypatch):
    import sys

    import fastdpo.bench
    from fastdpo.bench import roofline

    monkeypatch.setitem(sys.modules, "fastdpo.bench.triton_static", None)  # import raises ImportError
    monkeypatch.delattr(fastdpo.bench, "triton_static", raising=False)  # also when imported before
    rows, note = roofline.triton_rows()
    assert rows == [] and "triton_static is not available" in note


def test_roofline_command_is_dispatched_by_the_bench_cli():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "fastdpo.bench", "roofline", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "python -m fastdpo.bench roofline" in p.stdout and "--check" in p.stdout
