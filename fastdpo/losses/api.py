"""Public entry points of the loss library: :func:`dpo_loss` (from logits), :func:`linear_dpo_loss`
(from LM-head inputs) and their module forms.

Each validates its inputs, runs the fused per-token kernel once (policy + reference log-probs +
statistics) and hands the per-token outputs to the one shared code path,
:func:`fastdpo.losses.compute.loss_from_tokens` (sequence reduction, objectives, metrics).
"""

from __future__ import annotations

import inspect

import torch

from fastdpo import _backends, _validation
from fastdpo.losses.compute import DPOOutput, loss_from_tokens, run
from fastdpo.losses.diagnostics import check_flag
from fastdpo.losses.plan import LOSS_DEFAULTS, check_batch, groups, make_plan, plan_from_options
from fastdpo.losses.sequences import PaddedLayout, make_layout
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
        average_log_prob: length-averaged sequence log-probs (Liger's switch): every sequence sum (policy
            and reference, after ``ld_alpha`` / ``token_weights``) is divided by its number of scored tokens;
            objectives that length-normalise themselves (ipo, sigmoid_norm, simpo, ...) then use them as they are.
        token_weights: per-token weights shaped like ``labels`` inside every sequence sum.
        pair_weights: per-pair weights multiplying the per-pair loss (Sem-DPO style).
        desirable: bool ``[N]`` for unpaired losses (kto, bco); default ``[True]*N/2 + [False]*N/2``.
        diagnostics: also compute the training-dynamics diagnostics (likelihood displacement, loss
            reweighting, chosen / rejected logits-gradient norms, margins) from the same pass, in
            ``metrics`` under ``diagnostics/...`` and as ``DPOOutput.diagnostics`` (docs/diagnostics.md).
        reference_free: use no reference for a reference-anchored loss (the policy log-probs stand in
            for the log-ratios); it must be asked for explicitly, as a missing reference is an error.
        **variant_options: options of the chosen loss type(s) (see their docstrings).
