"""Per-token -> per-sequence: the one sequence reduction every entry point (and the trainer) uses.

A *layout* says how the per-token tensors map to sequences. :class:`PaddedLayout` is
TRL's ``[N, T]`` batch (row i is sequence i, ``ignore_index`` on prompt and padding).
Everything downstream of :func:`sequence_stats` (objectives, metrics) sees only
per-sequence tensors and the layout's per-token helpers, so another layout (packed
tokens) plugs in without touching the objectives.
"""

from __future__ import annotations

import torch

from fastdpo.losses.registry import SequenceStats
from fastdpo.ops.logprobs import FusedLogprobs


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
