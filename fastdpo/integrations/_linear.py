"""Per-token log-probs of ``hidden @ weight.T (+ bias)`` through fastdpo's kernels, a block of rows at a time.

Shared by the TRL and transformers integrations. The forward turns a block of
hidden rows into logits (one GEMM), runs fastdpo's fused forward kernel on it
(log-prob, log-sum-exp and the per-token statistics in one read) and drops the
block; the backward recomputes each block's logits, lets the fused backward
kernel write the logits gradient over them in place and accumulates the two
gradient GEMMs in float32. Peak extra memory is one ``[rows, V]`` block.

The logit transform is ``z = softcap' * tanh(scale * x / softcap') / T`` (no tanh
without a soft cap). A positive ``logit_scale`` is folded into the kernel's own
parameters: ``scale * c * tanh(x / c) / T`` with ``c = softcap / scale`` and the
temperature ``T / scale`` is the same function, so no extra pass is needed.
"""

from __future__ import annotations

import torch

from fastdpo import _backends
from fastdpo.ops.schema import STAT_NAMES

# Logit elements per block (rows * V); 2**27 is one 4096 x 32768 tile, TRL's fused-head tile size.
DEFAULT_BLOCK_ELEMENTS = 1 << 27
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_STAT = {name: i for i, name in enumerate(STAT_NAMES)}


def _kernel_params(temperature: float, softcap: float | None, logit_scale: float):
    """(temperature', softcap', pre_scale) for the kernel: pre_scale multiplies the logits block when it cannot
    be folded (a non-positive scale)."""
    cap = float(softcap) if softcap else 0.0
    scale = float(logit_scale)
    if scale > 0:
        return float(temperature) / scale, cap / scale, 1.0
    return float(temperature), cap, scale


def _block_rows(n: int, vocab: int, block_elements: int) -> int:
    return max(1, min(n, block_elements // max(vocab, 1)))


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
        compute_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        t, cap, pre = _kernel_params(temperature, softcap, logit_scale)
        kern = _backends.kernel_module(_backends.resolve(backend, device))
        want_stats = any(o in outputs for o in OPTIONAL_OUTPUTS)
        targets = targets.reshape(-1).long()
        logp = torch.zeros(n, dtype=torch.float32, device=device)
        acc = torch.float64 if compute_dtype == torch.float64 else torch.float32  # the kernels' accumulation dtype
        lse = torch.zeros(n, dtype=acc, device=device)
        stats = torch.zeros(n, len(STAT_NAMES), dtype=torch.float32, device=device) if want_stats else None
        rows = _block_rows(n, vocab, block_elements)
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        with torch.no_grad():
            for i in range(0, n, rows):
                j = min(n, i + rows)
                logits = torch.nn.functional.linear(hidden[i:j].to(compute_dtype), w, b)
                if pre != 1.0:
                    logits.mul_(pre)
                lp, ls, _, st = kern.logprobs_fwd(logits.unsqueeze(0), targets[i:j].unsqueeze(0).contiguous(), None,
                                                 ignore_index, t, cap, want_stats)
                logp[i:j] = lp[0]
                lse[i:j] = ls[0]
                if want_stats:
                    stats[i:j] = st[0]
                del logits
        entropy = stats[:, _STAT["entropy"]].clone() if "entropy" in outputs else None
        lssp = stats[:, _STAT["log_sum_p2"]].clone() if "log_sum_sq_probs" in outputs else None
        mean_logits = stats[:, _STAT["mean_logit"]].clone() if "mean_logits" in outputs else None
        is_top1 = stats[:, _STAT["argmax_hit"]] > 0.5 if "is_top1" in outputs else None
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy if entropy is not None else lse)
        ctx.args = (compute_dtype, t, cap, pre, backend, rows, ignore_index)
        ctx.mark_non_differentiable(*(x for x in (lssp, mean_logits, is_top1) if x is not None))
        return logp, entropy, lssp, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, *_):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        compute_dtype, t, cap, pre, backend, rows, ignore_index = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        kern = _backends.kernel_module(_backends.resolve(backend, hidden.device))
        with _gather_ctx(weight, bias):
            grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            w = weight.to(compute_dtype)
            b = bias.to(compute_dtype) if bias is not None else None
            g_lp = grad_logp.float().contiguous() if grad_logp is not None else None
            g_h = grad_entropy.float().contiguous() if grad_entropy is not None else None
            with torch.no_grad():
                for i in range(0, n, rows):
                    j = min(n, i + rows)
                    h = hidden[i:j].to(compute_dtype)
                    logits = torch.nn.functional.linear(h, w, b)
                    if pre != 1.0:
                        logits.mul_(pre)
                    extra = None
                    if g_h is not None:
                        keep = (targets[i:j] != ignore_index).float()
                        extra = _entropy_grad(logits, lse[i:j], entropy[i:j], g_h[i:j] * keep, t, cap)
                    if g_lp is not None:
                        # the fused backward kernel writes d(sum g * logp)/d(logits) over the block
                        grad = kern.logprobs_bwd(g_lp[i:j].to(lse.dtype).unsqueeze(0), logits.unsqueeze(0),
                                                 targets[i:j].unsqueeze(0).contiguous(), lse[i:j].unsqueeze(0),
                                                 ignore_index, t, cap, True)[0]
                        if extra is not None:
                            grad = grad.float().add_(extra)
                    else:
                        grad = extra
                    if pre != 1.0:
                        grad = grad * pre
                    if grad_h is not None:
                        grad_h[i:j].addmm_(grad.float(), w.float())
                    if grad_w is not None:
                        grad_w.addmm_(grad.float().t(), h.float())
                    if grad_b is not None:
                        grad_b += grad.sum(0, dtype=torch.float32)
                    del logits, grad
        return (
            grad_h.to(hidden.dtype) if grad_h is not None else None,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
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
    if temperature is None or float(temperature) <= 0:
        raise ValueError(f"fastdpo: temperature must be > 0, got {temperature!r}")
    if softcap is not None and float(softcap) <= 0:
        raise ValueError(f"fastdpo: final_logit_softcapping must be > 0 or None, got {softcap!r}")
    return LinearLogprobsFunction.apply(hidden, weight, bias, targets, float(temperature), softcap,
                                        float(logit_scale), outputs, str(backend), int(block_elements),
                                        int(ignore_index))
