"""Triton backend: the kernels of ``kernels/triton_logprobs.py`` registered as
``torch.library.triton_op`` ops (``fastdpo::logprobs_fwd_triton``,
``logprobs_bwd_triton`` and the in-place ``logprobs_bwd_triton_``), so
``torch.compile`` can trace them.

Runs on CUDA tensors; on CPU tensors only under ``TRITON_INTERPRET=1`` (the
Triton interpreter, slow, for testing), which must be set before the kernels
are first used.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from fastdpo.kernels._device import on_input_device

_ops = None


def unavailable_reason(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not hasattr(torch.library, "triton_op"):
        return f"torch {torch.__version__} has no torch.library.triton_op (needs torch >= 2.6)"
    if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        _get_ops()  # define the ops now (eagerly), so torch.compile only ever sees torch.ops calls
        return None
    return (f"the triton backend runs on CUDA tensors, got a {device.type} tensor "
            "(set TRITON_INTERPRET=1 before the first call to run it on CPU through the interpreter)")


# ----------------------------------------------------------------------------- launch configuration
# A program walks a row in blocks of two [LANES, VEC] tiles: LANES = 32 * num_warps threads,
# VEC = one 128-bit load. Few rows are split over the vocabulary so that at least two waves
# of programs are in flight.

_LOG2E = 1.4426950408889634
_WAVES = 2
_SM_DEFAULT = 132  # H100 SXM, for meta tensors (the static check)
_SM_INTERPRETED = 0  # the interpreter does not split rows (tests set it to exercise the split)
_FIXED_MAX = 40.0  # soft cap / T up to which the max is fixed at cap / T (2^(-2 * 40 * log2 e) is a normal float)
_BWD_MAX_BLOCKS = 4  # blocks per backward program when there is work enough
_SEGS_SMALL, _SEGS_LARGE = 32, 128  # the combine kernel's segment vector (V = 262144 in fp32: 128 blocks)


def _vec(dtype: torch.dtype) -> int:
    return 16 // dtype.itemsize


def _warps(V: int, vec: int) -> int:
    """Warps per program: 8 (256 lanes) for every vocabulary. Small vocabularies leave lanes
    idle, which costs little there and keeps one compiled kernel per option set."""
    return 8


def _resident(num_warps: int) -> int:
    """Programs one SM can hold at once (its 2048 threads; registers may allow fewer): the split
    aims at two waves of this many, so at least two waves of what really fits."""
    return max(1, 64 // num_warps)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_DEFAULT if device.type == "meta" else _SM_INTERPRETED


def _gpu_code(device: torch.device) -> bool:
    """Whether the kernels run compiled for a GPU (inline PTX allowed) rather than in the interpreter."""
    if _recorder is not None:
        return True
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"


def _transform_consts(temperature: float, softcap: float | None, dtype: torch.dtype, fast: bool):
    """(kz, inv_cap, CAP, APPROX): z = u * kz with u = x (CAP 0) or tanh(x / cap) (CAP 1: fixed max,
    CAP 2: running max); APPROX: tanh.approx.f32 for 16-bit inputs on the GPU."""
    cap = softcap or 0.0
    inv_t = 1.0 / temperature
    if cap <= 0:
        return inv_t, 0.0, 0, False
    kz = cap * inv_t
    return kz, 1.0 / cap, (1 if kz <= _FIXED_MAX else 2), fast and dtype != torch.float32


def _poly(cap: int, dtype: torch.dtype) -> int:
    """Degree of the FMA-unit exp2 for the second tile of each block of a soft-capped row (0: none):
    5 for fp32 (as accurate as the SFU), 4 for 16-bit inputs (2.7e-6, far below their rounding)."""
    if cap == 0:
        return 0
    return 5 if dtype == torch.float32 else 4


def _split(rows: int, blocks: int, num_warps: int, device: torch.device) -> tuple[int, int]:
    """(blocks per program, programs per row): one program per row when there are rows enough for
    two waves, else the vocabulary blocks are shared out so that there are."""
    target = _WAVES * _sm_count(device) * _resident(num_warps)
    if rows >= target or blocks <= 1:
        return blocks, 1
    per = max(1, blocks * rows // target)
    return per, -(-blocks // per)


def _like_phase(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped and strided like ``x`` whose rows start at the same offset from a
    16-byte boundary (so the backward stores as 128-bit vectors where it loads them); contiguous
    when ``x``'s rows are aligned or its strides are not a plain row layout."""
    B, T, V = x.shape
    vec = _vec(x.dtype)
    sb, st, sv = x.stride()
    phase = x.storage_offset() % vec
    plain = sv == 1 and st >= V and (B == 1 or sb >= T * st)
    if not plain or (phase == 0 and st % vec == 0 and sb % vec == 0):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    extent = phase + (B - 1) * sb + (T - 1) * st + V
    return torch.empty(extent, dtype=x.dtype, device=x.device).as_strided(x.shape, x.stride(), phase)


