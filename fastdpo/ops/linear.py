r"""Fused linear log-probs: LM-head inputs (hidden states, weight, bias) in, per-token
log-probs out, without ever holding the ``[tokens x vocab]`` logits.

The projection runs a tile of tokens at a time into one reusable buffer
(``memory_budget`` bytes); each tile is folded by the backend's fused forward
kernel (log-sum-exp, label logit, statistics) while it is hot, and for the
gradient the backend's backward kernel overwrites the tile with
``d loss / d logits`` before two GEMMs turn it into the hidden and weight
gradients (accumulated in fp32). Tokens whose label is ``ignore_index`` are
never projected: their log-prob is 0 and their gradient is 0.

Two exact strategies (see docs/architecture.md for their costs):

* **recompute** (:class:`_LinearLogprobsFunction`): forward keeps only the
  per-token log-sum-exp; backward projects each tile again and forms its
  gradient. Policy: 4 GEMM passes (forward, recompute, two gradients).
* **gradient in forward** (:func:`linear_grad_in_forward`): for a chunk of whole
  sequence groups (pairs) whose logits fit the budget, forward folds the tile,
  asks the caller for the per-token loss coefficients of that chunk and forms
  the gradient at once. Policy: 3 GEMM passes. Exact when the loss is
  separable over groups (a group's gradient does not depend on other groups'
  values), which the loss registry records per objective.

With ``logit_scale`` s, temperature T and soft cap c the logits are
``z = c * tanh(s * (h W^T + b) / c) / T`` (the soft cap only when c is given).
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, NamedTuple

import torch

from fastdpo import _backends, _validation
from fastdpo._backends import Backend
from fastdpo.ops.logprobs import FusedLogprobs, _resolve
from fastdpo.ops.schema import NUM_STATS
from fastdpo.ops.segments import host_to_device

STRATEGIES = ("auto", "recompute", "grad_in_forward")


def default_memory_budget(device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of logits one tile may hold: ``$FASTDPO_LINEAR_BUDGET_MB``, else 1 GiB on GPUs and
    2^24 logits on CPU (64 MiB in fp32, 32 MiB in bf16/fp16)."""
    env = os.environ.get("FASTDPO_LINEAR_BUDGET_MB")
    if env:
        return int(float(env) * (1 << 20))
    return (1 << 30) if device.type == "cuda" else (1 << 24) * torch.empty(0, dtype=dtype).element_size()


class TileOptions(NamedTuple):
    ignore_index: int
    temperature: float
    softcap: float  # 0 = none
    scale: float
    backend: str
    rows: int  # token rows per tile
    counts: tuple[int, ...] = ()  # tokens that count per sequence (row of labels), read once on the host
    dtype: torch.dtype | None = None  # the GEMMs' dtype (autocast's, or None: the inputs')


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the LM-head GEMMs run in for inputs of ``dtype``: under ``torch.autocast`` for
    ``device`` its dtype (as ``F.linear``; float64 stays), else ``dtype``."""
    if dtype != torch.float64 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def cast(dtype: torch.dtype, *tensors):
    """The tensors in ``dtype`` (None stays None; no copy when already there)."""
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)


def no_autocast(device: torch.device):
    """Autocast off inside the tile loops: their operands are already in the compute dtype."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def counted_index(y: torch.Tensor, ignore_index: int, total: int) -> torch.Tensor:
    """Flat indices of the ``total`` tokens of ``y [M]`` whose label is not ``ignore_index``, in order,
    without a host synchronisation (the size is known; ``nonzero`` would read it from the device)."""
    keep = y != ignore_index
    if y.device.type == "cpu" or torch._C._dispatch_has_kernel_for_dispatch_key("aten::nonzero_static", "CUDA"):
        return torch.nonzero_static(keep, size=total).squeeze(1)
    return torch.nonzero(keep).squeeze(1)  # pragma: no cover - a torch without nonzero_static on CUDA


