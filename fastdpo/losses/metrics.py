"""The metrics TRL's DPOTrainer logs, from per-sequence values and the statistics of the same kernel pass."""

from __future__ import annotations

import torch

from fastdpo.losses.registry import SequenceStats


def masked_mean(x, m):
    return (x * m).sum() / m.sum().clamp(min=1)


def _mean_where(x, m):
    """``x[m].mean()`` for a bool mask ``m`` (NaN when it selects nothing) without the selection's host sync."""
    m = m.to(x.dtype)
    return (x * m).sum() / m.sum()


def block_masks(layout, desirable, num_blocks, dtype=torch.float32):
    """Per-token masks (``dtype``) of the counted tokens of chosen (block 0 / desirable) and rejected
    (block 1 / undesirable) sequences, and of all counted tokens."""
    m = layout.mask.to(dtype)
    if desirable is not None:
        chosen, rejected = desirable, ~desirable
    else:
        seq_block = torch.arange(layout.num_seqs, device=m.device) // (layout.num_seqs // num_blocks)
        chosen, rejected = seq_block == 0, seq_block == 1
    return m * layout.per_token(chosen).to(dtype), m * layout.per_token(rejected).to(dtype), m


def trl_metrics(s: SequenceStats, stats, layout, cr, rr, desirable, num_blocks) -> dict:
    """``rewards/*``, ``logps/*``, ``logits/*``, ``entropy``, ``mean_token_accuracy`` (and ``kl/*`` for
    objectives with the token-level KL) as detached 0-d tensors."""
    cm, rm, m = block_masks(layout, desirable, num_blocks, stats.dtype)
    st = stats.reshape(*m.shape, -1)
    if desirable is not None:
        lc, lr = _mean_where(s.logps, desirable), _mean_where(s.logps, ~desirable)
    else:
        lc, lr = s.chosen_logps.mean(), s.rejected_logps.mean()
    out = {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
    }
    if cr.shape == rr.shape:
        out["rewards/accuracies"] = (cr > rr).float().mean()
        out["rewards/margins"] = (cr - rr).mean()
    out.update({
        "logps/chosen": lc.detach(),
        "logps/rejected": lr.detach(),
        "logits/chosen": masked_mean(st[..., 2], cm),
        "logits/rejected": masked_mean(st[..., 2], rm),
        "entropy": masked_mean(st[..., 0], m),
        "mean_token_accuracy": masked_mean(st[..., 1], cm),
    })
    if s.kl is not None:  # objectives with the token-level KL: mean per-sequence KL sums
        kc, kr = ((_mean_where(s.kl, desirable), _mean_where(s.kl, ~desirable)) if desirable is not None
                  else (s.chosen_kl.mean(), s.rejected_kl.mean()))
        out["kl/chosen"], out["kl/rejected"] = kc.detach(), kr.detach()
    return out
