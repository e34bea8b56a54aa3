"""Reference-free objectives with length normalisation or an NLL term (TRL's CPO
and ORPO trainers): SimPO, CPO, AlphaPO, ORPO. ``avg_w = log pi(y_w) / |y_w|``.
Options (``**variant_options``): ``simpo_gamma``, ``cpo_alpha``, ``alpha``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdpo.losses.registry import PairStats, register_loss


def chosen_nll(s: PairStats) -> torch.Tensor:
    """Mean negative log-likelihood over all chosen completion tokens of the batch."""
    return -(s.chosen_token_logps * s.chosen_mask).sum() / s.chosen_mask.sum().clamp(min=1)


def _avg(s: PairStats) -> tuple[torch.Tensor, torch.Tensor]:
    return s.chosen_logps / s.chosen_lengths.clamp(min=1), s.rejected_logps / s.rejected_lengths.clamp(min=1)


def _smoothed(h: torch.Tensor, eps: float) -> torch.Tensor:
    return -F.logsigmoid(h) * (1 - eps) - F.logsigmoid(-h) * eps


@register_loss("simpo", reference_free=True)
def simpo(s: PairStats) -> torch.Tensor:
    """SimPO (Meng et al., 2024, arXiv:2405.14734, Eq. 6):
    ``-log sigma(beta (avg_w - avg_l) - gamma)``, gamma = ``simpo_gamma`` (default 0.5)."""
    w, l_ = _avg(s)
    return _smoothed(s.beta * (w - l_) - s.option("simpo_gamma", 0.5), s.label_smoothing)


@register_loss("cpo", reference_free=True, nll=True)
def cpo(s: PairStats) -> torch.Tensor:
    """CPO (Xu et al., 2024, arXiv:2401.08417, Eq. 3 + NLL):
    ``-log sigma(beta (log pi(y_w) - log pi(y_l))) + cpo_alpha * NLL(y_w)`` (cpo_alpha default 1)."""
    pref = _smoothed(s.beta * (s.chosen_logps - s.rejected_logps), s.label_smoothing)
    return pref + s.option("cpo_alpha", 1.0) * chosen_nll(s)


@register_loss("alphapo", reference_free=True)
def alphapo(s: PairStats) -> torch.Tensor:
    """AlphaPO (Gupta et al., 2025, arXiv:2501.03884): SimPO with the reward
    ``r = (1 - p^-alpha) / alpha`` of the length-normalised probability ``p = exp(avg)``:
    ``-log sigma(beta (r_w - r_l) - gamma)`` (alpha default 0.25; alpha -> 0 is SimPO)."""
    alpha = s.option("alpha", 0.25)
    w, l_ = _avg(s)
    if abs(alpha) < 1e-12:
        rw, rl = w, l_
    else:
        rw, rl = (1 - torch.exp(-alpha * w)) / alpha, (1 - torch.exp(-alpha * l_)) / alpha
    return _smoothed(s.beta * (rw - rl) - s.option("simpo_gamma", 0.5), s.label_smoothing)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x <= 0, accurate at both ends (Maechler, 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@register_loss("orpo", reference_free=True, nll=True)
def orpo(s: PairStats) -> torch.Tensor:
    """ORPO (Hong et al., 2024, arXiv:2403.07691, Eq. 6-7):
    ``NLL(y_w) - beta log sigma(log odds(y_w) - log odds(y_l))`` with
    ``log odds(y) = avg - log(1 - exp(avg))``."""
    w, l_ = _avg(s)
    log_odds = (w - l_) - (log1mexp(w) - log1mexp(l_))
    return chosen_nll(s) - s.beta * F.logsigmoid(log_odds)
