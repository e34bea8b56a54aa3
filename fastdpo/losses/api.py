"""One-call fused preference losses: ``dpo_loss`` (logits in) and
``linear_dpo_loss`` (hidden states + LM head in).

Data flow: one fused kernel pass gives per-token policy log-probs (+ reference
log-probs + statistics); everything below is torch on ``[2B, T]`` tensors:
sequence sums (LD-DPO, per-token weights), f-divergence scores, the objective
from the registry, WPO weights and TRL's metrics.

Batch layout as in TRL: dim 0 is ``[chosen; rejected]``, labels already shifted,
``ignore_index`` on prompt and padding tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F

from fastdpo import _validation
from fastdpo.losses import dpo as _dpo  # noqa: F401  (registers the TRL objectives)
from fastdpo.losses import reference_free as _rf  # noqa: F401  (registers SimPO, CPO, AlphaPO, ORPO)
from fastdpo.losses.dpo import f_divergence_scores
from fastdpo.losses.registry import LossSpec, PairStats, get_loss
from fastdpo.ops.logprobs import fused_logprobs

_F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclasses.dataclass
class DPOOutput:
    """``loss`` (scalar), per-pair ``chosen_logps``/``rejected_logps`` (policy, as
    fed to the objective) and ``chosen_rewards``/``rejected_rewards``
    (``beta * log-ratio``, detached), and ``metrics`` with TRL's keys (0-d tensors)."""

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    losses: tuple[LossSpec, ...]
    weights: tuple[float, ...]
    beta: float
    label_smoothing: float
    f_divergence_type: str
    f_alpha_divergence_coef: float
    ld_alpha: float | None
    use_weighting: bool
    options: dict


def make_config(
    loss_type: str | Sequence[str] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_weights: Sequence[float] | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    discopop_tau: float = 0.05,
    **variant_options,
) -> LossConfig:
    """Validate the loss options once (shared by the functions and the modules)."""
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    if not isinstance(types, (list, tuple)) or not types or not all(isinstance(t, str) for t in types):
        raise TypeError(f"fastdpo: loss_type must be a name or a list of names, got {loss_type!r}")
    specs = tuple(get_loss(t) for t in types)
    if loss_weights is None:
        weights = (1.0,) * len(specs)
    else:
        weights = tuple(float(w) for w in loss_weights)
        if len(weights) != len(specs):
            raise ValueError(
                f"fastdpo: loss_weights has {len(weights)} entries but loss_type lists {len(specs)} losses ({types})"
            )
    beta = _validation.check_positive(beta, "beta")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"fastdpo: label_smoothing must be a number, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"fastdpo: label_smoothing must be in [0, 1), got {label_smoothing}")
    if f_divergence_type not in _F_DIVERGENCES:
        raise ValueError(f"fastdpo: unknown f_divergence_type {f_divergence_type!r}; expected one of {_F_DIVERGENCES}")
    if f_divergence_type != "reverse_kl":
        bad = [s.name for s in specs if not s.f_divergence]
        if bad:
            raise ValueError(
                f"fastdpo: f_divergence_type={f_divergence_type!r} is not supported by loss_type {bad}; "
                "use reverse_kl with these losses"
            )
    if ld_alpha is not None and not (isinstance(ld_alpha, (int, float)) and 0.0 <= ld_alpha <= 1.0):
        raise ValueError(f"fastdpo: ld_alpha must be None or a number in [0, 1], got {ld_alpha!r}")
    if use_weighting and any(s.name in ("aot", "aot_unpaired") for s in specs):
        raise ValueError("fastdpo: use_weighting is not supported with loss_type aot / aot_unpaired")
    _validation.check_positive(discopop_tau, "discopop_tau")
    options = dict(variant_options, discopop_tau=float(discopop_tau), label_smoothing=float(label_smoothing))
    for s in specs:
        if s.check is not None:
            s.check(options)
    return LossConfig(
        specs, weights, beta, float(label_smoothing), f_divergence_type, float(f_alpha_divergence_coef),
        None if ld_alpha is None else float(ld_alpha), bool(use_weighting), options,
    )


