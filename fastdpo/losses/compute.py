"""Per-token kernel outputs -> a DPO-family loss: the code path every entry point shares.

:func:`loss_from_tokens` takes a plan (:mod:`fastdpo.losses.plan`), the per-token outputs of
the fused kernels and a layout (:mod:`fastdpo.losses.sequences`), reduces the tokens to
sequences once, applies the objectives (WPO and pair weights included) and forms TRL's
metrics (:mod:`fastdpo.losses.metrics`). All ordinary torch code on small tensors.
"""

from __future__ import annotations

import dataclasses

import torch

from fastdpo import _validation
from fastdpo.losses import diagnostics as _diagnostics
from fastdpo.losses import metrics as _metrics
from fastdpo.losses.plan import LossPlan, check_batch, make_plan
from fastdpo.losses.registry import SequenceStats, f_divergence_scores
from fastdpo.losses.sequences import PaddedLayout, sequence_stats, wpo_weights
from fastdpo.ops.logprobs import FusedLogprobs


@dataclasses.dataclass
class DPOOutput:
    """Result of :func:`fastdpo.dpo_loss` / :func:`fastdpo.linear_dpo_loss`.

    ``loss``: scalar. ``chosen_logps`` / ``rejected_logps``: per-pair policy sequence
    log-probs (after ``ld_alpha`` / ``token_weights``). ``chosen_rewards`` /
    ``rejected_rewards``: detached implicit rewards (``beta * log-ratio`` for
    reference-based losses). ``metrics``: detached 0-d tensors under TRL's keys.
    ``policy_logps`` / ``ref_logps``: all ``N`` sequence log-probs (``ref_logps`` None
    when reference-free). ``diagnostics``: with ``diagnostics=True``, the batch's raw
    training-dynamics values (:class:`fastdpo.losses.diagnostics.Diagnostics`), whose summary is
    also in ``metrics`` under ``diagnostics/...``; else None.
    """

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict
    policy_logps: torch.Tensor
    ref_logps: torch.Tensor | None
    diagnostics: _diagnostics.Diagnostics | None = None


def loss_from_tokens(tok: FusedLogprobs, layout, *, ref_logps, plan: LossPlan, ld_alpha, use_weighting,
                     token_weights, pair_weights, desirable, diagnostics: bool = False,
                     temperature: float = 1.0) -> DPOOutput:
    """The loss, rewards and metrics of a batch from its per-token kernel outputs ``tok`` laid out by ``layout``.

    ``diagnostics=True`` adds the training-dynamics diagnostics (``temperature``: the one the kernel
    divided the logits by, for the logits-gradient norms); the loss is still evaluated once."""
    _diagnostics.check_flag(diagnostics)
    kw = dict(ref_logps=ref_logps, plan=plan, ld_alpha=ld_alpha, use_weighting=use_weighting,
              token_weights=token_weights, pair_weights=pair_weights, desirable=desirable)
    if not diagnostics:
        return _evaluate(tok, layout, **kw)[0]
    probe = _diagnostics.Probe(tok)
    with probe.context():
        out, s = _evaluate(probe.tok, layout, **kw)
        out.diagnostics = _diagnostics.compute(probe.tok, s, layout, out.loss, out.chosen_rewards,
                                               out.rejected_rewards, temperature=temperature,
                                               retain_graph=not probe.detach_outputs)
    out.metrics.update(out.diagnostics.summary())
    if probe.detach_outputs:  # evaluated with a graph only for the diagnostics: hand back what no-grad mode gives
        for f in ("loss", "chosen_logps", "rejected_logps", "policy_logps"):
            setattr(out, f, getattr(out, f).detach())
    return out