def project(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float,
             out: torch.Tensor) -> torch.Tensor:
    """``out = scale * (h @ weight.T + bias)`` in place (beta=0 ignores out's old contents)."""
    if bias is None:
        return torch.addmm(out, h, weight.t(), beta=0, alpha=scale, out=out)
    return torch.addmm(bias.expand_as(out), h, weight.t(), beta=scale, alpha=scale, out=out)


def fold(kern, x: torch.Tensor, y: torch.Tensor, o: TileOptions, stats: bool):
    """Fused forward over one tile of logits ``x [r, V]``: (logp, lse, stats|None)."""
    logp, lse, _, st, _, _ = kern.logprobs_fwd(x.unsqueeze(0), y.unsqueeze(0), None, o.ignore_index, o.temperature,
                                               o.softcap, stats)
    return logp[0], lse[0], (st[0] if stats else None)


def _fp32_out_gemm(device: torch.device) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` (bf16/fp16 operands, fp32 products and
    output) runs here: CUDA with torch >= 2.8."""
    return device.type == "cuda" and hasattr(torch.ops.aten.mm, "dtype") and \
        torch._C._dispatch_has_kernel_for_dispatch_key("aten::mm.dtype", "CUDA")


def add_weight_grad(acc: torch.Tensor, x: torch.Tensor, h: torch.Tensor, alpha: float, budget: int) -> None:
    """``acc [V, H] += alpha * x.T @ h`` for a gradient tile ``x [r, V]`` and its hidden rows ``h [r, H]``,
    with the products and sums in ``acc``'s dtype (fp32) even for bf16/fp16 tiles, and no temporary
    over ``budget`` bytes: a tile's partial gradient is never rounded to the tile's dtype. On CUDA the
    GEMMs write fp32 over vocabulary blocks; elsewhere a block's operands are upcast first."""
    if x.dtype == acc.dtype:
        acc.addmm_(x.t(), h, alpha=alpha)
        return
    r, V = x.shape
    H = h.shape[1]
    width = acc.element_size()
    if _fp32_out_gemm(x.device):
        vb = max(1, budget // (width * H))  # rows of the [vb, H] fp32 product
        for v in range(0, V, vb):
            acc[v : v + vb].add_(torch.mm(x[:, v : v + vb].t(), h, out_dtype=acc.dtype), alpha=alpha)
        return
    rb = max(1, budget // (width * H))  # hidden rows upcast at a time
    for i in range(0, r, rb):
        hf = h[i : i + rb].to(acc.dtype)
        vb = max(1, budget // (width * hf.shape[0]))  # vocabulary columns of the upcast gradient block
        for v in range(0, V, vb):
            acc[v : v + vb].addmm_(x[i : i + rb, v : v + vb].to(acc.dtype).t(), hf, alpha=alpha)


class GradAccumulator:
    """fp32 accumulators for the weight and bias gradients plus the hidden gradient rows, in the
    dtypes of the tensors given here (the parameters'); the tiles and GEMMs may run in a lower
    compute dtype (autocast)."""

    def __init__(self, hidden, weight, bias, need_h, need_w, need_b):
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.h = torch.zeros_like(hidden) if need_h else None
        self.w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        self.b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if (need_b and bias is not None) else None
        self.wt = None  # the compute-dtype weight's transpose made contiguous once, on first use (CPU)

    def add_tile(self, kern, x, g, y, lse, h_rows, idx, weight, o: TileOptions, extra=None, kl=None):
        """Turn the logits tile ``x`` into the gradient of ``sum g * logp`` (plus ``sum gk * KL`` with
        ``kl = (gk, ref_tile, ref_lse)``, plus ``extra``, a gradient w.r.t. the same logits from another
        per-token term) in place and accumulate the GEMMs."""
        kl_args = (kl[0].unsqueeze(0), kl[1].unsqueeze(0), kl[2].unsqueeze(0)) if kl is not None else ()
        kern.logprobs_bwd(g.unsqueeze(0), x.unsqueeze(0), y.unsqueeze(0), lse.unsqueeze(0), o.ignore_index,
                          o.temperature, o.softcap, True, *kl_args)
        if extra is not None:
            x.add_(extra.to(x.dtype))
        if self.h is not None:
            # CPU reduced-precision GEMMs are fast only in the "A @ B.T" layout (docs/architecture.md),
            # so that one is given the weight's transpose, copied once per backward.
            nt = x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
            if nt and self.wt is None:
                self.wt = weight.t().contiguous()
            gh = torch.mm(x, self.wt.t()) if nt else torch.mm(x, weight)
            if o.scale != 1.0:
                gh.mul_(o.scale)
            self.h.index_copy_(0, idx, gh.to(self.h.dtype))
        if self.w is not None:
            add_weight_grad(self.w, x, h_rows, o.scale, max(o.rows, x.shape[0]) * x.shape[1] * x.element_size())
        if self.b is not None:
            self.b.add_(x.sum(0, dtype=self.b.dtype), alpha=o.scale)

    def result(self, weight, bias):
        gw = self.w.to(weight.dtype) if self.w is not None else None
        gb = self.b.to(bias.dtype) if self.b is not None else None
        return self.h, gw, gb


def tile_buffers(like: torch.Tensor, count: int, rows: int, V: int) -> torch.Tensor:
    """``count`` reusable ``[rows, V]`` logits tiles. The row count is padded to a multiple of 8 so
    that the reference tile's rows start at the same offset from a 16-byte boundary as the
    policy's (the GPU kernels read the two rows together with 128-bit loads)."""
    return like.new_empty(count, -(-rows // 8) * 8 if count > 1 else rows, V)


def tiles(n: int, rows: int):
    for i in range(0, n, rows):
        yield i, min(n, i + rows)


def fold_rows(kern, h, weight, bias, y, idx, o: TileOptions, stats: bool, out_logp, out_lse=None, out_stats=None,
              kl=None):
    """Forward fold of the valid rows ``idx`` of ``h`` into the full-length outputs (no gradient).

    With ``kl = (rh, rw, rb, out_ref, out_kl, out_ref_lse)`` each tile's reference logits are projected
    beside the policy's (two buffers of ``o.rows`` rows) and folded with the token-level KL in the
    same kernel call."""
    n = idx.numel()
    if n == 0:
        return
    if o.backend == "cpu" and kl is None:  # the same loop in C++
        torch.ops.fastdpo.linear_fwd_(h, weight, bias, y, idx, o.ignore_index, o.temperature, o.softcap, o.scale,
                                      o.rows, out_logp, out_lse, out_stats if stats else None)
        return
    buf = tile_buffers(h, 2 if kl else 1, min(o.rows, n), weight.shape[0])
    for i, j in tiles(n, o.rows):
        sel = idx[i:j]
        ys = y.index_select(0, sel)
        x = project(h.index_select(0, sel), weight, bias, o.scale, buf[0, : j - i])
        if kl is None:
            lp, lse, st = fold(kern, x, ys, o, stats)
        else:
            rh, rw, rb, out_ref, out_kl, out_ref_lse = kl
            r = project(rh.index_select(0, sel), rw, rb, o.scale, buf[1, : j - i])
            lp, lse, ref, st, klv, ref_lse = (t.squeeze(0) for t in kern.logprobs_fwd(
                x.unsqueeze(0), ys.unsqueeze(0), r.unsqueeze(0), o.ignore_index, o.temperature, o.softcap, stats,
                True))
            for out, val in ((out_ref, ref), (out_kl, klv), (out_ref_lse, ref_lse)):
                out.index_copy_(0, sel, val)
        out_logp.index_copy_(0, sel, lp)
        if out_lse is not None:
            out_lse.index_copy_(0, sel, lse)
        if stats:
            out_stats.index_copy_(0, sel, st)


class _LinearLogprobsFunction(torch.autograd.Function):
    """Recompute strategy: forward folds tiles (saving only lse), backward re-projects them.

    With ``kl`` (needs ``ref_hidden``) the fourth output is the token-level KL to the reference;
    its tiles hold policy and reference logits side by side (``o.rows`` each) and backward
    re-projects the reference tile too."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, idx, ref_hidden, ref_weight, ref_bias, stats, o: TileOptions,
                kl=False):
        kern = _backends.kernel_module(Backend(o.backend))
        cd = o.dtype or hidden.dtype
        M = hidden.shape[0]
        acc = torch.float64 if cd == torch.float64 else torch.float32
        logp = torch.zeros(M, dtype=acc, device=hidden.device)
        lse = torch.zeros_like(logp)
        st = torch.zeros(M, NUM_STATS, dtype=acc, device=hidden.device) if stats else logp.new_empty(0)
        ref = torch.zeros_like(logp) if ref_hidden is not None else logp.new_empty(0)
        kl_out = torch.zeros_like(logp) if kl else logp.new_empty(0)
        ref_lse = torch.zeros_like(logp) if kl else logp.new_empty(0)
        with no_autocast(hidden.device):
            h, w, b, rh, rw, rb = cast(cd, hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
            if rh is not None and not kl:
                fold_rows(kern, rh, rw, rb, labels, idx, o, False, ref)
            fold_rows(kern, h, w, b, labels, idx, o, stats, logp, lse, st,
                      kl=(rh, rw, rb, ref, kl_out, ref_lse) if kl else None)
        # The inputs as given (the casts are made again in backward rather than kept).
        ctx.save_for_backward(hidden, weight, bias, labels, idx, lse,
                              *((ref_hidden, ref_weight, ref_bias, ref_lse) if kl else ()))
        ctx.o = o
        ctx.mark_non_differentiable(ref, st)
        return logp, ref, st, kl_out

    @staticmethod
    def backward(ctx, grad_logp, _g_ref, _g_st, grad_kl):
        hidden, weight, bias, labels, idx, lse, *ref = ctx.saved_tensors
        o = ctx.o
        kern = _backends.kernel_module(Backend(o.backend))
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grads = GradAccumulator(hidden, weight, bias, need_h, need_w, need_b)  # in the inputs' dtypes
        n = idx.numel()
        with no_autocast(hidden.device):
            h, w, b = cast(o.dtype or hidden.dtype, hidden, weight, bias)
            if n and o.backend == "cpu" and not ref:  # the same loop in C++
                torch.ops.fastdpo.linear_bwd_(grad_logp.contiguous(), h, w, b, labels, idx, lse, o.ignore_index,
                                              o.temperature, o.softcap, o.scale, o.rows, grads.h, grads.w, grads.b)
            elif n:
                # With the KL term the reference tile is projected again beside the policy's.
                buf = tile_buffers(h, 2 if ref else 1, min(o.rows, n), w.shape[0])
                g = grad_logp.contiguous()
                gk = grad_kl.contiguous() if ref else None
                if ref:
                    rh, rw, rb, ref_lse = ref
                    rh, rw, rb = cast(h.dtype, rh, rw, rb)
                for i, j in tiles(n, o.rows):
                    sel = idx[i:j]
                    h_rows = h.index_select(0, sel)
                    x = project(h_rows, w, b, o.scale, buf[0, : j - i])
                    kl = None
                    if ref:
                        r = project(rh.index_select(0, sel), rw, rb, o.scale, buf[1, : j - i])
                        kl = (gk.index_select(0, sel), r, ref_lse.index_select(0, sel))
                    grads.add_tile(kern, x, g.index_select(0, sel), labels.index_select(0, sel),
                                   lse.index_select(0, sel), h_rows, sel, w, o, kl=kl)
        gh, gw, gb = grads.result(weight, bias)
        return gh, gw, gb, None, None, None, None, None, None, None, None


def _check_inputs(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, autocast=False):
    # Under autocast every float input is cast to the autocast dtype (as F.linear), so dtypes may differ.
    def differ(a, b):
        return not autocast and a != b

    _validation.check_float_tensor(hidden, "hidden")
    _validation.check_float_tensor(weight, "weight")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"fastdpo: expected hidden [..., H] and weight [V, H] with the same H, got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("fastdpo: weight has an empty vocabulary dimension")
    if differ(weight.dtype, hidden.dtype):
        raise TypeError(f"fastdpo: hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"fastdpo: weight is on {weight.device} but hidden is on {hidden.device}")
    _validation.check_tensor(labels, "labels")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"fastdpo: labels must be an integer tensor (token ids), got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"fastdpo: labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != hidden.device:
        raise ValueError(f"fastdpo: labels are on {labels.device} but hidden is on {hidden.device}")
    if bias is not None:
        _validation.check_float_tensor(bias, "bias")
        if tuple(bias.shape) != (weight.shape[0],) or differ(bias.dtype, weight.dtype):
            raise ValueError(f"fastdpo: bias must be a ({weight.shape[0]},) {weight.dtype} tensor, "
                             f"got {tuple(bias.shape)} {bias.dtype}")
    if ref_hidden is not None:
        _validation.check_float_tensor(ref_hidden, "ref_hidden")
        _validation.check_same_shape(hidden, ref_hidden, "hidden", "ref_hidden")
        if differ(ref_hidden.dtype, hidden.dtype):
            raise TypeError(f"fastdpo: ref_hidden must have the dtype of hidden ({hidden.dtype}), got {ref_hidden.dtype}")
        if ref_weight is not None:
            _validation.check_float_tensor(ref_weight, "ref_weight")
            if tuple(ref_weight.shape) != tuple(weight.shape) or differ(ref_weight.dtype, weight.dtype):
                raise ValueError(f"fastdpo: ref_weight must be a {tuple(weight.shape)} {weight.dtype} tensor, "
                                 f"got {tuple(ref_weight.shape)} {ref_weight.dtype}")
            if ref_bias is not None and (tuple(ref_bias.shape) != (weight.shape[0],) or
                                         differ(ref_bias.dtype, weight.dtype)):
                raise ValueError(f"fastdpo: ref_bias must be a ({weight.shape[0]},) {weight.dtype} tensor, "
                                 f"got {tuple(ref_bias.shape)} {ref_bias.dtype}")
    elif ref_weight is not None or ref_bias is not None:
        raise ValueError("fastdpo: ref_weight/ref_bias need ref_hidden")


def prepare(hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
            ignore_index=-100, temperature=1.0, softcap=None, logit_scale=1.0, memory_budget=None,
            backend="auto", kl=False, cu_seqlens: list[int] | None = None):
    """Validate the inputs of the fused-linear path and fix its options.

    Returns ``(h [M, H], y [M], rh, ref_weight, ref_bias, idx, opts)``: flattened tokens, the
    indices of the tokens that count and the tile options, whose ``counts`` (tokens that count per
    row of ``labels``, or per packed sequence with ``cu_seqlens``: validated host offsets of the
    flattened tokens) are the one host synchronisation of the fused-linear path. With ``kl`` a tile
    holds policy and reference logits side by side, so it has half the rows.
    """
    if kl and ref_hidden is None:
        raise ValueError("fastdpo: the token-level KL to the reference (kl=True) needs ref_hidden")
    autocast = isinstance(hidden, torch.Tensor) and torch.is_autocast_enabled(hidden.device.type)
    _check_inputs(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, autocast)
    cd = compute_dtype(hidden.device, hidden.dtype)
    ignore_index = _validation.check_int(ignore_index, "ignore_index")
    temperature = _validation.check_positive(temperature, "temperature")
    softcap = _validation.check_positive(softcap, "softcap", allow_none=True) or 0.0
    logit_scale = _validation.check_positive(logit_scale, "logit_scale")
    V, H = weight.shape
    if memory_budget is None:
        memory_budget = default_memory_budget(hidden.device, cd)
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget <= 0:
        raise ValueError(f"fastdpo: memory_budget must be a positive number of bytes, got {memory_budget!r}")
    rows = max(1, memory_budget // ((2 if kl else 1) * V * cd.itemsize))
    backend = _resolve(str(backend), hidden.device.type)
    y = labels.reshape(-1).long()
    _validation.check_label_range(y, V, ignore_index)
    h = hidden.reshape(-1, H)
    if ref_hidden is not None:
        ref_hidden = ref_hidden.detach().reshape(-1, H)
        if ref_weight is None:
            ref_weight, ref_bias = weight, bias
        ref_weight = ref_weight.detach()
        ref_bias = ref_bias.detach() if ref_bias is not None else None
    if cu_seqlens is None:
        rows_of_labels = labels.reshape(labels.shape[:-1].numel(), labels.shape[-1]) if labels.dim() else labels.view(1, 1)
        counts = tuple((rows_of_labels != ignore_index).sum(1).tolist())
    else:  # packed: counted tokens before each sequence end, differenced on the host
        ends = host_to_device([c - 1 for c in cu_seqlens[1:]], y.device)
        below = (y != ignore_index).cumsum(0).index_select(0, ends).tolist()
        counts = tuple(b - a for a, b in zip([0] + below[:-1], below))
    idx = counted_index(y, ignore_index, sum(counts))
    return h, y, ref_hidden, ref_weight, ref_bias, idx, TileOptions(ignore_index, temperature, softcap, logit_scale,
                                                                    backend, rows, counts, cd)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    stats: bool = False,
    kl: bool = False,
    memory_budget: int | None = None,
    backend: str | Backend = "auto",
) -> FusedLogprobs:
    """Per-token log-probs of ``labels`` under ``logits = logit_scale * (hidden @ weight.T + bias)``
    (soft-capped, temperature-scaled as in :func:`fastdpo.token_logprobs`), never holding more than
    ``memory_budget`` bytes of logits.

    Args:
        hidden: ``[..., H]`` (any float dtype shared with ``weight``); ``weight``: ``[V, H]``;
            ``bias``: ``[V]`` or None. ``labels``: ``hidden.shape[:-1]`` token ids, ``ignore_index``
            where nothing counts.
        ref_hidden: reference hidden states shaped like ``hidden`` (no gradient), projected by
            ``ref_weight``/``ref_bias`` (default: ``weight``/``bias``) in the same tile loop.
        stats: also return the per-token statistics of :func:`fastdpo.fused_logprobs`.
        kl: also return the per-token full-vocabulary KL of the reference to the policy (needs
            ``ref_hidden``), differentiable like ``logps``; see :func:`fastdpo.fused_logprobs`.
        memory_budget: bytes of logits per tile (default :func:`default_memory_budget`); with
            ``kl`` it holds a policy and a reference tile.

    Returns:
        :class:`FusedLogprobs` shaped like ``labels``; ``logps`` is differentiable w.r.t.
        ``hidden``, ``weight`` and ``bias`` (recompute strategy: backward projects each tile again).
    """
    h, y, rh, rw, rb, idx, o = prepare(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden,
                                       ref_weight=ref_weight, ref_bias=ref_bias, ignore_index=ignore_index,
                                       temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                                       memory_budget=memory_budget, backend=backend, kl=kl)
    logp, ref, st, kl_out = _LinearLogprobsFunction.apply(h, weight, bias, y, idx, rh, rw, rb, bool(stats), o,
                                                          bool(kl))
    shape = labels.shape
    return FusedLogprobs(logp.view(shape), ref.view(shape) if rh is not None else None,
                         st.view(*shape, NUM_STATS) if stats else None, kl_out.view(shape) if kl else None)


class GradInForward(NamedTuple):
    """Result of :func:`linear_grad_in_forward`: detached per-token outputs and the gradients
    of the caller's loss w.r.t. ``hidden`` (flattened ``[M, H]``), ``weight`` and ``bias``."""

    tokens: FusedLogprobs
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None


def group_chunks(counts: list[int], groups: list[list[int]], V: int, elem: int, budget: int) -> list[list[int]] | None:
    """Pack whole groups of sequences (``groups[g]``: its sequence indices; ``counts[s]``: the
    valid tokens of sequence s) into chunks whose logits fit ``budget`` bytes; None if one group
    alone does not fit."""
    chunks, cur, cur_bytes = [], [], 0
    for g in groups:
        b = sum(counts[s] for s in g) * V * elem
        if b > budget:
            return None
        if cur and cur_bytes + b > budget:
            chunks.append(cur)
            cur, cur_bytes = [], 0
        cur.extend(g)
        cur_bytes += b
    if cur:
        chunks.append(cur)
    return chunks


@torch.no_grad()
def linear_grad_in_forward(h, weight, bias, y, rh, rw, rb, o: TileOptions, shape, chunks: list[list[int]],
                           coef_fn: Callable[[FusedLogprobs], torch.Tensor],
                           need_h: bool, need_w: bool, need_b: bool) -> GradInForward:
    """Gradient-in-forward strategy over ``chunks`` (lists of sequence indices, whole groups each);
    ``shape``: the token shape of the per-token outputs (the labels'), padded rows or a packed row.
    A packed ``[chosen; rejected]`` row holds a pair as two separate token ranges: each sequence's
    counted tokens are one slice of the counted-token index either way.

    For each chunk: fold the reference tile, fold the policy tile (kept in the buffer), call
    ``coef_fn(tokens)`` with the per-token outputs so far (later chunks hold zeros) to get
    ``d loss / d logp`` for every token, and turn the buffered tile into its gradient. The
    coefficients of a chunk must not depend on the values of later chunks (a separable loss).
    """
    kern = _backends.kernel_module(Backend(o.backend))
    M = h.shape[0]
    cd = o.dtype or h.dtype
    acc = torch.float64 if cd == torch.float64 else torch.float32
    logp = torch.zeros(M, dtype=acc, device=h.device)
    st = torch.zeros(M, NUM_STATS, dtype=acc, device=h.device)
    ref = torch.zeros_like(logp) if rh is not None else None
    grads = GradAccumulator(h, weight, bias, need_h, need_w, need_b)  # in the inputs' dtypes
    w_in, b_in = weight, bias
    with no_autocast(h.device):
        h, weight, bias, rh, rw, rb = cast(cd, h, weight, bias, rh, rw, rb)
    # Token indices of every chunk from the counts read in prepare (no host sync): each sequence's
    # tokens are a slice of the counted-token index, placed in chunk order.
    idx = counted_index(y, o.ignore_index, sum(o.counts))
    start = [0]
    for c in o.counts:
        start.append(start[-1] + c)
    chunk_tok = [torch.cat([idx[start[s] : start[s + 1]] for s in c]) for c in chunks]
    rows = max((t.numel() for t in chunk_tok), default=0)
    buf = h.new_empty(rows, weight.shape[0]) if rows else None
    for sel in chunk_tok:
        n = sel.numel()
        if n == 0:
            continue
        ys = y.index_select(0, sel)
        x = buf[:n]
        with no_autocast(h.device):
            if rh is not None:
                ref.index_copy_(0, sel, fold(kern, project(rh.index_select(0, sel), rw, rb, o.scale, x), ys, o,
                                             False)[0])
            h_rows = h.index_select(0, sel)
            lp, lse, s = fold(kern, project(h_rows, weight, bias, o.scale, x), ys, o, True)
        logp.index_copy_(0, sel, lp)
        st.index_copy_(0, sel, s)
        with torch.enable_grad():  # the caller's loss, under the caller's autocast state
            leaf = logp.view(shape).detach().requires_grad_()
            loss = coef_fn(FusedLogprobs(leaf, ref.view(shape) if ref is not None else None, st.view(*shape, NUM_STATS)))
            (coef,) = torch.autograd.grad(loss, leaf, allow_unused=True)
        if coef is None:
            continue  # the loss does not depend on the policy log-probs
        with no_autocast(h.device):
            grads.add_tile(kern, x, coef.reshape(-1).index_select(0, sel).contiguous(), ys, lse, h_rows, sel, weight,
                           o)
    tokens = FusedLogprobs(logp.view(shape), ref.view(shape) if ref is not None else None, st.view(*shape, NUM_STATS))
    return GradInForward(tokens, *grads.result(w_in, b_in))


class AttachGrads(torch.autograd.Function):
    """``value`` (a detached loss) made differentiable w.r.t. ``inputs`` with gradients already
    computed: backward returns ``grad_output * grad`` for each."""

    @staticmethod
    def forward(ctx, value, grads, *inputs):
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        out = [None if g is None else (g * grad_out.to(g.dtype) if grad_out.numel() == 1 else g) for g in ctx.grads]
        return (None, None, *out)