def _sequence_logps(token_logps, mask, ld_alpha, token_weights):
    """Sum per-token log-probs over each completion. LD-DPO (Liu et al., 2024,
    arXiv:2409.06411) down-weights by ``ld_alpha`` the tokens of the longer
    response beyond the length of the shorter one of its pair."""
    if token_weights is not None:
        token_logps = token_logps * token_weights
    if ld_alpha is None:
        return (token_logps * mask).sum(-1)
    pos = mask.cumsum(-1)
    lens = mask.sum(-1)
    cw, rj = lens.chunk(2)
    shared = torch.minimum(cw, rj).repeat(2).unsqueeze(-1)
    shared_mask = mask & (pos <= shared)
    tail_mask = mask & (pos > shared)
    return (token_logps * shared_mask).sum(-1) + ld_alpha * (token_logps * tail_mask).sum(-1)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def compute_loss(
    token_logps: torch.Tensor,
    labels: torch.Tensor,
    cfg: LossConfig,
    *,
    ref_token_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    ignore_index: int = -100,
    token_weights: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
) -> DPOOutput:
    """The loss and metrics from per-token log-probs ``[2B, T]`` (shared by every entry point).

    ``pair_weights`` ``[B]`` (no gradient) scale each pair's loss before the mean: the
    per-pair semantic-consistency weight of Sem-DPO, the instance-level weights of
    margin-adaptive DPO (MADPO), or any other per-pair reweighting."""
    mask = labels != ignore_index
    n = token_logps.shape[0] // 2
    has_ref = ref_token_logps is not None or ref_logps is not None
    for s in cfg.losses:
        if s.needs_reference and not has_ref:
            raise ValueError(
                f"fastdpo: loss_type {s.name!r} needs a reference: pass ref_logits (ref_hidden) or ref_logps"
            )
        if s.reference_free and has_ref:
            raise ValueError(f"fastdpo: loss_type {s.name!r} is reference-free: do not pass a reference")

    logps = _sequence_logps(token_logps, mask, cfg.ld_alpha, token_weights)
    if ref_logps is None:
        if ref_token_logps is not None:
            ref = _sequence_logps(ref_token_logps, mask, cfg.ld_alpha, token_weights)
        else:
            ref = torch.zeros_like(logps)
    else:
        ref = ref_logps.to(logps.dtype)
    ref = ref.detach()
    lengths = mask.sum(-1).to(logps.dtype)
    lr = logps - ref
    scores = f_divergence_scores(lr, cfg.f_divergence_type, cfg.f_alpha_divergence_coef)
    cm, rm = mask.chunk(2)
    ctl, rtl = token_logps.chunk(2)
    ps = PairStats(
        *logps.chunk(2), *ref.chunk(2), *scores.chunk(2), *lengths.chunk(2), ctl, rtl, cm, rm,
        has_reference=has_ref, beta=cfg.beta, label_smoothing=cfg.label_smoothing, options=cfg.options,
    )

    weights = None
    if cfg.use_weighting:
        if stats is None:
            raise ValueError("fastdpo: use_weighting needs the per-token log sum p^2 from the fused pass")
        # WPO (Zhou et al., 2024, arXiv:2406.11827, Eq. 2): exp of the mean over the completion of
        # log p(y_t) - log sum_v p_v^2, for chosen times rejected; no gradient.
        with torch.no_grad():
            aligned = ((token_logps - stats[..., 3]) * mask).sum(-1) / lengths.clamp(min=1)
            w = torch.exp(aligned)
            weights = w[:n] * w[n:]

    loss = token_logps.new_zeros(())
    nll = None
    for spec, weight in zip(cfg.losses, cfg.weights):
        per_pair = spec.fn(ps)
        if weights is not None:
            per_pair = per_pair * weights
        if pair_weights is not None:
            per_pair = per_pair * pair_weights.detach().to(per_pair.dtype)
        loss = loss + per_pair.mean() * weight
        if spec.nll and nll is None:
            nll = _rf.chosen_nll(ps).detach()

    chosen_rewards = (cfg.beta * lr[:n]).detach()
    rejected_rewards = (cfg.beta * lr[n:]).detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": logps[:n].detach().mean(),
        "logps/rejected": logps[n:].detach().mean(),
    }
    if stats is not None:
        st = stats.detach()
        metrics["logits/chosen"] = _masked_mean(st[:n, :, 2], cm)
        metrics["logits/rejected"] = _masked_mean(st[n:, :, 2], rm)
        metrics["entropy"] = _masked_mean(st[..., 0], mask)
        metrics["mean_token_accuracy"] = _masked_mean(st[:n, :, 1], cm)
    if nll is not None:
        metrics["nll_loss"] = nll
    return DPOOutput(loss, logps[:n], logps[n:], chosen_rewards, rejected_rewards, metrics)


