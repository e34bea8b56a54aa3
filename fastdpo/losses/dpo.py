"""The DPO-family objectives of TRL's ``DPOTrainer`` (``loss_type`` values), same
names and formulas as TRL 1.16. Notation: ``h = beta * (score_w - score_l)``
with scores the (f-divergence-mapped) policy/reference log-ratios,
``r_w = log pi(y_w) - log ref(y_w)`` and ``r_l`` likewise, ``eps`` =
``label_smoothing``, ``sigma`` the logistic function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdpo.losses.registry import PairStats, register_loss


def _eps_in(lo: float, hi: float, lo_open: bool, what: str):
    def check(opts):
        eps = opts["label_smoothing"]
        ok = (lo < eps if lo_open else lo <= eps) and eps < hi
        if not ok:
            bracket = "(" if lo_open else "["
            raise ValueError(f"fastdpo: {what} needs label_smoothing in {bracket}{lo}, {hi}), got {eps}")

    return check


@register_loss("sigmoid", f_divergence=True)
def sigmoid(s: PairStats) -> torch.Tensor:
    """DPO (Rafailov et al., 2023, arXiv:2305.18290): ``-log sigma(h)``.

    With ``label_smoothing = eps > 0`` (opt-in, as older trainers did) it is
    conservative DPO (cDPO, Mitchell 2023): ``-(1-eps) log sigma(h) - eps log sigma(-h)``.
    """
    h = s.beta * s.delta_score
    if s.label_smoothing:
        return -(1 - s.label_smoothing) * F.logsigmoid(h) - s.label_smoothing * F.logsigmoid(-h)
    return -F.logsigmoid(h)


@register_loss("hinge", f_divergence=True)
def hinge(s: PairStats) -> torch.Tensor:
    """SLiC-HF hinge (Zhao et al., 2023, arXiv:2305.10425): ``relu(1 - h)``."""
    return torch.relu(1 - s.beta * s.delta_score)


@register_loss("ipo", f_divergence=True)
def ipo(s: PairStats) -> torch.Tensor:
    """IPO (Azar et al., 2023, arXiv:2310.12036, Eq. 17), length-normalised as in TRL:
    ``(score_w / |y_w| - score_l / |y_l| - 1 / (2 beta))^2``."""
    delta = s.chosen_scores / s.chosen_lengths.clamp(min=1) - s.rejected_scores / s.rejected_lengths.clamp(min=1)
    return (delta - 1 / (2 * s.beta)) ** 2


@register_loss("exo_pair", f_divergence=True, check=_eps_in(0.0, 1.0, True, "exo_pair"))
def exo_pair(s: PairStats) -> torch.Tensor:
    """EXO-pref (Ji et al., 2024, arXiv:2402.00856, Eq. 16):
    ``sigma(h)(log sigma(h) - log(1-eps)) + sigma(-h)(log sigma(-h) - log eps)``, eps > 0."""
    h = s.beta * s.delta_score
    eps = torch.tensor(s.label_smoothing, dtype=h.dtype, device=h.device)
    return torch.sigmoid(h) * (F.logsigmoid(h) - torch.log1p(-eps)) + torch.sigmoid(-h) * (
        F.logsigmoid(-h) - torch.log(eps)
    )


@register_loss("nca_pair", needs_reference=True)
def nca_pair(s: PairStats) -> torch.Tensor:
    """NCA (Chen et al., 2024, arXiv:2402.05369):
    ``-log sigma(beta r_w) - 0.5 log sigma(-beta r_w) - 0.5 log sigma(-beta r_l)``."""
    cw, cl = s.beta * s.chosen_logratios, s.beta * s.rejected_logratios
    return -F.logsigmoid(cw) - 0.5 * F.logsigmoid(-cw) - 0.5 * F.logsigmoid(-cl)


@register_loss("robust", f_divergence=True, check=_eps_in(0.0, 0.5, False, "robust"))
def robust(s: PairStats) -> torch.Tensor:
    """Robust DPO (Chowdhury et al., 2024, arXiv:2403.00409) for labels flipped with
    probability eps < 0.5: ``(-(1-eps) log sigma(h) + eps log sigma(-h)) / (1 - 2 eps)``."""
    h = s.beta * s.delta_score
    eps = s.label_smoothing
    return (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)


@register_loss("bco_pair", needs_reference=True)
def bco_pair(s: PairStats) -> torch.Tensor:
    """Paired BCO (Jung et al., 2024, arXiv:2404.04656) as in TRL:
    ``-log sigma(beta r_w) - log sigma(-beta r_l)``."""
    return -F.logsigmoid(s.beta * s.chosen_logratios) - F.logsigmoid(-s.beta * s.rejected_logratios)


@register_loss("sppo_hard", needs_reference=True)
def sppo_hard(s: PairStats) -> torch.Tensor:
    """SPPO with hard win probabilities (Wu et al., 2024, arXiv:2405.00675, Eq. 4.7):
    ``(r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2``."""
    return (s.chosen_logratios - 0.5 / s.beta) ** 2 + (s.rejected_logratios + 0.5 / s.beta) ** 2


def _smoothed_logistic(delta: torch.Tensor, s: PairStats) -> torch.Tensor:
    return -F.logsigmoid(s.beta * delta) * (1 - s.label_smoothing) - F.logsigmoid(-s.beta * delta) * s.label_smoothing


@register_loss("aot", needs_reference=True)
def aot(s: PairStats) -> torch.Tensor:
    """AOT, paired (Melnyk et al., 2024, arXiv:2406.05882): the sorted policy log-ratio
    margins minus the sorted reference margins through the (smoothed) logistic loss."""
    pol = torch.sort(s.chosen_logps - s.rejected_logps, dim=0).values
    ref = torch.sort(s.ref_chosen_logps - s.ref_rejected_logps, dim=0).values
    return _smoothed_logistic(pol - ref, s)


@register_loss("aot_unpaired", needs_reference=True)
def aot_unpaired(s: PairStats) -> torch.Tensor:
    """AOT, unpaired (Melnyk et al., 2024): sorted chosen log-ratios minus sorted rejected ones."""
    w = torch.sort(s.chosen_logratios, dim=0).values
    l_ = torch.sort(s.rejected_logratios, dim=0).values
    return _smoothed_logistic(w - l_, s)


@register_loss("apo_zero", needs_reference=True)
def apo_zero(s: PairStats) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al., 2024, arXiv:2408.06266, Eq. 7):
    ``1 - sigma(beta r_w) + sigma(beta r_l)``."""
    return 1 - torch.sigmoid(s.beta * s.chosen_logratios) + torch.sigmoid(s.beta * s.rejected_logratios)


@register_loss("apo_down", needs_reference=True)
def apo_down(s: PairStats) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al., 2024, Eq. 8):
    ``sigma(beta r_w) + 1 - sigma(beta (r_w - r_l))``."""
    return torch.sigmoid(s.beta * s.chosen_logratios) + 1 - torch.sigmoid(
        s.beta * (s.chosen_logratios - s.rejected_logratios)
    )


@register_loss("discopop", f_divergence=True)
def discopop(s: PairStats) -> torch.Tensor:
    """DiscoPOP / log-ratio modulated loss (Chan Lu et al., 2024, arXiv:2406.08414, Eq. 5):
    ``m = sigma(h / tau)``, ``(1 - m)(-log sigma(h)) + m exp(-h)``."""
    h = s.beta * s.delta_score
    m = torch.sigmoid(h / s.option("discopop_tau", 0.05))
    return -F.logsigmoid(h) * (1 - m) + torch.exp(-h) * m


@register_loss("sft", f_divergence=True, nll=True)
def sft(s: PairStats) -> torch.Tensor:
    """Supervised fine-tuning on the chosen responses: the mean NLL over all chosen
    completion tokens of the batch, repeated per pair (its mean is that value)."""
    nll = -(s.chosen_token_logps * s.chosen_mask).sum() / s.chosen_mask.sum().clamp(min=1)
    return nll.expand(s.chosen_logps.shape[0])


@register_loss("sigmoid_norm", f_divergence=True)
def sigmoid_norm(s: PairStats) -> torch.Tensor:
    """Length-normalised DPO (as TRL's ``sigmoid_norm``):
    ``-log sigma(beta (score_w / |y_w| - score_l / |y_l|))``."""
    delta = s.chosen_scores / s.chosen_lengths.clamp(min=1) - s.rejected_scores / s.rejected_lengths.clamp(min=1)
    return -F.logsigmoid(s.beta * delta)


TRL_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)


def f_divergence_scores(logratios: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    r"""Map log-ratios ``log t`` to ``f'(t)`` of the f-divergence (Wang et al., 2023,
    "Beyond Reverse KL", arXiv:2309.16240), as TRL does:

    reverse_kl: ``log t``; forward_kl: ``1 - 1/t``; js_divergence: ``log 2 + log sigma(log t)``;
    alpha_divergence: ``(t^(alpha-1) - 1) / (alpha - 1)`` with the exponent clamped so
    ``exp`` stays finite in the working dtype (reverse KL at alpha = 1).
    """
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        t = (alpha - 1.0) * logratios
        clamp_max = {torch.float16: 11.0}.get(t.dtype, 80.0)
        return (torch.exp(torch.clamp(t.float(), max=clamp_max)) - 1.0).to(t.dtype) / (alpha - 1.0)
    raise ValueError(
        f"fastdpo: unknown f_divergence_type {kind!r}; expected reverse_kl, forward_kl, js_divergence or "
        "alpha_divergence"
    )
