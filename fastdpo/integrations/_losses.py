"""The loss library entry the integrations need: a DPO-family loss from per-token log-probs.

``fastdpo.dpo_loss`` / ``linear_dpo_loss`` start from logits or hidden states; the
integrations already hold the per-token log-probs (and statistics) of a fused LM
head, so they enter the loss library one step later, with the same validation,
sequence sums (LD-DPO, token weights), WPO weights, objectives and metrics.
"""

from __future__ import annotations

import torch

from fastdpo.losses import compute as _compute
from fastdpo.losses.plan import LOSS_DEFAULTS, LossPlan, check_reference, make_plan, plan_from_options
from fastdpo.losses.sequences import make_layout
from fastdpo.ops.logprobs import FusedLogprobs
from fastdpo.ops.schema import STAT_NAMES


def check_loss_options(**options) -> LossPlan:
    """Validate loss options without a batch (raises the loss library's errors, which name the option)."""
    return plan_from_options(**options)


def stats_from_fields(shape, *, entropy=None, is_top1=None, mean_logits=None, log_sum_sq_probs=None, device=None):
    """Stack per-token fields into the loss library's ``[..., 4]`` statistics (missing fields are zeros)."""
    cols = {"entropy": entropy, "argmax_hit": is_top1, "mean_logit": mean_logits, "log_sum_p2": log_sum_sq_probs}
    out = torch.zeros(*shape, len(STAT_NAMES), dtype=torch.float32, device=device)
    for i, name in enumerate(STAT_NAMES):
        if cols[name] is not None:
            out[..., i] = cols[name].detach().reshape(shape).float()
    return out


def loss_from_token_logprobs(logps: torch.Tensor, labels: torch.Tensor, *, ref_token_logps: torch.Tensor | None = None,
                             ref_logps: torch.Tensor | None = None, stats: torch.Tensor | None = None,
                             kl: torch.Tensor | None = None, ignore_index: int = -100, token_weights=None,
                             pair_weights=None, desirable=None, diagnostics: bool = False, cu_seqlens=None,
                             position_ids=None, backend="auto",
                             **loss_options) -> _compute.DPOOutput:
    """DPO-family loss from per-token policy log-probs ``logps [N, T]`` (0 at ignored tokens, differentiable).

    ``labels [N, T]`` marks the scored tokens (``!= ignore_index``); ``ref_token_logps [N, T]`` are the
    reference's per-token log-probs, or ``ref_logps [N]`` its precomputed sequence log-probs; ``stats``
    ``[N, T, 4]`` (entropy, argmax hit, mean logit, log sum p^2) feeds the metrics and WPO weights;
    ``kl [N, T]`` is the per-token KL to the reference for the token-KL objectives (differentiable, 0 at
    ignored tokens). With ``cu_seqlens`` / ``position_ids`` the tensors are a packed batch (``[N_total]`` or
    ``[1, N_total]`` tokens, see :func:`fastdpo.dpo_loss`); ``backend`` runs its per-sequence sums.
    ``loss_options`` are those of :func:`fastdpo.dpo_loss`; ``diagnostics=True`` needs ``stats`` (its
    ``log sum p^2`` column gives the gradient norms).
    """
    if diagnostics and stats is None:
        raise ValueError("fastdpo: diagnostics=True needs stats (the per-token log sum p^2 of the fused pass)")
    if logps.shape != labels.shape:
        raise ValueError(f"fastdpo: logps and labels must have the same shape, got {tuple(logps.shape)} and "
                         f"{tuple(labels.shape)}")
    if ref_token_logps is not None and ref_token_logps.shape != labels.shape:
        raise ValueError(f"fastdpo: ref_token_logps must have shape {tuple(labels.shape)}, got "
                         f"{tuple(ref_token_logps.shape)}")
    if stats is None:
        stats = torch.zeros(*labels.shape, len(STAT_NAMES), dtype=torch.float32, device=logps.device)
    mask = labels != ignore_index
    logps = logps.float().masked_fill(~mask, 0.0)
    ref_tok = ref_token_logps.detach().float().masked_fill(~mask, 0.0) if ref_token_logps is not None else None
    if kl is not None and kl.shape != labels.shape:
        raise ValueError(f"fastdpo: kl must have shape {tuple(labels.shape)}, got {tuple(kl.shape)}")
    kl = kl.float().masked_fill(~mask, 0.0) if kl is not None else None
    tok = FusedLogprobs(logps, ref_tok, stats.float(), kl)
    opts = {**LOSS_DEFAULTS, **loss_options}
    variant = {k: v for k, v in opts.items() if k not in LOSS_DEFAULTS}
    layout = make_layout(labels, ignore_index, cu_seqlens=cu_seqlens, position_ids=position_ids, backend=backend)
    return _compute.run(lambda kl: tok, labels, layout.num_seqs, ref_tok is not None, ref_logps=ref_logps,
                        loss_type=opts["loss_type"], beta=opts["beta"], label_smoothing=opts["label_smoothing"],
                        loss_weights=opts["loss_weights"], f_divergence_type=opts["f_divergence_type"],
                        f_alpha_divergence_coef=opts["f_alpha_divergence_coef"], ld_alpha=opts["ld_alpha"],
                        use_weighting=opts["use_weighting"], discopop_tau=opts["discopop_tau"],
                        ignore_index=ignore_index, token_weights=token_weights, pair_weights=pair_weights,
                        desirable=desirable, variant_options=variant, average_log_prob=opts["average_log_prob"],
                        diagnostics=diagnostics, layout=layout, reference_free=opts["reference_free"])


