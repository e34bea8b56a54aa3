"""The CUDA C++ backend: built and linked for sm_80 and sm_90 everywhere (CI has
no GPU), compared with the torch reference where a GPU is present."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fastdpo
from fastdpo import _build

needs_toolkit = pytest.mark.skipif(
    not torch.version.cuda or _build.cuda_home() is None,
    reason="needs a CUDA build of torch and a CUDA toolkit (nvcc) to compile the extension",
)


def _assert_cuda_kernel_matches_schema(op):
    """The C++ signature registered for CUDA has the schema's argument and return types
    (kl, grad_kl, ref_logits, ref_lse included), read from the dispatcher's dump."""
    schema = getattr(torch.ops.fastdpo, op).default._schema

    def spelled(t):
        s = str(t)
        return s[len("Optional[") : -1] + "?" if s.startswith("Optional[") else s

    want = ([spelled(a.type) for a in schema.arguments], [spelled(r.type) for r in schema.returns])
    line = next(ln for ln in torch._C._dispatch_dump(f"fastdpo::{op}").splitlines() if ln.startswith("CUDA:"))
    m = re.search(r" :: \((.*?)\) -> \(?(.*?)\)? \[", line)
    if m is None:  # the dump format is torch's own; nothing to compare against
        return
    got = tuple([a.split()[0] for a in part.split(", ") if a] for part in m.groups())
    assert got == want, (op, line)


@needs_toolkit
def test_extension_builds_links_and_registers_cuda_kernels(monkeypatch):
    monkeypatch.setenv("FASTDPO_CUDA_ARCHS", "80;90")
    assert _build.torch_arch_list() == "8.0;9.0+PTX"
    path = _build.load_extension("cuda")
    assert path.endswith(".so")
    for op in ("logprobs_fwd", "logprobs_bwd", "logprobs_bwd_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdpo::{op}", "CUDA"), op
        _assert_cuda_kernel_matches_schema(op)
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


# The per-token KL(reference || policy): forward (kl, ref log-probs) and backward with
# both upstream gradients, against the torch backend and a float64 ground truth.


def _kl_case(shape, V, dtype):
    x, y, w = _case(shape, V, dtype)
    r, _, wk = _case(shape, V, dtype, seed=1)
    y[1] = -100  # a fully ignored sequence
    y[0, :3] = torch.tensor([0, V - 1, V // 2])
    w[0, 0] = 0.0  # only the KL gradient
    wk[0, 1] = 0.0  # only the log-prob gradient
    w[0, 2] = wk[0, 2] = 0.0  # neither: the row's gradient is exactly 0
    return x, y, r, w, wk


def _run_kl(backend, x, y, r, w, wk, inplace=False, **kw):
    xx = x.detach().clone().requires_grad_()
    logits = xx.view_as(xx) if inplace else xx
    out = fastdpo.fused_logprobs(logits, y, ref_logits=r, kl=True, stats=True, inplace_backward=inplace,
                                 backend=backend, **kw)
    ((out.logps * w).sum() + (out.kl * wk).sum()).backward()
    return out, xx.grad


def _err(a, truth):
    return (a.double() - truth.double()).abs().max().item()


def _assert_no_worse(got, same_dtype, truth, k, tol, what):
    """got's error vs the float64 truth is within k times the same-dtype torch error, plus tol (relative)."""
    scale = 1.0 + truth.abs().max().item()
    e, e_ref = _err(got, truth), _err(same_dtype, truth)
    assert e <= k * e_ref + tol * scale, f"{what}: error {e:.3g} vs torch's {e_ref:.3g} (scale {scale:.3g})"


# Outputs of the forward are float32 for every input dtype (computed in float32 from exactly
# representable inputs); gradients are rounded to the input dtype (tolerance: one unit in the last place).
FWD_TOL = 2e-5
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1, 7, 1000, 32001, 262144])
@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7, "softcap": 5.0}])
@pytest.mark.parametrize("inplace", [False, True])
def test_kl_matches_reference_on_gpu(dtype, V, kw, inplace):
    x, y, r, w, wk = _kl_case((2, 5), V, dtype)
    o64, g64 = _run_kl("torch", x.double(), y, r.double(), w.double(), wk.double(), **kw)
    ot, gt = _run_kl("torch", x, y, r, w, wk, **kw)
    ok, gk = _run_kl("cuda", x, y, r, w, wk, inplace=inplace, **kw)
    assert ok.kl.dtype == torch.float32 and ok.kl.shape == y.shape
    for name in ("logps", "ref_logps", "kl"):
        _assert_no_worse(getattr(ok, name), getattr(ot, name), getattr(o64, name), 4, FWD_TOL, name)
    _assert_no_worse(gk, gt, g64, 4, GRAD_TOL[dtype], "grad")
    assert (ok.kl[1] == 0).all() and (ok.kl[y == -100] == 0).all()  # ignored tokens
    assert (gk[1] == 0).all() and (gk[y == -100] == 0).all()
    assert (gk[0, 2] == 0).all()  # both upstream gradients 0
    if V > 1:
        assert (gk[0, 0] != 0).any() and (gk[0, 1] != 0).any()  # one of them non-zero
    assert (ok.kl[y != -100] >= -1e-5).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1000, 262144])