# A static check (``fastdpo.bench.triton_static``) sets this to a list to record the launches
# (kernel, grid, arguments) the launchers make for given tensors instead of running them.
_recorder: list | None = None


@on_input_device
def _launch(*args, kernel, grid, meta, wrap: bool = True):
    """Launch ``kernel[grid](*args, **meta)`` (through ``wrap_triton`` inside the ops) on the device
    of its first tensor argument."""
    if _recorder is not None:
        _recorder.append((kernel, tuple(grid), tuple(args), dict(meta)))
        return
    if wrap:
        from torch.library import wrap_triton

        kernel = wrap_triton(kernel)
    kernel[grid](*args, **meta)


@on_input_device
def _fwd(logits, labels, ref_logits, ignore_index, temperature, softcap, stats, kl):
    from fastdpo.kernels import triton_logprobs as k

    _check_kl_fwd(ref_logits, kl)
    B, T, V = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.zeros(B, T, dtype=acc, device=logits.device)
    lse = torch.zeros_like(logp)
    ref = torch.zeros_like(logp) if ref_logits is not None else logp.new_empty(0)
    st = torch.zeros(B, T, 4, dtype=acc, device=logits.device) if stats else logp.new_empty(0)
    kl_out = torch.zeros_like(logp) if kl else logp.new_empty(0)
    ref_lse = torch.zeros_like(logp) if kl else logp.new_empty(0)
    rows = B * T
    if rows:
        fast = _gpu_code(logits.device)
        kz, inv_cap, cap, approx = _transform_consts(temperature, softcap, logits.dtype, fast)
        r = ref_logits if ref_logits is not None else logits
        vec = _vec(logits.dtype)
        nw = _warps(V, vec)
        blocks = -(-(V + vec - 1) // (2 * 32 * nw * vec))
        per, nseg = _split(rows, blocks, nw, logits.device)
        ws = torch.empty(rows * 10 * nseg if nseg > 1 else 1, dtype=torch.float32, device=logits.device)
        outs = (logp, lse, ref if ref_logits is not None else logp, st if stats else logp, kl_out if kl else logp,
                ref_lse if kl else logp)
        flags = dict(VEC=vec, CAP=cap, STATS=bool(stats), HAS_REF=ref_logits is not None, KL=bool(kl), FAST=fast,
                     APPROX=approx)
        strides = (T, logits.stride(0), logits.stride(1), r.stride(0), r.stride(1), V)
        _launch(logits, r, labels, *outs, ws, *strides, per, ignore_index, kz, inv_cap, kz * _LOG2E,
                kernel=k.logprobs_fwd_kernel, grid=(rows, nseg),
                meta=dict(LANES=32 * nw, POLY=_poly(cap, logits.dtype), num_warps=nw, **flags))
        if nseg > 1:
            _launch(logits, r, labels, *outs, ws, *strides, nseg, ignore_index, kz, inv_cap, int(stats),
                    int(ref_logits is not None), int(kl), kernel=k.logprobs_combine_kernel, grid=(rows,),
                    meta=dict(SEGS=_SEGS_SMALL if nseg <= _SEGS_SMALL else _SEGS_LARGE, VEC=vec, CAP=min(cap, 1),
                              FAST=fast, APPROX=approx, num_warps=1))
    return logp, lse, ref, st, kl_out, ref_lse


@on_input_device
def _bwd(grad, logits, labels, lse, out, ignore_index, temperature, softcap, grad_kl, ref_logits, ref_lse):
    from fastdpo.kernels import triton_logprobs as k

    _check_kl_bwd(grad_kl, ref_logits, ref_lse)
    B, T, V = logits.shape
    if B * T == 0:
        return
    fast = _gpu_code(logits.device)
    kz, inv_cap, cap, approx = _transform_consts(temperature, softcap, logits.dtype, fast)
    vec = _vec(logits.dtype)
    nw = _warps(V, vec)
    blocks = -(-(V + vec - 1) // (2 * 32 * nw * vec))
    per, nprog = _split(B * T, blocks, nw, logits.device)
    if nprog == 1:  # rows enough: a few blocks per program
        per = min(blocks, _BWD_MAX_BLOCKS)
        nprog = -(-blocks // per)
    has_kl = grad_kl is not None
    # Without KL the extra pointers are never read; any tensor stands in.
    gk, r, rl = (grad_kl, ref_logits, ref_lse) if has_kl else (grad, logits, lse)
    _launch(grad, logits, labels, lse, out, gk, r, rl, T, logits.stride(0), logits.stride(1), out.stride(0),
            out.stride(1), r.stride(0), r.stride(1), V, per, ignore_index, inv_cap, kz * _LOG2E, 1.0 / temperature,
            kernel=k.logprobs_bwd_kernel, grid=(B * T, nprog),
            meta=dict(VEC=vec, LANES=32 * nw, CAP=min(cap, 1), HAS_KL=has_kl, FAST=fast, APPROX=approx, num_warps=nw))


def _define_ops():
    import triton
    from torch.library import triton_op

    from fastdpo.kernels import triton_logprobs as k

    def op(name, mutates_args, same_as):
        if isinstance(k.logprobs_fwd_kernel, triton.runtime.JITFunction):
            return triton_op(name, mutates_args=mutates_args)
        return _interpreter_op(name, mutates_args, same_as)

    @op("fastdpo::logprobs_fwd_triton", mutates_args=(), same_as="logprobs_fwd")
    @on_input_device
    def fwd(logits: torch.Tensor, labels: torch.Tensor, ref_logits: Optional[torch.Tensor], ignore_index: int,
            temperature: float, softcap: float, stats: bool, kl: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _fwd(logits, labels, ref_logits, ignore_index, temperature, softcap, stats, kl)

    @op("fastdpo::logprobs_bwd_triton", mutates_args=(), same_as="logprobs_bwd")
    def bwd(grad_logp: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
            ignore_index: int, temperature: float, softcap: float, grad_kl: Optional[torch.Tensor] = None,
            ref_logits: Optional[torch.Tensor] = None, ref_lse: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = _like_phase(logits)
        _bwd(grad_logp, logits, labels, lse, out, ignore_index, temperature, softcap, grad_kl, ref_logits, ref_lse)
        return out

    @op("fastdpo::logprobs_bwd_triton_", mutates_args=("logits",), same_as="logprobs_bwd_")
    def bwd_inplace(grad_logp: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                    ignore_index: int, temperature: float, softcap: float, grad_kl: Optional[torch.Tensor] = None,
                    ref_logits: Optional[torch.Tensor] = None, ref_lse: Optional[torch.Tensor] = None) -> None:
        _bwd(grad_logp, logits, labels, lse, logits, ignore_index, temperature, softcap, grad_kl, ref_logits,
             ref_lse)

    return fwd, bwd, bwd_inplace


def _interpreter_op(name, mutates_args, same_as):
    """Under TRITON_INTERPRET=1 the kernels are Python functions that torch.compile cannot trace into:
    register the body as an opaque custom op instead of a triton_op, whose fake kernel is that of the
    ``fastdpo::`` op with the same contract (called on the fake tensors)."""

    def register(fn):
        custom = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        custom.register_fake(lambda *args, **kwargs: getattr(torch.ops.fastdpo, same_as)(*args, **kwargs))
        return custom

    return register


def _get_ops():
    global _ops
    if _ops is None:
        _ops = _define_ops()
    return _ops


def _check_kl_fwd(ref_logits, kl):
    if kl and ref_logits is None:
        raise ValueError("fastdpo: kl=True (the per-token KL to the reference) needs ref_logits")


def _check_kl_bwd(grad_kl, ref_logits, ref_lse):
    if grad_kl is not None and (ref_logits is None or ref_lse is None):
        raise ValueError("fastdpo: grad_kl (the KL term of the backward) needs ref_logits and ref_lse")


def logprobs_fwd(logits, labels, ref_logits, ignore_index, temperature, softcap, stats, kl=False):
    if logits.dtype == torch.float64:
        raise TypeError("fastdpo: the triton backend takes float32, bfloat16 or float16 logits, got float64")
    _check_kl_fwd(ref_logits, kl)
    return torch.ops.fastdpo.logprobs_fwd_triton(logits, labels, ref_logits, ignore_index, temperature, softcap, stats,
                                                 kl)


def logprobs_bwd(grad_logp, logits, labels, lse, ignore_index, temperature, softcap, inplace, grad_kl=None,
                 ref_logits=None, ref_lse=None):
    _check_kl_bwd(grad_kl, ref_logits, ref_lse)
    args = (grad_logp, logits, labels, lse, ignore_index, temperature, softcap, grad_kl, ref_logits, ref_lse)
    if inplace:
        torch.ops.fastdpo.logprobs_bwd_triton_(*args)
        return logits
    return torch.ops.fastdpo.logprobs_bwd_triton(*args)


# ----------------------------------------------------------------------------- building blocks
# Launched directly (eager) by the chunked loops that use them.


@on_input_device
def lse_fold(tile, labels, v_offset: int, m, s, z_label, temperature: float = 1.0, softcap: float | None = None):
    """Fold a logits tile ``[n, c]`` (vocabulary ids ``v_offset .. v_offset + c``) into
    the running max ``m [n]`` and sum ``s [n]`` (fp32, in place; start from -inf and 0),
    and write ``z_label [n]`` for rows whose label lies in the chunk. After the last
    chunk ``lse = m + log(s)`` and ``logp = z_label - lse``."""
    from fastdpo.kernels import triton_logprobs as k

    n, c = tile.shape
    if n == 0:
        return
    assert tile.stride(1) == 1 and m.dtype == s.dtype == z_label.dtype == torch.float32
    fast = _gpu_code(tile.device)
    kz, inv_cap, cap, approx = _transform_consts(temperature, softcap, tile.dtype, fast)
    vec = _vec(tile.dtype)
    nw = _warps(c, vec)
    _launch(tile, labels, m, s, z_label, tile.stride(0), c, v_offset, kz, inv_cap, kz * _LOG2E,
            kernel=k.lse_fold_kernel, grid=(n,), wrap=False,
            meta=dict(VEC=vec, LANES=32 * nw, CAP=cap, POLY=_poly(cap, tile.dtype), FAST=fast, APPROX=approx,
                      num_warps=nw))


@on_input_device
def tile_grad_(tile, labels, v_offset: int, lse, grad, temperature: float = 1.0, softcap: float | None = None):
    """Overwrite a recomputed logits tile ``[n, c]`` with ``grad * (onehot - softmax) * dz/dx``
    (``lse`` and ``grad`` are fp32 ``[n]``; rows with ``grad == 0`` become 0)."""
    from fastdpo.kernels import triton_logprobs as k

    n, c = tile.shape
    if n == 0:
        return tile
    assert tile.stride(1) == 1
    fast = _gpu_code(tile.device)
    kz, inv_cap, cap, approx = _transform_consts(temperature, softcap, tile.dtype, fast)
    vec = _vec(tile.dtype)
    nw = _warps(c, vec)
    blocks = -(-(c + vec - 1) // (2 * 32 * nw * vec))
    per = min(blocks, _BWD_MAX_BLOCKS)
    _launch(tile, labels, lse, grad, tile.stride(0), c, v_offset, per, inv_cap, kz * _LOG2E, 1.0 / temperature,
            kernel=k.tile_grad_kernel, grid=(n, -(-blocks // per)), wrap=False,
            meta=dict(VEC=vec, LANES=32 * nw, CAP=min(cap, 1), FAST=fast, APPROX=approx, num_warps=nw))
    return tile


@on_input_device
def segment_sum(values, offsets):
    """Per-sequence sums of per-token values for packed (padding-free) batches (the kernel contract):
    ``out[k] = sum(values[offsets[k]:offsets[k+1]])``, float32, ``offsets`` int64 ``[S + 1]``
    non-decreasing within ``values`` (validated by the caller). Deterministic: one program per
    segment sums its slice block by block in order."""
    from fastdpo.kernels import triton_logprobs as k

    if values.dtype == torch.float64:
        raise TypeError("fastdpo: the triton backend takes float32, bfloat16 or float16 values, got float64")
    S = offsets.shape[0] - 1
    out = torch.zeros(S, dtype=torch.float32, device=values.device)
    if S > 0:
        _launch(values.contiguous(), offsets, out, kernel=k.segment_sum_kernel, grid=(S,), meta=dict(BLOCK=1024),
                wrap=False)
    return out
