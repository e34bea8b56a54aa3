"""token_logprobs on the torch reference and the native CPU backend.

Each backend is compared with a float64 ground truth computed by plain
autograd (log_softmax + gather), and its error is bounded by the error of the
same computation done naively in the working dtype: kernel_err <= K * naive_err + tol.
"""

from __future__ import annotations

import pytest
import torch

import fastdpo
from fastdpo.ops.schema import STAT_NAMES

BACKENDS = ["torch", "cpu"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
K = 2.0
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3, torch.float64: 1e-10}


def naive_logprobs(x, y, ignore_index=-100, temperature=1.0, softcap=None):
    """Plain autograd computation in x's dtype (the baseline users run today)."""
    z = softcap * torch.tanh(x / softcap) if softcap else x
    z = z / temperature
    valid = y != ignore_index
    lp = torch.log_softmax(z, dim=-1).gather(-1, torch.where(valid, y, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, lp, torch.zeros((), dtype=lp.dtype))


def truth(x, y, w, **kw):
    """float64 log-probs and the gradient of sum(w * logp) w.r.t. x."""
    xd = x.detach().double().requires_grad_()
    lp = naive_logprobs(xd, y, **kw)
    (lp * w.double()).sum().backward()
    return lp.detach(), xd.grad


def run(fn, x, y, w, **kw):
    xx = x.detach().clone().requires_grad_()
    lp = fn(xx, y, **kw)
    (lp.float() * w).sum().backward()
    return lp.detach().double(), xx.grad.double()


def make_case(shape, V, dtype, seed=0, scale=3.0, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, V, generator=g) * scale).to(dtype)
    y = torch.randint(0, V, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore_frac] = -100
    w = torch.randn(shape, generator=g)
    return x, y, w


