r"""The DPOTrainer loss types, with TRL's names, formulas and defaults.

Notation: :math:`\rho_w, \rho_l` are the chosen / rejected log-ratios
:math:`\log\pi_\theta(y|x) - \log\pi_{ref}(y|x)` (the policy log-prob when reference-free),
:math:`s_w, s_l` their f-divergence scores (:func:`f_divergence_scores`; equal to
:math:`\rho` for reverse KL), :math:`\Delta = s_w - s_l`, :math:`\varepsilon` the
``label_smoothing``, :math:`|y|` the number of response tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdpo.losses.registry import register_loss, smoothed_sigmoid_loss


def _delta(s):
    return s.chosen_scores - s.rejected_scores


def _check_robust(cfg):
    if not (0.0 <= cfg.label_smoothing < 0.5):
        raise ValueError(
            f"fastdpo: loss_type='robust' needs label_smoothing (the label flip rate) in [0, 0.5), got {cfg.label_smoothing}"
        )


def _check_exo(cfg):
    if not (0.0 < cfg.label_smoothing < 1.0):
        raise ValueError(
            f"fastdpo: loss_type='exo_pair' needs label_smoothing (epsilon) in (0, 1), got {cfg.label_smoothing}; "
            "the EXO paper recommends 1e-3"
        )


def _check_cdpo(cfg):
    if cfg.cdpo and not (0.0 <= cfg.label_smoothing <= 0.5):
        raise ValueError(f"fastdpo: cDPO label_smoothing must be >= 0 and <= 0.5, got {cfg.label_smoothing}")


@register_loss("sigmoid", f_divergence=True, defaults={"cdpo": False}, validate=_check_cdpo)
def sigmoid(s, cfg):
    r"""DPO (Rafailov et al. 2023, arXiv:2305.18290): :math:`-\log\sigma(\beta\Delta)`.

    With ``cdpo=True``, conservative DPO (Mitchell 2023, "A note on DPO with noisy
    preferences"): :math:`-(1-\varepsilon)\log\sigma(\beta\Delta) - \varepsilon\log\sigma(-\beta\Delta)`.
    (TRL's sigmoid ignores ``label_smoothing``; cDPO is therefore opt-in.)
    """
    return smoothed_sigmoid_loss(cfg.beta * _delta(s), cfg.label_smoothing if cfg.cdpo else 0.0)


@register_loss("hinge", f_divergence=True)
def hinge(s, cfg):
    r"""SLiC hinge loss (Zhao et al. 2023, arXiv:2305.10425): :math:`\max(0, 1 - \beta\Delta)`."""
    return torch.relu(1 - cfg.beta * _delta(s))


@register_loss("ipo", f_divergence=True)
def ipo(s, cfg):
    r"""IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17) on length-normalised scores:
    :math:`(s_w/|y_w| - s_l/|y_l| - 1/(2\beta))^2` (``beta`` is the paper's :math:`\tau`)."""
    d = s.per_token(s.chosen_scores, 0) - s.per_token(s.rejected_scores, 1)
    return (d - 1 / (2 * cfg.beta)) ** 2


@register_loss("exo_pair", f_divergence=True, validate=_check_exo)
def exo_pair(s, cfg):
    r"""EXO-pref (Ji et al. 2024, arXiv:2402.00856, Eq. 16), K = 2:
    :math:`\mathrm{KL}(\mathrm{softmax}(\beta s)\,\|\,[1-\varepsilon, \varepsilon])`
    :math:`= \sigma(z)(\log\sigma(z) - \log(1-\varepsilon)) + \sigma(-z)(\log\sigma(-z) - \log\varepsilon)`, :math:`z = \beta\Delta`."""
    z = cfg.beta * _delta(s)
    eps = float(cfg.label_smoothing)  # a Python number: no host-to-device copy
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


@register_loss("nca_pair", reference="required")
def nca_pair(s, cfg):
    r"""NCA (Chen et al. 2024, arXiv:2402.05369), :math:`r = \beta\rho`:
    :math:`-\log\sigma(r_w) - \tfrac12\log\sigma(-r_w) - \tfrac12\log\sigma(-r_l)`."""
    rw, rl = cfg.beta * s.chosen_logratios, cfg.beta * s.rejected_logratios
    return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)


@register_loss("robust", f_divergence=True, validate=_check_robust)
def robust(s, cfg):
    r"""Robust DPO, rDPO (Chowdhury et al. 2024, arXiv:2403.00409), flip rate :math:`\varepsilon < 1/2`:
    :math:`[-(1-\varepsilon)\log\sigma(\beta\Delta) + \varepsilon\log\sigma(-\beta\Delta)] / (1 - 2\varepsilon)`."""
    z, eps = cfg.beta * _delta(s), cfg.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


@register_loss("bco_pair", reference="required")
def bco_pair(s, cfg):
    r"""Paired BCO (Jung et al. 2024, arXiv:2404.04656) without the running mean:
    :math:`-\log\sigma(\beta\rho_w) - \log\sigma(-\beta\rho_l)`."""
    return -F.logsigmoid(cfg.beta * s.chosen_logratios) - F.logsigmoid(-cfg.beta * s.rejected_logratios)


@register_loss("sppo_hard", reference="required")
def sppo_hard(s, cfg):
    r"""SPPO with hard win probabilities (Wu et al. 2024, arXiv:2405.00675, Eq. 4.7 with P = 1 / 0):
    :math:`(\rho_w - \tfrac{1}{2\beta})^2 + (\rho_l + \tfrac{1}{2\beta})^2`."""
    return (s.chosen_logratios - 0.5 / cfg.beta) ** 2 + (s.rejected_logratios + 0.5 / cfg.beta) ** 2


def _sorted(x):
    return torch.sort(x, dim=0)[0]


@register_loss("aot", weighting=False, separable=False)
def aot(s, cfg):
    r"""AOT, paired (Melnyk et al. 2024, arXiv:2406.05882): with
    :math:`\delta = \mathrm{sort}(\log\pi_w - \log\pi_l) - \mathrm{sort}(\log\pi^{ref}_w - \log\pi^{ref}_l)`
    over the batch, :math:`-(1-\varepsilon)\log\sigma(\beta\delta) - \varepsilon\log\sigma(-\beta\delta)`."""
    pol = s.chosen_logps - s.rejected_logps
    ref = 0.0 if s.ref_logps is None else _sorted(s.ref_chosen_logps - s.ref_rejected_logps)
    return smoothed_sigmoid_loss(cfg.beta * (_sorted(pol) - ref), cfg.label_smoothing)


@register_loss("aot_unpaired", reference="required", weighting=False, separable=False)
def aot_unpaired(s, cfg):
    r"""AOT, unpaired (Melnyk et al. 2024, arXiv:2406.05882): :math:`\delta = \mathrm{sort}(\rho_w) - \mathrm{sort}(\rho_l)`,
    :math:`-(1-\varepsilon)\log\sigma(\beta\delta) - \varepsilon\log\sigma(-\beta\delta)`."""
    return smoothed_sigmoid_loss(cfg.beta * (_sorted(s.chosen_logratios) - _sorted(s.rejected_logratios)), cfg.label_smoothing)


@register_loss("apo_zero", reference="required")
def apo_zero(s, cfg):
    r"""APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7):
    :math:`1 - \sigma(\beta\rho_w) + \sigma(\beta\rho_l)`."""
    return 1 - torch.sigmoid(cfg.beta * s.chosen_logratios) + torch.sigmoid(cfg.beta * s.rejected_logratios)


@register_loss("apo_down", reference="required")
def apo_down(s, cfg):
    r"""APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 8):
    :math:`\sigma(\beta\rho_w) + 1 - \sigma(\beta(\rho_w - \rho_l))`."""
    rw = s.chosen_logratios
    return torch.sigmoid(cfg.beta * rw) + 1 - torch.sigmoid(cfg.beta * (rw - s.rejected_logratios))


@register_loss("discopop", f_divergence=True)
def discopop(s, cfg):
    r"""DiscoPOP log-ratio modulated loss (Chris Lu et al. 2024, arXiv:2406.08414, Eq. 5), :math:`z = \beta\Delta`,
    :math:`m = \sigma(z/\tau)`: :math:`(1-m)(-\log\sigma(z)) + m\,e^{-z}` (``tau = discopop_tau``)."""
    z = cfg.beta * _delta(s)
    m = torch.sigmoid(z / cfg.discopop_tau)
    return -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m


@register_loss("sft", reference="unused", f_divergence=True)
def sft(s, cfg):
    r"""Supervised fine-tuning on the chosen responses: token-mean NLL
    :math:`-\sum_t \log\pi(y_{w,t}) / \sum |y_w|` (a batch scalar; combine with other losses via a list).
    Logs it as ``nll_loss``."""
    nll = s.nll(0)
    s.metrics["nll_loss"] = nll
    return nll


@register_loss("sigmoid_norm", f_divergence=True)
def sigmoid_norm(s, cfg):
    r"""Length-normalised DPO (as in TRL): :math:`-\log\sigma(\beta(s_w/|y_w| - s_l/|y_l|))`."""
    d = s.per_token(s.chosen_scores, 0) - s.per_token(s.rejected_scores, 1)
    return -F.logsigmoid(cfg.beta * d)
