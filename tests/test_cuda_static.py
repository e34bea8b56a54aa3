"""Static checks of the CUDA extension's compiled code, without a GPU: the library built for
sm_80 and sm_90 uses no local memory, keeps registers within its launch bounds, embeds PTX,
stores 128-bit vectors in the backward, and every kernel variant the losses use has at least
1.25x headroom over HBM bandwidth in the SASS roofline at H100 rates (fastdpo.bench.roofline)."""

from __future__ import annotations

import pytest
import torch

from fastdpo import _build
from fastdpo.bench import roofline, sass


def _tools_ok() -> bool:
    try:
        sass.tool("cuobjdump")
        return True
    except FileNotFoundError:
        return False


pytestmark = pytest.mark.skipif(
    not torch.version.cuda or _build.cuda_home() is None or not _tools_ok(),
    reason="needs a CUDA build of torch, a CUDA toolkit (nvcc) and cuobjdump",
)

ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def lib():
    return roofline.cuda_library()  # cached by source hash: built once per change of csrc/


@pytest.fixture(scope="module")
def kernels(lib):
    return {arch: roofline.cuda_kernels(lib, arch) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_no_local_memory_and_registers_within_launch_bounds(lib, arch):
    res = sass.resource_usage(lib)[arch]
    attrs = sass.kernel_attributes(lib, arch)
    assert len(res) >= 30, sorted(res)  # every forward/backward specialisation is there
    for name, r in res.items():
        assert r["LOCAL"] == 0 and r["STACK"] == 0, (name, r)
        a = attrs.get(name, {})
        assert "max_threads" in a and "max_regs" in a, f"{name} has no __launch_bounds__"
        assert r["REG"] <= a["max_regs"], (name, r["REG"], a)
        assert r["REG"] * a["max_threads"] <= 65536, (name, r["REG"], a)


def test_library_embeds_ptx(lib):
    assert sass.embedded_ptx(lib), "the CUDA library embeds no PTX: GPUs newer than the built archs cannot run it"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_backward_stores_128_bit_vectors(kernels, arch, dtype):
    ks = kernels[arch]
    for v in (v for v in roofline.CUDA_VARIANTS if v.backward):
        tmpl = v.template.format(T=roofline._CXX_DTYPE[dtype])
        key = roofline.find_kernel(ks, v.kernel, tmpl)
        assert key is not None, (v.kernel, tmpl)
        loops = roofline.select_loops(sass.main_loops(ks[key]["instrs"]), v.loops)
        assert loops, f"{v.label} {dtype}: no main loop with 128-bit stores"
        for lp in loops:
            stores = [i.op for i in lp.instrs if sass._mem_kind(i.op) == "store"]
            assert stores and all(op.startswith("STG.E") and ".128" in op for op in stores), (v.label, stores)


def test_every_default_variant_has_headroom_at_h100_rates(lib):
    rows = roofline.cuda_rows(lib)
    defaults = [r for r in rows if r.default]
    assert len(defaults) == 3 * sum(v.default for v in roofline.CUDA_VARIANTS)
    assert roofline.failures(rows) == [], roofline.format_table(rows)
    for r in defaults:  # one read of each row: KL and reference folded into the policy's loop
        assert len(r.loops) == 1, (r.dtype, r.label, r.loops)
