"""Calls into the ``fastdpo::logprobs_*`` ops, shared by the native backends
(``cpu`` and ``cuda`` register implementations of the same ops per device)."""

from __future__ import annotations

import torch


def logprobs_fwd(logits, labels, ref_logits, ignore_index, temperature, softcap, stats):
    return torch.ops.fastdpo.logprobs_fwd(logits, labels, ref_logits, ignore_index, temperature, softcap, stats)


def logprobs_bwd(grad_logp, logits, labels, lse, ignore_index, temperature, softcap, inplace):
    if inplace:
        torch.ops.fastdpo.logprobs_bwd_(grad_logp, logits, labels, lse, ignore_index, temperature, softcap)
        return logits
    return torch.ops.fastdpo.logprobs_bwd(grad_logp, logits, labels, lse, ignore_index, temperature, softcap)
