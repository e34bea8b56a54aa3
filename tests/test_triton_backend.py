"""The Triton backend against the torch reference.

Without a GPU the kernels run on CPU tensors through the Triton interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py before triton is first imported),
on small shapes; tests marked ``gpu`` repeat the comparisons on CUDA at
realistic sizes.
"""

from __future__ import annotations

import pytest
import torch

import fastdpo
from fastdpo import _backends

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"), pytest.mark.skipif(
    _backends.unavailable_reason(_backends.Backend.TRITON, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    is not None,
    reason="triton backend unavailable here",
)]

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def case(shape, V, dtype, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, V, generator=g) * 3).to(dtype)
    y = torch.randint(0, V, shape, generator=g)
    y[torch.rand(shape, generator=g) < 0.3] = -100
    w = torch.randn(shape, generator=g)
    return x.to(device), y.to(device), w.to(device)


def run(backend, x, y, w, ref=None, stats=False, inplace=False, **kw):
    xx = x.detach().clone().requires_grad_()
    logits = xx.view_as(xx) if inplace else xx
    out = fastdpo.fused_logprobs(logits, y, ref_logits=ref, backend=backend, stats=stats, inplace_backward=inplace, **kw)
    (out.logps * w).sum().backward()
    return out, xx.grad


TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1, 7, 1000, 4097])
@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7, "softcap": 5.0}])
def test_matches_reference(dtype, V, kw):
    x, y, w = case((2, 3), V, dtype)
    r, _, _ = case((2, 3), V, dtype, seed=1)
    ot, gt = run("torch", x, y, w, ref=r, stats=True, **kw)
    ok, gk = run("triton", x, y, w, ref=r, stats=True, **kw)
    tol = TOL[dtype]
    assert torch.allclose(ok.logps, ot.logps, atol=tol, rtol=tol)
    assert torch.allclose(ok.ref_logps, ot.ref_logps, atol=tol, rtol=tol)
    assert torch.allclose(ok.stats, ot.stats, atol=tol * 10, rtol=tol)
    assert torch.allclose(gk.float(), gt.float(), atol=tol, rtol=tol)
    assert (gk[y == -100] == 0).all()


def test_ignored_rows_inplace_and_nan():
    x, y, w = case((2, 4), 37, torch.float32)
    y[0] = -100  # a fully ignored sequence
    _, g_expect = run("torch", x, y, w)
    out, g = run("triton", x, y, w, inplace=True)
    assert torch.allclose(g, g_expect, atol=1e-6)
    assert (out.logps[0] == 0).all() and (g[0] == 0).all()
    x[1, 1, 3] = float("nan")
    x[1, 2, 5] = float("-inf")
    y[1, 1:3] = 0
    lp = fastdpo.token_logprobs(x, y, backend="triton")
    assert torch.isnan(lp[1, 1]) and torch.isfinite(lp[1, 2])
    assert torch.allclose(lp[1, 2], fastdpo.token_logprobs(x, y, backend="torch")[1, 2], atol=1e-5)


def test_strided_logits():
    x, y, w = case((2, 9), 50, torch.float32)
    sl, ys, ws = x[:, :-1], y[:, 1:], w[:, 1:]
    ot, gt = run("torch", sl, ys, ws)
    ok, gk = run("triton", sl, ys, ws)
    assert torch.allclose(ok.logps, ot.logps, atol=1e-5) and torch.allclose(gk, gt, atol=1e-6)


def test_dpo_loss_on_triton_backend():
    x, y, _ = case((4, 6), 64, torch.float32)
    y[:, :2] = -100
    r = x + 0.1
    a = fastdpo.dpo_loss(x, y, ref_logits=r, backend="triton", loss_type=["sigmoid", "sft"])
    b = fastdpo.dpo_loss(x, y, ref_logits=r, backend="torch", loss_type=["sigmoid", "sft"])
    assert torch.allclose(a.loss, b.loss, atol=1e-5)
    for k in b.metrics:
        assert torch.allclose(a.metrics[k], b.metrics[k], atol=1e-5), k


# ----------------------------------------------------------------------------- per-token KL(reference || policy)


