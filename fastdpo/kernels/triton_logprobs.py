"""Triton kernels of the fused log-prob ops (imported lazily by ``kernels/triton.py``).

Forward: one program per token row walks the vocabulary in blocks, keeping the
online max / sum-exp (and, for statistics, ``sum e (z - m)``, ``sum e^2``, the
sum of z and the first argmax), reads the label logit, and folds the reference
row in the same launch; with KL the reference pass also re-reads the (L2-hot)
policy row to fold ``KL(q || p)``. Backward: a 2-D grid (rows x vocabulary
blocks) writes ``g (onehot - softmax(z)) dz/dx`` (plus the KL term
``gk (p - q) dz/dx`` when asked), optionally into the logits themselves.
Math in fp32, row offsets in int64. Same definitions as ``kernels/reference.py``
and ``csrc/include/fastdpo/math.h``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _transform(x, inv_t, softcap, inv_softcap, HAS_CAP: tl.constexpr):
    """z = s(x) / T and dz/dx, with s(x) = c tanh(x / c) written through
    e = exp(-2|x|/c): tanh = (1 - e) / (1 + e), 1 - tanh^2 = 4e / (1 + e)^2."""
    if HAS_CAP:
        e = tl.exp(-2.0 * tl.abs(x) * inv_softcap)
        inv = 1.0 / (1.0 + e)
        th = (1.0 - e) * inv
        z = softcap * tl.where(x < 0, -th, th) * inv_t
        dz = 4.0 * e * inv * inv * inv_t
    else:
        z = x * inv_t
        dz = tl.full(x.shape, 1.0, tl.float32) * inv_t
    return z, dz


@triton.jit
def _row_reduce(row_ptr, V, inv_t, softcap, inv_softcap, BLOCK: tl.constexpr, HAS_CAP: tl.constexpr,
                STATS: tl.constexpr):
    """Online log-sum-exp over one row. Returns (lse, entropy, log sum p^2, mean z,
    first argmax, nan count); the statistics only when STATS."""
    m = -float("inf")
    s = 0.0
    sz = 0.0  # sum e (z - m): entropy = log s - sz / s
    s2 = 0.0  # sum e^2:       log sum p^2 = log s2 - 2 log s
    zsum = 0.0
    best = -float("inf")
    best_idx = 0
    nans = 0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < V
        x = tl.load(row_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        z, _ = _transform(x, inv_t, softcap, inv_softcap, HAS_CAP)
        nans += tl.sum(((z != z) & valid).to(tl.int32), axis=0)
        zm = tl.where(valid & (z == z), z, -float("inf"))
        bm = tl.max(zm, axis=0)
        new_m = tl.maximum(m, bm)
        if new_m != -float("inf"):
            f_old = tl.where(m == -float("inf"), 0.0, tl.exp(m - new_m))
            d = zm - new_m
            e = tl.where(zm == -float("inf"), 0.0, tl.exp(d))
            if STATS:
                shift = tl.where(m == -float("inf"), 0.0, m - new_m)
                sz = f_old * (sz + s * shift) + tl.sum(tl.where(e > 0, e * d, 0.0), axis=0)
                s2 = s2 * f_old * f_old + tl.sum(e * e, axis=0)
            s = s * f_old + tl.sum(e, axis=0)
            m = new_m
        if STATS:
            zsum += tl.sum(tl.where(valid, z, 0.0), axis=0)
            idx = tl.min(tl.where(zm == bm, cols, V), axis=0)
            take = bm > best
            best_idx = tl.where(take, idx, best_idx)
            best = tl.where(take, bm, best)
    lse = m + tl.log(s)
    if STATS:
        ent = tl.log(s) - sz / s
        lsp2 = tl.log(s2) - 2.0 * tl.log(s)
    else:
        ent = 0.0
        lsp2 = 0.0
    # m and log s apart as well: the KL pass forms log p = (z - m) - log s without a rounded lse.
    return lse, ent, lsp2, zsum / V, best_idx, nans, m, tl.log(s)


@triton.jit
def _ref_kl_reduce(r_row, x_row, m_p, log_s_p, V, inv_t, softcap, inv_softcap, BLOCK: tl.constexpr,
                   HAS_CAP: tl.constexpr):
    """Online fold of the reference row z' against the policy's log-probs (z - m_p) - log s_p:
    (m, s, a) with a = sum e (d - log p), e = exp(d), d = z' - m, rescaled like
    the entropy accumulator. Returns (ref lse, KL(q || p) = a / s - log s, nan count
    of the reference row)."""
    m = -float("inf")
    s = 0.0
    a = 0.0
    nans = 0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < V
        xr = tl.load(r_row + cols, mask=valid, other=0.0).to(tl.float32)
        zr, _ = _transform(xr, inv_t, softcap, inv_softcap, HAS_CAP)
        x = tl.load(x_row + cols, mask=valid, other=0.0).to(tl.float32)
        z, _ = _transform(x, inv_t, softcap, inv_softcap, HAS_CAP)
        nans += tl.sum(((zr != zr) & valid).to(tl.int32), axis=0)
        zm = tl.where(valid & (zr == zr), zr, -float("inf"))
        new_m = tl.maximum(m, tl.max(zm, axis=0))
        if new_m != -float("inf"):
            f_old = tl.where(m == -float("inf"), 0.0, tl.exp(m - new_m))
            shift = tl.where(m == -float("inf"), 0.0, m - new_m)
            d = zm - new_m
            e = tl.where(zm == -float("inf"), 0.0, tl.exp(d))
            # q_v = 0 terms count 0 (also where p_v = 0 would give 0 * inf)
            a = f_old * (a + s * shift) + tl.sum(tl.where(e > 0, e * (d - ((z - m_p) - log_s_p)), 0.0), axis=0)
            s = s * f_old + tl.sum(e, axis=0)
            m = new_m
    return m + tl.log(s), a / s - tl.log(s), nans


@triton.jit
def logprobs_fwd_kernel(
    x_ptr, r_ptr, y_ptr, logp_ptr, lse_ptr, ref_ptr, st_ptr, kl_ptr, rlse_ptr,
    T, sxb, sxt, srb, srt, V, ignore_index, inv_t, softcap, inv_softcap,
    BLOCK: tl.constexpr, HAS_CAP: tl.constexpr, STATS: tl.constexpr, HAS_REF: tl.constexpr, KL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(y_ptr + row)
    if label == ignore_index:
        return  # outputs were zero-initialised
    b = row // T
    t = row % T
    x_row = x_ptr + b * sxb + t * sxt
    lse, ent, lsp2, zmean, best_idx, nans, m, log_s = _row_reduce(x_row, V, inv_t, softcap, inv_softcap, BLOCK,
                                                                    HAS_CAP, STATS)
    safe = tl.minimum(tl.maximum(label, 0), V - 1)  # read in bounds; a label outside [0, V) gives NaN
    z_y, _ = _transform(tl.load(x_row + safe).to(tl.float32), inv_t, softcap, inv_softcap, HAS_CAP)
    nan = float("nan")
    bad = (nans > 0) | (safe != label)
    lse = tl.where(bad, nan, lse)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, z_y - lse)
    if STATS:
        tl.store(st_ptr + row * 4 + 0, tl.where(bad, nan, ent))
        tl.store(st_ptr + row * 4 + 1, tl.where(bad, nan, (best_idx == label).to(tl.float32)))
        tl.store(st_ptr + row * 4 + 2, tl.where(bad, nan, zmean))
        tl.store(st_ptr + row * 4 + 3, tl.where(bad, nan, lsp2))
    if HAS_REF:
        r_row = r_ptr + b * srb + t * srt
        if KL:
            # KL needs the policy lse, so the reference pass comes second and also yields the reference lse.
            rlse, kl, rnans = _ref_kl_reduce(r_row, x_row, m, log_s, V, inv_t, softcap, inv_softcap, BLOCK, HAS_CAP)
            rlse = tl.where((rnans > 0) | bad, nan, rlse)
            tl.store(rlse_ptr + row, rlse)
            tl.store(kl_ptr + row, tl.where((rnans > 0) | bad, nan, kl))
        else:
            rlse, _, _, _, _, rnans, _, _ = _row_reduce(r_row, V, inv_t, softcap, inv_softcap, BLOCK, HAS_CAP, False)
            rlse = tl.where((rnans > 0) | (safe != label), nan, rlse)
        rz_y, _ = _transform(tl.load(r_row + safe).to(tl.float32), inv_t, softcap, inv_softcap, HAS_CAP)
        tl.store(ref_ptr + row, rz_y - rlse)


@triton.jit
def logprobs_bwd_kernel(
    g_ptr, x_ptr, y_ptr, lse_ptr, out_ptr, gk_ptr, r_ptr, rlse_ptr,
    T, sxb, sxt, sob, sot, srb, srt, V, ignore_index, inv_t, softcap, inv_softcap,
    BLOCK: tl.constexpr, HAS_CAP: tl.constexpr, HAS_KL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < V
    b = row // T
    t = row % T
    label = tl.load(y_ptr + row)
    g = tl.load(g_ptr + row).to(tl.float32)
    if HAS_KL:
        gk = tl.load(gk_ptr + row).to(tl.float32)
        skip = (label == ignore_index) | ((g == 0.0) & (gk == 0.0))
    else:
        gk = 0.0
        skip = (label == ignore_index) | (g == 0.0)
    o_row = out_ptr + b * sob + t * sot
    if skip:
        tl.store(o_row + cols, tl.zeros([BLOCK], dtype=tl.float32).to(out_ptr.dtype.element_ty), mask=valid)
    else:
        lse = tl.load(lse_ptr + row)
        x = tl.load(x_ptr + b * sxb + t * sxt + cols, mask=valid, other=0.0).to(tl.float32)
        z, dz = _transform(x, inv_t, softcap, inv_softcap, HAS_CAP)
        p = tl.exp(z - lse)
        onehot = (cols == label).to(tl.float32)
        if HAS_KL:
            # (g 1[v == y] - (g - gk) p - gk q) dz/dx; the reference row is only read where gk != 0.
            gq = tl.zeros([BLOCK], dtype=tl.float32)
            if gk != 0.0:
                rlse = tl.load(rlse_ptr + row)
                xr = tl.load(r_ptr + b * srb + t * srt + cols, mask=valid, other=0.0).to(tl.float32)
                zr, _ = _transform(xr, inv_t, softcap, inv_softcap, HAS_CAP)
                gq = gk * tl.exp(zr - rlse)
            grad = (g * onehot - (g - gk) * p - gq) * dz
        else:
            grad = g * (onehot - p) * dz
        tl.store(o_row + cols, grad.to(out_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------- fused-linear folds
# A fused-linear loop computes the logits one [tokens, vocab chunk] tile at a
# time (tile = hidden @ W[v0:v0+c].T) and folds each tile while it is hot.


@triton.jit
def lse_fold_kernel(
    tile_ptr, y_ptr, m_ptr, s_ptr, zy_ptr, stride_n, C, v_offset, inv_t, softcap, inv_softcap,
    BLOCK: tl.constexpr, HAS_CAP: tl.constexpr,
):
    """Fold one tile row into the running (m, s) of its token and pick up the
    label's z when the label falls inside this vocabulary chunk."""
    row = tl.program_id(0).to(tl.int64)
    m = tl.load(m_ptr + row)
    s = tl.load(s_ptr + row)
    label = tl.load(y_ptr + row) - v_offset
    t_row = tile_ptr + row * stride_n
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < C
        x = tl.load(t_row + cols, mask=valid, other=0.0).to(tl.float32)
        z, _ = _transform(x, inv_t, softcap, inv_softcap, HAS_CAP)
        z = tl.where(valid, z, -float("inf"))
        bm = tl.max(z, axis=0)
        new_m = tl.maximum(m, bm)
        if new_m != -float("inf"):
            f_old = tl.where(m == -float("inf"), 0.0, tl.exp(m - new_m))
            e = tl.where(z == -float("inf"), 0.0, tl.exp(z - new_m))
            s = s * f_old + tl.sum(e, axis=0)
            m = new_m
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    if (label >= 0) & (label < C):
        zy, _ = _transform(tl.load(t_row + label).to(tl.float32), inv_t, softcap, inv_softcap, HAS_CAP)
        tl.store(zy_ptr + row, zy)


