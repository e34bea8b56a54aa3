"""TRL's fused-LM-head outputs from ``hidden @ weight.T (+ bias)`` through fastdpo's fused-linear tiles.

Shared by the TRL and transformers integrations. The tile loop is
:mod:`fastdpo.ops.linear` (recompute strategy: forward folds each tile of
logits with the fused forward kernel, backward projects it again and the fused
backward kernel writes its gradient in place before the two GEMMs, accumulated
in fp32); this module adds TRL's output selection, a differentiable entropy,
autocast and ZeRO-3 gathering. Tokens whose target is ``ignore_index`` are not
projected and give 0 everywhere.

The logit transform is ``z = softcap * tanh(logit_scale * x / softcap) / T`` (no
tanh without a soft cap), as in :func:`fastdpo.ops.linear.project`.
"""

from __future__ import annotations

import torch

from fastdpo import _backends, _validation
from fastdpo.ops import linear
from fastdpo.ops.schema import STAT_NAMES

# Logit elements per block (rows * V); 2**27 is one 4096 x 32768 tile, TRL's fused-head tile size.
DEFAULT_BLOCK_ELEMENTS = 1 << 27
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_STAT = {name: i for i, name in enumerate(STAT_NAMES)}


def _gather_ctx(*params):
    """DeepSpeed ZeRO-3 gathering of a sharded LM head, when TRL provides it (a null context otherwise)."""
    try:
        from trl.trainer.utils import maybe_gather_lm_head_ctx
    except Exception:  # trl absent or too old: nothing is sharded behind our back
        import contextlib

        return contextlib.nullcontext()
    return maybe_gather_lm_head_ctx(*params)