def kl_case(shape, V, dtype, seed=0):
    """Policy/reference logits, labels with ignored tokens, and upstream weights for the
    log-probs (w) and the KL (wk) with a row where only one of them is non-zero."""
    x, y, w = case(shape, V, dtype, seed=seed)
    r, _, wk = case(shape, V, dtype, seed=seed + 100)
    w.view(-1)[0] = 0.0  # only the KL gradient
    wk.view(-1)[1] = 0.0  # only the log-prob gradient
    y.view(-1)[:2] = 0  # ... on rows that count
    # the reference max in the last vocabulary block: the running KL sum must rescale (V > BLOCK)
    r.view(-1, V)[0, -1] = r.float().abs().max() + 2.0
    return x, y, r, w, wk


def _transform64(x, temperature=1.0, softcap=None):
    x = x.double()
    return (softcap * torch.tanh(x / softcap) if softcap else x) / temperature


def kl_truth(x, y, r, w, wk, temperature=1.0, softcap=None, ignore_index=-100):
    """Float64 ground truth from the full logits through autograd:
    (logps, kl, ref_lse, d[(logps * w).sum() + (kl * wk).sum()] / d x)."""
    xx = x.detach().double().requires_grad_()
    logp_all = torch.log_softmax(_transform64(xx, temperature, softcap), -1)
    zr = _transform64(r, temperature, softcap)
    logq_all = torch.log_softmax(zr, -1)
    q = logq_all.exp()
    valid = y != ignore_index
    logps = torch.where(valid, logp_all.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    kl = torch.where(valid, torch.where(q > 0, q * (logq_all - logp_all), 0.0).sum(-1), 0.0)
    ((logps * w.double()).sum() + (kl * wk.double()).sum()).backward()
    ref_lse = torch.where(valid, torch.logsumexp(zr, -1), 0.0)
    return logps.detach(), kl.detach(), ref_lse, xx.grad


def run_kl(backend, x, y, r, w, wk, inplace=False, **kw):
    xx = x.detach().clone().requires_grad_()
    logits = xx.view_as(xx) if inplace else xx
    out = fastdpo.fused_logprobs(logits, y, ref_logits=r, kl=True, backend=backend, inplace_backward=inplace, **kw)
    ((out.logps * w).sum() + (out.kl * wk).sum()).backward()
    return out, xx.grad


def kernel_fwd(backend, x, y, r, temperature=1.0, softcap=None, stats=False, kl=True):
    mod = _backends.kernel_module(_backends.Backend(backend))
    return mod.logprobs_fwd(x, y, r, -100, temperature, softcap or 0.0, stats, kl)


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_near_truth(got, ref, truth, tol, k=2.0):
    """The kernel's error against the float64 truth stays within k times the torch
    reference's own error (same inputs, same output dtype) plus tol."""
    e_got, e_ref = err(got, truth), err(ref, truth)
    assert e_got <= k * e_ref + tol, (e_got, e_ref)


KL_TOL = 2e-5  # forward outputs: fp32 math and fp32 outputs for every input dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1, 7, 1000, 4097])
@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7, "softcap": 5.0}])
def test_kl_matches_reference_and_float64_truth(dtype, V, kw):
    x, y, r, w, wk = kl_case((2, 3), V, dtype)
    t_logp, t_kl, t_rlse, t_grad = kl_truth(x, y, r, w, wk, **kw)
    if V > 1:
        assert t_kl.abs().max() > 0.1  # a real KL to compare (always 0 when V == 1)

    fk = kernel_fwd("triton", x, y, r, **kw)
    ft = kernel_fwd("torch", x, y, r, **kw)
    assert len(fk) == 6 and fk[4].shape == fk[5].shape == y.shape
    scale = 1.0 + t_kl.abs().max().item()
    assert_near_truth(fk[4], ft[4], t_kl, KL_TOL * scale)
    assert_near_truth(fk[5], ft[5], t_rlse, KL_TOL * (1 + t_rlse.abs().max().item()))
    assert torch.allclose(fk[4], ft[4], atol=KL_TOL * scale, rtol=1e-5)
    assert torch.allclose(fk[5], ft[5], atol=KL_TOL, rtol=1e-5)
    ignored = y == -100
    assert (fk[4][ignored] == 0).all() and (fk[5][ignored] == 0).all()

    ok, gk = run_kl("triton", x, y, r, w, wk, **kw)
    ot, gt = run_kl("torch", x, y, r, w, wk, **kw)
    assert_near_truth(ok.kl, ot.kl, t_kl, KL_TOL * scale)
    assert_near_truth(ok.logps, ot.logps, t_logp, KL_TOL * 10)
    assert gk.dtype == dtype
    g_scale = t_grad.abs().max().item()
    # plus one unit in the last place of the output dtype: the interpreter truncates fp32 -> bf16/fp16
    assert_near_truth(gk, gt, t_grad, 1e-5 * (1 + g_scale) + torch.finfo(dtype).eps * g_scale)
    assert torch.allclose(gk.float(), gt.float(), atol=TOL[dtype] * (1 + g_scale), rtol=TOL[dtype])
    assert (gk[ignored] == 0).all()


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_ignored_rows_inplace_and_one_sided_gradients(inplace, dtype):
    x, y, r, w, wk = kl_case((3, 4), 300, dtype, seed=3)
    y[1:] = torch.randint(0, 300, (2, 4), generator=torch.Generator().manual_seed(5)).to(y)
    y[0] = -100  # a fully ignored sequence
    y[2, 3] = -100
    w[1, :2] = 0.0  # only the KL gradient
    wk[1, 2:] = 0.0  # only the log-prob gradient
    w[2, 0] = wk[2, 0] = 0.0  # neither
    _, kl_t, _, g_t = kl_truth(x, y, r, w, wk, temperature=0.9, softcap=6.0)
    ok, gk = run_kl("triton", x, y, r, w, wk, inplace=inplace, temperature=0.9, softcap=6.0)
    _, gt = run_kl("torch", x, y, r, w, wk, temperature=0.9, softcap=6.0)
    tol = TOL[dtype] * (1 + g_t.abs().max().item())
    assert torch.allclose(gk.double(), g_t, atol=tol, rtol=TOL[dtype])
    assert torch.allclose(gk.float(), gt.float(), atol=tol, rtol=TOL[dtype])
    assert torch.allclose(ok.kl.double(), kl_t, atol=1e-4, rtol=1e-5)
    assert (ok.kl[0] == 0).all() and (ok.logps[0] == 0).all() and ok.kl[2, 3] == 0
    assert (gk[0] == 0).all() and (gk[2, 3] == 0).all() and (gk[2, 0] == 0).all()
    # the one-sided rows really carry a gradient
    assert (gk[1, :2].abs().amax(-1) > 1e-3).all() and (gk[1, 2:].abs().amax(-1) > 1e-3).all()
    # gradient of the KL alone, and of the log-probs alone with kl=True (grad_kl all zero)
    for wl, wkl in ((torch.zeros_like(w), wk), (w, torch.zeros_like(wk))):
        _, _, _, g_t = kl_truth(x, y, r, wl, wkl)
        _, g = run_kl("triton", x, y, r, wl, wkl, inplace=inplace)
        assert torch.allclose(g.double(), g_t, atol=TOL[dtype] * (1 + g_t.abs().max().item()), rtol=TOL[dtype])


