"""The per-token full-vocabulary KL(reference || policy) of the kernels (``kl=True``) and the RRPO
objective built on it, on the torch reference and the native CPU backend.

Ground truth is float64 plain autograd over full log-softmaxes; in the working dtype the kernel
error is bounded by the error of the same naive computation in that dtype:
kernel_err <= K * naive_err + tol. The Triton and CUDA backends have their own files.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdpo
import fastdpo.losses as L
from fastdpo.losses.registry import LossConfig, SequenceStats

BACKENDS = ["torch", "cpu"]
K = 2.0
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3}


def _transform(x, temperature=1.0, softcap=None):
    return (softcap * torch.tanh(x / softcap) if softcap else x) / temperature


def naive(x, r, y, temperature=1.0, softcap=None):
    """(logp, kl) per token in x's dtype with autograd: what users would write."""
    logp_all = torch.log_softmax(_transform(x, temperature, softcap), -1)
    logq_all = torch.log_softmax(_transform(r, temperature, softcap), -1)
    q = logq_all.exp()
    kl = torch.where(q > 0, q * (logq_all - logp_all), torch.zeros((), dtype=q.dtype)).sum(-1)
    valid = y != -100
    lp = logp_all.gather(-1, torch.where(valid, y, 0).unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=lp.dtype)
    return torch.where(valid, lp, zero), torch.where(valid, kl, zero)


def grads_of(fn, x, w, wk):
    """Outputs and d/dx of sum(w * logp) + sum(wk * kl)."""
    xx = x.detach().clone().requires_grad_()
    lp, kl = fn(xx)
    ((lp.double() * w.double()).sum() + (kl.double() * wk.double()).sum()).backward()
    return lp.detach().double(), kl.detach().double(), xx.grad.double()


def kernel(backend, r, y, **kw):
    def f(x):
        out = fastdpo.fused_logprobs(x, y, ref_logits=r, kl=True, backend=backend, **kw)
        return out.logps, out.kl
    return f


def make_case(shape, V, dtype, seed=0, scale=3.0, ignore_frac=0.3, near=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, V, generator=g) * scale
    # The reference near the policy (as in training) or independent of it.
    r = x + torch.randn(*shape, V, generator=g) * (0.3 if near else scale)
    y = torch.randint(0, V, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore_frac] = -100
    w, wk = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return x.to(dtype), r.to(dtype), y, w, wk


