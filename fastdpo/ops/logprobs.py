"""Per-token log-probabilities from logits: validation -> autograd Function -> kernel.

:func:`fused_logprobs` is what the loss library calls (policy + optional
reference + statistics in one pass); :func:`token_logprobs` is the public
building block.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastdpo import _backends, _validation
from fastdpo._backends import Backend
from fastdpo.ops import schema  # noqa: F401  (defines the fastdpo:: ops)
from fastdpo.ops.schema import STAT_NAMES


class FusedLogprobs(NamedTuple):
    """Output of :func:`fused_logprobs`, shaped like ``labels``.

    ``logps``: float32 log-probs (0 at ignored tokens), differentiable w.r.t. the logits.
    ``ref_logps``: the same for ``ref_logits`` (no gradient), or None.
    ``stats``: ``labels.shape + (4,)`` float32 (no gradient), or None; columns
    ``entropy, argmax_hit, mean_logit, log_sum_p2`` (see :data:`STAT_NAMES`), 0 at ignored tokens.
    ``kl``: the per-token full-vocabulary ``KL(pi_ref || pi)`` (``kl=True``), differentiable
    w.r.t. the policy logits, 0 at ignored tokens; or None.
    """

    logps: torch.Tensor
    ref_logps: torch.Tensor | None
    stats: torch.Tensor | None
    kl: torch.Tensor | None = None


class TokenLogprobs(NamedTuple):
    """Output of ``token_logprobs(..., stats=True)``; every field shaped like ``labels``."""

    logps: torch.Tensor
    entropy: torch.Tensor
    argmax_hit: torch.Tensor
    mean_logit: torch.Tensor
    log_sum_p2: torch.Tensor


@torch._dynamo.assume_constant_result
def _resolve(name: str, device_type: str) -> str:
    # Runs eagerly even while torch.compile traces (it may build/load code);
    # the traced graph keeps the chosen backend as a constant.
    return _backends.resolve(name, torch.device(device_type)).value


class _LogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ref_logits, ignore_index, temperature, softcap, stats, kl, inplace, backend):
        kern = _backends.kernel_module(Backend(backend))
        logp, lse, ref_logp, st, kl_out, ref_lse = kern.logprobs_fwd(
            logits, labels, ref_logits, ignore_index, temperature, softcap, stats, kl
        )
        # The KL gradient needs the reference distribution again: its logits and log-sum-exp.
        ctx.save_for_backward(logits, labels, lse, *((ref_logits, ref_lse) if kl else ()))
        ctx.args = (ignore_index, temperature, softcap, inplace, backend)
        ctx.mark_non_differentiable(ref_logp, st)
        return logp, ref_logp, st, kl_out

    @staticmethod
    def backward(ctx, grad_logp, _grad_ref, _grad_stats, grad_kl):
        logits, labels, lse, *ref = ctx.saved_tensors
        ignore_index, temperature, softcap, inplace, backend = ctx.args
        kern = _backends.kernel_module(Backend(backend))
        kl_args = (grad_kl.contiguous(), *ref) if ref else ()
        grad = kern.logprobs_bwd(
            grad_logp.contiguous(), logits, labels, lse, ignore_index, temperature, softcap, inplace, *kl_args
        )
        if inplace:
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None, None, None, None, None


def _as_3d(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [B, T, V] without copying when the leading dims allow it
    (a slice such as ``logits[:, :-1]`` stays a view)."""
    if logits.dim() == 1:
        x = logits.view(1, 1, -1)
    elif logits.dim() == 2:
        x = logits.unsqueeze(0)
    elif logits.dim() == 3:
        x = logits
    else:
        x = logits.reshape(-1, *logits.shape[-2:])
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        x = x.contiguous()  # kernels need a unit stride along the vocabulary
    return x


