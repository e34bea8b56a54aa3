"""Native CPU backend: C++ kernels in ``csrc/cpu``, registered as the CPU
implementation of the ``fastdpo::logprobs_*`` ops."""

from __future__ import annotations

import torch

from fastdpo import _build


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors only, got a {device.type} tensor"
    _build.load_extension("cpu")  # raises BuildError with the log path on failure
    return None


def logprobs_fwd(logits, labels, ref_logits, ignore_index, temperature, softcap, stats):
    return torch.ops.fastdpo.logprobs_fwd(logits, labels, ref_logits, ignore_index, temperature, softcap, stats)


def logprobs_bwd(grad_logp, logits, labels, lse, ignore_index, temperature, softcap, inplace):
    if inplace:
        torch.ops.fastdpo.logprobs_bwd_(grad_logp, logits, labels, lse, ignore_index, temperature, softcap)
        return logits
    return torch.ops.fastdpo.logprobs_bwd(grad_logp, logits, labels, lse, ignore_index, temperature, softcap)
