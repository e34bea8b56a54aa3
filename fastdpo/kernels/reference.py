"""Plain-torch reference of the fused log-prob ops: the oracle for every backend.

Written with plain torch ops and bounded memory: the rows are processed a block
at a time (:data:`_CHUNK_ELEMS` elements), in place in a few workspaces made once
per call and reused by every block, so no ``[N, V]`` temporary is ever made
(freshly allocated buffers of that size cost more in page faults than the
arithmetic). Only the backward's output is ``[N, V]``; the forward's
``log_softmax`` is the same fused op a naive implementation uses.

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

# Elements per block of rows (64 MiB of float32 per workspace). Every op over a block is one
# parallel region; blocks this large keep their number small, which matters most on a busy
# machine (where smaller, cache-resident blocks lose far more to thread synchronisation).
_CHUNK_ELEMS = 1 << 24


def unavailable_reason(device: torch.device) -> str | None:
    return None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _capped(x: torch.Tensor, softcap: float) -> torch.Tensor:
    return softcap * torch.tanh(x / softcap) if softcap > 0 else x


def _flat(t: torch.Tensor | None) -> bool:
    """Whether the rows of a [B, T, V] tensor form one [B*T, V] view."""
    return t is None or t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1)


def _blocks(tensors, B: int, T: int, V: int) -> list[tuple[int, int]]:
    """Flat row ranges ``(r0, r1)`` of at most ``_CHUNK_ELEMS`` elements; within one batch row
    when some tensor's rows do not form one view."""
    step = max(1, _CHUNK_ELEMS // max(V, 1))
    flat = True
    for t in tensors:
        flat = flat and _flat(t)
    spans = [(0, B * T)] if flat else [(b * T, (b + 1) * T) for b in range(B)]
    return [(r0, min(hi, r0 + step)) for lo, hi in spans for r0 in range(lo, hi, step)]


def _rows(t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 (flat [B*T] numbering) of a [B, T, V] tensor as an [n, V] view."""
    B, T, V = t.shape
    if _flat(t):
        return t.view(B * T, V)[r0:r1] if t.stride(0) == T * t.stride(1) else t[0, r0:r1]
    return t[r0 // T, r0 % T : r0 % T + (r1 - r0)]


class _Workspace:
    """[rows, V] buffers in the accumulation dtype, made on first use and reused by every block."""

    def __init__(self, rows: int, V: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = (rows, V), dtype, device
        self.bufs: dict[int, torch.Tensor] = {}

    def __getitem__(self, i: int) -> torch.Tensor:
        buf = self.bufs.get(i)
        if buf is None:
            buf = self.bufs[i] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return buf


def _transformed(x: torch.Tensor, temperature: float, softcap: float, acc, ws: _Workspace, i: int) -> torch.Tensor:
    """``s(x) / T`` of a block in the accumulation dtype: ``x`` itself when there is nothing to do,
    else computed into workspace ``i``."""
    if x.dtype == acc and softcap == 0 and temperature == 1:
        return x
    z = ws[i][: x.shape[0]]
    z.copy_(x)
    if softcap > 0:
        z.div_(softcap).tanh_().mul_(softcap)
    if temperature != 1:
        z.div_(temperature)
    return z


def _block_fwd(z, y, valid, stats, ws, first):
    """Log-probs, log-sum-exp (and stats) of one block of transformed rows z [n, V]; the block's
    log-softmax is left in workspace ``first`` (workspace 2 is scratch for the stats)."""
    n = z.shape[0]
    safe_y = torch.where(valid, y, 0).unsqueeze(-1)
    lsm = torch.log_softmax(z, -1, out=ws[first][:n])
    logp_y = lsm.gather(-1, safe_y).squeeze(-1)
    lse = z.gather(-1, safe_y).squeeze(-1) - logp_y  # log-sum-exp, as z_y - log p_y
    bad = ~torch.isfinite(lse)  # an infinite label logit: take it the long way
    if torch.compiler.is_compiling() or bool(bad.any()):  # (no data-dependent branch in a traced graph)
        lse = torch.where(bad, torch.logsumexp(z, -1), lse)
    logp = torch.where(valid, logp_y, 0.0)
    st = None
    if stats:
        p = torch.exp(lsm, out=ws[2][:n])
        log_sum_p2 = 2 * torch.linalg.vector_norm(p, dim=-1).log()
        # -sum p log p, with 0 log 0 = 0 (the NaN of 0 * -inf), in place of p
        entropy = -p.mul_(lsm).nan_to_num_(0.0, float("inf"), float("-inf")).sum(-1)
        hit = (z.argmax(-1) == y).to(z.dtype)  # the first maximum
        mean_logit = z.mean(-1)
        st = torch.stack([entropy, hit, mean_logit, log_sum_p2], dim=-1)
        st = torch.where(valid.unsqueeze(-1), st, 0.0)
    return logp, torch.where(valid, lse, 0.0), st


@torch.no_grad()
def logprobs_fwd(logits, labels, ref_logits, ignore_index, temperature, softcap, stats, kl=False):
    if kl and ref_logits is None:
        raise ValueError("fastdpo: kl=True needs ref_logits")
    B, T, V = logits.shape
    acc = _acc_dtype(logits.dtype)
    dev = logits.device
    logp = torch.zeros(B * T, dtype=acc, device=dev)
    lse = torch.zeros_like(logp)
    ref_logp = torch.zeros_like(logp) if ref_logits is not None else logp.new_empty(0)
    st = torch.zeros(B * T, 4, dtype=acc, device=dev) if stats else logp.new_empty(0)
    kl_out = torch.zeros_like(logp) if kl else logp.new_empty(0)
    ref_lse = torch.zeros_like(logp) if kl else logp.new_empty(0)
    rows = max(1, min(B * T, _CHUNK_ELEMS // max(V, 1)))
    # 0: policy z, 1: policy log-softmax, 2: scratch (probabilities), 4: reference z, 5: reference log-softmax
    ws = _Workspace(rows, V, acc, dev)
    flat_labels = labels.reshape(B * T)
    for r0, r1 in _blocks((logits, ref_logits), B, T, V):
        y = flat_labels[r0:r1]
        valid = y != ignore_index
        z = _transformed(_rows(logits, r0, r1), temperature, softcap, acc, ws, 0)
        lp, ls, s = _block_fwd(z, y, valid, stats, ws, 1)
        logp[r0:r1], lse[r0:r1] = lp, ls
        if stats:
            st[r0:r1] = s
        if ref_logits is not None:
            zr = _transformed(_rows(ref_logits, r0, r1), temperature, softcap, acc, ws, 4)
            lpr, lsr, _ = _block_fwd(zr, y, valid, False, ws, 5)
            ref_logp[r0:r1] = lpr
            if kl:
                ref_lse[r0:r1] = lsr
                n = r1 - r0
                lsm, lsq = ws[1][:n], ws[5][:n]
                q = torch.exp(lsq, out=ws[2][:n])
                # q (log q - log p), 0 where q = 0 (the NaN of 0 * -inf), +inf where only p = 0; in place of log q
                terms = lsq.sub_(lsm).mul_(q).nan_to_num_(0.0, float("inf"), float("-inf"))
                kl_out[r0:r1] = torch.where(valid, terms.sum(-1), 0.0)
    shape = (B, T)
    return (logp.view(shape), lse.view(shape), ref_logp.view(shape) if ref_logits is not None else ref_logp,
            st.view(B, T, 4) if stats else st, kl_out.view(shape) if kl else kl_out,
            ref_lse.view(shape) if kl else ref_lse)


@torch.no_grad()
def logprobs_bwd(grad_logp, logits, labels, lse, ignore_index, temperature, softcap, inplace, grad_kl=None,
                 ref_logits=None, ref_lse=None):
    if grad_kl is not None and (ref_logits is None or ref_lse is None):
        raise ValueError("fastdpo: grad_kl needs ref_logits and ref_lse")
    B, T, V = logits.shape
    acc = _acc_dtype(logits.dtype)
    dev = logits.device
    out = logits if inplace else torch.empty(B, T, V, dtype=logits.dtype, device=dev)
    rows = max(1, min(B * T, _CHUNK_ELEMS // max(V, 1)))
    direct = logits.dtype == acc  # the gradient is formed in the output itself
    # 0: tanh(x / c) then dz/dx (soft cap), 1: the gradient (unless direct), 2: reference probabilities
    ws = _Workspace(rows, V, acc, dev)
    flat_labels, flat_lse = labels.reshape(B * T), lse.reshape(B * T)
    flat_g = grad_logp.reshape(B * T)
    flat_gk = grad_kl.reshape(B * T) if grad_kl is not None else None
    flat_ref_lse = ref_lse.reshape(B * T) if grad_kl is not None else None
    for r0, r1 in _blocks((logits, ref_logits, out), B, T, V):
        n = r1 - r0
        x, o = _rows(logits, r0, r1), _rows(out, r0, r1)
        y = flat_labels[r0:r1]
        valid = y != ignore_index
        g = torch.where(valid, flat_g[r0:r1].to(acc), 0.0).unsqueeze(-1)
        gk = torch.where(valid, flat_gk[r0:r1].to(acc), 0.0).unsqueeze(-1) if flat_gk is not None else None
        grad = o if direct else ws[1][:n]
        lse_col = flat_lse[r0:r1].unsqueeze(-1)
        if gk is not None:  # before the policy rows are overwritten (the reference may alias them)
            qbuf = ws[2][:n]
            zr = _transformed(_rows(ref_logits, r0, r1), temperature, softcap, acc, ws, 2)
            q = torch.sub(zr, flat_ref_lse[r0:r1].unsqueeze(-1), out=qbuf).exp_()
        dzdx = 1.0 / temperature
        if softcap > 0:
            th = ws[0][:n].copy_(x).div_(softcap).tanh_()
            p = torch.mul(th, softcap, out=grad).div_(temperature).sub_(lse_col).exp_()  # softmax(z)
            dzdx = th.square_().neg_().add_(1.0).div_(temperature)
        elif x.dtype != acc or temperature != 1:
            z = grad.copy_(x).div_(temperature) if temperature != 1 else grad.copy_(x)
            p = z.sub_(lse_col).exp_()
        else:
            p = torch.sub(x, lse_col, out=grad).exp_()
        if gk is None:
            p.mul_(-g)
            keep = g != 0
        else:
            p.mul_(gk - g).addcmul_(q, gk, value=-1.0)
            keep = (g != 0) | (gk != 0)
        p.scatter_add_(-1, torch.where(valid, y, 0).unsqueeze(-1), g)
        if softcap > 0 or temperature != 1:
            p.mul_(dzdx)
        p.masked_fill_(~keep, 0.0)  # rows without upstream gradient are exactly 0 (whatever the logits hold)
        if not direct:
            o.copy_(p)
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
