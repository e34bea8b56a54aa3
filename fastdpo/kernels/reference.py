"""Plain-torch reference of the fused log-prob ops: the oracle for every backend.

Readable rather than fast, and row-chunked so it never needs O(B*T*V) extra
memory: each chunk of rows is upcast, transformed and reduced on its own.

Per token row with logits x and label y (c = soft cap, T = temperature)::

    s = c * tanh(x / c)        (s = x without soft cap)
    z = s / T
    lse = logsumexp(z)
    logp = z[y] - lse          (0 where y == ignore_index)
    stats = [entropy = -sum p log p, 1[argmax z == y], mean(z), log sum p^2]
    d logp / d x = (onehot(y) - softmax(z)) * (1 - tanh^2(x / c)) / T
"""

from __future__ import annotations

import torch

# Upcast at most this many elements at a time (64 MiB of float32).
_CHUNK_ELEMS = 1 << 24


def unavailable_reason(device: torch.device) -> str | None:
    return None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(B: int, T: int, V: int):
    step = max(1, _CHUNK_ELEMS // max(V, 1))
    for b in range(B):
        for t0 in range(0, T, step):
            yield b, slice(t0, min(T, t0 + step))


def _capped(x: torch.Tensor, softcap: float) -> torch.Tensor:
    return softcap * torch.tanh(x / softcap) if softcap > 0 else x


def _chunk_fwd(x, y, ignore_index, temperature, softcap, stats):
    """Log-probs (and stats) of one chunk of rows x [n, V] with labels y [n]."""
    acc = _acc_dtype(x.dtype)
    s = _capped(x.to(acc), softcap)
    z = s / temperature
    valid = y != ignore_index
    safe_y = torch.where(valid, y, 0).unsqueeze(-1)
    lse = torch.logsumexp(z, dim=-1)
    logp = torch.where(valid, z.gather(-1, safe_y).squeeze(-1) - lse, 0.0)
    st = None
    if stats:
        logp_all = z - lse.unsqueeze(-1)
        p = logp_all.exp()
        entropy = -torch.where(p > 0, p * logp_all, 0.0).sum(-1)
        hit = (z.argmax(-1) == y).to(acc)
        mean_logit = z.mean(-1)
        log_sum_p2 = torch.logsumexp(2 * logp_all, dim=-1)
        st = torch.stack([entropy, hit, mean_logit, log_sum_p2], dim=-1)
        st = torch.where(valid.unsqueeze(-1), st, 0.0)
    return logp, torch.where(valid, lse, 0.0), st


@torch.no_grad()
def logprobs_fwd(logits, labels, ref_logits, ignore_index, temperature, softcap, stats):
    B, T, V = logits.shape
    acc = _acc_dtype(logits.dtype)
    logp = torch.zeros(B, T, dtype=acc, device=logits.device)
    lse = torch.zeros_like(logp)
    ref_logp = torch.zeros_like(logp) if ref_logits is not None else logp.new_empty(0)
    st = torch.zeros(B, T, 4, dtype=acc, device=logits.device) if stats else logp.new_empty(0)
    for b, ts in _row_chunks(B, T, V):
        y = labels[b, ts]
        lp, ls, s = _chunk_fwd(logits[b, ts], y, ignore_index, temperature, softcap, stats)
        logp[b, ts], lse[b, ts] = lp, ls
        if stats:
            st[b, ts] = s
        if ref_logits is not None:
            ref_logp[b, ts] = _chunk_fwd(ref_logits[b, ts], y, ignore_index, temperature, softcap, False)[0]
    return logp, lse, ref_logp, st


@torch.no_grad()
def logprobs_bwd(grad_logp, logits, labels, lse, ignore_index, temperature, softcap, inplace):
    B, T, V = logits.shape
    acc = _acc_dtype(logits.dtype)
    out = logits if inplace else torch.empty(B, T, V, dtype=logits.dtype, device=logits.device)
    for b, ts in _row_chunks(B, T, V):
        x = logits[b, ts].to(acc)
        y = labels[b, ts]
        valid = y != ignore_index
        g = torch.where(valid, grad_logp[b, ts].to(acc), 0.0).unsqueeze(-1)
        if softcap > 0:
            th = torch.tanh(x / softcap)
            dzdx = (1 - th * th) / temperature
            z = softcap * th / temperature
        else:
            dzdx = 1.0 / temperature
            z = x / temperature
        p = torch.exp(z - lse[b, ts].unsqueeze(-1))
        onehot = torch.zeros_like(p).scatter_(-1, torch.where(valid, y, 0).unsqueeze(-1), 1.0)
        grad = torch.where(g != 0, g * (onehot - p) * dzdx, 0.0)
        out[b, ts] = grad.to(logits.dtype)
    return out
