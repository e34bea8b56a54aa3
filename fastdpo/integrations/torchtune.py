"""Loss modules with the call signatures of torchtune's DPO-family losses (``torchtune.rlhf.loss``), built on
fastdpo's loss registry. torchtune itself is not needed.

Each takes per-pair sequence log-probs ``[B]`` and returns per-pair ``losses`` and detached
``chosen_rewards`` / ``rejected_rewards`` (``[B]``), as torchtune's do::

    from fastdpo.integrations.torchtune import DPOLoss      # instead of: from torchtune.rlhf.loss import DPOLoss

    losses, chosen_rewards, rejected_rewards = DPOLoss(beta=0.1)(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)

With Δ = (π_c - π_r) - (ref_c - ref_r):

- ``DPOLoss(beta=0.1, label_smoothing=0.0)``: ``-(1-ε) log σ(βΔ) - ε log σ(-βΔ)`` (cDPO when ε > 0);
  fastdpo ``sigmoid`` with ``cdpo=True``.
- ``RSOLoss(gamma=0.1)``: ``max(0, 1 - γΔ)``; fastdpo ``hinge`` with beta = γ. Rewards ``γ * log-ratio``.
- ``IPOLoss(tau=0.1)``: ``(Δ - 1/(2τ))²`` (torchtune's former IPO loss); fastdpo ``ipo`` on the sequence
  log-probs as given. Rewards ``τ * log-ratio``.
- ``SimPOLoss(beta=2.0, gamma=0.5, label_smoothing=0.0)``: reference-free,
  ``forward(policy_chosen_logps, policy_rejected_logps)`` on *average* per-token log-probs:
  ``-(1-ε) log σ(β(π_c - π_r) - γ) - ε log σ(-…)``; rewards ``β * π``. fastdpo ``simpo``.
"""

from __future__ import annotations

import torch

from fastdpo.integrations._losses import pair_losses

__all__ = ["DPOLoss", "RSOLoss", "IPOLoss", "SimPOLoss"]


class DPOLoss(torch.nn.Module):
    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        super().__init__()
        self.beta = beta
        self.label_smoothing = label_smoothing

    def forward(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        return pair_losses("sigmoid", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                           reference_rejected_logps, beta=self.beta, label_smoothing=self.label_smoothing,
                           cdpo=self.label_smoothing != 0)


class RSOLoss(torch.nn.Module):
    def __init__(self, gamma: float = 0.1):
        super().__init__()
        self.gamma = gamma

    def forward(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        return pair_losses("hinge", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                           reference_rejected_logps, beta=self.gamma)


class IPOLoss(torch.nn.Module):
    def __init__(self, tau: float = 0.1):
        super().__init__()
        self.tau = tau

    def forward(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        return pair_losses("ipo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                           reference_rejected_logps, beta=self.tau)


class SimPOLoss(torch.nn.Module):
    def __init__(self, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0):
        super().__init__()
        self.beta = beta
        self.gamma = gamma
        self.label_smoothing = label_smoothing

    def forward(self, policy_chosen_logps, policy_rejected_logps):
        return pair_losses("simpo", policy_chosen_logps, policy_rejected_logps, beta=self.beta,
                           label_smoothing=self.label_smoothing, simpo_gamma=self.gamma)
