"""Fused-linear weight and bias gradients: fp32 accumulation, and no tensor larger than
``memory_budget`` besides the inputs, the outputs and the fp32 accumulators.

The allowances, by shape and dtype, with a count so that a per-tile ``[V, H]`` temporary (one per
tile) cannot pass for one of them: the fp32 ``[V, H]`` weight-gradient accumulator (one), the
gradients in the parameters' dtypes (the weight's at most twice: the cast of the accumulator and the
copy the gradient-in-forward strategy scales by the upstream gradient), hidden-shaped gradient rows,
and on CPU in bf16/fp16 one transposed copy of the weight, made once per backward because CPU
reduced-precision GEMMs are fast only in the ``A @ B.T`` layout (docs/architecture.md).
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastdpo
from fastdpo import _backends
from fastdpo.ops import linear


class _Allocations(TorchDispatchMode):
    """Every tensor an op creates (a new storage), with its op, shape, dtype and bytes."""

    def __init__(self, inputs):
        super().__init__()
        self.seen = {t.untyped_storage().data_ptr() for t in inputs}
        self.new = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.numel():
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.seen:
                    self.seen.add(ptr)
                    self.new.append((func.overloadpacket.__name__, tuple(t.shape), t.dtype,
                                     t.untyped_storage().nbytes()))
        return out


def _check_allocations(allocs, budget, V, H, hidden_shapes, wdtype, nt):
    over = [a for a in allocs if a[3] > budget]
    kinds = collections.Counter()
    for op, shape, dtype, nbytes in over:
        if shape == (V, H) and dtype == torch.float32:
            kinds["fp32 weight accumulator"] += 1
        elif shape == (V, H) and dtype == wdtype:
            kinds["weight gradient output"] += 1
        elif shape in hidden_shapes:
            kinds["hidden gradient"] += 1
        elif nt and shape == (H, V) and dtype == wdtype:
            kinds["transposed weight (CPU GEMM layout)"] += 1
        else:
            raise AssertionError(f"a {op} output {shape} {dtype} of {nbytes} bytes exceeds memory_budget={budget}")
    limits = {"fp32 weight accumulator": 1, "weight gradient output": 2, "hidden gradient": 3,
              "transposed weight (CPU GEMM layout)": 1}
    for k, n in kinds.items():
        assert n <= limits[k], (k, n, over)


def _python_loops():
    """(backend, strategy) pairs that run the Python tile loop with a fused kernel: GPUs run it with
    the triton and cuda kernels; on CPU the cpu backend runs it for grad_in_forward (recompute has
    the C++ loop, tested below). The torch backend is left out: its row-chunked reference kernel
    upcasts up to 2^24 logits at a time to fp32 by design."""
    out = [("cpu", "grad_in_forward")]
    if _backends.unavailable_reason(_backends.Backend.TRITON, torch.device("cpu")) is None:
        out += [("triton", "recompute"), ("triton", "grad_in_forward")]
    return out


@pytest.mark.parametrize("backend, strategy", _python_loops())
def test_bf16_weight_gradient_allocations_stay_within_the_budget(backend, strategy):
    """The Python tile loop (the one GPUs run): [V, H] = 256 KiB in bf16, budget 40 KiB, ~10 tiles."""
    n, t, hd, v = 4, 16, 32, 4096
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, t, hd, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, hd, generator=g) / hd**0.5).bfloat16().requires_grad_()
    b = torch.zeros(v, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, v, (n, t), generator=g)
    y[:, :3] = -100
    budget = 5 * v * 2  # 5 rows per tile
    if strategy == "grad_in_forward":
        budget = 27 * v * 2  # one pair (<= 26 tokens) per chunk
    rh = h.detach() * 0.9
    with _Allocations([h, w, b, rh, y]) as mode:
        out = fastdpo.linear_dpo_loss(h, w, y, bias=b, ref_hidden=rh, strategy=strategy, memory_budget=budget,
                                      backend=backend)
        out.loss.backward()
    _check_allocations(mode.new, budget, v, hd, {(n * t, hd), (n, t, hd)}, torch.bfloat16, nt=True)
    assert torch.isfinite(w.grad.float()).all() and w.grad.float().abs().sum() > 0


def test_cpu_native_loop_weight_gradient_allocations_stay_within_the_budget():
    """The C++ tile loop (cpu backend, recompute) is one op to a dispatch mode: the profiler sees its
    allocations."""
    from torch.profiler import ProfilerActivity, profile

    n, t, hd, v = 4, 16, 64, 8192
    g = torch.Generator().manual_seed(1)
    h = torch.randn(n, t, hd, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, hd, generator=g) / hd**0.5).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n, t), generator=g)
    y[:, :3] = -100
    budget = 5 * v * 2
    out = fastdpo.linear_dpo_loss(h, w, y, ref_hidden=h.detach() * 0.9, strategy="recompute", memory_budget=budget,
                                  backend="cpu")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out.loss.backward()
    # An op's own allocations (its cpu_memory_usage repeats its children's).
    sizes = sorted(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > budget)
    assert sizes, "the profiler recorded no allocation"
    # allowed: the fp32 accumulator (4 VH), the bf16 result (2 VH), the transposed weight (2 VH), hidden rows
    vh = v * hd
    allowed = collections.Counter({4 * vh: 1, 2 * vh: 2})
    for s in sizes:
        if s <= n * t * hd * 4:
            continue  # hidden-sized
        assert allowed[s] > 0, (s, sizes, budget)
        allowed[s] -= 1


def _tiles(n_tiles=12, rows=40, v=300, hd=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Partials that cancel across tiles: rounding a tile's partial gradient to bf16 would show.
    xs = [(torch.randn(rows, v, generator=g) * (1 if k % 2 else -1)).bfloat16() for k in range(n_tiles)]
    hs = [torch.randn(rows, hd, generator=g).bfloat16() for _ in range(n_tiles)]
    return xs, hs


def test_weight_gradient_of_bf16_tiles_accumulates_in_fp32():
    xs, hs = _tiles()
    v, hd = xs[0].shape[1], hs[0].shape[1]
    acc = torch.zeros(v, hd)
    for x, hr in zip(xs, hs):
        linear.add_weight_grad(acc, x, hr, 0.5, budget=x.numel() * 2)
    exact = sum(x.double().t() @ hr.double() for x, hr in zip(xs, hs)) * 0.5
    err = (acc.double() - exact).abs().max() / exact.abs().max()
    # What rounding each tile's partial gradient to bf16 before the fp32 sum gives (the old way):
    rounded = sum((x.double().t() @ hr.double()).bfloat16().double() for x, hr in zip(xs, hs)) * 0.5
    rounded_err = (rounded - exact).abs().max() / exact.abs().max()
    assert err < 1e-6, err
    assert rounded_err > 100 * err  # the check would see a per-tile bf16 rounding


def test_native_cpu_loop_accumulates_the_weight_gradient_in_fp32():
    """linear_bwd_ (C++) on bf16: its fp32 accumulator equals the float64 sum of its own tile gradients."""
    fastdpo._backends.resolve("cpu", torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    M, hd, v, rows = 96, 24, 300, 8
    h = torch.randn(M, hd, generator=g).bfloat16()
    w = (torch.randn(v, hd, generator=g) / hd**0.5).bfloat16()
    y = torch.randint(0, v, (M,), generator=g)
    idx = torch.arange(M)
    grad = torch.randn(M, generator=g)
    lse = torch.zeros(M)
    torch.ops.fastdpo.linear_fwd_(h, w, None, y, idx, -100, 1.0, 0.0, 1.0, rows, torch.zeros(M), lse, None)
    gw = torch.zeros(v, hd)
    torch.ops.fastdpo.linear_bwd_(grad, h, w, None, y, idx, lse, -100, 1.0, 0.0, 1.0, rows, None, gw, None)
    exact = torch.zeros(v, hd, dtype=torch.float64)
    for i in range(0, M, rows):
        x = (h[i : i + rows] @ w.t()).unsqueeze(0)  # the same bf16 tile, turned into its gradient in place
        torch.ops.fastdpo.logprobs_bwd_(grad[i : i + rows].unsqueeze(0), x, y[i : i + rows].unsqueeze(0),
                                        lse[i : i + rows].unsqueeze(0), -100, 1.0, 0.0)
        exact += x[0].double().t() @ h[i : i + rows].double()
    err = (gw.double() - exact).abs().max() / exact.abs().max()
    assert err < 1e-5, err


@pytest.mark.parametrize("backend, strategy", [b for b in _python_loops() if b[0] == "triton"])
def test_cuda_fp32_output_gemm_branch_stays_within_the_budget(monkeypatch, backend, strategy):
    """The CUDA branch of add_weight_grad (bf16 GEMMs writing fp32 blocks), run here with an
    emulated ``torch.mm(..., out_dtype=)`` whose result is allocated inside the mode as on CUDA."""
    from torch.utils._python_dispatch import _disable_current_modes

    real_mm = torch.mm
    calls = []

    def mm(a, b, *, out_dtype=None):
        if out_dtype is None:
            return real_mm(a, b)
        calls.append((tuple(a.shape), tuple(b.shape)))
        with _disable_current_modes():
            r = real_mm(a.to(out_dtype), b.to(out_dtype))
        return r.clone()  # the fp32 product, seen by the allocation mode

    monkeypatch.setattr(linear, "_fp32_out_gemm", lambda device: True)
    monkeypatch.setattr(torch, "mm", mm)
    test_bf16_weight_gradient_allocations_stay_within_the_budget(backend, strategy)
    assert calls, "the fp32-output GEMM branch was not taken"


@pytest.mark.gpu
def test_cuda_weight_gradient_of_bf16_tiles_accumulates_in_fp32():
    xs, hs = _tiles()
    xs, hs = [x.cuda() for x in xs], [h.cuda() for h in hs]
    acc = torch.zeros(xs[0].shape[1], hs[0].shape[1], device="cuda")
    for x, hr in zip(xs, hs):
        linear.add_weight_grad(acc, x, hr, 0.5, budget=x.numel() * 2)
    exact = sum(x.double().t() @ hr.double() for x, hr in zip(xs, hs)) * 0.5
    assert ((acc.double() - exact).abs().max() / exact.abs().max()).item() < 1e-6