@triton.jit
def tile_grad_kernel(
    tile_ptr, y_ptr, lse_ptr, g_ptr, stride_n, C, v_offset, inv_t, softcap, inv_softcap,
    BLOCK: tl.constexpr, HAS_CAP: tl.constexpr,
):
    """Overwrite a recomputed tile with its logits gradient g (onehot - p) dz/dx."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < C
    g = tl.load(g_ptr + row)
    lse = tl.load(lse_ptr + row)
    label = tl.load(y_ptr + row) - v_offset
    ptr = tile_ptr + row * stride_n + cols
    x = tl.load(ptr, mask=valid, other=0.0).to(tl.float32)
    z, dz = _transform(x, inv_t, softcap, inv_softcap, HAS_CAP)
    grad = g * ((cols == label).to(tl.float32) - tl.exp(z - lse)) * dz
    grad = tl.where(g == 0.0, 0.0, grad)
    tl.store(ptr, grad.to(tile_ptr.dtype.element_ty), mask=valid)


@triton.jit
def segment_sum_kernel(v_ptr, off_ptr, out_ptr, BLOCK: tl.constexpr):
    """out[k] = sum(v[off[k]:off[k+1]]): one program per segment, blocks summed in
    order, so the result does not depend on scheduling (deterministic)."""
    k = tl.program_id(0).to(tl.int64)
    start = tl.load(off_ptr + k)
    end = tl.load(off_ptr + k + 1)
    acc = 0.0
    for i in range(start, end, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        acc += tl.sum(tl.load(v_ptr + idx, mask=idx < end, other=0.0).to(tl.float32), axis=0)
    tl.store(out_ptr + k, acc)