@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7, "softcap": 5.0}])
def test_small_kl_is_accurate_on_gpu(dtype, V, kw):
    """Policy close to the reference: a KL of ~1e-3 out of a sum of terms of size ~log V."""
    x, y, _ = _case((2, 5), V, torch.float32)
    r = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).cuda()).to(dtype)
    x = x.to(dtype)
    truth = _run_kl("torch", x.double(), y, r.double(), torch.zeros(y.shape).cuda(), torch.ones(y.shape).cuda(),
                    **kw)[0].kl
    got = fastdpo.fused_logprobs(x, y, ref_logits=r, kl=True, backend="cuda", **kw).kl
    valid = y != -100
    assert (truth[valid] > 1e-4).all()
    torch.testing.assert_close(got.double(), truth, atol=3e-5, rtol=1e-2)


@pytest.mark.gpu
def test_kl_of_large_logits_is_accurate_on_gpu():
    """Logits ~1e4: the KL pass forms log p from the policy's max and log-sum, not a rounded lse."""
    x, y, _ = _case((2, 5), 32000, torch.float32)
    x = x + 1e4
    r = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).cuda()
    truth = fastdpo.fused_logprobs(x.double(), y, ref_logits=r.double(), kl=True, backend="torch").kl
    got = fastdpo.fused_logprobs(x, y, ref_logits=r, kl=True, backend="cuda").kl
    torch.testing.assert_close(got.double(), truth, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
def test_kl_gpu_bitwise_reproducible_with_strided_misaligned_reference():
    V = 32000
    x, y, w = _case((3, 9), V, torch.bfloat16)
    rr, _, wk = _case((3, 8), V + 1, torch.bfloat16, seed=1)
    sl, ys, ws = x[:, :-1], y[:, 1:], w[:, 1:]
    ref = rr[..., 1:]  # own strides; rows start off 16-byte boundaries
    a = _run_kl("cuda", sl, ys, ref, ws, wk)
    b = _run_kl("cuda", sl, ys, ref, ws, wk)
    assert torch.equal(a[0].kl, b[0].kl) and torch.equal(a[0].ref_logps, b[0].ref_logps) and torch.equal(a[1], b[1])
    t = _run_kl("torch", sl, ys, ref, ws, wk)
    strided = fastdpo.fused_logprobs(sl, ys, ref_logits=ref, kl=True, backend="cuda")  # policy strides too
    torch.testing.assert_close(strided.kl, a[0].kl, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(strided.logps, a[0].logps, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a[0].kl, t[0].kl, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a[0].ref_logps, t[0].ref_logps, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(a[1].float(), t[1].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_kl_op_contract_on_gpu():
    ops = torch.ops.fastdpo
    fastdpo.fused_logprobs(torch.randn(1, 2, device="cuda"), torch.zeros(1, dtype=torch.long, device="cuda"),
                           backend="cuda")  # builds and loads the extension
    x, y, g = _case((2, 3), 50, torch.float32)
    r, _, gk = _case((2, 3), 50, torch.float32, seed=1)
    args = (-100, 1.0, 0.0)
    logp, lse, ref_logp, st, kl, ref_lse = ops.logprobs_fwd(x, y, r, *args, False, False)
    assert kl.numel() == 0 and ref_lse.numel() == 0
    with pytest.raises(RuntimeError, match="needs ref_logits"):
        ops.logprobs_fwd(x, y, None, *args, False, True)
    _, lse_k, ref_logp_k, _, kl, ref_lse = ops.logprobs_fwd(x, y, r, *args, False, True)
    assert kl.shape == ref_lse.shape == y.shape
    torch.testing.assert_close(lse_k, lse, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ref_logp_k, ref_logp, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="needs ref_logits and ref_lse"):
        ops.logprobs_bwd(g, x, y, lse, *args, gk, r, None)
    # A zero KL gradient everywhere takes the plain path: the gradient without it.
    plain = ops.logprobs_bwd(g, x, y, lse, *args)
    with_zero_kl = ops.logprobs_bwd(g, x, y, lse, *args, torch.zeros_like(gk), r, ref_lse)
    torch.testing.assert_close(with_zero_kl, plain, atol=1e-7, rtol=1e-6)
    # In place: the reference may be the logits themselves (each element is read before it is
    # written), but not a view that overlaps them elsewhere.
    *_, ref_lse_x = ops.logprobs_fwd(x, y, x, *args, False, True)
    want = ops.logprobs_bwd(g, x, y, lse, *args, gk, x.clone(), ref_lse_x)
    x1 = x.clone()
    ops.logprobs_bwd_(g, x1, y, lse, *args, gk, x1, ref_lse_x)
    assert torch.equal(x1, want)
    big = torch.randn(2, 4, 50, device="cuda")
    with pytest.raises(RuntimeError, match="overlap"):
        ops.logprobs_bwd_(g, big[:, :3], y, lse, *args, gk, big[:, 1:], ref_lse)


# Paths of the reworked kernels: rows split over the vocabulary for small batches, odd-V rows
# peeled to alignment, the soft-cap table (bf16/fp16) and its math fallback, the KL in one read,
# the statistics' argmax test, non-finite inputs. Each against the float64 truth and the
# same-dtype torch backend (error <= 4x torch's + tol).


def _fwd_all(backend, x, y, r=None, kl=False, **kw):
    return fastdpo.fused_logprobs(x, y, ref_logits=r, kl=kl, stats=True, backend=backend, **kw)


def _check_fwd(x, y, r=None, kl=False, **kw):
    got = _fwd_all("cuda", x, y, r, kl, **kw)
    same = _fwd_all("torch", x, y, r, kl, **kw)
    truth = _fwd_all("torch", x.double(), y, None if r is None else r.double(), kl, **kw)
    names = ["logps"] + (["ref_logps"] if r is not None else []) + (["kl"] if kl else [])
    for name in names:
        _assert_no_worse(getattr(got, name), getattr(same, name), getattr(truth, name), 4, FWD_TOL, name)
    valid = y != -100
    for j, what in ((0, "entropy"), (2, "mean logit"), (3, "log sum p^2")):
        _assert_no_worse(got.stats[..., j][valid], same.stats[..., j][valid], truth.stats[..., j][valid], 4,
                         FWD_TOL, what)
    assert torch.equal(got.stats[..., 1][valid], truth.stats[..., 1][valid])  # argmax hit: exact
    return got


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [128256, 151936, 262144])
@pytest.mark.parametrize("mode", ["plain", "ref", "kl"])
def test_small_batches_split_rows_over_the_vocabulary(dtype, V, mode):
    """3 rows cannot fill the GPU: each row is reduced by many blocks and merged by the last."""
    x, y, _ = _case((1, 3), V, dtype)
    y[0, 0] = V - 1
    r = _case((1, 3), V, dtype, seed=1)[0] if mode != "plain" else None
    a = _check_fwd(x, y, r, kl=mode == "kl")
    b = _fwd_all("cuda", x, y, r, mode == "kl")
    assert torch.equal(a.logps, b.logps) and torch.equal(a.stats, b.stats)  # fixed merge order
    # the same rows inside a batch that needs no split agree to rounding
    big_x = torch.cat([x, torch.zeros(1, 4096, V, dtype=dtype, device="cuda")], 1)
    big_y = torch.cat([y, torch.full((1, 4096), -100, device="cuda")], 1)
    big_r = None if r is None else torch.cat([r, torch.zeros_like(big_x[:, 3:])], 1)
    c = _fwd_all("cuda", big_x, big_y, big_r, mode == "kl")
    torch.testing.assert_close(c.logps[:, :3], a.logps, atol=2e-5, rtol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [50257, 32001, 7, 15])
@pytest.mark.parametrize("inplace", [False, True])
def test_odd_vocabularies_peel_to_alignment(dtype, V, inplace):
    """Contiguous odd-V rows start at every alignment; sliced views also misalign logits and
    gradient rows against each other (the backward then stores entry by entry)."""
    x, y, w = _case((3, 9), V, dtype)

    def sliced(backend, x, sl):  # the op sees the strided view x[sl] of a [3, 9, V] tensor
        xx = x.detach().clone().requires_grad_()
        logits = (xx.view_as(xx) if inplace and backend == "cuda" else xx)[sl]
        out = fastdpo.fused_logprobs(logits, y[sl], backend=backend, stats=True,
                                     inplace_backward=inplace and backend == "cuda")
        (out.logps * w[sl]).sum().backward()
        return xx.grad[sl]

    for sl in ((slice(None), slice(None, -1)), (slice(None), slice(1, None))):
        _check_fwd(x[sl], y[sl])
        g64, gt, gk = sliced("torch", x.double(), sl), sliced("torch", x, sl), sliced("cuda", x, sl)
        _assert_no_worse(gk, gt, g64, 4, GRAD_TOL[dtype], f"grad {sl}")
        assert (gk[y[sl] == -100] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,softcap", [(torch.bfloat16, 30.0), (torch.float16, 30.0), (torch.float16, 80.0),
                                           (torch.float32, 30.0), (torch.bfloat16, 5.0)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("mode", ["plain", "ref", "kl"])
def test_softcap_table_and_math_paths(dtype, softcap, temperature, mode):
    """bf16/fp16 soft caps come from a table (fp16 with softcap > 56 and fp32 from the formula);
    logits up to 10x the cap reach tanh's saturation, where table entries are shared."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 7, 32000, generator=g) * softcap * 0.6).to(dtype).cuda()
    x[0, 0, :50] = 10 * softcap  # saturated: ties of the capped logits
    y = torch.randint(0, 32000, (2, 7), generator=g).cuda()
    y[0, 0] = 3  # a tied maximum, not the first one
    y[1, :2] = -100
    r = (x.float() + torch.randn(x.shape, generator=g).cuda()).to(dtype) if mode != "plain" else None
    kw = {"softcap": softcap, "temperature": temperature}
    _check_fwd(x, y, r, kl=mode == "kl", **kw)
    w, wk = torch.randn(2, 7, generator=g).cuda(), torch.randn(2, 7, generator=g).cuda()
    if mode == "kl":
        o64, g64 = _run_kl("torch", x.double(), y, r.double(), w.double(), wk.double(), **kw)
        ot, gt = _run_kl("torch", x, y, r, w, wk, **kw)
        ok, gk = _run_kl("cuda", x, y, r, w, wk, **kw)
    else:
        o64, g64 = _run("torch", x.double(), y, w.double(), **kw)
        ot, gt = _run("torch", x, y, w, **kw)
        ok, gk = _run("cuda", x, y, w, **kw)
    _assert_no_worse(gk, gt, g64, 4, GRAD_TOL[dtype], "grad")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_hit_at_vector_edges_and_ties(dtype):
    """The label is the first argmax iff it is the max and nothing before it is as large: labels
    at the ends of 128-bit vectors, in the peeled head and tail, behind and ahead of ties."""
    V = 4099  # odd: rows start unaligned
    x = torch.randn(4, 8, V).to(dtype)
    y = torch.zeros(4, 8, dtype=torch.long)
    positions = [0, 1, 6, 7, 8, 9, 15, 16, 2047, 2048, V - 2, V - 1]
    for k, p in enumerate(positions):
        row = x.view(-1, V)[k]
        row[p] = 20.0
        y.view(-1)[k] = p
    x.view(-1, V)[12, 100] = x.view(-1, V)[12, 200] = 20.0  # tie: the later one is not the argmax
    y.view(-1)[12] = 200
    x.view(-1, V)[13, 100] = x.view(-1, V)[13, 200] = 20.0  # tie: the first one is
    y.view(-1)[13] = 100
    x.view(-1, V)[14, 5] = 30.0  # the label is not the max
    y.view(-1)[14] = 9
    x, y = x.cuda(), y.cuda()
    got = _check_fwd(x, y)
    hits = got.stats[..., 1].view(-1)
    assert hits[: len(positions)].eq(1).all() and hits[12] == 0 and hits[13] == 1 and hits[14] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_non_finite_logits(dtype, softcap):
    """A NaN makes its row NaN (and only its row); -inf entries (a masked vocabulary) are
    probability 0, also in the statistics and the KL."""
    x, y, _ = _case((2, 4), 5000, dtype)
    r = _case((2, 4), 5000, dtype, seed=1)[0]
    x[0, 0, 17] = float("nan")
    x[0, 1, :1000] = float("-inf")
    r[0, 1, :500] = float("-inf")
    y[0, 1] = 1500
    y[0, 0] = y[0, 2] = 3
    kw = {"softcap": softcap or None}
    got = _fwd_all("cuda", x, y, r, True, **kw)
    want = _fwd_all("torch", x.double(), y, r.double(), True, **kw)
    assert got.logps[0, 0].isnan() and got.kl[0, 0].isnan() and got.stats[0, 0].isnan().all()
    ok = torch.ones_like(y, dtype=torch.bool)
    ok[0, 0] = False
    ok &= y != -100
    for name in ("logps", "ref_logps", "kl"):
        torch.testing.assert_close(getattr(got, name)[ok].double(), getattr(want, name)[ok], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(got.stats[ok].double(), want.stats[ok], atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
def test_split_backward_for_small_batches_and_zero_rows():
    """Backward blocks split long rows too; rows with a zero gradient (or ignored) are zero."""
    x, y, w = _case((1, 4), 262144, torch.bfloat16)
    y[0, 1] = -100
    w[0, 2] = 0.0
    o64, g64 = _run("torch", x.double(), y, w.double())
    ot, gt = _run("torch", x, y, w)
    ok, gk = _run("cuda", x, y, w)
    _assert_no_worse(gk, gt, g64, 4, GRAD_TOL[torch.bfloat16], "grad")
    assert (gk[0, 1] == 0).all() and (gk[0, 2] == 0).all()
    assert torch.equal(gk, _run("cuda", x, y, w)[1])