def _evaluate(tok: FusedLogprobs, layout, *, ref_logps, plan: LossPlan, ld_alpha, use_weighting,
              token_weights, pair_weights, desirable) -> tuple[DPOOutput, SequenceStats]:
    n = layout.num_seqs
    K = 1 if (plan.unpaired and desirable is not None) else plan.num_blocks
    n_desirable = None
    if plan.unpaired and desirable is None:
        desirable = torch.arange(n, device=layout.mask.device) < n // 2
        n_desirable = n // 2
    if ld_alpha is not None and K == 1:
        raise ValueError("fastdpo: ld_alpha needs paired responses ([chosen; rejected] layout), not desirable=")
    if plan.token_kl and tok.kl is None:
        raise ValueError(
            f"fastdpo: loss_type {plan.kl_losses} needs the token-level KL to "
            "the reference over the vocabulary, which per-token log-probs do not carry; use fastdpo.dpo_loss with "
            "ref_logits (or linear_dpo_loss with ref_hidden)")
    s = sequence_stats(tok, layout, ref_logps=ref_logps, ld_alpha=ld_alpha, token_weights=token_weights,
                       num_blocks=K, desirable=desirable, average_log_prob=plan.average_log_prob)
    s.scores = f_divergence_scores(s.logratios, plan.common["f_divergence_type"], plan.common["f_alpha_divergence_coef"])
    wpo = wpo_weights(tok, layout, s.n_tokens, K) if use_weighting else None

    loss = 0.0
    for sp, cfg, weight in plan.terms:
        per = sp.fn(s, cfg)
        if wpo is not None:
            per = per * wpo
        if pair_weights is not None:
            per = per * pair_weights.to(per.dtype)
        loss = loss + per.mean() * weight

    sp0, cfg0, _ = plan.terms[0]
    split = _by_desirability(desirable, n_desirable) if desirable is not None else None
    with torch.no_grad():
        if sp0.rewards is not None:
            cr, rr = sp0.rewards(s, cfg0)
        else:
            r = cfg0.beta * (s.logratios.view(K, -1) if K > 1 else s.logratios)
            if desirable is not None:
                r = r.reshape(-1)
                cr, rr = r[split[0]], r[split[1]]
            else:
                cr, rr = r[0], r[1]
        cr, rr = cr.detach(), rr.detach()
        metrics = _metrics.trl_metrics(s, tok.stats, layout, cr, rr, desirable, K)
    if "nll_loss" in s.metrics:
        metrics["nll_loss"] = s.metrics.pop("nll_loss").detach()
    metrics.update({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in s.metrics.items()})
    if desirable is not None:
        chosen, rejected = s.logps[split[0]], s.logps[split[1]]
    else:
        chosen, rejected = s.chosen_logps, s.rejected_logps
    if not isinstance(loss, torch.Tensor):  # pragma: no cover - every objective returns a tensor
        loss = torch.tensor(loss, device=layout.mask.device)
    return DPOOutput(loss, chosen, rejected, cr, rr, metrics, s.logps, s.ref_logps), s


def _by_desirability(desirable: torch.Tensor, n_desirable: int | None):
    """Indices of the desirable and of the undesirable sequences, each in order. Their number (the
    outputs' sizes) is read from the device once when not known: one host sync, instead of one
    per boolean selection."""
    k = int(desirable.sum()) if n_desirable is None else n_desirable
    order = torch.argsort((~desirable).to(torch.uint8), stable=True)
    return order[:k], order[k:]


def run(tok_fn, labels, n, have_ref_tokens, *, ref_logps, loss_type, beta, label_smoothing, loss_weights,
        f_divergence_type, f_alpha_divergence_coef, ld_alpha, use_weighting, discopop_tau, ignore_index,
        token_weights, pair_weights, desirable, variant_options, average_log_prob=False,
        diagnostics=False, layout=None, reference_free=False) -> DPOOutput:
    """Plan the options, check the batch, get the per-token outputs from ``tok_fn(kl: bool)`` and
    evaluate the loss on ``layout`` (default: the padded ``[N, T]`` layout of ``labels``); ``n`` is
    the number of sequences."""
    plan = make_plan(loss_type, loss_weights, beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef,
                     ld_alpha, use_weighting, discopop_tau, variant_options, average_log_prob=average_log_prob,
                     reference_free=reference_free)
    _validation.check_int(ignore_index, "ignore_index")
    _diagnostics.check_flag(diagnostics)
    check_batch(plan, n, desirable, ref_logps, have_ref_tokens, pair_weights, token_weights, labels)
    tok = tok_fn(plan.token_kl)
    layout = PaddedLayout(labels, ignore_index) if layout is None else layout
    return loss_from_tokens(tok, layout, ref_logps=ref_logps, plan=plan,
                            ld_alpha=ld_alpha, use_weighting=use_weighting, token_weights=token_weights,
                            pair_weights=pair_weights, desirable=desirable, diagnostics=diagnostics)
