"""Static check of the compiled Triton kernels, without a GPU.

Every specialisation the launchers of ``fastdpo/kernels/triton.py`` produce (recorded on meta
tensors for every dtype, option set, vocabulary size and layout, see
``fastdpo.bench.triton_static``) is compiled with Triton's own compiler for sm_80 and sm_90:
no spills, no local memory, main loops that read rows with 128-bit loads (and write the
gradient with 128-bit stores) and hold no barrier or shuffle; the loss paths' main loops stay
memory-bound at H100 rates (issue and SFU time below memory time / 1.25), and few rows are split
over the vocabulary so that at least two waves are in flight. Compiled kernels are cached on disk
by source hash, so a second run takes seconds.
"""

from __future__ import annotations

import collections
import re

import pytest

pytest.importorskip("triton")
from fastdpo.bench import roofline, sass  # noqa: E402
from fastdpo.bench import triton_static as ts  # noqa: E402


def _no_cuda_backend() -> str | None:
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        make_backend(GPUTarget("cuda", 90, 32))
        from fastdpo.bench import sass

        sass.tool("nvdisasm")
    except Exception as e:  # noqa: BLE001 - any reason the toolchain is missing
        return f"Triton's CUDA backend or nvdisasm is unavailable: {e}"
    return None


pytestmark = pytest.mark.skipif(_no_cuda_backend() is not None, reason=str(_no_cuda_backend()))


@pytest.fixture(scope="module")
def variants():
    return ts.launcher_variants()


@pytest.fixture(scope="module")
def compiled(variants):
    return ts.compile_variants(variants, ts.ARCHS)


def test_variants_span_dtypes_options_vocabularies_and_layouts(variants):
    by_kernel = collections.defaultdict(set)
    for v in variants:
        c = dict(v.constexprs)
        if v.kernel == "logprobs_fwd_kernel":
            by_kernel[v.kernel].add((v.dtype, c["CAP"], c["STATS"], c["HAS_REF"], c["KL"]))
        elif v.kernel == "logprobs_bwd_kernel":
            by_kernel[v.kernel].add((v.dtype, c["CAP"], c["HAS_KL"]))
    fwd = {(d, cap, st, ref, kl) for d in ts.DTYPES for cap in (0, 1, 2) for st in (False, True)
           for ref, kl in ((False, False), (True, False), (True, True))}
    assert by_kernel["logprobs_fwd_kernel"] == fwd
    assert by_kernel["logprobs_bwd_kernel"] == {(d, cap, kl) for d in ts.DTYPES for cap in (0, 1) for kl in (False, True)}
    names = {v.kernel for v in variants}
    assert names >= {"logprobs_fwd_kernel", "logprobs_combine_kernel", "logprobs_bwd_kernel", "lse_fold_kernel",
                     "tile_grad_kernel", "segment_sum_kernel"}


def test_int64_strides_and_every_alignment_share_one_kernel(variants):
    # Integer arguments have fixed types and are not specialised; rows align themselves: a batch
    # with strides beyond 2^31, a view moved by one row of an odd vocabulary and the plain
    # layout launch the same compiled kernel.
    keys = {v.key for v in variants}
    for dtype in ts.DTYPES:
        for V in (7, 50257):
            for op in ("fwd", "bwd"):
                # the main kernel (few-row layouts also launch the split's combine kernel)
                got = {ts._variant(c, ts._record(c)[0]).key for c in (
                    ts._Case(op, dtype, V, layout, stats=True, ref=True)
                    for layout in ("contig", "slice", "shift", "i64", "tile"))}
                assert len(got) == 1 and got <= keys, (dtype, V, op)
    strides = [t for v in variants if v.kernel == "logprobs_fwd_kernel" for n, t in v.signature if n == "sxb"]
    assert set(strides) == {"i64"}


def test_every_variant_compiles_for_sm80_and_sm90_without_spills_or_local_memory(variants, compiled):
    assert len(compiled) == 2 * len(variants)
    assert {c.arch for c in compiled} == set(ts.ARCHS)
    bad = [(c.variant.label, c.arch, c.n_spills, c.local) for c in compiled if c.n_spills or c.local]
    assert not bad, bad
    local = re.compile(r"\b(LDL|STL)(\.\w+)*\b")
    bad = [(c.variant.label, c.arch) for c in compiled if local.search(c.sass)]
    assert not bad, bad
    assert all(c.n_regs > 0 for c in compiled)


def test_main_loops_are_vector_loads_without_barriers(compiled):
    for c in compiled:
        v = c.variant
        if not v.loops:
            continue
        assert ts.loop_barriers(v, c) == 0, (v.label, c.arch)  # finds each main loop by its 128-bit loads, else raises
        if v.kernel in ("logprobs_bwd_kernel", "tile_grad_kernel"):
            assert ts.loop_stores_128(v, c), (v.label, c.arch)  # the gradient goes out as 128-bit stores


def test_loss_paths_are_memory_bound_at_h100_rates():
    # The default variants of dpo_loss, linear_dpo_loss's folds, RRPO/TDPO's KL and soft-capped
    # models: main-loop issue and SFU time per vocabulary position at most memory time / 1.25, as
    # the roofline command (python -m fastdpo.bench roofline --check, docs/gpu.md's table) reports them.
    rows, note = roofline.triton_rows()
    assert note is None and rows, note
    assert {p for r in rows for p in r.path.split("; ")} >= {
        "dpo_loss forward", "dpo_loss backward", "rrpo/tdpo forward (KL)", "rrpo/tdpo backward (KL)",
        "linear fold, policy", "linear fold, reference", "linear fold, KL", "linear tile gradient",
        "dpo_loss forward, soft cap 30", "linear fold, policy, soft cap 30"}
    assert roofline.failures(rows) == [], roofline.format_table(rows)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_few_rows_keep_two_waves_in_flight(dtype):
    # At V = 128k, N >= 64 rows are split over the vocabulary so that the grid holds at least two
    # waves of the compiled kernel's resident programs (from its registers) on an H100's SMs.
    for rows in (64, 100, 256, 777, 1056):
        case = ts._Case("fwd", dtype, 128256, "contig", rows=rows, stats=True, ref=True)
        launch = ts._record(case)[0]
        c = ts.compile_variant(ts._variant(case, launch), 90)
        resident = sass.resident_warps(c.n_regs, c.shared, 32 * c.num_warps) // c.num_warps
        programs = launch[1][0] * launch[1][1]
        assert programs >= 2 * sass.H100.sms * resident, (rows, programs, resident)


def test_compiled_kernels_are_cached(variants):
    import time

    v = variants[0]
    first = ts.compile_variant(v, 90)
    t = time.perf_counter()
    again = ts.compile_variant(v, 90)
    assert time.perf_counter() - t < 5.0
    assert again.cubin == first.cubin and again.sass == first.sass