"""


def _check_token_dims(x: torch.Tensor, name: str, width: str, packed: bool) -> None:
    """``[N, T, width]`` for a padded batch; ``[N_total, width]`` or ``[1, N_total, width]`` for a packed one."""
    if packed and not (x.dim() == 2 or (x.dim() == 3 and x.shape[0] == 1)):
        raise ValueError(f"fastdpo: packed {name} must be [N_total, {width}] or [1, N_total, {width}] (every "
                         f"sequence's tokens in one row), got shape {tuple(x.shape)}")
    if not packed and x.dim() != 3:
        raise ValueError(f"fastdpo: {name} must be [N, T, {width}] (N sequences), or [N_total, {width}] with "
                         f"cu_seqlens / position_ids for a packed batch, got shape {tuple(x.shape)}")


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
    average_log_prob: bool = False,
    diagnostics: bool = False,
    cu_seqlens=None,
    position_ids: torch.Tensor | None = None,
    reference_free: bool = False,
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
            With neither, a loss anchored to a reference raises unless ``reference_free=True``
            (log-ratios become policy log-probs); losses reference-free by definition (simpo, cpo,
            orpo, ...) need neither.
        backend: kernel backend (``auto``, ``torch``, ``cpu``, ``triton``, ``cuda``).
        process_group: vocabulary-parallel: ``logits`` / ``ref_logits`` are this rank's vocabulary
            shard (see :func:`fastdpo.vocab_parallel_logprobs`); the loss and metrics are then the
            same on every rank and the gradient flows to the local shard.
        cu_seqlens, position_ids: a packed (padding-free) batch: ``logits`` ``[N_total, V]`` (or
            ``[1, N_total, V]``), ``labels`` ``[N_total]`` (or ``[1, N_total]``), the N sequences' tokens
            end to end in the same order as the padded batch (``[chosen; rejected]``). Sequence k is
            tokens ``cu_seqlens[k] : cu_seqlens[k+1]`` (``[N + 1]`` ints, flash-attention's convention),
            or give transformers' ``position_ids`` (restarting at 0 at each sequence). See
            :func:`fastdpo.losses.sequences.make_layout`.

    Returns:
        :class:`DPOOutput`.
    """
    _validation.check_float_tensor(logits, "logits")
    _check_token_dims(logits, "logits", "V", cu_seqlens is not None or position_ids is not None)
    _validation.check_labels(labels, logits)
    layout = make_layout(labels, ignore_index, cu_seqlens=cu_seqlens, position_ids=position_ids, backend=backend)

    def tok_fn(kl: bool):
        if process_group is not None:
            return vocab_parallel_logprobs(logits, labels, process_group=process_group, ref_logits=ref_logits,
                                           ignore_index=ignore_index, stats=True, kl=kl, backend=backend)
        return fused_logprobs(logits, labels, ref_logits=ref_logits, ignore_index=ignore_index, stats=True, kl=kl,
                              backend=backend)

    return run(tok_fn, labels, layout.num_seqs, ref_logits is not None, ref_logps=ref_logps, loss_type=loss_type,
                beta=beta, label_smoothing=label_smoothing, loss_weights=loss_weights,
                f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
                ld_alpha=ld_alpha, use_weighting=use_weighting, discopop_tau=discopop_tau,
                ignore_index=ignore_index, token_weights=token_weights, pair_weights=pair_weights,
                desirable=desirable, variant_options=variant_options, average_log_prob=average_log_prob,
                diagnostics=diagnostics, layout=layout, reference_free=reference_free)


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
    average_log_prob: bool = False,
    diagnostics: bool = False,
    cu_seqlens=None,
    position_ids: torch.Tensor | None = None,
    reference_free: bool = False,
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
        cu_seqlens, position_ids: a packed batch, as in :func:`dpo_loss`: ``hidden`` ``[N_total, H]``
            (or ``[1, N_total, H]``), ``labels`` ``[N_total]``; only the packed tokens are projected.

    Gradients flow to ``hidden``, ``weight`` and ``bias``, accumulated in fp32.
    """
    _validation.check_tensor(hidden, "hidden")
    _check_token_dims(hidden, "hidden", "H", cu_seqlens is not None or position_ids is not None)
    if strategy not in linear.STRATEGIES:
        raise ValueError(f"fastdpo: unknown strategy {strategy!r}; expected one of {', '.join(linear.STRATEGIES)}")
    plan = make_plan(loss_type, loss_weights, beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef,
                     ld_alpha, use_weighting, discopop_tau, variant_options, average_log_prob=average_log_prob,
                     reference_free=reference_free)
    _validation.check_int(ignore_index, "ignore_index")
    check_flag(diagnostics)
    _validation.check_tensor(labels, "labels")
    layout = make_layout(labels, ignore_index, cu_seqlens=cu_seqlens, position_ids=position_ids, backend=backend)
    h, y, rh, rw, rb, idx, o = linear.prepare(
        hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
        ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
        memory_budget=memory_budget, backend=backend, kl=plan.token_kl and ref_hidden is not None,
        cu_seqlens=getattr(layout, "cu_seqlens", None))
    n, shape = layout.num_seqs, labels.shape
    check_batch(plan, n, desirable, ref_logps, ref_hidden is not None, pair_weights, token_weights, labels)

    def finish(tok: FusedLogprobs, diagnose: bool = False) -> DPOOutput:
        return loss_from_tokens(tok, layout, ref_logps=ref_logps, plan=plan,
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
            counts = list(o.counts)  # read once on the host by linear.prepare (per row, or per packed sequence)
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
        return finish(FusedLogprobs(logp.view(shape), ref.view(shape) if rh is not None else None,
                                    st.view(*shape, -1), kl.view(shape) if plan.token_kl else None), diagnostics)
    res = linear.linear_grad_in_forward(h, weight, bias, y, rh, rw, rb, o, shape, chunks,
                                        lambda tok: finish(tok).loss, *need)
    with torch.no_grad():
        out = finish(res.tokens, diagnostics)
    out.loss = linear.AttachGrads.apply(out.loss, (res.grad_hidden, res.grad_weight, res.grad_bias), h, weight, bias)
    return out


dpo_loss.__doc__ += _LOSS_DOC
linear_dpo_loss.__doc__ += _LOSS_DOC


def check_module_options(fn, options: dict) -> None:
    """Validate the options a module form fixes for ``fn`` (dpo_loss / linear_dpo_loss), without tensors: the
    loss options through :func:`~fastdpo.losses.plan.plan_from_options`, plus the backend, ignore index and
    fused-linear strategy names. The per-call inputs (the tensors ``fn`` takes positionally) cannot be fixed."""
    params = inspect.signature(fn).parameters
    positional = [n for n, p in params.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    fixed = sorted(set(positional) & set(options))
    if fixed:
        raise TypeError(f"fastdpo: {fixed} are per-call inputs of {fn.__name__}, not module options; pass them "
                        "when calling the module")
    call_only = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in LOSS_DEFAULTS}
    plan_from_options(**{k: v for k, v in options.items() if k not in call_only})
    if "backend" in options:
        _backends.parse_backend(options["backend"])
    if "ignore_index" in options:
        _validation.check_int(options["ignore_index"], "ignore_index")
    if "diagnostics" in options:
        check_flag(options["diagnostics"])
    if "strategy" in options and options["strategy"] not in linear.STRATEGIES:
        raise ValueError(f"fastdpo: unknown strategy {options['strategy']!r}; expected one of "
                         f"{', '.join(linear.STRATEGIES)}")


class DPOLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`dpo_loss`: options fixed at construction, overridable per call.

    ``DPOLoss(loss_type="ipo", beta=0.5)(logits, labels, ref_logits=ref) -> DPOOutput``

    The options are validated when the module is built (the same checks and messages as a call), so a
    misspelt option or a bad value raises there, not at the first training step.
    """

    _fn = staticmethod(dpo_loss)

    def __init__(self, **options):
        super().__init__()
        check_module_options(type(self)._fn, options)
        self.options = options

    def forward(self, *args, **kwargs) -> DPOOutput:
        return type(self)._fn(*args, **{**self.options, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if not isinstance(v, torch.Tensor))


class LinearDPOLoss(DPOLoss):
    """``nn.Module`` form of :func:`linear_dpo_loss`: ``LinearDPOLoss(...)(hidden, weight, labels, ...)``."""

    _fn = staticmethod(linear_dpo_loss)
