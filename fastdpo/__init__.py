"""fastdpo: fused kernels for DPO-family preference losses.

The vocabulary-wide log-softmax gather, the reference log-ratio and the
backward run in one pass over the logits; losses are small torch functions of
the per-token / per-sequence log-probs those kernels return.
"""

from fastdpo._backends import Backend, BackendUnavailableError, available_backends
from fastdpo._build import BuildError
from fastdpo._version import __version__
from fastdpo.ops.linear import linear_token_logprobs
from fastdpo.ops.logprobs import FusedLogprobs, TokenLogprobs, fused_logprobs, token_logprobs
from fastdpo.ops.vocab_parallel import vocab_parallel_linear_logprobs, vocab_parallel_logprobs
from fastdpo.losses import (
    BCOLoss,
    DPOLoss,
    DPOOutput,
    LinearDPOLoss,
    SequenceStats,
    available_losses,
    dpo_loss,
    get_loss,
    linear_dpo_loss,
    register_loss,
    sequence_sums,
)


__all__ = [
    "BCOLoss",
    "DPOLoss",
    "DPOOutput",
    "LinearDPOLoss",
    "SequenceStats",
    "available_losses",
    "dpo_loss",
    "get_loss",
    "linear_dpo_loss",
    "register_loss",
    "sequence_sums",
    "Backend",
    "BackendUnavailableError",
    "BuildError",
    "FusedLogprobs",
    "TokenLogprobs",
    "available_backends",
    "fused_logprobs",
    "linear_token_logprobs",
    "token_logprobs",
    "vocab_parallel_linear_logprobs",
    "vocab_parallel_logprobs",
    "__version__",
]
