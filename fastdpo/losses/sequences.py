"""Per-token -> per-sequence: the one sequence reduction every entry point (and the trainer) uses.

A *layout* says how the per-token tensors map to sequences. :class:`PaddedLayout` is
TRL's ``[N, T]`` batch (row i is sequence i, ``ignore_index`` on prompt and padding);
:class:`PackedLayout` is a padding-free batch, the N sequences' tokens laid end to end
(``[N_total]``), described by flash-attention's ``cu_seqlens`` or transformers'
``position_ids``. Both have the same methods (``tokens``, ``seq_sum``, ``per_token``,
``positions``, ``offsets``, ``mask``, ``num_seqs``), and everything downstream of
:func:`sequence_stats` (objectives, metrics) sees only per-sequence tensors and those
methods, so the objectives run unchanged on either. The sequences come in the same
order in both: ``[chosen; rejected]`` (or the objective's blocks).
"""

from __future__ import annotations

import torch

from fastdpo import _validation
from fastdpo.losses.registry import SequenceStats
from fastdpo.ops.logprobs import FusedLogprobs
from fastdpo.ops.segments import host_to_device, segment_sum


class PaddedLayout:
    """Tokens ``[N, T]``: row i is sequence i; tokens whose label is ``ignore_index`` do not count."""

    def __init__(self, labels: torch.Tensor, ignore_index: int):
        self.shape = tuple(labels.shape)
        self.num_seqs = labels.shape[0]
        self.mask = labels != ignore_index

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """A per-token tensor (any shape with the tokens' numel) in this layout's token shape."""
        return x.reshape(self.shape)

    def seq_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``[N]`` sums over each sequence's tokens of a per-token tensor (ignored tokens must hold 0)."""
        return self.tokens(x).sum(1)

    def per_token(self, per_seq: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-sequence ``[N]`` tensor to the tokens."""
        return per_seq.unsqueeze(1).expand(self.shape)

    def positions(self) -> torch.Tensor:
        """1-based rank of each counted token among its sequence's counted tokens."""
        return self.mask.cumsum(1)

    def offsets(self) -> torch.Tensor:
        """``[N + 1]`` int64 offsets of the sequences in the flattened tokens (row starts)."""
        return torch.arange(self.num_seqs + 1, device=self.mask.device) * self.shape[1]


class PackedLayout:
    """Packed tokens ``[M]``: sequence k is tokens ``cu_seqlens[k] : cu_seqlens[k+1]``; tokens whose label is
    ``ignore_index`` do not count. Build it with :func:`make_layout` (which validates the packing).

    ``cu_seqlens`` (host ints) stays on the host; the device copies (``offsets()``, the per-token
    ``seq_index``) are made once. Sums over sequences go through the deterministic segment sum
    of the backend (:func:`fastdpo.ops.segments.segment_sum`)."""

    def __init__(self, labels: torch.Tensor, ignore_index: int, cu_seqlens: list[int], backend="auto"):
        device = labels.device
        self.shape = (labels.numel(),)
        self.num_seqs = len(cu_seqlens) - 1
        self.cu_seqlens = list(cu_seqlens)
        self.backend = backend
        self.mask = labels.reshape(-1) != ignore_index
        self._offsets, self.seq_index = _device_index(self.cu_seqlens, device)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """A per-token tensor (any shape with the tokens' numel) as ``[M]``."""
        return x.reshape(self.shape)

    def seq_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``[N]`` sums over each sequence's tokens of a per-token tensor (ignored tokens must hold 0)."""
        return segment_sum(self.tokens(x), self._offsets, self.seq_index, self.backend)

    def per_token(self, per_seq: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-sequence ``[N]`` tensor to the tokens."""
        return per_seq.index_select(0, self.seq_index)

    def positions(self) -> torch.Tensor:
        """1-based rank of each counted token among its sequence's counted tokens."""
        c = self.mask.cumsum(0)
        before = (c - self.mask.long()).index_select(0, self._offsets[:-1])  # counted tokens before each sequence
        return c - self.per_token(before)

    def offsets(self) -> torch.Tensor:
        """``[N + 1]`` int64 offsets of the sequences in the tokens (``cu_seqlens`` on the tokens' device)."""
        return self._offsets


def _device_index(cu: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``cu_seqlens`` on ``device`` and each token's sequence index, without a device sync."""
    offsets = host_to_device(cu, device)
    seq_index = torch.repeat_interleave(torch.arange(len(cu) - 1, device=device), offsets.diff(), output_size=cu[-1])
    return offsets, seq_index


def sequence_sums(values: torch.Tensor, *, cu_seqlens=None, position_ids=None, backend="auto") -> torch.Tensor:
    """``[N]`` per-sequence sums of per-token values (0 at ignored tokens, e.g. the ``logps`` of
    :func:`fastdpo.fused_logprobs`): row sums of a padded ``[N, T]`` tensor, or with ``cu_seqlens`` /
    ``position_ids`` (as in :func:`fastdpo.dpo_loss`) the sums of a packed ``[N_total]`` (or
    ``[1, N_total]``) tensor by the backend's deterministic segment sum. Differentiable."""
    _validation.check_float_tensor(values, "values")
    if cu_seqlens is None and position_ids is None:
        if values.dim() != 2:
            raise ValueError(f"fastdpo: padded values must be [N, T] (or pass cu_seqlens / position_ids for a "
                             f"packed batch), got shape {tuple(values.shape)}")
        return values.sum(1)
    if not (values.dim() == 1 or (values.dim() == 2 and values.shape[0] == 1)):
        raise ValueError(f"fastdpo: packed values must be [N_total] or [1, N_total], got shape {tuple(values.shape)}")
    offsets, seq_index = _device_index(packed_offsets(values.numel(), cu_seqlens, position_ids), values.device)
    return segment_sum(values, offsets, seq_index, backend)


def _first(bad: torch.Tensor) -> int:
    return int(torch.nonzero(bad)[0, 0])


def packed_offsets(num_tokens: int, cu_seqlens=None, position_ids=None) -> list[int]:
    """``cu_seqlens`` as host ints from either index form, validated against ``num_tokens``.

    Reads the index once on the host (one device sync when it is a GPU tensor; none for a CPU
    tensor or a list)."""
    if (cu_seqlens is None) == (position_ids is None):
        raise ValueError("fastdpo: give the packing as cu_seqlens or as position_ids (one of them), got "
                         + ("both" if cu_seqlens is not None else "neither"))
    if position_ids is not None:
        _validation.check_tensor(position_ids, "position_ids")
        if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
            raise TypeError(f"fastdpo: position_ids must be an integer tensor, got {position_ids.dtype}")
        if position_ids.numel() != num_tokens or (position_ids.dim() == 2 and position_ids.shape[0] != 1) \
                or position_ids.dim() > 2:
            raise ValueError(
                f"fastdpo: position_ids must be [N_total] or [1, N_total] with one entry per packed token "
                f"(N_total = {num_tokens}, the labels' length), got shape {tuple(position_ids.shape)}")
        p = position_ids.reshape(-1).cpu().long()
        if p.numel() == 0:
            raise ValueError("fastdpo: a packed batch needs at least one sequence, got no tokens")
        if bool((p < 0).any()):
            t = _first(p < 0)
            raise ValueError(f"fastdpo: position_ids must be >= 0, got {int(p[t])} at token {t}")
        start = p == 0
        start[0] = True
        bad = ~start[1:] & (p[1:] != p[:-1] + 1)
        if bool(bad.any()):
            t = _first(bad) + 1
            raise ValueError(
                f"fastdpo: position_ids must count up by 1 within a sequence and restart at 0 for the next "
                f"(transformers' packed format), got position_ids[{t}] = {int(p[t])} after {int(p[t - 1])}")
        return torch.nonzero(start).flatten().tolist() + [num_tokens]
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool or cu_seqlens.dim() != 1:
            raise TypeError(f"fastdpo: cu_seqlens must be a 1-D integer tensor [N + 1], got {cu_seqlens.dtype} "
                            f"of shape {tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.tolist()
    else:
        cu = list(cu_seqlens)
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in cu):
            raise TypeError("fastdpo: cu_seqlens must be an integer tensor or a sequence of ints")
    if len(cu) < 2 or cu[0] != 0:
        raise ValueError(f"fastdpo: cu_seqlens must be the offsets [0, ..., N_total] of the N >= 1 packed sequences "
                         f"(flash-attention's convention), got {cu[:8]}{' ...' if len(cu) > 8 else ''}")
    for k in range(len(cu) - 1):
        if cu[k + 1] < cu[k]:
            raise ValueError(f"fastdpo: cu_seqlens must be non-decreasing (sequence k is tokens cu_seqlens[k] : "
                             f"cu_seqlens[k+1]), got cu_seqlens[{k + 1}] = {cu[k + 1]} < cu_seqlens[{k}] = {cu[k]}")
        if cu[k + 1] == cu[k]:
            raise ValueError(f"fastdpo: packed sequence {k} is empty (cu_seqlens[{k}] = cu_seqlens[{k + 1}] = "
                             f"{cu[k]}); every sequence of a packed batch needs at least one token (keep an empty "
                             "response's prompt, with labels = ignore_index)")
    if cu[-1] != num_tokens:
        raise ValueError(f"fastdpo: cu_seqlens ends at {cu[-1]} but the packed batch has {num_tokens} tokens "
                         "(labels); the lengths do not match")
    return cu


def make_layout(labels: torch.Tensor, ignore_index: int, *, cu_seqlens=None, position_ids=None, backend="auto"):
    """:class:`PaddedLayout` of ``labels [N, T]``, or with ``cu_seqlens`` / ``position_ids`` the
    :class:`PackedLayout` of ``labels [N_total]`` (or ``[1, N_total]``)."""
    _validation.check_int(ignore_index, "ignore_index")
    if cu_seqlens is None and position_ids is None:
        return PaddedLayout(labels, ignore_index)
    if not (labels.dim() == 1 or (labels.dim() == 2 and labels.shape[0] == 1)):
        raise ValueError(f"fastdpo: packed labels must be [N_total] or [1, N_total] (every sequence's tokens in one "
                         f"row), got shape {tuple(labels.shape)}")
    return PackedLayout(labels, ignore_index, packed_offsets(labels.numel(), cu_seqlens, position_ids), backend)


def sequence_stats(tok: FusedLogprobs, layout, *, ref_logps, ld_alpha, token_weights, num_blocks,
                   desirable, average_log_prob=False) -> SequenceStats:
    """The per-sequence inputs of the objectives from the per-token kernel outputs.

    ``logps`` / ``ref_logps`` are sums weighted by ``token_weights`` and LD-DPO's ``ld_alpha``
    (with ``average_log_prob``, Liger's switch, divided by the sequence's number of scored tokens;
    precomputed ``ref_logps`` are sums too); ``sum_logps`` is the plain sum; ``kl`` the plain sum
    of the token-level KL."""
    logp = layout.tokens(tok.logps)
    mask = layout.mask
    n_tokens = layout.seq_sum(mask.to(logp.dtype))
    w = None
    if ld_alpha is not None:
        # LD-DPO (Liu et al. 2024, arXiv:2409.06411): tokens beyond the shorter response of the group weigh ld_alpha.
        shared = n_tokens.view(num_blocks, -1).min(0).values.repeat(num_blocks)
        w = torch.where(layout.positions() <= layout.per_token(shared), 1.0, float(ld_alpha)).to(logp.dtype)
    if token_weights is not None:
        tw = layout.tokens(token_weights).to(logp.dtype)
        w = tw if w is None else w * tw

    def seq(x):
        return layout.seq_sum(x if w is None else x * w)

    if tok.ref_logps is not None:
        ref = seq(layout.tokens(tok.ref_logps))
    elif ref_logps is not None:
        ref = ref_logps.detach().to(logp.dtype)
    else:
        ref = None
    kl = layout.seq_sum(tok.kl) if tok.kl is not None else None  # 0 at ignored tokens
    logps = seq(logp)
    if average_log_prob:
        logps = logps / n_tokens.clamp(min=1.0)
        ref = ref / n_tokens.clamp(min=1.0) if ref is not None else None
    return SequenceStats(logps, ref, layout.seq_sum(logp), n_tokens, num_blocks, desirable, kl=kl,
                         length_averaged=bool(average_log_prob))


def wpo_weights(tok: FusedLogprobs, layout, n_tokens, num_blocks):
    """WPO (Zhou et al. 2024, arXiv:2406.11827, Eq. 2): w(y) = exp(mean_t [log p_t - log sum_v p_v^2]),
    per pair the product over its responses; no gradient."""
    with torch.no_grad():
        logp = layout.tokens(tok.logps)
        lsp2 = layout.tokens(tok.stats[..., 3])
        w = torch.exp(layout.seq_sum((logp - lsp2) * layout.mask) / n_tokens.clamp(min=1.0))
        return w.view(num_blocks, -1).prod(0)
