r"""Per-sequence sums of per-token values for packed (padding-free) batches: autograd Function -> kernel.

Sequence k of a packed batch is ``values[offsets[k]:offsets[k+1]]`` (flash-attention's ``cu_seqlens``):

.. math::
    \mathrm{out}_k = \sum_{t = o_k}^{o_{k+1} - 1} v_t, \qquad
    \frac{\partial\, \mathrm{out}_k}{\partial v_t} = [\mathrm{seq}(t) = k]

Every backend sums each segment on its own in a fixed order (no atomics), so the result is the
same on every run; backward hands each token its sequence's gradient (a gather). The packing is
validated once by the layout that owns it (:class:`fastdpo.losses.sequences.PackedLayout`), so
nothing here reads the offsets back to the host.
"""

from __future__ import annotations

import torch

from fastdpo import _backends
from fastdpo._backends import Backend
from fastdpo.ops import schema  # noqa: F401  (defines the fastdpo:: ops)
from fastdpo.ops.logprobs import _resolve


def host_to_device(values: list[int], device) -> torch.Tensor:
    """An int64 tensor of host ints on ``device`` without a device sync: on a GPU through pinned memory and a
    non-blocking copy (the pinned buffer is held until the copy has run)."""
    t = torch.tensor(values, dtype=torch.long)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class _SegmentSumFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, offsets, seq_index, backend):
        ctx.save_for_backward(seq_index)
        ctx.dtype = values.dtype
        return _backends.kernel_module(Backend(backend)).segment_sum(values, offsets)

    @staticmethod
    def backward(ctx, grad):
        (seq_index,) = ctx.saved_tensors
        return grad.index_select(0, seq_index).to(ctx.dtype), None, None, None


def segment_sum(values: torch.Tensor, offsets: torch.Tensor, seq_index: torch.Tensor,
                backend: str | Backend = "auto") -> torch.Tensor:
    """``[S]`` sums of the packed per-token ``values`` (any shape with ``M`` elements) over the
    segments ``offsets [S + 1]`` (int64, on the values' device); ``seq_index [M]`` is each token's
    segment (for the backward). float32 (float64 for float64 values), differentiable w.r.t. ``values``."""
    backend = _resolve(str(backend), values.device.type)
    return _SegmentSumFunction.apply(values.reshape(-1), offsets, seq_index, backend)
