"""A loss module with the call signature of OpenRLHF's ``DPOLoss`` (``openrlhf.models.loss``), built on fastdpo's
loss registry. OpenRLHF itself is not needed::

    from fastdpo.integrations.openrlhf import DPOLoss

    loss, chosen_rewards, rejected_rewards = DPOLoss(beta=0.1, label_smoothing=0.0, ipo=False)(
        chosen_logps, rejected_logps, reference_chosen_logps, reference_rejected_logps)

With Δ = (π_c - π_r) - (ref_c - ref_r): ``ipo=False`` gives ``mean(-(1-ε) log σ(βΔ) - ε log σ(-βΔ))``
(fastdpo ``sigmoid``, cDPO when ε > 0), ``ipo=True`` gives ``mean((Δ - 1/(2β))²)`` (fastdpo ``ipo`` on the
sequence log-probs as given). ``loss`` is the batch mean; the rewards are detached ``β * log-ratio`` per pair.
"""

from __future__ import annotations

import torch

from fastdpo.integrations._losses import pair_losses

__all__ = ["DPOLoss"]


class DPOLoss(torch.nn.Module):
    def __init__(self, beta: float, label_smoothing: float = 0.0, ipo: bool = False):
        super().__init__()
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.ipo = ipo

    def forward(self, chosen_logps, rejected_logps, reference_chosen_logps, reference_rejected_logps):
        if self.ipo:
            losses, cr, rr = pair_losses("ipo", chosen_logps, rejected_logps, reference_chosen_logps,
                                         reference_rejected_logps, beta=self.beta)
        else:
            losses, cr, rr = pair_losses("sigmoid", chosen_logps, rejected_logps, reference_chosen_logps,
                                         reference_rejected_logps, beta=self.beta,
                                         label_smoothing=self.label_smoothing, cdpo=self.label_smoothing != 0)
        return losses.mean(), cr, rr
