r"""Reference-free objectives with an optional NLL term: CPO, SimPO, AlphaPO, ORPO.

:math:`\ell` is a sequence log-prob (summed, or length-normalised :math:`\bar\ell = \ell/|y|`),
:math:`\mathrm{NLL}` the token-mean cross-entropy over the chosen responses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdpo.losses.registry import register_loss, smoothed_sigmoid_loss


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x <= 0, accurate near 0 and near -inf (Maechler 2012)."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _cpo_rewards(s, cfg):
    """AlphaPO transform :math:`r = (1 - p^{-\\alpha})/\\alpha = -\\mathrm{expm1}(-\\alpha\\ell)/\\alpha` (``\\ell`` when alpha = 0)."""
    ell = s.mean_logps if cfg.length_normalize else s.logps
    if cfg.alpha != 0:
        ell = -torch.expm1(-cfg.alpha * ell) / cfg.alpha
    return s.block(ell, 0), s.block(ell, 1)


CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def _check_cpo(cfg):
    if cfg.cpo_loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"fastdpo: unknown cpo_loss_type {cfg.cpo_loss_type!r}; expected one of {CPO_LOSS_TYPES}")
    if cfg.cpo_loss_type != "sigmoid" and (cfg.simpo_gamma != 0 or cfg.label_smoothing != 0):
        raise ValueError(f"fastdpo: cpo_loss_type={cfg.cpo_loss_type!r} uses neither simpo_gamma nor label_smoothing "
                         f"(got {cfg.simpo_gamma} and {cfg.label_smoothing}); set them to 0")


def _cpo_family(s, cfg):
    r"""CPO / SimPO / AlphaPO: with rewards :math:`r_w, r_l` (:func:`_cpo_rewards`) and :math:`d = r_w - r_l`,
    ``cpo_loss_type`` (TRL's CPOTrainer ``loss_type``) ``"sigmoid"``:
    :math:`-(1-\varepsilon)\log\sigma(z) - \varepsilon\log\sigma(-z)` with :math:`z = \beta d - \gamma`;
    ``"hinge"`` (SLiC, Zhao et al. 2023, arXiv:2305.10425): :math:`\max(0, 1 - \beta d)`;
    ``"ipo"`` (Azar et al. 2023, arXiv:2310.12036, Eq. 17): :math:`(d - 1/(2\beta))^2`;
    plus :math:`\lambda\,\mathrm{NLL}` (``cpo_alpha`` = :math:`\lambda`)."""
    rw, rl = _cpo_rewards(s, cfg)
    kind = getattr(cfg, "cpo_loss_type", "sigmoid")
    if kind == "hinge":
        loss = torch.relu(1 - cfg.beta * (rw - rl))
    elif kind == "ipo":
        loss = ((rw - rl) - 1 / (2 * cfg.beta)) ** 2
    else:
        loss = smoothed_sigmoid_loss(cfg.beta * (rw - rl) - cfg.simpo_gamma, cfg.label_smoothing)
    if cfg.cpo_alpha != 0:
        nll = s.nll(0)
        s.metrics["nll_loss"] = nll
        loss = loss + cfg.cpo_alpha * nll
    elif cfg.log_nll:
        s.metrics["nll_loss"] = s.nll(0)
    return loss


def _rewards(s, cfg):
    rw, rl = _cpo_rewards(s, cfg)
    return cfg.beta * rw, cfg.beta * rl


_DOC = _cpo_family.__doc__


@register_loss("cpo", reference="unused", rewards=_rewards, validate=_check_cpo,
               defaults={"cpo_alpha": 1.0, "alpha": 0.0, "simpo_gamma": 0.0, "length_normalize": False, "log_nll": True,
                         "cpo_loss_type": "sigmoid"})
def cpo(s, cfg):
    return _cpo_family(s, cfg)


cpo.__doc__ = "CPO (Xu et al. 2024, arXiv:2401.08417): summed log-probs, NLL weight ``cpo_alpha`` (default 1).\n" + _DOC


@register_loss("simpo", reference="unused", rewards=_rewards,
               defaults={"simpo_gamma": 0.5, "cpo_alpha": 0.0, "alpha": 0.0, "length_normalize": True, "log_nll": False})
def simpo(s, cfg):
    return _cpo_family(s, cfg)


simpo.__doc__ = (
    "SimPO (Meng et al. 2024, arXiv:2405.14734): length-normalised log-probs, margin ``simpo_gamma``"
    " (TRL's CPO ``loss_type='simpo'``; add ``cpo_alpha`` for CPO-SimPO).\n" + _DOC
)


@register_loss("alphapo", reference="unused", rewards=_rewards,
               defaults={"alpha": 0.25, "simpo_gamma": 0.5, "cpo_alpha": 0.0, "length_normalize": True, "log_nll": False})
def alphapo(s, cfg):
    return _cpo_family(s, cfg)


alphapo.__doc__ = (
    "AlphaPO (Gupta et al. 2025, arXiv:2501.03884): SimPO with the reward shape "
    r":math:`r = (1 - \bar p^{-\alpha})/\alpha` (TRL's CPO ``alpha``).""\n" + _DOC
)


def _orpo_rewards(s, cfg):
    return cfg.beta * s.block(s.mean_logps, 0), cfg.beta * s.block(s.mean_logps, 1)


@register_loss("orpo", reference="unused", rewards=_orpo_rewards)
def orpo(s, cfg):
    r"""ORPO (Hong et al. 2024, arXiv:2403.07691, Eqs. 4-7), on length-normalised log-probs :math:`\bar\ell`:
    :math:`\log\mathrm{odds} = \bar\ell - \log(1 - e^{\bar\ell})` (safe ``log1mexp``),
    loss :math:`\mathrm{NLL} - \beta\log\sigma(\log\mathrm{odds}_w - \log\mathrm{odds}_l)`.
    Logs ``nll_loss``, ``log_odds_ratio`` and ``log_odds_chosen`` as TRL does."""
    lw, ll = s.block(s.mean_logps, 0), s.block(s.mean_logps, 1)
    log_odds = (lw - ll) - (log1mexp(lw) - log1mexp(ll))
    ratio = F.logsigmoid(log_odds)
    nll = s.nll(0)
    s.metrics.update({"nll_loss": nll, "log_odds_ratio": ratio.detach().mean(), "log_odds_chosen": log_odds.detach().mean()})
    return nll - cfg.beta * ratio
