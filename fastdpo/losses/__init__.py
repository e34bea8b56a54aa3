"""DPO-family losses on top of the fused per-token kernels.

Importing this package registers every built-in objective (see :mod:`fastdpo.losses.registry`).
"""

from fastdpo.losses import dpo, literature, reference_free, unpaired  # noqa: F401  (register the objectives)
from fastdpo.losses.api import DPOLoss, DPOOutput, LinearDPOLoss, dpo_loss, linear_dpo_loss
from fastdpo.losses.registry import (
    LossConfig,
    LossSpec,
    SequenceStats,
    available_losses,
    get_loss,
    register_loss,
)
from fastdpo.losses.sequences import sequence_sums
from fastdpo.losses.unpaired import BCOLoss, RunningMean

__all__ = [
    "BCOLoss",
    "DPOLoss",
    "DPOOutput",
    "LinearDPOLoss",
    "LossConfig",
    "LossSpec",
    "RunningMean",
    "SequenceStats",
    "available_losses",
    "dpo_loss",
    "get_loss",
    "linear_dpo_loss",
    "register_loss",
    "sequence_sums",
]