def test_kl_backward_reads_reference_rows_only_where_needed():
    x, y, r, _, _ = kl_case((2, 3), 50, torch.float32, seed=7)
    y[y == -100] = 1
    _, lse, _, _, _, rlse = kernel_fwd("triton", x, y, r)
    g = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    gk = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    gk[0] = 0.0
    expect = tk.logprobs_bwd(g, x, y, lse, -100, 1.0, 0.0, False, gk, r, rlse)
    ref_expect = _backends.kernel_module(_backends.Backend.TORCH).logprobs_bwd(
        g, x, y, lse, -100, 1.0, 0.0, False, gk, r, rlse)
    assert torch.allclose(expect, ref_expect, atol=1e-6)
    r_poisoned = r.clone()
    r_poisoned[0] = float("nan")  # rows with grad_kl == 0 must not look at the reference
    got = tk.logprobs_bwd(g, x, y, lse, -100, 1.0, 0.0, False, gk, r_poisoned, rlse)
    assert torch.equal(got, expect)


def test_kl_forward_leaves_other_outputs_and_edge_values():
    x, y, r, _, _ = kl_case((2, 3), 1000, torch.float32, seed=11)
    plain = kernel_fwd("triton", x, y, r, stats=True, kl=False)
    with_kl = kernel_fwd("triton", x, y, r, stats=True, kl=True)
    for a, b in zip(plain[:4], with_kl[:4]):
        assert torch.equal(a, b)
    assert plain[4].numel() == 0 and plain[5].numel() == 0
    # same distribution: zero KL, reference lse = policy lse
    same = kernel_fwd("triton", x, y, x.clone())
    valid = y != -100
    assert same[4].abs().max() < 1e-5 and torch.allclose(same[5][valid], same[1][valid], atol=1e-6)
    # q_v = 0 terms count 0 even where p_v = 0; p_v = 0 where q_v > 0 gives inf; NaN in the reference
    x2, r2 = x.clone(), r.clone()
    r2[0, :, :500] = float("-inf")
    x2[0, :, :400] = float("-inf")
    r2[1, 1, 7] = float("nan")
    x2[1, 2, 9] = float("-inf")
    y2 = torch.full_like(y, 600)
    got, expect = kernel_fwd("triton", x2, y2, r2), kernel_fwd("torch", x2, y2, r2)
    assert torch.isfinite(got[4][0]).all()
    assert torch.allclose(got[4][0], expect[4][0], atol=5e-5) and torch.allclose(got[5][0], expect[5][0], atol=1e-5)
    assert torch.isnan(got[4][1, 1]) and torch.isnan(got[5][1, 1]) and torch.isnan(got[2][1, 1])
    assert got[4][1, 2] == float("inf") and expect[4][1, 2] == float("inf")


