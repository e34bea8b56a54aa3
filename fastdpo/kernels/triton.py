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


def _block(V: int) -> int:
    import triton

    return min(triton.next_power_of_2(V), 4096)


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8


# A static check (``fastdpo.bench.triton_static``) sets this to a list to record the launches
# (kernel, grid, arguments) the launchers make for given tensors instead of running them.
_recorder: list | None = None


def _launch(kernel, grid, args, meta, wrap: bool = True):
    if _recorder is not None:
        _recorder.append((kernel, tuple(grid), tuple(args), dict(meta)))
        return
    if wrap:
        from torch.library import wrap_triton

        kernel = wrap_triton(kernel)
    kernel[grid](*args, **meta)


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
    if B * T:
        inv_t, cap, inv_cap, has_cap = _launch_consts(temperature, softcap)
        r = ref_logits if ref_logits is not None else logits
        block = _block(V)
        _launch(k.logprobs_fwd_kernel, (B * T,), (
            logits, r, labels, logp, lse, ref if ref_logits is not None else logp, st if stats else logp,
            kl_out if kl else logp, ref_lse if kl else logp,
            T, logits.stride(0), logits.stride(1), r.stride(0), r.stride(1), V, ignore_index, inv_t, cap, inv_cap),
            dict(BLOCK=block, HAS_CAP=has_cap, STATS=stats, HAS_REF=ref_logits is not None, KL=kl,
                 num_warps=_warps(block)))
    return logp, lse, ref, st, kl_out, ref_lse


def _bwd(grad, logits, labels, lse, out, ignore_index, temperature, softcap, grad_kl, ref_logits, ref_lse):
    import triton

    from fastdpo.kernels import triton_logprobs as k

    _check_kl_bwd(grad_kl, ref_logits, ref_lse)
    B, T, V = logits.shape
    if B * T == 0:
        return
    inv_t, cap, inv_cap, has_cap = _launch_consts(temperature, softcap)
    block = _block(V)
    grid = (B * T, triton.cdiv(V, block))
    has_kl = grad_kl is not None
    # Without KL the extra pointers are never read; any tensor stands in.
    gk, r, rl = (grad_kl, ref_logits, ref_lse) if has_kl else (grad, logits, lse)
    _launch(k.logprobs_bwd_kernel, grid, (
        grad, logits, labels, lse, out, gk, r, rl, T, logits.stride(0), logits.stride(1), out.stride(0),
        out.stride(1), r.stride(0), r.stride(1), V, ignore_index, inv_t, cap, inv_cap),
        dict(BLOCK=block, HAS_CAP=has_cap, HAS_KL=has_kl, num_warps=_warps(block)))


def _define_ops():
    from torch.library import triton_op

    @triton_op("fastdpo::logprobs_fwd_triton", mutates_args=())
    def fwd(logits: torch.Tensor, labels: torch.Tensor, ref_logits: Optional[torch.Tensor], ignore_index: int,
            temperature: float, softcap: float, stats: bool, kl: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _fwd(logits, labels, ref_logits, ignore_index, temperature, softcap, stats, kl)

    @triton_op("fastdpo::logprobs_bwd_triton", mutates_args=())
    def bwd(grad_logp: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
            ignore_index: int, temperature: float, softcap: float, grad_kl: Optional[torch.Tensor] = None,
            ref_logits: Optional[torch.Tensor] = None, ref_lse: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _bwd(grad_logp, logits, labels, lse, out, ignore_index, temperature, softcap, grad_kl, ref_logits, ref_lse)
        return out

    @triton_op("fastdpo::logprobs_bwd_triton_", mutates_args=("logits",))
    def bwd_inplace(grad_logp: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                    ignore_index: int, temperature: float, softcap: float, grad_kl: Optional[torch.Tensor] = None,
                    ref_logits: Optional[torch.Tensor] = None, ref_lse: Optional[torch.Tensor] = None) -> None:
        _bwd(grad_logp, logits, labels, lse, logits, ignore_index, temperature, softcap, grad_kl, ref_logits,
             ref_lse)

    return fwd, bwd, bwd_inplace


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


def _launch_consts(temperature: float, softcap: float | None):
    cap = softcap or 0.0
    return 1.0 / temperature, cap, (1.0 / cap if cap > 0 else 0.0), cap > 0


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
    inv_t, cap, inv_cap, has_cap = _launch_consts(temperature, softcap)
    block = _block(c)
    _launch(k.lse_fold_kernel, (n,), (tile, labels, m, s, z_label, tile.stride(0), c, v_offset, inv_t, cap, inv_cap),
            dict(BLOCK=block, HAS_CAP=has_cap, num_warps=_warps(block)), wrap=False)


def tile_grad_(tile, labels, v_offset: int, lse, grad, temperature: float = 1.0, softcap: float | None = None):
    """Overwrite a recomputed logits tile ``[n, c]`` with ``grad * (onehot - softmax) * dz/dx``
    (``lse`` and ``grad`` are fp32 ``[n]``; rows with ``grad == 0`` become 0)."""
    import triton

    from fastdpo.kernels import triton_logprobs as k

    n, c = tile.shape
    if n == 0:
        return tile
    assert tile.stride(1) == 1
    inv_t, cap, inv_cap, has_cap = _launch_consts(temperature, softcap)
    block = _block(c)
    _launch(k.tile_grad_kernel, (n, triton.cdiv(c, block)),
            (tile, labels, lse, grad, tile.stride(0), c, v_offset, inv_t, cap, inv_cap),
            dict(BLOCK=block, HAS_CAP=has_cap, num_warps=_warps(block)), wrap=False)
    return tile


def _segment_offsets(seq_index: torch.Tensor, num_segments: int) -> torch.Tensor:
    if seq_index.numel() > 1 and bool((seq_index[1:] < seq_index[:-1]).any()):
        raise ValueError("fastdpo: seq_index must be non-decreasing (tokens of one sequence packed together)")
    bounds = torch.arange(num_segments + 1, device=seq_index.device, dtype=seq_index.dtype)
    return torch.searchsorted(seq_index, bounds)


def segment_sum_torch(values: torch.Tensor, seq_index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Torch fallback of :func:`segment_sum` (same contract): per-segment sums of
    contiguous slices, in a fixed order."""
    off = _segment_offsets(seq_index, num_segments).tolist()
    return torch.stack([values[a:b].float().sum() for a, b in zip(off[:-1], off[1:])]) if num_segments else \
        values.new_zeros(0, dtype=torch.float32)


def segment_sum(values: torch.Tensor, seq_index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Per-sequence sums of per-token values for packed (padding-free) batches:
    ``out[k] = sum(values[seq_index == k])`` with ``seq_index`` non-decreasing.
    Deterministic: one program per segment sums its slice block by block in order."""
    from fastdpo.kernels import triton_logprobs as k

    out = torch.zeros(num_segments, dtype=torch.float32, device=values.device)
    if num_segments == 0:
        return out
    off = _segment_offsets(seq_index, num_segments)
    _launch(k.segment_sum_kernel, (num_segments,), (values.contiguous(), off, out), dict(BLOCK=1024), wrap=False)
    return out