def fused_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_logits: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    stats: bool = False,
    kl: bool = False,
    inplace_backward: bool = False,
    backend: str | Backend = "auto",
) -> FusedLogprobs:
    r"""Policy log-probs, reference log-probs, statistics and the token-level KL in one pass.

    See :func:`token_logprobs` for the arguments; ``ref_logits`` (same shape as
    ``logits``, no gradient) adds ``ref_logps``, ``stats=True`` adds the per-token
    statistics, and ``kl=True`` (needs ``ref_logits``) adds the per-token KL of the
    reference distribution to the policy over the whole vocabulary (as RRPO and TDPO
    regularise), differentiable w.r.t. ``logits``:

    .. math::
        \mathrm{KL}_t = \sum_v q_{t,v} (\log q_{t,v} - \log p_{t,v}), \quad
        rac{\partial \mathrm{KL}_t}{\partial z_{t,v}} = p_{t,v} - q_{t,v}

    with :math:`p = \mathrm{softmax}(z)`, :math:`q = \mathrm{softmax}(z')` of the equally
    transformed (soft cap, temperature) policy and reference logits. The reference
    logits are kept for the backward.
    """
    ignore_index, temperature, softcap = _validation.check_logprob_inputs(
        logits, labels, ref_logits, ignore_index, temperature, softcap
    )
    if kl and ref_logits is None:
        raise ValueError("fastdpo: kl=True (the per-token KL to the reference) needs ref_logits")
    if inplace_backward and logits.requires_grad and logits.is_leaf:
        raise ValueError(
            "fastdpo: inplace_backward=True would overwrite a leaf tensor that requires grad; "
            "use it on logits produced by the model (e.g. the LM head output)"
        )

    backend = _resolve(str(backend), logits.device.type)
    _validation.check_label_range(labels, logits.shape[-1], ignore_index)  # no host sync on GPUs or when compiled

    out_shape = labels.shape
    x = _as_3d(logits)
    y = labels.reshape(x.shape[:2]).long().contiguous()
    r = _as_3d(ref_logits.detach()) if ref_logits is not None else None
    logp, ref_logp, st, kl_out = _LogprobsFunction.apply(
        x, y, r, ignore_index, temperature, softcap, bool(stats), bool(kl), bool(inplace_backward), backend
    )
    return FusedLogprobs(
        logp.view(out_shape),
        ref_logp.view(out_shape) if r is not None else None,
        st.view(*out_shape, len(STAT_NAMES)) if stats else None,
        kl_out.view(out_shape) if kl else None,
    )


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    backend: str | Backend = "auto",
    stats: bool = False,
    inplace_backward: bool = False,
):
    r"""Per-token log-probabilities of ``labels`` under ``logits``, fused and memory-lean.

    .. math::
        s = c \tanh(x / c)\ (\text{if softcap } c), \quad z = s / T, \quad
        \log p_t = z_{t, y_t} - \log \textstyle\sum_v e^{z_{t,v}}

    Args:
        logits: ``[..., V]`` float32/bfloat16/float16; any strides on the leading
            dims (``logits[:, :-1]`` is not copied).
        labels: integer tensor of shape ``logits.shape[:-1]``, already aligned with
            the logits (the target of position t); ``ignore_index`` marks tokens
            that do not count.
        temperature: divide the (soft-capped) logits by this.
        softcap: Gemma-style ``softcap * tanh(x / softcap)`` applied first, or None.
        backend: ``"auto"``, ``"torch"`` (reference), ``"cpu"``, ``"triton"`` or ``"cuda"``.
        stats: also return per-token entropy, whether the label is the
            argmax, the mean over the vocabulary of the soft-capped,
            temperature-scaled logits and ``log sum p^2`` from the same pass.
        inplace_backward: write the gradient into the logits' own storage in
            backward, saving a ``[N, V]`` buffer. **The logits are destroyed**:
            nothing else may use them after backward.

    Returns:
        float32 log-probs shaped like ``labels`` (0.0 at ignored positions),
        differentiable w.r.t. ``logits``; with ``stats`` a
        :class:`TokenLogprobs` tuple.
    """
    out = fused_logprobs(
        logits,
        labels,
        ignore_index=ignore_index,
        temperature=temperature,
        softcap=softcap,
        stats=stats,
        inplace_backward=inplace_backward,
        backend=backend,
    )
    if not stats:
        return out.logps
    return TokenLogprobs(out.logps, *out.stats.unbind(-1))