def test_kl_argument_errors():
    x, y, r, _, _ = kl_case((1, 2), 9, torch.float32)
    with pytest.raises(ValueError, match="ref_logits"):
        tk.logprobs_fwd(x, y, None, -100, 1.0, 0.0, False, True)
    _, lse, _, _, _, rlse = tk.logprobs_fwd(x, y, r, -100, 1.0, 0.0, False, True)
    g = torch.ones(1, 2)
    for ref, ref_lse in ((None, rlse), (r, None)):
        with pytest.raises(ValueError, match="ref_lse"):
            tk.logprobs_bwd(g, x, y, lse, -100, 1.0, 0.0, False, g, ref, ref_lse)


# torch.compile and opcheck trace the triton_op bodies with fake tensors; kernels
# created by the interpreter cannot be traced, so these run on a GPU only.
@pytest.mark.gpu
def test_torch_compile_traces_the_triton_ops():
    x, y, w = case((2, 4), 33, torch.float32)

    def f(a):
        return (fastdpo.token_logprobs(a, y, backend="triton") * w).sum()

    torch._dynamo.reset()
    a1, a2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(a1)
    out.backward()
    f(a2).backward()
    assert torch.allclose(out, f(a2.detach()), atol=1e-5) and torch.allclose(a1.grad, a2.grad, atol=1e-6)


@pytest.mark.gpu
def test_opcheck_triton_ops():
    x, y, _ = case((2, 3), 17, torch.float32)
    y = y.clamp(min=0)
    r = x + torch.randn_like(x)
    ops = torch.ops.fastdpo
    torch.library.opcheck(ops.logprobs_fwd_triton.default, (x, y, x + 1, -100, 1.0, 0.0, True))
    torch.library.opcheck(ops.logprobs_fwd_triton.default, (x, y, r, -100, 0.8, 4.0, True, True))
    _, lse, _, _, _, rlse = ops.logprobs_fwd_triton(x, y, r, -100, 1.0, 0.0, False, True)
    g = torch.randn(2, 3, device=DEV)
    gk = torch.randn(2, 3, device=DEV)
    torch.library.opcheck(ops.logprobs_bwd_triton.default, (g, x, y, lse, -100, 1.0, 0.0))
    torch.library.opcheck(ops.logprobs_bwd_triton.default, (g, x, y, lse, -100, 1.0, 0.0, gk, r, rlse))
    torch.library.opcheck(ops.logprobs_bwd_triton_.default, (g, x.clone(), y, lse, -100, 1.0, 0.0, gk, r, rlse))


