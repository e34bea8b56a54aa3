r"""Objectives from the literature beyond TRL's DPOTrainer, all as functions of sequence statistics.

Per-pair weights (Sem-DPO, Mohamed et al. 2025, arXiv:2507.20133) are the ``pair_weights=`` option of
every loss, and per-token weights inside the sequence sums the ``token_weights=`` option; neither needs
an objective of its own. Notation as in :mod:`fastdpo.losses.dpo`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdpo.losses import dpo
from fastdpo.losses.reference_free import log1mexp
from fastdpo.losses.registry import register_loss, smoothed_sigmoid_loss

# rDPO (Chowdhury et al. 2024) is TRL's "robust"; the paper's name is an alias of the same function.
register_loss("rdpo", f_divergence=True, validate=dpo._check_robust)(dpo.robust)


def _check_ties(cfg):
    if cfg.tie_model not in ("rao_kupper", "davidson"):
        raise ValueError(f"fastdpo: tie_model must be 'rao_kupper' or 'davidson', got {cfg.tie_model!r}")
    lo = 1.0 if cfg.tie_model == "rao_kupper" else 0.0
    if not cfg.tie_nu > lo:
        raise ValueError(f"fastdpo: tie_nu must be > {lo} for tie_model={cfg.tie_model!r}, got {cfg.tie_nu}")


@register_loss("dpo_ties", f_divergence=True, validate=_check_ties,
               defaults={"ties": None, "tie_model": "rao_kupper", "tie_nu": 2.0})
def dpo_ties(s, cfg):
    r"""DPO with ties (Chen et al. 2024, arXiv:2409.17431), :math:`d = \beta\Delta`, ``ties``: bool per pair.

    Rao-Kupper (:math:`\nu > 1`, :math:`\alpha = \log\nu`): :math:`P_{win} = \sigma(d - \alpha)`,
    :math:`P_{tie} = (\nu^2 - 1)\sigma(d - \alpha)\sigma(-d - \alpha)`.
    Davidson (:math:`\nu > 0`): :math:`P_{win} = 1/(1 + e^{-d} + \nu e^{-d/2})`,
    :math:`P_{tie} = \nu e^{-d/2}/(1 + e^{-d} + \nu e^{-d/2})`.
    Loss :math:`-\log P_{tie}` on tied pairs, :math:`-\log P_{win}` otherwise.
    """
    d = cfg.beta * (s.chosen_scores - s.rejected_scores)
    nu = cfg.tie_nu
    if cfg.tie_model == "rao_kupper":
        a = math.log(nu)
        log_win = F.logsigmoid(d - a)
        log_tie = math.log(nu * nu - 1) + log_win + F.logsigmoid(-d - a)
    else:
        log_den = torch.logsumexp(torch.stack([torch.zeros_like(d), -d, math.log(nu) - d / 2]), dim=0)
        log_win = -log_den
        log_tie = math.log(nu) - d / 2 - log_den
    if cfg.ties is None:
        return -log_win
    return -torch.where(cfg.ties.to(torch.bool), log_tie, log_win)


@register_loss("margin_dpo", f_divergence=True, defaults={"margin": 0.0})
def margin_dpo(s, cfg):
    r"""Margin-adaptive DPO: :math:`-\log\sigma(\beta_i\Delta_i - m_i)` with per-pair (tensor) or global
    ``beta`` and ``margin`` (ODPO, Amini et al. 2024, arXiv:2402.10571; beta-DPO, Wu et al. 2024,
    arXiv:2407.08639, with the per-pair beta computed by the caller)."""
    return -F.logsigmoid(cfg.beta * (s.chosen_scores - s.rejected_scores) - cfg.margin)


def _asft_rewards(s, cfg):
    return cfg.beta * s.block(s.mean_logps, 0), cfg.beta * s.block(s.mean_logps, 1)


@register_loss("asft", reference="unused", rewards=_asft_rewards, defaults={"asft_lambda": 1.0})
def asft(s, cfg):
    r"""ASFT (Wang et al. 2024, arXiv:2409.10571): absolute-likelihood alignment without a reference,
    with :math:`f = \log\frac{\bar p}{1 - \bar p}` of the length-normalised probability :math:`\bar p`:
    :math:`\mathrm{NLL} + \lambda\beta'[-\log\sigma(f_w) - \log\sigma(-f_l)]` where :math:`\beta'` = ``beta``
    scales the alignment term and :math:`\lambda` = ``asft_lambda``."""
    lw, ll = s.block(s.mean_logps, 0), s.block(s.mean_logps, 1)
    fw, fl = lw - log1mexp(lw), ll - log1mexp(ll)
    nll = s.nll(0)
    s.metrics["nll_loss"] = nll
    return nll + cfg.asft_lambda * cfg.beta * (-F.logsigmoid(fw) - F.logsigmoid(-fl))


def _check_tpo(cfg):
    if cfg.tpo_variant not in ("sigmoid", "hinge", "ipo", "tpo-l"):
        raise ValueError(f"fastdpo: tpo_variant must be 'sigmoid', 'hinge', 'ipo' or 'tpo-l', got {cfg.tpo_variant!r}")


def _tpo_logps(s, cfg):
    return s.mean_logps if cfg.tpo_variant in ("ipo", "tpo-l") else s.logps


def _tpo_rewards(s, cfg):
    ell = _tpo_logps(s, cfg)
    return cfg.beta * s.block(ell, 0), cfg.beta * s.block(ell, 1)


@register_loss("tpo", reference="unused", rewards=_tpo_rewards, validate=_check_tpo,
               num_blocks=lambda cfg: 3 if cfg.tpo_alpha != 0 else 2,
               defaults={"tpo_alpha": 1.0, "tpo_variant": "sigmoid", "tpo_l_gamma": 0.5})
def tpo(s, cfg):
    r"""TPO (Saeidi et al. 2024, arXiv:2405.16681), as TRL's TPO trainer; batch ``[chosen; rejected; gold]``
    (``[chosen; rejected]`` when ``tpo_alpha = 0``). :math:`\delta = \ell_w - \ell_l` (length-normalised for the
    ipo / tpo-l variants); sigmoid: :math:`-(1-\varepsilon)\log\sigma(\beta\delta) - \varepsilon\log\sigma(-\beta\delta)`;
    hinge: :math:`\max(0, 1 - \beta\delta)`; ipo: :math:`(\delta - 1/(2\beta))^2`; tpo-l: sigmoid of
    :math:`\beta\delta - \gamma`; plus :math:`\alpha\,\mathrm{NLL}(\text{gold})`."""
    ell = _tpo_logps(s, cfg)
    delta = s.block(ell, 0) - s.block(ell, 1)
    v = cfg.tpo_variant
    if v == "hinge":
        loss = torch.relu(1 - cfg.beta * delta)
    elif v == "ipo":
        loss = (delta - 1 / (2 * cfg.beta)) ** 2
    else:
        loss = smoothed_sigmoid_loss(cfg.beta * delta - (cfg.tpo_l_gamma if v == "tpo-l" else 0.0), cfg.label_smoothing)
    if cfg.tpo_alpha != 0:
        nll = s.nll(2)
        s.metrics["nll_loss"] = nll
        loss = loss + cfg.tpo_alpha * nll
    return loss


def _num_responses(cfg):
    k = cfg.num_responses
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"fastdpo: num_responses (K, the responses per prompt) must be an int >= 2, got {k!r}")
    return k


@register_loss("plackett_luce", num_blocks=_num_responses, defaults={"num_responses": 2})
def plackett_luce(s, cfg):
    r"""Listwise DPO under a Plackett-Luce ranking model (Rafailov et al. 2023, App. A.3; LiPO, Liu et al. 2024,
    arXiv:2402.01878): batch ``[rank 1; ...; rank K]``, :math:`r_k = \beta\rho_k`,
    :math:`-\sum_{k=1}^{K-1}\big(r_k - \log\sum_{j \ge k} e^{r_j}\big)`. K = 2 is DPO."""
    r = cfg.beta * s.blocks(s.logratios) if not isinstance(cfg.beta, torch.Tensor) else cfg.beta.unsqueeze(-1) * s.blocks(s.logratios)
    # log sum_{j >= k} exp(r_j): reverse cumulative logsumexp
    tail = torch.logcumsumexp(r.flip(-1), dim=-1).flip(-1)
    return -(r - tail)[:, :-1].sum(-1)


@register_loss("adpo", num_blocks=_num_responses, defaults={"num_responses": 2, "targets": None})
def adpo(s, cfg):
    r"""Anchored listwise softmax (ADPO): over the K responses of a prompt, scores anchored to the reference
    :math:`r_k = \beta\rho_k`; cross-entropy :math:`-\sum_k q_k\log\mathrm{softmax}(r)_k` to the target
    distribution ``targets`` ``[B, K]`` (default: all mass on block 0, the best response)."""
    r = cfg.beta * s.blocks(s.logratios) if not isinstance(cfg.beta, torch.Tensor) else cfg.beta.unsqueeze(-1) * s.blocks(s.logratios)
    logp = torch.log_softmax(r, dim=-1)
    if cfg.targets is None:
        return -logp[:, 0]
    q = cfg.targets.to(logp.dtype)
    if q.shape != logp.shape:
        raise ValueError(f"fastdpo: adpo targets must have shape {tuple(logp.shape)} ([pairs, K]), got {tuple(q.shape)}")
    return -(q * logp).sum(-1)


def _check_rrpo(cfg):
    if not cfg.rrpo_alpha >= 0:
        raise ValueError(f"fastdpo: rrpo_alpha (the token-level KL weight) must be >= 0, got {cfg.rrpo_alpha}")


@register_loss("rrpo", reference="required", token_kl=True, validate=_check_rrpo, defaults={"rrpo_alpha": 0.01})
def rrpo(s, cfg):
    r"""RRPO, Refined Regularized Preference Optimization (Sarkar & Etemad 2025, arXiv:2504.12083):

    .. math::
        -\log\sigma\Big(\beta \sum_i (u^+_i - u^-_i)\Big)
        + \alpha \sum_t D_{KL}\big(\pi_{ref}(\cdot|x, y^+_{<t}) \,\|\, \pi_\theta(\cdot|x, y^+_{<t})\big)

    :math:`u^\pm_i` are the log-ratios :math:`\log\pi_\theta - \log\pi_{ref}` of the i-th refined
    sub-sequence (the phrases where the preferred and non-preferred responses differ): pass a
    0/1 phrase mask as ``token_weights`` so the sequence log-ratios sum only those tokens
    (without it every response token counts). The KL runs over every response token of the
    preferred response and the whole vocabulary, computed by the kernels in the same pass as the
    log-probs (needs ``ref_logits`` / ``ref_hidden``). :math:`\alpha` = ``rrpo_alpha`` (0.01 as
    in the paper's training scripts), :math:`\beta` = ``beta``. Logs ``kl/chosen`` and
    ``kl/rejected`` (mean per-sequence KL sums).
    """
    return -F.logsigmoid(cfg.beta * (s.chosen_logratios - s.rejected_logratios)) + cfg.rrpo_alpha * s.chosen_kl


def _check_tdpo(cfg):
    if cfg.tdpo_variant not in ("tdpo1", "tdpo2"):
        raise ValueError(f"fastdpo: tdpo_variant must be 'tdpo1' or 'tdpo2', got {cfg.tdpo_variant!r}")


def _tdpo_rewards(s, cfg):
    return cfg.beta * (s.chosen_logratios + s.chosen_kl), cfg.beta * (s.rejected_logratios + s.rejected_kl)


@register_loss("tdpo", reference="required", token_kl=True, validate=_check_tdpo, rewards=_tdpo_rewards,
               defaults={"tdpo_alpha": 0.5, "tdpo_variant": "tdpo2"})
def tdpo(s, cfg):
    r"""TDPO, Token-level Direct Preference Optimization (Zeng et al. 2024, arXiv:2404.11999), with the
    sequential KL :math:`D_w, D_l = \sum_t D_{KL}(\pi_{ref}(\cdot|x, y_{<t}) \| \pi_\theta(\cdot|x, y_{<t}))`
    of the chosen / rejected response from the kernels' pass and :math:`u = \log\pi_\theta - \log\pi_{ref}`:

    * ``tdpo1``: :math:`-\log\sigma(\beta(u_w - u_l) - \beta(D_l - D_w))`
    * ``tdpo2`` (default): :math:`-\log\sigma(\beta(u_w - u_l) - \alpha\beta(D_l - \mathrm{sg}(D_w)))`,
      :math:`\alpha` = ``tdpo_alpha`` (0.5 as in the paper's configuration), sg = stop-gradient.

    Rewards as logged by the paper's code: :math:`\beta(u + D)`. Logs ``kl/chosen`` and ``kl/rejected``.
    """
    margin = s.chosen_logratios - s.rejected_logratios
    if cfg.tdpo_variant == "tdpo1":
        return -F.logsigmoid(cfg.beta * (margin - (s.rejected_kl - s.chosen_kl)))
    return -F.logsigmoid(cfg.beta * (margin - cfg.tdpo_alpha * (s.rejected_kl - s.chosen_kl.detach())))
