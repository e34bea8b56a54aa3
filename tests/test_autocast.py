"""The fused linear under ``torch.autocast`` with fp32 parameters (how mixed-precision training runs).

Its GEMMs follow autocast as ``F.linear`` does (the head and hidden states in the autocast dtype),
the gradients come back in the parameters' dtype, and against the float64 truth its error is at
most twice that of full-logits autograd under the same autocast (plus a small tolerance).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastdpo

N, T, H, V = 4, 9, 16, 37


def _inputs(device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, T, H, generator=g)
    w = torch.randn(V, H, generator=g) / H**0.5
    b = torch.randn(V, generator=g) * 0.1
    rh = h + 0.3 * torch.randn(N, T, H, generator=g)
    y = torch.randint(0, V, (N, T), generator=g)
    y[:, :3] = -100
    y[1, 6:] = -100
    return [t.to(device) for t in (h, w, b, rh, y)]


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _truth(h, w, b, rh, y, loss_fn):
    h64, w64, b64 = _leaves(h.double(), w.double(), b.double())
    loss = loss_fn(F.linear(h64, w64, b64), F.linear(rh.double(), w.double(), b.double()), y)
    loss.backward()
    return loss.detach(), h64.grad, w64.grad, b64.grad


def _naive(h, w, b, rh, y, loss_fn, device_type, dtype):
    hl, wl, bl = _leaves(h, w, b)
    with torch.autocast(device_type, dtype=dtype):
        loss = loss_fn(F.linear(hl, wl, bl), F.linear(rh, wl.detach(), bl.detach()), y)
    loss.backward()
    return loss.detach(), hl.grad, wl.grad, bl.grad


class _GemmDtypes(TorchDispatchMode):
    """The dtypes of the operands of every GEMM (and of the native fused-linear loops) that run."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "linear_fwd_", "linear_bwd_"):
            mats = args[1:3] if name == "addmm" else args[:2] if name == "mm" else args[1:3] if name == "linear_bwd_" \
                else args[:2]
            self.dtypes |= {m.dtype for m in mats if isinstance(m, torch.Tensor)}
        return func(*args, **(kwargs or {}))


def _check_three_way(ours, naive, truth, params):
    for name, got, base, want in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), ours, naive, truth):
        assert got is not None, name
        if name != "loss":
            assert got.dtype == params[name].dtype, (name, got.dtype)  # the parameters' dtype
        err = (got.double() - want).abs().max().item()
        base_err = (base.double() - want).abs().max().item()
        tol = 1e-5 * want.abs().max().item()
        assert err <= 2 * base_err + tol, (name, err, base_err)


def _dpo(logits, ref, y):
    return fastdpo.dpo_loss(logits, y, ref_logits=ref, backend="torch").loss


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("strategy", ["recompute", "grad_in_forward"])
@pytest.mark.parametrize("backward_inside", [False, True])
def test_linear_dpo_loss_under_cpu_autocast(dtype, backend, strategy, backward_inside):
    h, w, b, rh, y = _inputs()
    hl, wl, bl = _leaves(h, w, b)
    with torch.autocast("cpu", dtype=dtype), _GemmDtypes() as gemms:
        out = fastdpo.linear_dpo_loss(hl, wl, y, bias=bl, ref_hidden=rh, strategy=strategy, backend=backend,
                                      memory_budget=13 * V * 2)  # several tiles, one pair per chunk
        if backward_inside:
            out.loss.backward()
    if not backward_inside:
        out.loss.backward()
    assert gemms.dtypes == {dtype}, gemms.dtypes  # the GEMMs follow autocast, as F.linear does
    ours = (out.loss.detach(), hl.grad, wl.grad, bl.grad)
    _check_three_way(ours, _naive(h, w, b, rh, y, _dpo, "cpu", dtype), _truth(h, w, b, rh, y, _dpo),
                     {"grad_hidden": h, "grad_weight": w, "grad_bias": b})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_linear_token_logprobs_under_cpu_autocast(dtype, backend):
    h, w, b, rh, y = _inputs(seed=1)
    g = torch.randn(N, T, generator=torch.Generator().manual_seed(2))

    def weighted(logits, ref, labels):
        lp = fastdpo.token_logprobs(logits, labels, backend="torch")
        return (lp * g.to(lp.dtype)).sum()

    hl, wl, bl = _leaves(h, w, b)
    with torch.autocast("cpu", dtype=dtype), _GemmDtypes() as gemms:
        out = fastdpo.linear_token_logprobs(hl, wl, y, bias=bl, ref_hidden=rh, stats=True, backend=backend,
                                            memory_budget=5 * V * 2)
        loss = (out.logps * g).sum()
        loss.backward()  # inside the autocast region, as a training step often is
    assert gemms.dtypes == {dtype}, gemms.dtypes
    ours = (loss.detach(), hl.grad, wl.grad, bl.grad)
    _check_three_way(ours, _naive(h, w, b, rh, y, weighted, "cpu", dtype), _truth(h, w, b, rh, y, weighted),
                     {"grad_hidden": h, "grad_weight": w, "grad_bias": b})


def test_autocast_hidden_in_reduced_precision_with_fp32_head():
    """Under autocast a bf16 hidden state meets the fp32 head, as F.linear allows."""
    h, w, b, rh, y = _inputs(seed=3)
    hb = h.bfloat16().requires_grad_()
    wl = w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastdpo.linear_dpo_loss(hb, wl, y, ref_hidden=rh.bfloat16(), backend="cpu")
    out.loss.backward()
    assert hb.grad.dtype == torch.bfloat16 and wl.grad.dtype == torch.float32
    assert torch.isfinite(wl.grad).all() and wl.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="share a dtype"):  # without autocast the dtypes must agree
        fastdpo.linear_dpo_loss(hb, wl, y, backend="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("strategy", ["recompute", "grad_in_forward"])
def test_linear_dpo_loss_under_cuda_autocast(dtype, backend, strategy):
    h, w, b, rh, y = _inputs("cuda")
    hl, wl, bl = _leaves(h, w, b)
    with torch.autocast("cuda", dtype=dtype):
        out = fastdpo.linear_dpo_loss(hl, wl, y, bias=bl, ref_hidden=rh, strategy=strategy, backend=backend,
                                      memory_budget=13 * V * 2)
    out.loss.backward()
    ours = (out.loss.detach(), hl.grad, wl.grad, bl.grad)
    _check_three_way(ours, _naive(h, w, b, rh, y, _dpo, "cuda", dtype), _truth(h, w, b, rh, y, _dpo),
                     {"grad_hidden": h, "grad_weight": w, "grad_bias": b})
