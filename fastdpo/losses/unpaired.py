r"""Unpaired objectives: KTO and BCO. Each sequence is desirable or undesirable
(``desirable=`` bool ``[N]``; default: the first half desirable, the second undesirable),
:math:`\rho` its log-ratio to the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdpo.losses.api import DPOLoss, dpo_loss
from fastdpo.losses.registry import register_loss


def _kl_estimate(s, cfg):
    """The KTO reference point z0: ``kl`` given, or ``mean(kl_logps - ref_kl_logps)`` clamped at 0 (no gradient)."""
    if cfg.kl is not None:
        kl = (cfg.kl.to(s.logps) if isinstance(cfg.kl, torch.Tensor)  # a number is filled in, not copied to the device
              else torch.full((), float(cfg.kl), dtype=s.logps.dtype, device=s.logps.device))
    elif cfg.kl_logps is not None:
        if cfg.ref_kl_logps is None or cfg.ref_kl_logps.shape != cfg.kl_logps.shape:
            raise ValueError("fastdpo: kto kl_logps needs ref_kl_logps of the same shape (log-probs of the mismatched pairs)")
        kl = (cfg.kl_logps - cfg.ref_kl_logps).to(s.logps.dtype).mean().clamp(min=0)
    else:
        raise ValueError(
            "fastdpo: loss_type='kto' needs the KL reference point: pass kl= (a number or 0-d tensor) or "
            "kl_logps= and ref_kl_logps= (sequence log-probs of mismatched prompt/completion pairs); kl=0.0 disables it"
        )
    return kl.detach()


@register_loss("kto", reference="required", unpaired=True, weighting=False,
               defaults={"desirable_weight": 1.0, "undesirable_weight": 1.0, "kl": None, "kl_logps": None,
                         "ref_kl_logps": None})
def kto(s, cfg):
    r"""KTO (Ethayarajh et al. 2024, arXiv:2402.01306), reference point :math:`z_0` = the clamped batch KL
    estimate from mismatched pairs (no gradient):
    desirable :math:`\lambda_D(1 - \sigma(\beta(\rho - z_0)))`, undesirable :math:`\lambda_U(1 - \sigma(\beta(z_0 - \rho)))`,
    averaged over all sequences. Logs ``kl``."""
    kl = _kl_estimate(s, cfg)
    s.metrics["kl"] = kl
    rho = s.logratios
    return torch.where(
        s.desirable,
        cfg.desirable_weight * (1 - torch.sigmoid(cfg.beta * (rho - kl))),
        cfg.undesirable_weight * (1 - torch.sigmoid(cfg.beta * (kl - rho))),
    )


@register_loss("apo_zero_unpaired", reference="required", unpaired=True, weighting=False,
               defaults={"desirable_weight": 1.0, "undesirable_weight": 1.0})
def apo_zero_unpaired(s, cfg):
    r"""Unpaired APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266), as in TRL's KTO trainer:
    desirable :math:`\lambda_D(1 - \sigma(\beta\rho))`, undesirable :math:`\lambda_U\sigma(\beta\rho)`."""
    z = torch.sigmoid(cfg.beta * s.logratios)
    return torch.where(s.desirable, cfg.desirable_weight * (1 - z), cfg.undesirable_weight * z)


def _check_bco(cfg):
    lo, hi = cfg.min_density_ratio, cfg.max_density_ratio
    if not (0 <= lo <= hi):
        raise ValueError(f"fastdpo: bco needs 0 <= min_density_ratio <= max_density_ratio, got {lo} and {hi}")


@register_loss("bco", reference="required", unpaired=True, weighting=False, separable=False, validate=_check_bco,
               defaults={"running": None, "delta": None, "udm_prob": None, "min_density_ratio": 0.5,
                         "max_density_ratio": 10.0})
def bco(s, cfg):
    r"""BCO (Jung et al. 2024, arXiv:2404.04656): reward :math:`r = \beta\rho`, shift :math:`\delta` =
    running mean of the batch-mean rewards (no gradient), desirable :math:`-\log\sigma(r - \delta)`,
    undesirable :math:`-w\,\log\sigma(-(r - \delta))`.

    ``running``: a :class:`RunningMean` updated with this batch (see :class:`BCOLoss`); ``delta``: a fixed
    shift instead; neither: this batch's mean reward.

    Underlying-distribution matching (the paper's density-ratio trick, TRL's
    ``match_underlying_distribution``): ``udm_prob`` ``[N]`` is a prompt classifier's probability
    that each sequence's prompt comes from the desirable distribution; undesirable sequences are
    weighted by :math:`w = \mathrm{clamp}(p / (1 - p + 10^{-8}),` ``min_density_ratio``,
    ``max_density_ratio``:math:`)` (defaults 0.5 and 10, as TRL); without it :math:`w = 1`.
    """
    r = cfg.beta * s.logratios
    batch_mean = r.detach().mean()
    if cfg.delta is not None:
        delta = torch.as_tensor(cfg.delta, dtype=r.dtype, device=r.device)
    elif cfg.running is not None:
        delta = cfg.running.update(batch_mean).to(r.dtype)
    else:
        delta = batch_mean
    s.metrics["delta"] = delta.detach()
    loss = -F.logsigmoid(torch.where(s.desirable, r - delta, delta - r))
    if cfg.udm_prob is not None:
        p = torch.as_tensor(cfg.udm_prob, device=r.device).to(r.dtype).detach()
        if p.shape != r.shape:
            raise ValueError(f"fastdpo: bco udm_prob must have one probability per sequence, shape {tuple(r.shape)}, "
                             f"got {tuple(p.shape)}")
        w = (p / (1 - p + 1e-8)).clamp(min=cfg.min_density_ratio, max=cfg.max_density_ratio)
        loss = torch.where(s.desirable, loss, w * loss)
    return loss


class RunningMean(torch.nn.Module):
    """Mean of every value passed to :meth:`update` so far (float64 buffers, saved in ``state_dict``)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(torch.float64).reshape(-1)
        if self.mean.device != x.device:
            self.to(x.device)
        n = x.numel()
        self.mean += (x.sum() - n * self.mean) / (self.count + n)
        self.count += n
        return self.mean.clone()


class BCOLoss(DPOLoss):
    """BCO with its running reward mean held in the module: ``BCOLoss(beta=0.1)(logits, labels, ref_logits=ref)``.

    Each call updates the running mean with the batch's mean reward, then computes the loss (as TRL's BCO did).
    """

    _fn = staticmethod(dpo_loss)

    def __init__(self, **options):
        options.setdefault("loss_type", "bco")
        super().__init__(**options)
        self.running = RunningMean()

    def forward(self, *args, **kwargs):
        return super().forward(*args, running=self.running, **kwargs)
