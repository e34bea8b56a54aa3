"""The CUDA C++ backend: built and linked for sm_80 and sm_90 everywhere (CI has
no GPU), compared with the torch reference where a GPU is present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fastdpo
from fastdpo import _build

needs_toolkit = pytest.mark.skipif(
    not torch.version.cuda or _build.cuda_home() is None,
    reason="needs a CUDA build of torch and a CUDA toolkit (nvcc) to compile the extension",
)


@needs_toolkit
def test_extension_builds_links_and_registers_cuda_kernels(monkeypatch):
    monkeypatch.setenv("FASTDPO_CUDA_ARCHS", "80;90")
    assert _build.torch_arch_list() == "8.0;9.0"
    path = _build.load_extension("cuda")
    assert path.endswith(".so")
    for op in ("logprobs_fwd", "logprobs_bwd", "logprobs_bwd_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdpo::{op}", "CUDA"), op
    log = Path(path).parent.parent / (Path(path).parent.name + ".log")
    if log.is_file():  # built in this cache: both architectures were compiled, warnings are errors
        text = log.read_text()
        assert "-gencode=arch=compute_80,code=sm_80" in text and "-gencode=arch=compute_90,code=sm_90" in text
        assert "--Werror=all-warnings" in text


def test_cuda_backend_explains_why_it_cannot_run_on_cpu_tensors():
    with pytest.raises(fastdpo.BackendUnavailableError, match="CUDA tensors"):
        fastdpo.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), backend="cuda")


def _case(shape, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, V, generator=g) * 3).to(dtype).cuda()
    y = torch.randint(0, V, shape, generator=g)
    y[torch.rand(shape, generator=g) < 0.3] = -100
    return x, y.cuda(), torch.randn(shape, generator=g).cuda()


def _run(backend, x, y, w, ref=None, inplace=False, **kw):
    xx = x.detach().clone().requires_grad_()
    logits = xx.view_as(xx) if inplace else xx
    out = fastdpo.fused_logprobs(logits, y, ref_logits=ref, backend=backend, stats=True, inplace_backward=inplace,
                                 **kw)
    (out.logps * w).sum().backward()
    return out, xx.grad


TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1, 7, 1000, 4097, 262144])
@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7, "softcap": 5.0}])
@pytest.mark.parametrize("inplace", [False, True])
def test_matches_reference_on_gpu(dtype, V, kw, inplace):
    x, y, w = _case((2, 5), V, dtype)
    y[1] = -100  # a fully ignored sequence
    r, _, _ = _case((2, 5), V, dtype, seed=1)
    ot, gt = _run("torch", x, y, w, ref=r, **kw)
    ok, gk = _run("cuda", x, y, w, ref=r, inplace=inplace, **kw)
    tol = TOL[dtype]
    assert torch.allclose(ok.logps, ot.logps, atol=tol, rtol=tol)
    assert torch.allclose(ok.ref_logps, ot.ref_logps, atol=tol, rtol=tol)
    assert torch.allclose(ok.stats, ot.stats, atol=tol * 10, rtol=tol)
    assert torch.allclose(gk.float(), gt.float(), atol=tol, rtol=tol)
    assert (gk[1] == 0).all()


@pytest.mark.gpu
def test_gpu_bitwise_reproducible_and_strided():
    x, y, w = _case((3, 9), 32000, torch.bfloat16)
    sl, ys, ws = x[:, :-1], y[:, 1:], w[:, 1:]
    a = _run("cuda", sl, ys, ws)
    b = _run("cuda", sl, ys, ws)
    assert torch.equal(a[0].logps, b[0].logps) and torch.equal(a[1], b[1])
    t = _run("torch", sl, ys, ws)
    assert torch.allclose(a[0].logps, t[0].logps, atol=2e-2)


@needs_toolkit
def test_a_warning_in_our_cuda_sources_fails_the_build(tmp_path):
    """The flags the extension is built with turn warnings in our sources into errors."""
    import subprocess

    spec = _build.EXTENSIONS["cuda"]
    flags = _build._flags(spec)["extra_cuda_cflags"]
    src = tmp_path / "warn.cu"
    src.write_text("__global__ void k(float* p) { int unused = 0; p[0] = 1.f; }\n")
    nvcc = str(Path(_build.cuda_home()) / "bin" / "nvcc")
    base = [nvcc, "-c", str(src), "-o", str(tmp_path / "warn.o"), "-gencode=arch=compute_80,code=sm_80"]
    assert subprocess.run(base, capture_output=True).returncode == 0  # a plain build accepts it
    p = subprocess.run(base + flags, capture_output=True, text=True)
    assert p.returncode != 0 and "unused" in (p.stdout + p.stderr)
