"""Public entry points of the loss library: :func:`dpo_loss` (from logits), :func:`linear_dpo_loss`
(from LM-head inputs) and their module forms.

Each validates its inputs, runs the fused per-token kernel once (policy + reference log-probs +
statistics) and hands the per-token outputs to the one shared code path,
:func:`fastdpo.losses.compute.loss_from_tokens` (sequence reduction, objectives, metrics).
"""

from __future__ import annotations

import torch

from fastdpo import _validation
from fastdpo.losses.compute import DPOOutput, loss_from_tokens, run
from fastdpo.losses.diagnostics import check_flag
from fastdpo.losses.plan import check_batch, groups, make_plan
from fastdpo.losses.sequences import PaddedLayout
from fastdpo.ops import linear
from fastdpo.ops.logprobs import FusedLogprobs, fused_logprobs
from fastdpo.ops.vocab_parallel import vocab_parallel_logprobs

__all__ = ["DPOLoss", "DPOOutput", "LinearDPOLoss", "dpo_loss", "linear_dpo_loss"]

_LOSS_DOC = """
    Loss options (same for both forms):
        loss_type: a registered name (``fastdpo.available_losses()``) or a list of names,
            combined as ``sum_i loss_weights[i] * loss_i``.
        beta: float > 0, or a per-pair tensor (margin-adaptive losses).
        label_smoothing: robust / exo_pair / aot epsilon; cDPO with ``loss_type='sigmoid', cdpo=True``.
        f_divergence_type, f_alpha_divergence_coef: f-DPO score transform (reverse_kl, forward_kl,
            js_divergence, alpha_divergence), for the losses built on the chosen-rejected difference.
        ld_alpha: LD-DPO weight of the tokens beyond the shorter response (policy and reference).
        use_weighting: WPO pair weights from the per-token ``log sum p^2`` of the same pass.
        discopop_tau: DiscoPOP temperature.
        token_weights: per-token weights shaped like ``labels`` inside every sequence sum.
        pair_weights: per-pair weights multiplying the per-pair loss (Sem-DPO style).
        desirable: bool ``[N]`` for unpaired losses (kto, bco); default ``[True]*N/2 + [False]*N/2``.
        diagnostics: also compute the training-dynamics diagnostics (likelihood displacement, loss
            reweighting, chosen / rejected logits-gradient norms, margins) from the same pass, in
            ``metrics`` under ``diagnostics/...`` and as ``DPOOutput.diagnostics`` (docs/diagnostics.md).
        **variant_options: options of the chosen loss type(s) (see their docstrings).
"""


def dpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_logits: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    loss_type="sigmoid",
    beta=0.1,
    label_smoothing: float = 0.0,
    loss_weights=None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    discopop_tau: float = 0.05,
    ignore_index: int = -100,
    backend="auto",
    token_weights: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
    desirable: torch.Tensor | None = None,
    process_group=None,
    diagnostics: bool = False,
    **variant_options,
) -> DPOOutput:
    """DPO-family loss from policy logits in one fused pass over the vocabulary.

    Args:
        logits: ``[N, T, V]`` policy logits; dim 0 is ``[chosen; rejected]`` (N = 2B) or the
            loss type's blocks. Any strides on N and T (``logits[:, :-1]`` is not copied).
        labels: ``[N, T]`` token ids aligned with the logits (already shifted);
            ``ignore_index`` marks prompt and padding.
        ref_logits: reference-model logits shaped like ``logits`` (no gradient), or
        ref_logps: ``[N]`` precomputed sequence-level reference log-probs in the same order.
            With neither the loss is reference-free (log-ratios become policy log-probs), or an
            error for losses that need a reference.
        backend: kernel backend (``auto``, ``torch``, ``cpu``, ``triton``, ``cuda``).
        process_group: vocabulary-parallel: ``logits`` / ``ref_logits`` are this rank's vocabulary
            shard (see :func:`fastdpo.vocab_parallel_logprobs`); the loss and metrics are then the
            same on every rank and the gradient flows to the local shard.

    Returns:
        :class:`DPOOutput`.
    """
    _validation.check_float_tensor(logits, "logits")
    if logits.dim() != 3:
        raise ValueError(f"fastdpo: logits must be [N, T, V] (N sequences), got shape {tuple(logits.shape)}")
    _validation.check_labels(labels, logits)

    def tok_fn(kl: bool):
        if process_group is not None:
            return vocab_parallel_logprobs(logits, labels, process_group=process_group, ref_logits=ref_logits,
                                           ignore_index=ignore_index, stats=True, kl=kl, backend=backend)
        return fused_logprobs(logits, labels, ref_logits=ref_logits, ignore_index=ignore_index, stats=True, kl=kl,
                              backend=backend)

    return run(tok_fn, labels, logits.shape[0], ref_logits is not None, ref_logps=ref_logps, loss_type=loss_type,
                beta=beta, label_smoothing=label_smoothing, loss_weights=loss_weights,
                f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
                ld_alpha=ld_alpha, use_weighting=use_weighting, discopop_tau=discopop_tau,
                ignore_index=ignore_index, token_weights=token_weights, pair_weights=pair_weights,
                desirable=desirable, variant_options=variant_options, diagnostics=diagnostics)


def linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    loss_type="sigmoid",
    beta=0.1,
    label_smoothing: float = 0.0,
    loss_weights=None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    discopop_tau: float = 0.05,
    ignore_index: int = -100,
    backend="auto",
    token_weights: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
    desirable: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    strategy: str = "auto",
    memory_budget: int | None = None,
    diagnostics: bool = False,
    **variant_options,
) -> DPOOutput:
    """DPO-family loss from the LM head's inputs, ``logits = logit_scale * (hidden @ weight.T + bias)``,
    never holding more than ``memory_budget`` bytes of logits.

    Args:
        hidden: ``[N, T, H]`` final hidden states of the policy (dim 0 as in :func:`dpo_loss`).
        weight: ``[V, H]`` LM-head weight (dtype of ``hidden``); ``bias``: ``[V]`` or None.
        labels: ``[N, T]`` as in :func:`dpo_loss`.
        ref_hidden: ``[N, T, H]`` reference hidden states (no gradient); ``ref_weight`` /
            ``ref_bias`` default to ``weight`` / ``bias`` (a shared, frozen head) when
            ``ref_weight`` is None. Or ``ref_logps`` (``[N]``) instead.
        temperature, softcap: as in :func:`fastdpo.token_logprobs` (e.g. Gemma-2's
            ``final_logit_softcapping``); ``logit_scale``: multiplies the logits first (Cohere).
        strategy: ``"recompute"`` (forward keeps per-token log-sum-exp only; backward projects
            every tile again: 4 policy GEMM passes), ``"grad_in_forward"`` (each chunk of whole
            pairs is projected once and its gradient formed in forward: 3 policy GEMM passes;
            needs a separable loss and a pair's logits within ``memory_budget``; only ``.loss``
            carries the gradient) or ``"auto"`` (grad_in_forward when allowed and a gradient is
            needed, else recompute).
        memory_budget: bytes of logits held at once (default: ``$FASTDPO_LINEAR_BUDGET_MB``,
            else 1 GiB on GPUs, 2^24 logits on CPU: 64 MiB fp32, 32 MiB bf16).
        diagnostics: as for :func:`dpo_loss`; the gradient norms are those w.r.t. the logits
            ``logit_scale * (hidden @ weight.T + bias)`` the tiles hold, not w.r.t. ``hidden``.

    Gradients flow to ``hidden``, ``weight`` and ``bias``, accumulated in fp32.
    """
    _validation.check_tensor(hidden, "hidden")
    if hidden.dim() != 3:
        raise ValueError(f"fastdpo: hidden must be [N, T, H] (N sequences), got shape {tuple(hidden.shape)}")
    if strategy not in linear.STRATEGIES:
        raise ValueError(f"fastdpo: unknown strategy {strategy!r}; expected one of {', '.join(linear.STRATEGIES)}")
    plan = make_plan(loss_type, loss_weights, beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef,
                     ld_alpha, use_weighting, discopop_tau, variant_options)
    _validation.check_int(ignore_index, "ignore_index")
    check_flag(diagnostics)
    h, y, rh, rw, rb, idx, o = linear.prepare(
        hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
        ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
        memory_budget=memory_budget, backend=backend, kl=plan.token_kl and ref_hidden is not None)
    n, T = labels.shape
    check_batch(plan, n, desirable, ref_logps, ref_hidden is not None, pair_weights, token_weights, labels)

    def finish(tok: FusedLogprobs, diagnose: bool = False) -> DPOOutput:
        return loss_from_tokens(tok, PaddedLayout(labels, ignore_index), ref_logps=ref_logps, plan=plan,
                                ld_alpha=ld_alpha, use_weighting=use_weighting, token_weights=token_weights,
                                pair_weights=pair_weights, desirable=desirable, diagnostics=diagnose,
                                temperature=o.temperature)

    need = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    chunks = None
    if strategy != "recompute" and any(need):
        elem = o.dtype.itemsize  # of the logits tiles (autocast's dtype under autocast)
        budget = o.rows * weight.shape[0] * elem
        not_separable = [sp.name for sp, _, _ in plan.terms if not sp.separable]
        with_kl = plan.kl_losses
        if not not_separable and not with_kl:
            counts = list(o.counts)  # read once on the host by linear.prepare
            chunks = linear.group_chunks(counts, groups(plan, n), weight.shape[0], elem, budget)
        if chunks is None and strategy == "grad_in_forward":
            why = (f"loss_type {not_separable} is not separable over pairs" if not_separable else
                   f"loss_type {with_kl} needs the token-level KL, whose gradient the recompute strategy forms"
                   if with_kl else f"one pair's logits exceed memory_budget={budget} bytes")
            raise ValueError(f"fastdpo: strategy='grad_in_forward' cannot be used: {why}; use strategy='recompute' "
                             "or 'auto'")
    if chunks is None:
        logp, ref, st, kl = linear._LinearLogprobsFunction.apply(h, weight, bias, y, idx, rh, rw, rb, True, o,
                                                                 plan.token_kl)
        return finish(FusedLogprobs(logp.view(n, T), ref.view(n, T) if rh is not None else None, st.view(n, T, -1),
                                    kl.view(n, T) if plan.token_kl else None), diagnostics)
    res = linear.linear_grad_in_forward(h, weight, bias, y, rh, rw, rb, o, T, chunks, lambda tok: finish(tok).loss,
                                        *need)
    with torch.no_grad():
        out = finish(res.tokens, diagnostics)
    out.loss = linear.AttachGrads.apply(out.loss, (res.grad_hidden, res.grad_weight, res.grad_bias), h, weight, bias)
    return out


dpo_loss.__doc__ += _LOSS_DOC
linear_dpo_loss.__doc__ += _LOSS_DOC


class DPOLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`dpo_loss`: options fixed at construction, overridable per call.

    ``DPOLoss(loss_type="ipo", beta=0.5)(logits, labels, ref_logits=ref) -> DPOOutput``
    """

    _fn = staticmethod(dpo_loss)

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, *args, **kwargs) -> DPOOutput:
        return type(self)._fn(*args, **{**self.options, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if not isinstance(v, torch.Tensor))


class LinearDPOLoss(DPOLoss):
    """``nn.Module`` form of :func:`linear_dpo_loss`: ``LinearDPOLoss(...)(hidden, weight, labels, ...)``."""

    _fn = staticmethod(linear_dpo_loss)