def pair_losses(loss_type: str, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
                **options):
    """Per-pair losses and detached ``(chosen_rewards, rejected_rewards)`` of a registered objective from
    sequence-level log-probs ``[B]`` (no token counts: length-normalising objectives see 1 token per sequence,
    i.e. the inputs are used as given). ``options`` are the loss options of :func:`fastdpo.dpo_loss`, checked
    the same way."""
    from fastdpo.losses.registry import SequenceStats, f_divergence_scores

    opts = {**LOSS_DEFAULTS, "loss_type": loss_type, **options}
    variant = {k: v for k, v in opts.items() if k not in LOSS_DEFAULTS}
    plan = make_plan(loss_type, None, opts["beta"], opts["label_smoothing"], opts["f_divergence_type"],
                     opts["f_alpha_divergence_coef"], None, False, opts["discopop_tau"], variant,
                     reference_free=opts["reference_free"])
    [(spec, cfg, _)] = plan.terms
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("fastdpo: pass both reference log-probs or neither")
    logps = torch.cat([chosen_logps, rejected_logps])
    ref = None if ref_chosen_logps is None else torch.cat([ref_chosen_logps, ref_rejected_logps]).detach()
    if spec.token_kl:
        raise ValueError(f"fastdpo: loss_type={loss_type!r} needs the token-level KL to the reference over the "
                         "vocabulary, which sequence log-probs do not carry; use fastdpo.dpo_loss with ref_logits "
                         "(or linear_dpo_loss with ref_hidden)")
    check_reference(plan, ref is not None, ways="reference_chosen_logps and reference_rejected_logps")
    if spec.reference == "unused":
        ref = None
    s = SequenceStats(logps, ref, logps, torch.ones_like(logps), 2)
    s.scores = f_divergence_scores(s.logratios, cfg.f_divergence_type, cfg.f_alpha_divergence_coef)
    losses = spec.fn(s, cfg)
    with torch.no_grad():
        if spec.rewards is not None:
            cr, rr = spec.rewards(s, cfg)
        else:
            cr, rr = (cfg.beta * s.logratios).chunk(2)
    return losses, cr.detach(), rr.detach()
