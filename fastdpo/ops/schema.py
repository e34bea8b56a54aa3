"""The ``fastdpo::`` op schemas, defined once, with their fake (meta) kernels.

The native backends register device implementations under these names from
C++ (``TORCH_LIBRARY_IMPL(fastdpo, CPU|CUDA, m)``), so one op name serves every
device and ``torch.compile`` sees the calls through the fake kernels below.

``logprobs_fwd(logits [B,T,V], labels [B,T] int64, ref_logits?, ignore_index,
temperature, softcap, stats, kl=False) -> (logp, lse, ref_logp, stats, kl, ref_lse)``;
``softcap = 0`` means none, ``ref_logp``/``stats``/``kl``/``ref_lse`` are empty when
not requested, ``stats`` is ``[B, T, 4]``: entropy, argmax hit, mean over V of z
(soft-capped, temperature-scaled), log sum p^2. ``kl=True`` (needs ``ref_logits``)
adds the per-token full-vocabulary ``KL(q || p) = sum_v q_v (log q_v - log p_v)``
of the reference distribution q to the policy p, and the reference log-sum-exp
that its backward needs.

``logprobs_bwd(grad_logp, logits, labels, lse, ..., grad_kl?, ref_logits?, ref_lse?)
-> grad_logits`` and the in-place ``logprobs_bwd_`` that overwrites ``logits`` with
its gradient. With ``grad_kl`` the gradient also carries ``grad_kl * (p - q)``
(the KL term's), which needs the reference logits and their log-sum-exp.
"""

from __future__ import annotations

import torch

NUM_STATS = 4
STAT_NAMES = ("entropy", "argmax_hit", "mean_logit", "log_sum_p2")

_lib = torch.library.Library("fastdpo", "DEF")  # noqa: TOR901  (kept alive for the process)
_lib.define(
    "logprobs_fwd(Tensor logits, Tensor labels, Tensor? ref_logits, int ignore_index, float temperature, "
    "float softcap, bool stats, bool kl=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_lib.define(
    "logprobs_bwd(Tensor grad_logp, Tensor logits, Tensor labels, Tensor lse, int ignore_index, "
    "float temperature, float softcap, Tensor? grad_kl=None, Tensor? ref_logits=None, Tensor? ref_lse=None) -> Tensor"
)
_lib.define(
    "logprobs_bwd_(Tensor grad_logp, Tensor(a!) logits, Tensor labels, Tensor lse, int ignore_index, "
    "float temperature, float softcap, Tensor? grad_kl=None, Tensor? ref_logits=None, Tensor? ref_lse=None) -> ()"
)

# The fused-linear tile loop (fastdpo/ops/linear.py), natively on CPU: project valid token rows
# ``idx`` a tile of ``rows`` at a time and fold them into caller-allocated outputs (forward), or
# project again and accumulate the hidden/weight/bias gradients (backward, fp32 accumulators).
_lib.define(
    "linear_fwd_(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor idx, int ignore_index, "
    "float temperature, float softcap, float scale, int rows, Tensor(a!) logp, Tensor(b!)? lse, "
    "Tensor(c!)? stats) -> ()"
)
_lib.define(
    "linear_bwd_(Tensor grad_logp, Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor idx, "
    "Tensor lse, int ignore_index, float temperature, float softcap, float scale, int rows, "
    "Tensor(a!)? grad_hidden, Tensor(b!)? grad_weight, Tensor(c!)? grad_bias) -> ()"
)

# Per-sequence sums of packed (padding-free) batches: ``out[k] = sum(values[offsets[k]:offsets[k+1]])``
# in the accumulation dtype, each segment summed in a fixed order (deterministic, no atomics).
_lib.define("segment_sum(Tensor values, Tensor offsets) -> Tensor")


def _acc(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.register_fake("fastdpo::logprobs_fwd")
def _logprobs_fwd_fake(logits, labels, ref_logits, ignore_index, temperature, softcap, stats, kl=False):
    B, T, _ = logits.shape
    acc = _acc(logits)
    logp = logits.new_empty((B, T), dtype=acc)
    ref = logits.new_empty((B, T) if ref_logits is not None else (0,), dtype=acc)
    st = logits.new_empty((B, T, NUM_STATS) if stats else (0,), dtype=acc)
    kl_out = logits.new_empty((B, T) if kl else (0,), dtype=acc)
    return logp, torch.empty_like(logp), ref, st, kl_out, torch.empty_like(kl_out)


@torch.library.register_fake("fastdpo::logprobs_bwd")
def _logprobs_bwd_fake(grad_logp, logits, labels, lse, ignore_index, temperature, softcap, grad_kl=None,
                       ref_logits=None, ref_lse=None):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("fastdpo::logprobs_bwd_")
def _logprobs_bwd_inplace_fake(grad_logp, logits, labels, lse, ignore_index, temperature, softcap, grad_kl=None,
                               ref_logits=None, ref_lse=None):
    return None


@torch.library.register_fake("fastdpo::linear_fwd_")
def _linear_fwd_fake(hidden, weight, bias, labels, idx, ignore_index, temperature, softcap, scale, rows, logp, lse,
                     stats):
    return None


@torch.library.register_fake("fastdpo::linear_bwd_")
def _linear_bwd_fake(grad_logp, hidden, weight, bias, labels, idx, lse, ignore_index, temperature, softcap, scale,
                     rows, grad_hidden, grad_weight, grad_bias):
    return None


@torch.library.register_fake("fastdpo::segment_sum")
def _segment_sum_fake(values, offsets):
    return values.new_empty((offsets.shape[0] - 1,), dtype=_acc(values))
