"""DPO-family objectives as small torch functions of sequence-level statistics."""

from fastdpo.losses.api import DPOLoss, DPOOutput, LinearDPOLoss, compute_loss, dpo_loss, linear_dpo_loss, make_config
from fastdpo.losses.dpo import TRL_LOSS_TYPES, f_divergence_scores
from fastdpo.losses.registry import PairStats, get_loss, register_loss, registered_losses

__all__ = [
    "DPOLoss", "DPOOutput", "LinearDPOLoss", "PairStats", "TRL_LOSS_TYPES", "compute_loss", "dpo_loss",
    "f_divergence_scores", "get_loss", "linear_dpo_loss", "make_config", "register_loss", "registered_losses",
]