def err(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1, 7, 1000, 4097])
@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7}, {"temperature": 1.3, "softcap": 2.0}])
def test_kl_and_gradient_match_float64_truth(backend, dtype, V, kw):
    x, r, y, w, wk = make_case((2, 5), V, dtype, near=V > 7)
    t_lp, t_kl, t_g = grads_of(lambda a: naive(a.double(), r.double(), y, **kw), x, w, wk)
    k_lp, k_kl, k_g = grads_of(kernel(backend, r, y, **kw), x, w, wk)
    n_lp, n_kl, n_g = grads_of(lambda a: naive(a, r, y, **kw), x, w, wk)
    tol = TOL[dtype]
    assert err(k_kl, t_kl) <= K * err(n_kl, t_kl) + tol * max(1.0, t_kl.abs().max().item())
    assert err(k_lp, t_lp) <= K * err(n_lp, t_lp) + tol
    assert err(k_g, t_g) <= K * err(n_g, t_g) + tol
    assert (k_kl[y == -100] == 0).all() and (k_g[y == -100] == 0).all()
    assert (k_kl >= -1e-4).all()  # a divergence: never negative beyond rounding


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_exact(backend):
    x, r, y, w, wk = make_case((3, 4), 301, torch.float64)
    t = grads_of(lambda a: naive(a, r, y), x, w, wk)
    k = grads_of(kernel(backend, r, y), x, w, wk)
    for a, b in zip(k, t):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocab_strided_logits_and_fully_ignored_row(backend):
    # logits[:, :-1] as models produce them: strided rows, not copied; one row entirely ignored.
    x_full, r_full, y_full, w_full, wk_full = make_case((2, 6), 32001, torch.float32, near=True)
    x, r = x_full[:, :-1], r_full[:, :-1]
    y, w, wk = y_full[:, :-1].clone(), w_full[:, :-1], wk_full[:, :-1]
    y[1] = -100
    t_lp, t_kl, t_g = grads_of(lambda a: naive(a.double(), r.double(), y), x, w, wk)
    k_lp, k_kl, k_g = grads_of(kernel(backend, r, y), x, w, wk)
    assert not x.is_contiguous()
    torch.testing.assert_close(k_kl, t_kl, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(k_lp, t_lp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(k_g, t_g, rtol=1e-4, atol=1e-6)
    assert (k_kl[1] == 0).all() and (k_g[1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_one_upstream_gradient(backend):
    """Rows whose log-prob gradient is 0 still get the KL gradient (p - q), and the reverse."""
    x, r, y, w, wk = make_case((2, 6), 97, torch.float32, ignore_frac=0.0)
    w[0] = 0.0
    wk[1] = 0.0
    t = grads_of(lambda a: naive(a.double(), r.double(), y), x, w, wk)
    k = grads_of(kernel(backend, r, y), x, w, wk)
    torch.testing.assert_close(k[2], t[2], rtol=1e-4, atol=1e-6)
    assert k[2][0].abs().sum() > 0 and k[2][1].abs().sum() > 0
    # p - q sums to 0 over the vocabulary; so does onehot - p.
    torch.testing.assert_close(k[2].sum(-1), torch.zeros(2, 6, dtype=torch.float64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(backend, dtype):
    x, r, y, w, wk = make_case((2, 5), 333, dtype, near=True)
    expect = grads_of(kernel(backend, r, y), x, w, wk)[2]
    leaf = x.clone().requires_grad_()
    logits = leaf * 1  # a non-leaf, as an LM head output
    out = fastdpo.fused_logprobs(logits, y, ref_logits=r, kl=True, inplace_backward=True, backend=backend)
    ((out.logps * w).sum() + (out.kl * wk).sum()).backward()
    torch.testing.assert_close(leaf.grad.double(), expect, rtol=0, atol=0)
    torch.testing.assert_close(logits.detach().double(), expect, rtol=0, atol=0)  # the storage holds the gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_distributions_masked_vocabulary_and_infinite_kl(backend):
    x = torch.randn(1, 4, 50) * 3
    x[..., 10:20] = float("-inf")  # masked vocabulary entries in both (q = 0 there: terms count 0)
    y = torch.tensor([[0, 1, 2, 3]])
    out = fastdpo.fused_logprobs(x, y, ref_logits=x.clone(), kl=True, backend=backend)
    assert torch.isfinite(out.kl).all()
    torch.testing.assert_close(out.kl, torch.zeros(1, 4), rtol=0, atol=1e-5)
    # Mass of the reference where the policy has none: KL = +inf (not NaN, not finite).
    r = x.clone()
    r[0, 2, 15] = 5.0
    out = fastdpo.fused_logprobs(x, y, ref_logits=r, kl=True, backend=backend)
    assert out.kl[0, 2] == float("inf")
    assert torch.isfinite(out.kl[0, [0, 1, 3]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_stay_accurate(backend):
    # Logits around 1e4: the KL must come from differences within the row, not of large sums.
    x, r, y, w, wk = make_case((2, 3), 500, torch.float32, ignore_frac=0.0, near=True)
    x, r = x + 1e4, r + 1e4 - 3.0  # a different shift changes neither distribution's shape
    t_kl = naive(x.double(), r.double(), y)[1]  # of the float32 values as stored
    out = fastdpo.fused_logprobs(x, y, ref_logits=r, kl=True, backend=backend)
    torch.testing.assert_close(out.kl.double(), t_kl, rtol=1e-3, atol=1e-4)


def test_kl_needs_reference_logits_and_native_boundary_checks():
    x, r, y, _, _ = make_case((2, 3), 17, torch.float32)
    with pytest.raises(ValueError, match="ref_logits"):
        fastdpo.fused_logprobs(x, y, kl=True, backend="cpu")
    fwd, bwd = torch.ops.fastdpo.logprobs_fwd, torch.ops.fastdpo.logprobs_bwd
    with pytest.raises(RuntimeError, match="needs ref_logits"):
        fwd(x, y, None, -100, 1.0, 0.0, False, True)
    lse = fwd(x, y, None, -100, 1.0, 0.0, False)[1]
    g = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="ref_logits and ref_lse"):
        bwd(g, x, y, lse, -100, 1.0, 0.0, g, None, None)
    with pytest.raises(RuntimeError, match="grad_kl and ref_lse"):
        bwd(g, x, y, lse, -100, 1.0, 0.0, g.double(), r, lse)
    with pytest.raises(RuntimeError, match="shape of logits"):
        bwd(g, x, y, lse, -100, 1.0, 0.0, g, r[:, :2], lse)
    with pytest.raises(RuntimeError, match="also the ref_logits"):
        torch.ops.fastdpo.logprobs_bwd_(g, x, y, lse, -100, 1.0, 0.0, g, x, lse)


def test_torch_compile_fullgraph_with_kl():
    x, r, y, w, wk = make_case((2, 4), 33, torch.float32)

    def f(a, b, c, d, e):
        out = fastdpo.fused_logprobs(a, b, ref_logits=c, kl=True, backend="cpu")
        return (out.logps * d).sum() + (out.kl * e).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a1, a2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    v1, v2 = compiled(a1, y, r, w, wk), f(a2, y, r, w, wk)
    v1.backward()
    v2.backward()
    torch.testing.assert_close(v1, v2)
    torch.testing.assert_close(a1.grad, a2.grad)


# --------------------------------------------------------------------------------------------------- RRPO


def _pairs(n_pairs=3, T=7, V=23, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = 2 * n_pairs
    logits = torch.randn(n, T, V, generator=g) * 2
    ref = logits + torch.randn(n, T, V, generator=g)
    labels = torch.randint(0, V, (n, T), generator=g)
    signs = torch.zeros(n, T, dtype=torch.long)  # RRPO's phrase ids: 0 outside the refined phrases
    for i in range(n):
        labels[i, : 1 + i % 2] = -100  # prompt
        labels[i, T - (i % 3):] = -100  # padding
        signs[i, 2:4] = 1
        signs[i, 4 + i % 2] = 2
    signs[labels == -100] = -100
    return logits.to(dtype), ref.to(dtype), labels, signs


def rrpo_from_the_paper(logits, ref_logits, labels, signs, beta, alpha):
    """RRPO written from its definition (Sarkar & Etemad 2025): per-phrase log-ratio sums u_i, the
    pair loss -log sigma(beta * sum_i (u+_i - u-_i)), plus alpha times the chosen response's summed
    token-wise KL(pi_ref || pi) over the whole vocabulary; mean over pairs."""
    logp_all = torch.log_softmax(logits.double(), -1)
    logq_all = torch.log_softmax(ref_logits.double(), -1)
    mask = labels != -100
    y = labels.clamp(min=0).unsqueeze(-1)
    ratio = (logp_all.gather(-1, y) - logq_all.gather(-1, y)).squeeze(-1)
    phrases = [int(p) for p in signs.unique() if p > 0]
    u = torch.stack([(ratio * (signs == p)).sum(-1) for p in phrases], dim=-1)  # [N, phrases]
    kl = ((logq_all.exp() * (logq_all - logp_all)).sum(-1) * mask).sum(-1)
    u_c, u_r = u.chunk(2)
    kl_c, _ = kl.chunk(2)
    return (-F.logsigmoid(beta * (u_c - u_r).sum(-1)) + alpha * kl_c).mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta, alpha", [(0.1, 0.01), (0.5, 0.3)])
def test_rrpo_matches_its_definition(backend, beta, alpha):
    logits, ref_logits, labels, signs = _pairs()
    phrase_mask = (signs > 0).float()
    x = logits.clone().requires_grad_()
    out = L.dpo_loss(x, labels, ref_logits=ref_logits, loss_type="rrpo", beta=beta, rrpo_alpha=alpha,
                     token_weights=phrase_mask, backend=backend)
    out.loss.backward()
    xd = logits.double().requires_grad_()
    expect = rrpo_from_the_paper(xd, ref_logits, labels, signs, beta, alpha)
    expect.backward()
    torch.testing.assert_close(out.loss.double(), expect.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-7)
    # The KL term is there: it changes the gradient of the chosen rows only.
    assert out.metrics["kl/chosen"] > 0 and out.metrics["kl/rejected"] > 0
    plain = L.dpo_loss(logits.clone().requires_grad_(), labels, ref_logits=ref_logits, loss_type="rrpo", beta=beta,
                       rrpo_alpha=0.0, token_weights=phrase_mask, backend=backend)
    torch.testing.assert_close(out.loss - plain.loss, alpha * out.metrics["kl/chosen"], rtol=1e-5, atol=1e-7)
    # Rewards: beta * the phrase log-ratio sums, as RRPO logs them.
    lq = torch.log_softmax(ref_logits.double(), -1)
    lp = torch.log_softmax(logits.double(), -1)
    y = labels.clamp(min=0).unsqueeze(-1)
    ratio = ((lp.gather(-1, y) - lq.gather(-1, y)).squeeze(-1) * phrase_mask).sum(-1)
    torch.testing.assert_close(out.chosen_rewards.double(), beta * ratio[:3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.rejected_rewards.double(), beta * ratio[3:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rrpo_bf16_bounded(backend):
    logits, ref_logits, labels, signs = _pairs(dtype=torch.bfloat16, V=301)
    tw = (signs > 0).float()
    truth = rrpo_from_the_paper(logits.double(), ref_logits.double(), labels, signs, 0.1, 0.05)

    def naive_bf16(x):  # the same objective computed naively in bf16
        lp, kl = naive(x, ref_logits, labels)
        lq = naive(ref_logits, ref_logits, labels)[0]
        u = ((lp - lq) * tw).sum(-1)
        c, r = u.chunk(2)
        return (-F.logsigmoid(0.1 * (c - r)) + 0.05 * kl.sum(-1).chunk(2)[0]).mean()

    out = L.dpo_loss(logits, labels, ref_logits=ref_logits, loss_type="rrpo", beta=0.1, rrpo_alpha=0.05,
                     token_weights=tw, backend=backend)
    naive_err = abs(naive_bf16(logits).double().item() - truth.item())
    assert abs(out.loss.double().item() - truth.item()) <= K * naive_err + 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("budget", [None, 2 * 23 * 4 * 3])  # default, and tiles of 3 token rows
def test_rrpo_linear_form_matches_the_logits_form(backend, budget):
    g = torch.Generator().manual_seed(3)
    n, T, H, V = 6, 7, 8, 23
    hidden, ref_hidden = torch.randn(n, T, H, generator=g), torch.randn(n, T, H, generator=g)
    weight, bias = torch.randn(V, H, generator=g) * 0.5, torch.randn(V, generator=g) * 0.1
    _, _, labels, signs = _pairs(V=V)
    tw = (signs > 0).float()
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    out = L.linear_dpo_loss(h, w, labels, bias=b, ref_hidden=ref_hidden, loss_type="rrpo", rrpo_alpha=0.2,
                            token_weights=tw, memory_budget=budget, backend=backend, softcap=4.0, temperature=0.9)
    out.loss.backward()
    hd, wd, bd = (t.double().requires_grad_() for t in (hidden, weight, bias))
    x = _transform(hd @ wd.t() + bd, 0.9, 4.0)
    r = _transform(ref_hidden.double() @ weight.double().t() + bias.double(), 0.9, 4.0)
    expect = rrpo_from_the_paper(x, r, labels, signs, 0.1, 0.2)
    expect.backward()
    torch.testing.assert_close(out.loss.double(), expect.detach(), rtol=1e-5, atol=1e-6)
    for got, want in ((h.grad, hd.grad), (w.grad, wd.grad), (b.grad, bd.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_linear_token_logprobs_kl_and_strategy():
    g = torch.Generator().manual_seed(4)
    hidden, ref_hidden, weight = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g), \
        torch.randn(40, 8, generator=g)
    labels = torch.randint(0, 40, (2, 5), generator=g)
    labels[0, 0] = -100
    out = fastdpo.linear_token_logprobs(hidden, weight, labels, ref_hidden=ref_hidden, kl=True, backend="cpu",
                                        memory_budget=2 * 40 * 4 * 2)
    expect = fastdpo.fused_logprobs(hidden @ weight.t(), labels, ref_logits=ref_hidden @ weight.t(), kl=True,
                                    backend="torch")
    torch.testing.assert_close(out.kl, expect.kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ref_logps, expect.ref_logps, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ref_hidden"):
        fastdpo.linear_token_logprobs(hidden, weight, labels, kl=True)
    # The KL gradient comes from the recompute strategy; asking for the other one says why not.
    h = hidden.clone().requires_grad_()
    with pytest.raises(ValueError, match="token-level KL"):
        L.linear_dpo_loss(h, weight, torch.cat([labels, labels]).view(4, 5)[:2], ref_hidden=ref_hidden,
                          loss_type="rrpo", strategy="grad_in_forward")
    out = L.linear_dpo_loss(h, weight, labels, ref_hidden=ref_hidden, loss_type="rrpo", strategy="auto")
    out.loss.backward()
    assert h.grad is not None and h.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(ref_logits=None), "ref_logits"),
    (dict(ref_logits=None, ref_logps=torch.zeros(6)), "ref_logps are not enough"),
    (dict(rrpo_alpha=-0.1), "rrpo_alpha"),
    (dict(loss_type=["rrpo", "kto"]), "paired and unpaired"),
])
def test_rrpo_invalid_options(kwargs, match):
    logits, ref_logits, labels, _ = _pairs()
    kwargs = dict(kwargs)
    kwargs.setdefault("loss_type", "rrpo")
    kwargs.setdefault("ref_logits", ref_logits)
    with pytest.raises((ValueError, TypeError), match=match):
        L.dpo_loss(logits, labels, backend="torch", **kwargs)


def test_rrpo_combines_with_other_losses_and_pair_weights():
    logits, ref_logits, labels, _ = _pairs()
    pw = torch.tensor([0.5, 1.0, 2.0])
    both = L.dpo_loss(logits, labels, ref_logits=ref_logits, loss_type=["rrpo", "sft"], loss_weights=[1.0, 0.3],
                      pair_weights=pw, backend="cpu")
    a = L.dpo_loss(logits, labels, ref_logits=ref_logits, loss_type="rrpo", pair_weights=pw, backend="cpu")
    b = L.dpo_loss(logits, labels, ref_logits=ref_logits, loss_type="sft", pair_weights=pw, backend="cpu")
    torch.testing.assert_close(both.loss, a.loss + 0.3 * b.loss)


@pytest.mark.parametrize("name, options", [("rrpo", {"rrpo_alpha": 0.3}),
                                           ("tdpo", {"tdpo_alpha": 0.4, "tdpo_variant": "tdpo1"})])
def test_gradcheck_sequence_level_with_the_kl_input(name, options):
    # (tdpo2 stops the chosen KL's gradient by design, which a finite difference would not see.)
    spec = L.get_loss(name)
    cfg = LossConfig(beta=0.7, **options)
    g = torch.Generator().manual_seed(0)
    logps = -(torch.rand(6, generator=g, dtype=torch.float64) * 3 + 0.5)
    ref = -(torch.rand(6, generator=g, dtype=torch.float64) * 3 + 0.5)
    kl = torch.rand(6, generator=g, dtype=torch.float64)

    def f(lp, k):
        s = SequenceStats(lp, ref, lp, torch.ones(6, dtype=torch.float64), 2, kl=k)
        s.scores = s.logratios
        return spec.fn(s, cfg)

    assert torch.autograd.gradcheck(f, (logps.clone().requires_grad_(), kl.clone().requires_grad_()))


# --------------------------------------------------------------------------------------------------- TDPO


def tdpo_from_the_paper(logits, ref_logits, labels, beta, alpha, variant):
    """TDPO (Zeng et al. 2024) from its definition: u = sequence log-ratio, D = summed token-wise
    KL(pi_ref || pi); TDPO1 -log sigma(beta (u_w - u_l) - beta (D_l - D_w)), TDPO2 the same with
    alpha (D_l - sg(D_w)); mean over pairs."""
    logp_all = torch.log_softmax(logits.double(), -1)
    logq_all = torch.log_softmax(ref_logits.double(), -1)
    mask = labels != -100
    y = labels.clamp(min=0).unsqueeze(-1)
    u = ((logp_all.gather(-1, y) - logq_all.gather(-1, y)).squeeze(-1) * mask).sum(-1)
    d = ((logq_all.exp() * (logq_all - logp_all)).sum(-1) * mask).sum(-1)
    (u_w, u_l), (d_w, d_l) = u.chunk(2), d.chunk(2)
    if variant == "tdpo1":
        delta = beta * (d_l - d_w)
    else:
        delta = alpha * beta * (d_l - d_w.detach())
    return (-F.logsigmoid(beta * (u_w - u_l) - delta)).mean(), beta * (u_w + d_w), beta * (u_l + d_l)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_tdpo_matches_its_definition(backend, variant):
    logits, ref_logits, labels, _ = _pairs(seed=5)
    x = logits.clone().requires_grad_()
    out = L.dpo_loss(x, labels, ref_logits=ref_logits, loss_type="tdpo", beta=0.3, tdpo_alpha=0.7,
                     tdpo_variant=variant, backend=backend)
    out.loss.backward()
    xd = logits.double().requires_grad_()
    expect, cr, rr = tdpo_from_the_paper(xd, ref_logits, labels, 0.3, 0.7, variant)
    expect.backward()
    torch.testing.assert_close(out.loss.double(), expect.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.chosen_rewards.double(), cr.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.rejected_rewards.double(), rr.detach(), rtol=1e-5, atol=1e-6)


def test_tdpo_linear_form_and_bad_variant():
    g = torch.Generator().manual_seed(6)
    n, T, H, V = 6, 7, 8, 23
    hidden, ref_hidden, weight = torch.randn(n, T, H, generator=g), torch.randn(n, T, H, generator=g), \
        torch.randn(V, H, generator=g)
    _, _, labels, _ = _pairs(V=V)
    h = hidden.clone().requires_grad_()
    out = L.linear_dpo_loss(h, weight, labels, ref_hidden=ref_hidden, loss_type="tdpo", backend="cpu",
                            memory_budget=2 * V * 4 * 4)
    out.loss.backward()
    hd = hidden.double().requires_grad_()
    expect, _, _ = tdpo_from_the_paper(hd @ weight.double().t(), ref_hidden.double() @ weight.double().t(), labels,
                                       0.1, 0.5, "tdpo2")
    expect.backward()
    torch.testing.assert_close(out.loss.double(), expect.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), hd.grad, rtol=1e-4, atol=1e-6)
    logits, ref_logits, labels, _ = _pairs()
    with pytest.raises(ValueError, match="tdpo_variant"):
        L.dpo_loss(logits, labels, ref_logits=ref_logits, loss_type="tdpo", tdpo_variant="tdpo3")


def test_paths_without_the_vocabulary_say_why_rrpo_cannot_run():
    from fastdpo.integrations._losses import loss_from_token_logprobs, pair_losses

    logits, ref_logits, labels, _ = _pairs()
    tok = fastdpo.fused_logprobs(logits, labels, ref_logits=ref_logits)
    with pytest.raises(ValueError, match="token-level KL"):
        loss_from_token_logprobs(tok.logps, labels, ref_token_logps=tok.ref_logps, loss_type="rrpo")
    lp = torch.randn(3)
    with pytest.raises(ValueError, match="token-level KL"):
        pair_losses("tdpo", lp, lp, lp, lp)


def _gpu_backends():
    from fastdpo import _backends

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return [b for b in ("triton", "cuda") if _backends.unavailable_reason(_backends.Backend(b), dev) is None]


def _rrpo_both_forms(backend, device):
    logits, ref_logits, labels, signs = _pairs()
    tw = (signs > 0).float()
    g = torch.Generator().manual_seed(3)
    hidden, ref_hidden, weight = (torch.randn(6, 7, 8, generator=g), torch.randn(6, 7, 8, generator=g),
                                  torch.randn(23, 8, generator=g))
    x = logits.to(device).requires_grad_()
    a = L.dpo_loss(x, labels.to(device), ref_logits=ref_logits.to(device), loss_type="rrpo", rrpo_alpha=0.3,
                   token_weights=tw.to(device), backend=backend)
    a.loss.backward()
    h = hidden.to(device).requires_grad_()
    b = L.linear_dpo_loss(h, weight.to(device), labels.to(device), ref_hidden=ref_hidden.to(device),
                          loss_type="tdpo", backend=backend, memory_budget=2 * 23 * 4 * 4, softcap=3.0)
    b.loss.backward()
    return a.loss.cpu(), x.grad.cpu(), b.loss.cpu(), h.grad.cpu()


@pytest.mark.parametrize("backend", _gpu_backends() or ["triton"])
def test_rrpo_and_tdpo_on_gpu_backends_match_torch(backend):
    """On CPU tensors through the Triton interpreter here; on CUDA tensors (triton and cuda) with a GPU."""
    if backend not in _gpu_backends():
        pytest.skip(f"backend {backend} unavailable here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    got = _rrpo_both_forms(backend, device)
    want = _rrpo_both_forms("torch", device)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_linear_rrpo_without_reference_hidden_names_the_option():
    hidden, weight = torch.randn(2, 3, 4), torch.randn(9, 4)
    labels = torch.randint(0, 9, (2, 3))
    with pytest.raises(ValueError, match="ref_hidden for the linear form"):
        L.linear_dpo_loss(hidden, weight, labels, loss_type="rrpo")
    with pytest.raises(ValueError, match="labels must have shape"):
        L.linear_dpo_loss(hidden, weight, labels[0], loss_type="rrpo")
