"""The torch reference kernel (the oracle and the last fallback) block by block: any block size gives the
same bits, its temporaries stay bounded by the block size, and infinite label logits keep a finite
log-sum-exp. Accuracy against float64 truth is in test_logprobs.py / test_token_kl.py, as for every backend."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastdpo.kernels import reference as R

V = 97


def _case(B, T, dtype, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(B, T + 2 if strided else T, V, generator=g) * 3
    x = (full[:, 1:-1] if strided else full).to(dtype)  # strided: rows of a batch entry are not one view
    r = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :2] = -100
    gl, gk = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    gl[1, 0] = 0.0  # a valid row without upstream gradient
    return x, r, y, gl, gk


def _run(x, r, y, gl, gk, kw, inplace=False):
    fwd = R.logprobs_fwd(x, y, r, -100, kw["temperature"], kw["softcap"], True, kl=True)
    _, lse, _, _, _, ref_lse = fwd
    xi = x.clone() if inplace else x
    grad = R.logprobs_bwd(gl, xi, y, lse, -100, kw["temperature"], kw["softcap"], inplace, gk, r, ref_lse)
    grad_lp = R.logprobs_bwd(gl, x.clone() if inplace else x, y, lse, -100, kw["temperature"], kw["softcap"], inplace)
    return [*fwd, grad, grad_lp]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("kw", [dict(temperature=1.0, softcap=0.0), dict(temperature=0.7, softcap=4.0)])
@pytest.mark.parametrize("inplace", [False, True])
def test_any_block_size_gives_the_same_bits(monkeypatch, dtype, strided, kw, inplace):
    x, r, y, gl, gk = _case(3, 7, dtype, strided=strided)
    whole = _run(x, r, y, gl, gk, kw, inplace)
    for rows in (1, 3, 5):  # blocks that do and do not divide the rows, crossing batch entries when allowed
        monkeypatch.setattr(R, "_CHUNK_ELEMS", rows * V)
        blocked = _run(x, r, y, gl, gk, kw, inplace)
        for a, b in zip(whole, blocked):
            assert torch.equal(a, b)
    grad, grad_lp = whole[-2:]
    assert (grad[0, :2] == 0).all() and (grad_lp[1, 0] == 0).all()  # ignored rows / no upstream gradient


def test_in_place_gradient_may_alias_the_reference():
    x, _, y, gl, gk = _case(2, 4, torch.float32)
    _, lse, _, _, _, ref_lse = R.logprobs_fwd(x, y, x, -100, 1.0, 0.0, False, kl=True)
    expect = R.logprobs_bwd(gl, x, y, lse, -100, 1.0, 0.0, False, gk, x.clone(), ref_lse)
    xi = x.clone()
    got = R.logprobs_bwd(gl, xi, y, lse, -100, 1.0, 0.0, True, gk, xi, ref_lse)
    assert got is xi and torch.equal(got, expect)


def test_infinite_label_logit_keeps_a_finite_log_sum_exp():
    x, _, y, gl, _ = _case(2, 4, torch.float32)
    x[0, 2, y[0, 2]] = float("-inf")  # the label is a masked vocabulary entry
    logp, lse, *_ = R.logprobs_fwd(x, y, None, -100, 1.0, 0.0, False)
    torch.testing.assert_close(lse[:, 2:], torch.logsumexp(x[:, 2:], -1))
    assert logp[0, 2] == float("-inf") and torch.isfinite(logp[0, 3:]).all() and torch.isfinite(logp[1]).all()
    grad = R.logprobs_bwd(gl, x, y, lse, -100, 1.0, 0.0, False)
    assert torch.isfinite(grad).all()


class _Allocations(TorchDispatchMode):
    """Sizes of the tensors the dispatched ops create (views of existing storage excluded)."""

    def __init__(self, inputs):
        super().__init__()
        self.seen = {t.untyped_storage().data_ptr() for t in inputs}
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.seen:
                self.seen.add(t.untyped_storage().data_ptr())
                self.sizes.append(t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_temporaries_are_bounded_by_the_block(monkeypatch, dtype):
    monkeypatch.setattr(R, "_CHUNK_ELEMS", 4 * V)
    B, T = 2, 16  # 8 blocks of 4 rows
    x, r, y, gl, gk = _case(B, T, dtype)
    block = 4 * V * 4  # one fp32 workspace
    with _Allocations([x, r, y, gl, gk]) as m:
        _, lse, _, _, _, ref_lse = R.logprobs_fwd(x, y, r, -100, 0.9, 3.0, True, kl=True)
    assert max(m.sizes) <= block
    with _Allocations([x, r, y, gl, gk, lse, ref_lse]) as m:
        grad = R.logprobs_bwd(gl, x, y, lse, -100, 0.9, 3.0, False, gk, r, ref_lse)
    big = [s for s in m.sizes if s > block]
    assert big == [grad.untyped_storage().nbytes()]  # only the [N, V] gradient itself