def err(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 7, 1000])
@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7}, {"softcap": 5.0}, {"temperature": 1.3, "softcap": 2.0}])
def test_matches_float64_truth(backend, dtype, V, kw):
    x, y, w = make_case((3, 5), V, dtype)
    lp_t, g_t = truth(x, y, w, **kw)
    lp_n, g_n = run(naive_logprobs, x, y, w, **kw)
    lp_k, g_k = run(lambda a, b, **k: fastdpo.token_logprobs(a, b, backend=backend, **k), x, y, w, **kw)
    assert lp_k.dtype == torch.float64 and torch.isfinite(lp_k).all()
    assert err(lp_k, lp_t) <= K * err(lp_n, lp_t) + TOL[dtype]
    assert err(g_k, g_t) <= K * err(g_n, g_t) + TOL[dtype]
    # ignored positions: exactly zero output and zero gradient rows
    ign = y == -100
    assert (lp_k[ign] == 0).all()
    assert (g_k[ign] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocab(backend, dtype):
    x, y, w = make_case((2, 3), 32001, dtype, scale=4.0)
    lp_t, g_t = truth(x, y, w)
    lp_n, g_n = run(naive_logprobs, x, y, w)
    lp_k, g_k = run(lambda a, b: fastdpo.token_logprobs(a, b, backend=backend), x, y, w)
    assert err(lp_k, lp_t) <= K * err(lp_n, lp_t) + TOL[dtype]
    assert err(g_k, g_t) <= K * err(g_n, g_t) + TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_logits_are_not_copied(backend):
    x, y, w = make_case((2, 9), 37, torch.float32)
    sl = x[:, :-1]  # the usual shift: a strided view
    ys, ws = y[:, 1:], w[:, 1:]
    assert not sl.is_contiguous()
    lp_t, g_t = truth(sl, ys, ws)
    lp_k, g_k = run(lambda a, b: fastdpo.token_logprobs(a, b, backend=backend), sl, ys, ws)
    assert err(lp_k, lp_t) < 1e-5 and err(g_k, g_t) < 1e-5
    # transposed leading dims, and a non-unit stride along V (copied, still correct)
    xt = x.transpose(0, 1)
    lp_k2, _ = run(lambda a, b: fastdpo.token_logprobs(a, b, backend=backend), xt, y.t(), w.t())
    assert err(lp_k2, truth(xt, y.t(), w.t())[0]) < 1e-5
    xv = torch.randn(4, 40)[:, ::2]
    yv = torch.randint(0, 20, (4,))
    assert err(fastdpo.token_logprobs(xv, yv, backend=backend).double(), truth(xv, yv, torch.ones(4))[0]) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_1d_2d_4d(backend):
    x = torch.randn(2, 3, 4, 11)
    y = torch.randint(0, 11, (2, 3, 4))
    ref = naive_logprobs(x.double(), y)
    assert fastdpo.token_logprobs(x, y, backend=backend).shape == (2, 3, 4)
    assert err(fastdpo.token_logprobs(x, y, backend=backend).double(), ref) < 1e-5
    assert err(fastdpo.token_logprobs(x[0, 0], y[0, 0], backend=backend).double(), ref[0, 0]) < 1e-5
    one = fastdpo.token_logprobs(x[0, 0, 0], y[0, 0, 0], backend=backend)
    assert one.shape == () and abs(one.item() - ref[0, 0, 0].item()) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_ignored_rows_and_batch(backend):
    x, y, w = make_case((2, 4), 13, torch.float32)
    y[0] = -100
    lp, g = run(lambda a, b: fastdpo.token_logprobs(a, b, backend=backend), x, y, w)
    assert (lp[0] == 0).all() and (g[0] == 0).all()
    y[:] = -100
    lp, g = run(lambda a, b: fastdpo.token_logprobs(a, b, backend=backend), x, y, w)
    assert (lp == 0).all() and (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stats_match_definitions(backend, dtype):
    x, y, _ = make_case((3, 4), 257, dtype, scale=2.0)
    y[0, 0] = x[0, 0].float().argmax()  # make sure some hits exist
    kw = {"temperature": 0.9, "softcap": 4.0}
    out = fastdpo.token_logprobs(x, y, backend=backend, stats=True, **kw)
    s = 4.0 * torch.tanh(x.double() / 4.0)
    z = s / 0.9
    logp = torch.log_softmax(z, -1)
    valid = y != -100
    expect = {
        "entropy": -(logp.exp() * logp).sum(-1),
        "argmax_hit": (z.argmax(-1) == y).double(),
        "mean_logit": z.mean(-1),
        "log_sum_p2": torch.logsumexp(2 * logp, -1),
    }
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    for name in STAT_NAMES:
        got = getattr(out, name).double()
        assert got.shape == y.shape
        assert err(got[valid], expect[name][valid]) < tol * max(1.0, expect[name].abs().max().item()), name
        assert (got[~valid] == 0).all(), name
    assert out.argmax_hit[0, 0] == 1.0


def test_argmax_hit_takes_the_first_of_ties():
    x = torch.tensor([[1.0, 5.0, 5.0, 0.0]]).repeat(2, 1)
    y = torch.tensor([1, 2])
    for backend in BACKENDS:
        out = fastdpo.token_logprobs(x, y, backend=backend, stats=True)
        assert out.argmax_hit.tolist() == [1.0, 0.0], backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_logits_in_the_same_pass(backend):
    x, y, _ = make_case((2, 5), 101, torch.bfloat16)
    r, _, _ = make_case((2, 5), 101, torch.bfloat16, seed=1)
    out = fastdpo.fused_logprobs(x, y, ref_logits=r, backend=backend, temperature=1.5)
    assert err(out.ref_logps.double(), naive_logprobs(r.double(), y, temperature=1.5)) < 1e-5
    assert err(out.logps.double(), naive_logprobs(x.double(), y, temperature=1.5)) < 1e-5
    assert not out.ref_logps.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(backend, dtype):
    x, y, w = make_case((2, 6), 300, dtype)
    _, g_expect = run(lambda a, b: fastdpo.token_logprobs(a, b, backend=backend), x, y, w)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, as produced by an LM head
    lp = fastdpo.token_logprobs(logits, y, backend=backend, inplace_backward=True)
    (lp * w).sum().backward()
    assert torch.equal(leaf.grad.double(), g_expect)
    assert torch.equal(logits.detach(), leaf.grad)  # the logits' storage now holds the gradient
    with pytest.raises(ValueError, match="leaf"):
        fastdpo.token_logprobs(leaf, y, backend=backend, inplace_backward=True)


def test_cpu_backend_is_deterministic_across_thread_counts():
    x, y, w = make_case((4, 8), 5003, torch.float32)
    results = []
    old = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append(run(lambda a, b: fastdpo.token_logprobs(a, b, backend="cpu"), x, y, w))
    finally:
        torch.set_num_threads(old)
    for lp, g in results[1:]:
        assert torch.equal(lp, results[0][0]) and torch.equal(g, results[0][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    x, y, _ = make_case((2, 3), 6, torch.float64)
    x.requires_grad_()
    for kw in ({}, {"temperature": 0.8, "softcap": 3.0}):
        assert torch.autograd.gradcheck(
            lambda a: fastdpo.token_logprobs(a, y, backend=backend, **kw), (x,), eps=1e-6, atol=1e-6
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_values(backend):
    x = torch.randn(2, 3, 50) * 1e4
    x[0, 0, 7] = float("-inf")  # masked vocabulary entry
    y = torch.randint(0, 50, (2, 3))
    y[0, 0] = 3
    lp = fastdpo.token_logprobs(x, y, backend=backend)
    assert err(lp.double(), naive_logprobs(x.double(), y)) <= 1e-2  # |x| ~ 1e4: fp32 spacing ~1e-3
    x[1, 2, 4] = float("nan")
    lp = fastdpo.token_logprobs(x, y, backend=backend)
    assert torch.isnan(lp[1, 2]) and torch.isfinite(lp[0]).all()
    xb = (torch.randn(3, 64) * 300).to(torch.float16)  # fp16 exp would overflow without fp32 math
    yb = torch.randint(0, 64, (3,))
    assert torch.isfinite(fastdpo.token_logprobs(xb, yb, backend=backend)).all()


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda x, y, be: fastdpo.token_logprobs(x.long(), y, backend=be), TypeError, "logits must be float"),
        (lambda x, y, be: fastdpo.token_logprobs([1.0], y, backend=be), TypeError, "logits must be a torch.Tensor"),
        (lambda x, y, be: fastdpo.token_logprobs(x, y.float(), backend=be), TypeError, "labels must be an integer"),
        (lambda x, y, be: fastdpo.token_logprobs(x, y[:, :-1], backend=be), ValueError, "labels must have shape"),
        (lambda x, y, be: fastdpo.token_logprobs(x, torch.full_like(y, 10), backend=be), ValueError, "outside the vocabulary"),
        (lambda x, y, be: fastdpo.token_logprobs(x, torch.full_like(y, -5), backend=be), ValueError, "outside the vocabulary"),
        (lambda x, y, be: fastdpo.token_logprobs(x, y, temperature=0.0, backend=be), ValueError, "temperature"),
        (lambda x, y, be: fastdpo.token_logprobs(x, y, temperature=float("nan"), backend=be), ValueError, "temperature"),
        (lambda x, y, be: fastdpo.token_logprobs(x, y, softcap=-1.0, backend=be), ValueError, "softcap"),
        (lambda x, y, be: fastdpo.token_logprobs(x, y, ignore_index=1.5, backend=be), TypeError, "ignore_index"),
        (lambda x, y, be: fastdpo.token_logprobs(x, y, backend="gpu"), ValueError, "unknown backend"),
        (lambda x, y, be: fastdpo.token_logprobs(x[..., :0], y, backend=be), ValueError, "empty vocabulary"),
        (lambda x, y, be: fastdpo.token_logprobs(torch.tensor(1.0), y, backend=be), ValueError, "vocabulary dimension"),
        (lambda x, y, be: fastdpo.fused_logprobs(x, y, ref_logits=x[:1], backend=be), ValueError, "ref_logits must have the shape"),
        (lambda x, y, be: fastdpo.fused_logprobs(x, y, ref_logits=x.bfloat16(), backend=be), TypeError, "dtype of logits"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_clear_errors(call, exc, match, backend):
    x = torch.randn(2, 3, 10)
    y = torch.randint(0, 10, (2, 3))
    with pytest.raises(exc, match=match):
        call(x, y, backend)


def test_native_op_boundary_checks():
    """The C++ ops validate their own inputs (they are callable directly)."""
    from fastdpo import _build

    _build.load_extension("cpu")
    x = torch.randn(1, 2, 5)
    y = torch.tensor([[0, 7]])
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.fastdpo.logprobs_fwd(x, y, None, -100, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="must be int64"):
        torch.ops.fastdpo.logprobs_fwd(x, y.int(), None, -100, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="3-D"):
        torch.ops.fastdpo.logprobs_fwd(x[0], y[0], None, -100, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="contiguous along the vocabulary"):
        torch.ops.fastdpo.logprobs_fwd(torch.randn(1, 2, 10)[..., ::2], torch.zeros(1, 2, dtype=torch.long),
                                       None, -100, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="dtype of logits"):  # would otherwise be read as the wrong type
        torch.ops.fastdpo.logprobs_fwd(x, torch.tensor([[0, 1]]), x.double(), -100, 1.0, 0.0, False)


def test_unimplemented_backends_raise_clear_errors():
    for name in ("triton", "cuda"):
        reason = fastdpo._backends.unavailable_reason(fastdpo.Backend(name), torch.device("cpu"))
        if reason is None:
            continue  # implemented and usable here
        with pytest.raises(fastdpo.BackendUnavailableError, match=name):
            fastdpo.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), backend=name)


def test_opcheck_cpu_ops():
    from fastdpo import _build

    _build.load_extension("cpu")
    x, y, _ = make_case((2, 3), 17, torch.float32)
    r = torch.randn_like(x)
    fwd = torch.ops.fastdpo.logprobs_fwd
    torch.library.opcheck(fwd.default, (x, y, r, -100, 1.0, 0.0, True))
    torch.library.opcheck(fwd.default, (x.bfloat16(), y, None, -100, 0.5, 3.0, False))
    torch.library.opcheck(fwd.default, (x, y, r, -100, 0.5, 3.0, True, True))  # + token-level KL
    lse = fwd(x, y, None, -100, 1.0, 0.0, False)[1]
    g = torch.randn(2, 3)
    torch.library.opcheck(torch.ops.fastdpo.logprobs_bwd.default, (g, x, y, lse, -100, 1.0, 0.0))
    torch.library.opcheck(torch.ops.fastdpo.logprobs_bwd_.default, (g, x.clone(), y, lse, -100, 1.0, 0.0))
    ref_lse = fwd(x, y, r, -100, 1.0, 0.0, False, True)[5]
    gk = torch.randn(2, 3)
    torch.library.opcheck(torch.ops.fastdpo.logprobs_bwd.default, (g, x, y, lse, -100, 1.0, 0.0, gk, r, ref_lse))
    torch.library.opcheck(torch.ops.fastdpo.logprobs_bwd_.default,
                          (g, x.clone(), y, lse, -100, 1.0, 0.0, gk, r, ref_lse))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    x, y, w = make_case((2, 4), 33, torch.float32)

    def f(a, b, c):
        return (fastdpo.token_logprobs(a, b, backend=backend, temperature=0.9) * c).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a1 = x.clone().requires_grad_()
    a2 = x.clone().requires_grad_()
    out1 = compiled(a1, y, w)
    out2 = f(a2, y, w)
    out1.backward()
    out2.backward()
    assert torch.allclose(out1, out2, atol=1e-5) and torch.allclose(a1.grad, a2.grad, atol=1e-6)


def test_cpu_gradient_buffer_reuse_never_aliases_a_live_gradient():
    # >= 16 MiB gradients come from a one-buffer pool; a buffer is reused only
    # after the tensor that owned it is freed.
    x, y, w = make_case((1, 1100), 4096, torch.float32, ignore_frac=0.0)
    lp_t, g_t = truth(x, y, w)
    grads = []
    for _ in range(3):
        xx = x.clone().requires_grad_()
        (fastdpo.token_logprobs(xx, y, backend="cpu") * w).sum().backward()
        grads.append(xx.grad)
    ptrs = {g.data_ptr() for g in grads}
    assert len(ptrs) == 3  # all alive: three distinct buffers
    for g in grads:
        assert err(g.double(), g_t) < 1e-6
    del grads, xx
    for _ in range(2):  # freed and reused: still correct
        xx = x.clone().requires_grad_()
        (fastdpo.token_logprobs(xx, y, backend="cpu") * w).sum().backward()
        assert err(xx.grad.double(), g_t) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_largest_vocabulary(backend):
    x, y, w = make_case((1, 2), 262144, torch.bfloat16, ignore_frac=0.0)
    lp_t, g_t = truth(x, y, w)
    lp_n, g_n = run(naive_logprobs, x, y, w)
    lp_k, g_k = run(lambda a, b: fastdpo.token_logprobs(a, b, backend=backend), x, y, w)
    assert err(lp_k, lp_t) <= K * err(lp_n, lp_t) + TOL[torch.bfloat16]
    assert err(g_k, g_t) <= K * err(g_n, g_t) + TOL[torch.bfloat16]
