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

With reference logits x' (transformed the same way to z', q = softmax(z')) and
``kl=True``, the per-token full-vocabulary KL of the reference to the policy::

    kl = sum_v q_v (log q_v - log p_v)          (terms with q_v = 0 count 0)
    d kl / d x = (p - q) * dz/dx                (q is a constant: no reference gradient)

so a backward with upstream gradients g (log-prob) and g_kl (KL) writes
``(g onehot(y) - (g - g_kl) p - g_kl q) * dz/dx``.
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


def _transformed(x, temperature, softcap):
    return _capped(x.to(_acc_dtype(x.dtype)), softcap) / temperature


def _chunk_fwd(x, y, ignore_index, temperature, softcap, stats):
    """Log-probs (and stats) of one chunk of rows x [n, V] with labels y [n]."""
    z = _transformed(x, temperature, softcap)
    acc = z.dtype
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


def _chunk_kl(x, r, valid, temperature, softcap):
    """KL(q || p) per row of one chunk (policy rows x, reference rows r), 0 where not valid."""
    logp_all = torch.log_softmax(_transformed(x, temperature, softcap), dim=-1)
    logq_all = torch.log_softmax(_transformed(r, temperature, softcap), dim=-1)
    q = logq_all.exp()
    kl = torch.where(q > 0, q * (logq_all - logp_all), 0.0).sum(-1)
    return torch.where(valid, kl, 0.0)


@torch.no_grad()
def logprobs_fwd(logits, labels, ref_logits, ignore_index, temperature, softcap, stats, kl=False):
    if kl and ref_logits is None:
        raise ValueError("fastdpo: kl=True needs ref_logits")
    B, T, V = logits.shape
    acc = _acc_dtype(logits.dtype)
    logp = torch.zeros(B, T, dtype=acc, device=logits.device)
    lse = torch.zeros_like(logp)
    ref_logp = torch.zeros_like(logp) if ref_logits is not None else logp.new_empty(0)
    st = torch.zeros(B, T, 4, dtype=acc, device=logits.device) if stats else logp.new_empty(0)
    kl_out = torch.zeros_like(logp) if kl else logp.new_empty(0)
    ref_lse = torch.zeros_like(logp) if kl else logp.new_empty(0)
    for b, ts in _row_chunks(B, T, V):
        y = labels[b, ts]
        lp, ls, s = _chunk_fwd(logits[b, ts], y, ignore_index, temperature, softcap, stats)
        logp[b, ts], lse[b, ts] = lp, ls
        if stats:
            st[b, ts] = s
        if ref_logits is not None:
            rlp, rls, _ = _chunk_fwd(ref_logits[b, ts], y, ignore_index, temperature, softcap, False)
            ref_logp[b, ts] = rlp
            if kl:
                ref_lse[b, ts] = rls
                kl_out[b, ts] = _chunk_kl(logits[b, ts], ref_logits[b, ts], y != ignore_index, temperature, softcap)
    return logp, lse, ref_logp, st, kl_out, ref_lse


@torch.no_grad()
def logprobs_bwd(grad_logp, logits, labels, lse, ignore_index, temperature, softcap, inplace, grad_kl=None,
                 ref_logits=None, ref_lse=None):
    if grad_kl is not None and (ref_logits is None or ref_lse is None):
        raise ValueError("fastdpo: grad_kl needs ref_logits and ref_lse")
    B, T, V = logits.shape
    acc = _acc_dtype(logits.dtype)
    out = logits if inplace else torch.empty(B, T, V, dtype=logits.dtype, device=logits.device)
    for b, ts in _row_chunks(B, T, V):
        x = logits[b, ts].to(acc)
        y = labels[b, ts]
        valid = y != ignore_index
        g = torch.where(valid, grad_logp[b, ts].to(acc), 0.0).unsqueeze(-1)
        gk = torch.where(valid, grad_kl[b, ts].to(acc), 0.0).unsqueeze(-1) if grad_kl is not None else None
        if softcap > 0:
            th = torch.tanh(x / softcap)
            dzdx = (1 - th * th) / temperature
            z = softcap * th / temperature
        else:
            dzdx = 1.0 / temperature
            z = x / temperature
        p = torch.exp(z - lse[b, ts].unsqueeze(-1))
        onehot = torch.zeros_like(p).scatter_(-1, torch.where(valid, y, 0).unsqueeze(-1), 1.0)
        if gk is None:
            grad = torch.where(g != 0, g * (onehot - p) * dzdx, 0.0)
        else:
            q = torch.exp(_transformed(ref_logits[b, ts], temperature, softcap) - ref_lse[b, ts].unsqueeze(-1))
            grad = torch.where((g != 0) | (gk != 0), (g * (onehot - p) + gk * (p - q)) * dzdx, 0.0)
        out[b, ts] = grad.to(logits.dtype)
    return out


@torch.no_grad()
def segment_sum(values, offsets):
    """``out[k] = sum(values[offsets[k]:offsets[k+1]])`` in the accumulation dtype (packed batches).

    ``torch.segment_reduce`` reduces each segment on its own in a fixed order (a serial loop on CPU,
    CUB's segmented reduction on CUDA): the same answer every run, no atomics. ``offsets`` are
    validated by the caller (non-decreasing, within ``values``), so its own check (a device sync)
    is skipped."""
    acc = _acc_dtype(values.dtype)
    return torch.segment_reduce(values.to(acc), "sum", offsets=offsets, axis=0, unsafe=True, initial=0)