def test_opcheck_triton_ops_schema_with_kl():
    # The checks that run the ops for real (no fake-tensor tracing), so they also run
    # under the interpreter: declared schemas, mutations and autograd registration.
    x, y, _ = case((2, 3), 17, torch.float32)
    y = y.clamp(min=0)
    r = x + torch.randn_like(x)
    ops = torch.ops.fastdpo
    _, lse, _, _, kl, rlse = ops.logprobs_fwd_triton(x, y, r, -100, 1.0, 0.0, False, True)
    assert kl.shape == rlse.shape == y.shape
    g, gk = torch.randn(2, 3, device=DEV), torch.randn(2, 3, device=DEV)
    checks = ("test_schema", "test_autograd_registration")
    for op, args in (
        (ops.logprobs_fwd_triton.default, (x, y, r, -100, 0.8, 4.0, True, True)),
        (ops.logprobs_fwd_triton.default, (x, y, None, -100, 1.0, 0.0, False)),
        (ops.logprobs_bwd_triton.default, (g, x, y, lse, -100, 1.0, 0.0, gk, r, rlse)),
        (ops.logprobs_bwd_triton_.default, (g, x.clone(), y, lse, -100, 1.0, 0.0, gk, r, rlse)),
    ):
        torch.library.opcheck(op, args, test_utils=checks)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [32000, 128256, 262144])
def test_gpu_realistic_sizes(dtype, V):
    x, y, w = case((4, 512), V, dtype, device="cuda")
    ot, gt = run("torch", x, y, w, stats=True)
    ok, gk = run("triton", x, y, w, stats=True)
    tol = TOL[dtype]
    assert torch.allclose(ok.logps, ot.logps, atol=tol, rtol=tol)
    assert torch.allclose(gk.float(), gt.float(), atol=tol, rtol=tol)


from fastdpo.kernels import triton as tk  # noqa: E402
from fastdpo.kernels import reference as ref_k  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"temperature": 0.8, "softcap": 4.0}])
def test_fused_linear_fold_and_tile_grad(dtype, kw):
    n, V, chunk = 5, 1000, 384  # V not a multiple of the chunk
    x, y, w = case((n,), V, dtype)
    y[1] = -100
    ignore = y == -100
    m = torch.full((n,), float("-inf"), device=DEV)
    s = torch.zeros(n, device=DEV)
    zy = torch.zeros(n, device=DEV)
    for v0 in range(0, V, chunk):
        tk.lse_fold(x[:, v0 : v0 + chunk].contiguous(), y, v0, m, s, zy, **kw)
    lse = m + torch.log(s)
    out = fastdpo.fused_logprobs(x, y, backend="torch", **kw)
    expect_logp = out.logps
    assert torch.allclose(torch.where(ignore, 0.0, zy - lse), expect_logp, atol=2e-5)
    g = torch.where(ignore, 0.0, w)
    grads = []
    for v0 in range(0, V, chunk):
        grads.append(tk.tile_grad_(x[:, v0 : v0 + chunk].contiguous(), y, v0, lse, g, **kw))
    xx = x.detach().clone().requires_grad_()
    (fastdpo.fused_logprobs(xx, y, backend="torch", **kw).logps * w).sum().backward()
    assert torch.allclose(torch.cat(grads, 1).float(), xx.grad.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_segment_sum_packed_sequences_is_deterministic():
    g = torch.Generator().manual_seed(0)
    lengths = [3, 0, 2500, 1, 7]
    offsets = torch.tensor([0, *lengths]).cumsum(0).to(DEV)
    seq_index = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(DEV)
    values = torch.randn(int(sum(lengths)), generator=g).to(DEV)
    got = tk.segment_sum(values, offsets)
    expect = torch.stack([values[seq_index == k].double().sum() for k in range(len(lengths))])
    assert torch.allclose(got.double(), expect, atol=1e-4)
    assert torch.equal(got, tk.segment_sum(values, offsets))
    assert torch.allclose(ref_k.segment_sum(values, offsets).double(), expect, atol=1e-4)