class LinearLogprobsFunction(torch.autograd.Function):
    """``(hidden [N, H], weight [V, H], bias [V] | None, targets [N]) -> (logp, entropy, log_sum_sq_probs,
    mean_logits, is_top1)``, each ``[N]`` float32 (``is_top1`` bool), optional ones None unless in ``outputs``.

    ``logp`` and ``entropy`` are differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs, backend,
                block_elements, ignore_index):
        ctx.set_materialize_grads(False)
        device = hidden.device
        n, vocab = hidden.shape[0], weight.shape[0]
        cd = linear.compute_dtype(device, hidden.dtype)  # autocast's dtype, as F.linear
        o = linear.TileOptions(ignore_index, float(temperature), float(softcap) if softcap else 0.0,
                               float(logit_scale), _backends.resolve(backend, device).value,
                               max(1, block_elements // max(vocab, 1)))
        kern = _backends.kernel_module(_backends.Backend(o.backend))
        want_stats = any(k in outputs for k in OPTIONAL_OUTPUTS)
        targets = targets.reshape(-1).long()
        idx = torch.nonzero(targets != ignore_index).squeeze(1)
        acc = torch.float64 if cd == torch.float64 else torch.float32  # the kernels' accumulation dtype
        logp = torch.zeros(n, dtype=acc, device=device)
        lse = torch.zeros(n, dtype=acc, device=device)
        stats = torch.zeros(n, len(STAT_NAMES), dtype=acc, device=device) if want_stats else None
        with torch.no_grad(), linear.no_autocast(device):
            linear.fold_rows(kern, *linear.cast(cd, hidden, weight, bias), targets, idx, o, want_stats, logp, lse,
                             stats)
        logp = logp.float()
        entropy = stats[:, _STAT["entropy"]].float() if "entropy" in outputs else None
        lssp = stats[:, _STAT["log_sum_p2"]].float() if "log_sum_sq_probs" in outputs else None
        mean_logits = stats[:, _STAT["mean_logit"]].float() if "mean_logits" in outputs else None
        is_top1 = stats[:, _STAT["argmax_hit"]] > 0.5 if "is_top1" in outputs else None
        ctx.save_for_backward(hidden, weight, bias, targets, idx, lse, entropy if entropy is not None else lse)
        ctx.args = (cd, o)
        ctx.mark_non_differentiable(*(x for x in (lssp, mean_logits, is_top1) if x is not None))
        return logp, entropy, lssp, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, *_):
        hidden, weight, bias, targets, idx, lse, entropy = ctx.saved_tensors
        cd, o = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        kern = _backends.kernel_module(_backends.Backend(o.backend))
        with _gather_ctx(weight, bias), torch.no_grad(), linear.no_autocast(hidden.device):
            # Each tile is projected again exactly as in forward (in ``cd``). Under autocast (``cd`` narrower than
            # the parameters) the tile's logits gradient and the two gradient GEMMs then run in the parameters'
            # dtype against the parameters themselves: nothing is rounded to ``cd`` but the recomputed logits
            # (TRL rounds the logits gradient too; rounding the hidden-gradient GEMM's output as well cost accuracy).
            h, w, b = linear.cast(cd, hidden, weight, bias)
            mixed = cd != hidden.dtype
            gh_src, gw_src, gb_src = (hidden, weight, bias) if mixed else (h, w, b)
            grads = linear.GradAccumulator(gh_src, gw_src, gb_src, need_h, need_w, need_b)
            g_lp = grad_logp.to(lse.dtype) if grad_logp is not None else torch.zeros_like(lse)
            n = idx.numel()
            # mixed: a cd tile and its fp32 copy in about the bytes of one cd tile of o.rows rows
            rows = max(1, o.rows // 3) if mixed else o.rows
            buf = h.new_empty(min(rows, n), w.shape[0]) if n else None
            buf32 = torch.empty(buf.shape, dtype=hidden.dtype, device=hidden.device) if (n and mixed) else None
            for i, j in linear.tiles(n, rows):
                sel = idx[i:j]
                h_rows = h.index_select(0, sel)
                x = linear.project(h_rows, w, b, o.scale, buf[: j - i])
                if mixed:
                    x = buf32[: j - i].copy_(x)
                    h_rows = hidden.index_select(0, sel)
                extra = None
                if grad_entropy is not None:
                    extra = _entropy_grad(x, lse.index_select(0, sel), entropy.index_select(0, sel),
                                          grad_entropy.float().index_select(0, sel), o.temperature, o.softcap)
                grads.add_tile(kern, x, g_lp.index_select(0, sel).contiguous(), targets.index_select(0, sel),
                               lse.index_select(0, sel), h_rows, sel, gw_src, o, extra=extra)
            gh, gw, gb = grads.result(weight, bias)
        return (
            gh.to(hidden.dtype) if gh is not None else None,
            gw,
            gb,
            *([None] * 8),
        )


def _entropy_grad(logits, lse, entropy, g, t, cap):
    """d(sum_i g_i H_i)/d(logits) for one block: ``-g p (log p + H) dz/dx`` (float32)."""
    x = logits.float()
    if cap > 0:
        th = torch.tanh(x / cap)
        z = cap * th / t
        dzdx = (1 - th * th) / t
    else:
        z = x / t
        dzdx = 1.0 / t
    log_p = z - lse.unsqueeze(-1)
    p = log_p.exp()
    return -(g.unsqueeze(-1) * p * (log_p + entropy.unsqueeze(-1))) * dzdx


def linear_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, softcap=None, logit_scale=1.0,
                          outputs=("log_probs",), ignore_index=-100, backend="auto",
                          block_elements=DEFAULT_BLOCK_ELEMENTS):
    """Per-token ``(logp, entropy, log_sum_sq_probs, mean_logits, is_top1)`` of ``hidden [N, H] @ weight.T``;
    see :class:`LinearLogprobsFunction`. Rows whose target is ``ignore_index`` give 0 everywhere."""
    outputs = tuple(outputs)
    unknown = set(outputs) - set(OPTIONAL_OUTPUTS) - {"log_probs"}
    if unknown:
        raise ValueError(f"fastdpo: unknown per-token output(s) {sorted(unknown)}; expected {OPTIONAL_OUTPUTS}")
    _validation.check_positive(temperature, "temperature")
    _validation.check_positive(softcap, "final_logit_softcapping", allow_none=True)
    _validation.check_finite(logit_scale, "logit_scale")
    return LinearLogprobsFunction.apply(hidden, weight, bias, targets, float(temperature), softcap,
                                        float(logit_scale), outputs, str(backend), int(block_elements),
                                        int(ignore_index))