def _check_pairs(labels: torch.Tensor, ref_logps, token_weights, pair_weights=None):
    if labels.dim() != 2:
        raise ValueError(f"fastdpo: labels must be [2B, T] (chosen rows then rejected rows), got {tuple(labels.shape)}")
    if labels.shape[0] == 0 or labels.shape[0] % 2:
        raise ValueError(
            f"fastdpo: the batch must hold chosen then rejected sequences, so an even number of rows; "
            f"got {labels.shape[0]}"
        )
    if ref_logps is not None:
        _validation.check_float_tensor(ref_logps, "ref_logps")
        if tuple(ref_logps.shape) != (labels.shape[0],):
            raise ValueError(
                f"fastdpo: ref_logps must be [2B] = ({labels.shape[0]},) sequence log-probs in batch order, "
                f"got {tuple(ref_logps.shape)}"
            )
    if pair_weights is not None:
        _validation.check_float_tensor(pair_weights, "pair_weights")
        if tuple(pair_weights.shape) != (labels.shape[0] // 2,):
            raise ValueError(
                f"fastdpo: pair_weights must be [B] = ({labels.shape[0] // 2},), one weight per pair, "
                f"got {tuple(pair_weights.shape)}"
            )
    if token_weights is not None:
        _validation.check_float_tensor(token_weights, "token_weights")
        if token_weights.shape != labels.shape:
            raise ValueError(
                f"fastdpo: token_weights must be shaped like labels {tuple(labels.shape)}, got {tuple(token_weights.shape)}"
            )


def dpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_logits: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    loss_type: str | Sequence[str] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_weights: Sequence[float] | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    discopop_tau: float = 0.05,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    token_weights: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
    inplace_backward: bool = False,
    backend: str = "auto",
    **variant_options,
) -> DPOOutput:
    """DPO-family loss from policy logits ``[2B, T, V]`` (chosen rows, then rejected rows).

    ``ref_logits`` (same shape, no gradient) are folded into the same kernel pass;
    ``ref_logps`` (``[2B]``) are precomputed sequence log-probs. ``loss_type`` is a
    registered objective or a list of them, combined with ``loss_weights``. See
    :mod:`fastdpo.losses.dpo` and :mod:`fastdpo.losses.reference_free` for the formulas.
    ``token_weights`` (shaped like labels) weight each token inside the sequence sums;
    ``pair_weights`` (``[B]``) weight each pair's loss.
    """
    cfg = make_config(
        loss_type, beta, label_smoothing, loss_weights, f_divergence_type, f_alpha_divergence_coef, ld_alpha,
        use_weighting, discopop_tau, **variant_options,
    )
    _validation.check_tensor(labels, "labels")
    _check_pairs(labels, ref_logps, token_weights, pair_weights)
    if ref_logits is not None and ref_logps is not None:
        raise ValueError("fastdpo: pass either ref_logits or ref_logps, not both")
    out = fused_logprobs(
        logits, labels, ref_logits=ref_logits, ignore_index=ignore_index, temperature=temperature,
        softcap=softcap, stats=True, inplace_backward=inplace_backward, backend=backend,
    )
    return compute_loss(
        out.logps, labels, cfg, ref_token_logps=out.ref_logps, ref_logps=ref_logps, stats=out.stats,
        ignore_index=ignore_index, token_weights=token_weights, pair_weights=pair_weights,
    )


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
    logit_scale: float = 1.0,
    **loss_options,
) -> DPOOutput:
    """:func:`dpo_loss` from hidden states ``[2B, T, H]`` and the LM-head ``weight [V, H]``.

    The logits ``hidden @ weight.T (+ bias)`` (times ``logit_scale``) are formed
    here and the policy gradient is written into their own storage, so the only
    ``[N, V]`` buffer is the logits themselves. ``ref_weight`` defaults to
    ``weight`` (a reference sharing the LM head, e.g. a PEFT base model).
    """
    _validation.check_float_tensor(hidden, "hidden")
    _validation.check_float_tensor(weight, "weight")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"fastdpo: weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    logits = F.linear(hidden, weight, bias)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    ref_logits = None
    if ref_hidden is not None:
        _validation.check_same_shape(hidden, ref_hidden, "hidden", "ref_hidden")
        rw = weight if ref_weight is None else ref_weight
        with torch.no_grad():
            ref_logits = F.linear(ref_hidden, rw, ref_bias)
            if logit_scale != 1.0:
                ref_logits = ref_logits * logit_scale
    elif ref_weight is not None or ref_bias is not None:
        raise ValueError("fastdpo: ref_weight/ref_bias were given without ref_hidden")
    inplace = logits.requires_grad and not logits.is_leaf
    return dpo_loss(logits, labels, ref_logits=ref_logits, ref_logps=ref_logps, inplace_backward=inplace,
                    **loss_options)


class DPOLoss(torch.nn.Module):
    """Module form of :func:`dpo_loss`; options are validated once at construction.

    ``DPOLoss(loss_type="sigmoid", beta=0.1)(logits, labels, ref_logits=...)``.
    """

    def __init__(self, loss_type="sigmoid", *, ignore_index=-100, temperature=1.0, softcap=None, backend="auto",
                 **options):
        super().__init__()
        make_config(loss_type, **options)  # fail early on bad options
        self.kw = dict(loss_type=loss_type, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                       backend=backend, **options)

    def forward(self, logits, labels, *, ref_logits=None, ref_logps=None, token_weights=None,
                pair_weights=None) -> DPOOutput:
        return dpo_loss(logits, labels, ref_logits=ref_logits, ref_logps=ref_logps, token_weights=token_weights,
                        pair_weights=pair_weights, **self.kw)


class LinearDPOLoss(DPOLoss):
    """Module form of :func:`linear_dpo_loss`."""

    def forward(self, hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                ref_logps=None, token_weights=None) -> DPOOutput:
        return linear_dpo_loss(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                               ref_bias=ref_bias, ref_logps=ref_logps, token_weights=token_weights, **self.kw)
