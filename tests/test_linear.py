"""Fused-linear path (fastdpo.ops.linear): both strategies and ``auto`` against full logits +
autograd, odd shapes, the LM-head transforms, and a check that nothing O(N x V) is allocated."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastdpo
from fastdpo.ops import linear

N, T, H, V = 4, 9, 16, 37  # V: not a multiple of any block; 2 pairs of 9 tokens


def _inputs(dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, T, H, generator=g)
    w = torch.randn(V, H, generator=g) / H**0.5
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    rh = h + 0.3 * torch.randn(N, T, H, generator=g)
    y = torch.randint(0, V, (N, T), generator=g)
    y[:, :3] = -100  # prompt
    y[1, 6:] = -100  # padding
    return [t.to(dtype) if t is not None else None for t in (h, w, b, rh)] + [y]


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _reference(h, w, b, rh, y, *, temperature=1.0, softcap=None, logit_scale=1.0, **kw):
    """Full logits in float64 through dpo_loss (the torch oracle) and autograd."""
    h64, w64, b64 = (_leaf(t.double()) if t is not None else None for t in (h, w, b))
    logits = F.linear(h64, w64, b64) * logit_scale
    ref = F.linear(rh.double(), w.double(), b.double() if b is not None else None) * logit_scale
    if softcap is not None:
        logits, ref = softcap * torch.tanh(logits / softcap), softcap * torch.tanh(ref / softcap)
    out = fastdpo.dpo_loss(logits / temperature, y, ref_logits=ref / temperature, backend="torch", **kw)
    out.loss.backward()
    return out, h64.grad, w64.grad, (b64.grad if b is not None else None)


def _run(h, w, b, rh, y, **kw):
    hl, wl, bl = _leaf(h), _leaf(w), _leaf(b)
    out = fastdpo.linear_dpo_loss(hl, wl, y, bias=bl, ref_hidden=rh, **kw)
    out.loss.backward()
    return out, hl.grad, wl.grad, (bl.grad if bl is not None else None)


def _close(got, want, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("strategy", ["recompute", "grad_in_forward", "auto"])
@pytest.mark.parametrize("budget_rows", [None, 13])  # 13 rows: several tiles, one pair (<= 12 tokens) per chunk
def test_strategies_match_full_logits(strategy, backend, budget_rows):
    h, w, b, rh, y = _inputs()
    budget = None if budget_rows is None else budget_rows * V * 4
    out, gh, gw, gb = _run(h, w, b, rh, y, strategy=strategy, memory_budget=budget, backend=backend)
    ref, rgh, rgw, rgb = _reference(h, w, b, rh, y)
    _close(out.loss, ref.loss)
    for got, want in ((gh, rgh), (gw, rgw), (gb, rgb)):
        _close(got, want)
    for k, v in ref.metrics.items():
        _close(out.metrics[k], v, rtol=1e-4, atol=1e-5)
    _close(out.policy_logps, ref.policy_logps)


@pytest.mark.parametrize("strategy", ["recompute", "grad_in_forward"])
@pytest.mark.parametrize("loss_type, extra", [
    ("ipo", {}), ("orpo", {}), ("kto", {"kl": 0.1}), ("simpo", {}), (["sigmoid", "sft"], {"loss_weights": [1.0, 0.5]}),
    ("sigmoid", {"use_weighting": True, "ld_alpha": 0.5}), ("margin_dpo", {"beta": torch.tensor([0.1, 0.3])}),
])
def test_losses_and_options(strategy, loss_type, extra):
    h, w, b, rh, y = _inputs(seed=1)
    kw = dict(loss_type=loss_type, **extra)
    out, gh, gw, gb = _run(h, w, b, rh, y, strategy=strategy, memory_budget=13 * V * 4, backend="cpu", **kw)
    ref, rgh, rgw, rgb = _reference(h, w, b, rh, y, **kw)
    _close(out.loss, ref.loss)
    for got, want in ((gh, rgh), (gw, rgw), (gb, rgb)):
        _close(got, want)


def test_transforms_temperature_softcap_logit_scale():
    h, w, b, rh, y = _inputs(seed=2)
    h = h * 4  # large logits so the soft cap bites
    kw = dict(temperature=0.7, softcap=3.0, logit_scale=1.5)
    for strategy in ("recompute", "grad_in_forward"):
        out, gh, gw, gb = _run(h, w, b, rh, y, strategy=strategy, backend="cpu", **kw)
        ref, rgh, rgw, rgb = _reference(h, w, b, rh, y, **kw)
        _close(out.loss, ref.loss)
        for got, want in ((gh, rgh), (gw, rgw), (gb, rgb)):
            _close(got, want)


def test_without_reference_and_with_ref_logps():
    h, w, b, _, y = _inputs(seed=3, bias=False)
    ref_logps = torch.randn(N) - 20
    for strategy in ("recompute", "grad_in_forward"):
        hl, wl = _leaf(h), _leaf(w)
        out = fastdpo.linear_dpo_loss(hl, wl, y, ref_logps=ref_logps, strategy=strategy, backend="cpu")
        out.loss.backward()
        h64, w64 = _leaf(h.double()), _leaf(w.double())
        ref = fastdpo.dpo_loss(h64 @ w64.t(), y, ref_logps=ref_logps.double(), backend="torch")
        ref.loss.backward()
        _close(out.loss, ref.loss)
        _close(hl.grad, h64.grad)
        _close(wl.grad, w64.grad)


@pytest.mark.parametrize("strategy", ["recompute", "grad_in_forward"])
def test_bf16_error_bounded_by_same_dtype_torch(strategy):
    h, w, b, rh, y = _inputs(seed=4)
    hb, wb, bb, rhb = (t.bfloat16() for t in (h, w, b, rh))
    out, gh, gw, gb = _run(hb, wb, bb, rhb, y, strategy=strategy, backend="cpu")
    truth, tgh, tgw, _ = _reference(hb, wb, bb, rhb, y)  # float64 on the same bf16 inputs
    # same-dtype torch: bf16 logits and autograd
    hl, wl, bl = _leaf(hb), _leaf(wb), _leaf(bb)
    naive = fastdpo.dpo_loss(F.linear(hl, wl, bl), y, ref_logits=F.linear(rhb, wb, bb), backend="torch")
    naive.loss.backward()
    for got, base, want in ((out.loss, naive.loss, truth.loss), (gh, hl.grad, tgh), (gw, wl.grad, tgw)):
        err = (got.double() - want).abs().max()
        base_err = (base.double() - want).abs().max()
        assert err <= 2 * base_err + 1e-3 * want.abs().max(), (err, base_err)


def test_linear_token_logprobs_matches_token_logprobs():
    h, w, b, rh, y = _inputs(seed=5)
    hl, wl, bl = _leaf(h), _leaf(w), _leaf(b)
    out = fastdpo.linear_token_logprobs(hl, wl, y, bias=bl, ref_hidden=rh, stats=True, memory_budget=5 * V * 4,
                                        backend="cpu")
    h2, w2, b2 = _leaf(h), _leaf(w), _leaf(b)
    full = fastdpo.fused_logprobs(F.linear(h2, w2, b2), y, ref_logits=F.linear(rh, w, b), stats=True, backend="torch")
    _close(out.logps, full.logps)
    _close(out.ref_logps, full.ref_logps)
    _close(out.stats, full.stats, rtol=1e-4, atol=1e-5)
    gy = torch.randn(N, T)
    (out.logps * gy).sum().backward()
    (full.logps * gy).sum().backward()
    for got, want in ((hl.grad, h2.grad), (wl.grad, w2.grad), (bl.grad, b2.grad)):
        _close(got, want)
    assert torch.all(hl.grad[y == -100] == 0)


def test_grad_in_forward_scales_with_upstream_gradient_and_frozen_head():
    h, w, b, rh, y = _inputs(seed=6, bias=False)
    hl = _leaf(h)
    out = fastdpo.linear_dpo_loss(hl, w, y, ref_hidden=rh, strategy="grad_in_forward", backend="cpu")
    (3.0 * out.loss).backward()
    h2 = _leaf(h)
    ref = fastdpo.dpo_loss(h2 @ w.t(), y, ref_logits=rh @ w.t(), backend="torch")
    (3.0 * ref.loss).backward()
    _close(hl.grad, h2.grad)


def test_auto_uses_recompute_for_non_separable_and_user_losses(monkeypatch):
    calls = []
    real = linear.linear_grad_in_forward
    monkeypatch.setattr(linear, "linear_grad_in_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    h, w, b, rh, y = _inputs(seed=7)

    @fastdpo.register_loss("test_user_sigmoid", overwrite=True)
    def user(s, cfg):
        return -F.logsigmoid(cfg.beta * (s.chosen_logratios - s.rejected_logratios))

    assert not fastdpo.get_loss("test_user_sigmoid").separable
    assert not fastdpo.get_loss("aot").separable and fastdpo.get_loss("sigmoid").separable
    for lt in ("aot", "test_user_sigmoid"):
        out, gh, _, _ = _run(h, w, b, rh, y, loss_type=lt, strategy="auto", backend="cpu")
        ref, rgh, _, _ = _reference(h, w, b, rh, y, loss_type=lt)
        _close(out.loss, ref.loss)
        _close(gh, rgh)
    assert calls == []
    _run(h, w, b, rh, y, strategy="auto", backend="cpu")
    assert calls == [1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(strategy="fast"), "strategy"),
    (dict(strategy="grad_in_forward", loss_type="aot"), "not separable"),
    (dict(strategy="grad_in_forward", memory_budget=4 * V * 4), "memory_budget"),
    (dict(memory_budget=0), "memory_budget"),
    (dict(logit_scale=-1.0), "logit_scale"),
])
def test_invalid_options(kwargs, match):
    h, w, b, rh, y = _inputs()
    with pytest.raises(ValueError, match=match):
        _run(h, w, b, rh, y, backend="cpu", **kwargs)


def test_invalid_inputs():
    h, w, b, rh, y = _inputs()
    with pytest.raises(TypeError, match="share a dtype"):
        fastdpo.linear_dpo_loss(h, w.double(), y)
    with pytest.raises(ValueError, match="labels must have shape"):
        fastdpo.linear_dpo_loss(h, w, y[:, :-1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fastdpo.linear_dpo_loss(h, w, torch.full_like(y, V))
    with pytest.raises(ValueError, match="ref_weight"):
        fastdpo.linear_dpo_loss(h, w, y, ref_hidden=rh, ref_weight=w[:-1])


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates or writes."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("strategy, budget", [("recompute", 1 << 20), ("grad_in_forward", 12 << 20)])
def test_no_allocation_of_tokens_by_vocab(strategy, budget):
    # The logits would be 41 MB; a pair's response logits are 10 MB.
    n, t, hd, v = 4, 128, 8, 20000
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, t, hd, generator=g).requires_grad_(True)
    w = (torch.randn(v, hd, generator=g) / hd**0.5).requires_grad_(True)
    y = torch.randint(0, v, (n, t), generator=g)
    y[:, : t // 2] = -100
    with _LargestTensor() as mode:
        out = fastdpo.linear_dpo_loss(h, w, y, ref_hidden=h.detach() * 0.9, strategy=strategy, memory_budget=budget,
                                      backend="cpu")
        out.loss.backward()
    logits_bytes = n * t * v * 4
    assert mode.largest <= max(budget, v * hd * 4), (mode.largest, logits_bytes)
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


@pytest.mark.parametrize("strategy", ["recompute", "grad_in_forward"])
def test_python_tile_loop_on_triton_kernels(strategy):
    """The tile loop GPUs run (Python around the backend's kernels), here through the Triton interpreter."""
    pytest.importorskip("triton")
    if fastdpo._backends.unavailable_reason(fastdpo.Backend.TRITON, torch.device("cpu")) is not None:
        pytest.skip("triton backend unavailable on CPU tensors")
    h, w, b, rh, y = _inputs(seed=9)
    out, gh, gw, gb = _run(h, w, b, rh, y, strategy=strategy, memory_budget=13 * V * 4, backend="triton")
    ref, rgh, rgw, rgb = _reference(h, w, b, rh, y)
    _close(out.loss, ref.loss)
    for got, want in ((gh, rgh), (gw, rgw), (gb, rgb)):
        _close(got, want)


def test_native_linear_ops_opcheck():
    fastdpo._backends.resolve("cpu", torch.device("cpu"))  # loads the extension
    h, w, b, _, y = _inputs(seed=10)
    h2, y2 = h.reshape(-1, H), y.reshape(-1)
    idx = torch.nonzero(y2 != -100).squeeze(1)
    M = h2.shape[0]
    logp, lse, st = torch.zeros(M), torch.zeros(M), torch.zeros(M, 4)
    args = (h2, w, b, y2, idx, -100, 1.0, 0.0, 1.0, 5, logp, lse, st)
    torch.library.opcheck(torch.ops.fastdpo.linear_fwd_.default, args)
    torch.ops.fastdpo.linear_fwd_(*args)
    full = fastdpo.fused_logprobs(F.linear(h2, w, b), y2, stats=True, backend="torch")
    _close(logp, full.logps)
    gh, gw, gb = torch.zeros_like(h2), torch.zeros(V, H), torch.zeros(V)
    g = torch.randn(M)
    bargs = (g, h2, w, b, y2, idx, lse, -100, 1.0, 0.0, 1.0, 5, gh, gw, gb)
    torch.library.opcheck(torch.ops.fastdpo.linear_bwd_.default, bargs)
    with pytest.raises(RuntimeError, match="share a dtype"):
        torch.ops.fastdpo.linear_fwd_(h2.double(), w, b, y2, idx, -100, 1.0, 0.0, 1.0, 5, logp, lse, st)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("strategy", ["recompute", "grad_in_forward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_match_full_logits(backend, strategy, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator().manual_seed(11)
    n, t, hd, v = 4, 128, 256, 50257
    h = torch.randn(n, t, hd, generator=g).cuda().to(dtype)
    w = (torch.randn(v, hd, generator=g) / hd**0.5).cuda().to(dtype)
    rh = (h.float() + 0.1 * torch.randn(n, t, hd, generator=g).cuda()).to(dtype)
    y = torch.randint(0, v, (n, t), generator=g).cuda()
    y[:, :32] = -100
    out, gh, gw, _ = _run(h, w, None, rh, y, strategy=strategy, memory_budget=64 << 20, backend=backend)
    truth, tgh, tgw, _ = _reference(h, w, None, rh, y)
    hl, wl = _leaf(h), _leaf(w)
    naive = fastdpo.dpo_loss(F.linear(hl, wl), y, ref_logits=F.linear(rh, w), backend="torch")
    naive.loss.backward()
    for got, base, want in ((out.loss, naive.loss, truth.loss), (gh, hl.grad, tgh), (gw, wl.grad, tgw)):
        err = (got.double() - want).abs().max()
        base_err = (base.double() - want).abs().max()
        assert err <= 4 * base_err + 1e-5 * want.abs().max(), (err, base_err)
