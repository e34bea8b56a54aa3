"""Calls into the ``fastdpo::`` ops, shared by the native backends
(``cpu`` and ``cuda`` register implementations of the same ops per device)."""

from __future__ import annotations

import torch


def logprobs_fwd(logits, labels, ref_logits, ignore_index, temperature, softcap, stats, kl=False):
    return torch.ops.fastdpo.logprobs_fwd(logits, labels, ref_logits, ignore_index, temperature, softcap, stats, kl)


def logprobs_bwd(grad_logp, logits, labels, lse, ignore_index, temperature, softcap, inplace, grad_kl=None,
                 ref_logits=None, ref_lse=None):
    args = (grad_logp, logits, labels, lse, ignore_index, temperature, softcap, grad_kl, ref_logits, ref_lse)
    if inplace:
        torch.ops.fastdpo.logprobs_bwd_(*args)
        return logits
    return torch.ops.fastdpo.logprobs_bwd(*args)


def segment_sum(values, offsets):
    return torch.ops.fastdpo.segment_sum(values, offsets)
