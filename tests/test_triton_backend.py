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
    torch.library.opcheck(torch.ops.fastdpo.logprobs_fwd_triton.default, (x, y, x + 1, -100, 1.0, 0.0, True))
    _, lse, _, _ = torch.ops.fastdpo.logprobs_fwd_triton(x, y, None, -100, 1.0, 0.0, False)
    g = torch.randn(2, 3, device=DEV)
    torch.library.opcheck(torch.ops.fastdpo.logprobs_bwd_triton.default, (g, x, y, lse, -100, 1.0, 0.0))


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
    seq_index = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(DEV)
    values = torch.randn(int(sum(lengths)), generator=g).to(DEV)
    got = tk.segment_sum(values, seq_index, len(lengths))
    expect = torch.stack([values[seq_index == k].double().sum() for k in range(len(lengths))])
    assert torch.allclose(got.double(), expect, atol=1e-4)
    assert torch.equal(got, tk.segment_sum(values, seq_index, len(lengths)))
    assert torch.allclose(tk.segment_sum_torch(values, seq_index, len(lengths)).double(), expect, atol=1e-4)
    with pytest.raises(ValueError, match="non-decreasing"):
        tk.segment_sum(values, seq_index.flip(0), len(lengths))
