"""Triton kernels of the fused log-prob ops (imported lazily by ``kernels/triton.py``).

Same definitions as ``kernels/reference.py`` and ``csrc/include/fastdpo/math.h``; math in fp32.

Memory-bound by construction (the loop bodies are counted from SASS by
``fastdpo.bench.triton_static``):

* **Per-lane running state, one reduction per row.** A program walks its part of a row in
  blocks of two ``[LANES, VEC]`` tiles (LANES = its threads, VEC = one 128-bit load); each
  lane keeps its own running max and sums over the vocabulary and exponentiates every element
  once against it (``v = (u - m) c`` in log2 units, ``e = 2^v``); the lane's chunk of VEC
  elements rescales the lane's sums once. Lanes are merged once at the end of the row
  (a max, then weighted sums), so the loop has no barrier and no shuffle.
* **Statistics only when asked, with no extra exponentials:** entropy from ``sum e v``,
  ``log sum p^2`` from ``sum e^2``, the mean from ``sum u``, the first argmax from the lanes'
  chunk maxima (the winning chunk is read again at the end).
* **KL(q || p) in one read of both rows:** the policy and reference lanes advance together and
  ``A = sum e_r (v_r - v_p)`` is rescaled like the entropy sum, so
  ``KL = ln2 A / s_r - ln s_r + ln s_p``.
* **Soft cap** ``z = c tanh(x / c) / T``: ``|z| <= c / T``, so for ``c / T <= 40`` the max is
  fixed at ``c / T`` (no running max, no rescale; ``CAP == 1``), else it runs (``CAP == 2``).
  On the GPU (``FAST``) 16-bit inputs use ``tanh.approx.f32`` (one SFU op, relative error
  about 1.1e-5, below their own rounding) and fp32 inputs ``(1 - e) / (1 + e)`` with
  ``e = 2^(-2|y| log2 e)`` on the SFU; the second tile of each block exponentiates on the FMA
  units (:func:`_ex2_fma`) so that a soft-capped element costs 1.5 SFU ops, not 2. The label's
  logit is always transformed exactly.
* **Aligned rows whatever V:** each row starts at its own 16-byte boundary at or before the row
  (its *phase* from the pointer's address), so every full block is read with 128-bit loads; the
  partial first and last blocks are masked. Rows of two tensors read together (the KL's
  reference, the backward's output) use the fast path when their phases agree.
* **Split over the vocabulary**: few rows get several programs each, which write
  their merged partial state to a workspace that :func:`logprobs_combine_kernel` merges.

Backward: programs of ``BPP`` blocks write ``g (onehot - p) dz/dx`` (plus the KL term
``gk (p - q) dz/dx`` where ``gk != 0``) with 128-bit stores, optionally into the logits.
"""

from __future__ import annotations

import triton
import triton.language as tl

_INF = tl.constexpr(float("inf"))
_BIG = tl.constexpr(1 << 30)  # "no column yet" for the argmax

# Integer arguments have fixed types (strides int64) and are not specialised, nor are the
# inputs' alignments: the kernels align rows themselves, so one compiled kernel serves every
# vocabulary size, stride and offset (and the variants stay few).
_FWD_INTS = ["T", "sxb", "sxt", "srb", "srt", "V", "BPS", "ignore_index"]
_FWD_PTRS = ["x_ptr", "r_ptr", "y_ptr"]
_BWD_INTS = ["T", "sxb", "sxt", "sob", "sot", "srb", "srt", "V", "BPP", "ignore_index"]
_BWD_PTRS = ["g_ptr", "x_ptr", "y_ptr", "lse_ptr", "out_ptr", "gk_ptr", "r_ptr", "rlse_ptr"]


# ----------------------------------------------------------------------------- elementwise math


@triton.jit
def _ex2(v, FAST: tl.constexpr):
    """2^v on the SFU: one ``ex2.approx.ftz`` (about 2 ulp; results below 2^-126 flush to 0)."""
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [v], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(v)


@triton.jit
def _ex2_fma(v, DEG: tl.constexpr):
    """2^v for v in [-125, 0] on the FMA units: v = n + f (|f| <= 1/2, n by the 1.5 * 2^23
    rounding trick), a minimax polynomial for 2^f (relative error in fp32: degree 5 2.3e-7, like
    the SFU's; degree 4 2.7e-6, for 16-bit inputs) and n added to its exponent bits."""
    t = v + 12582912.0
    f = v - (t - 12582912.0)
    if DEG == 4:
        p = 0.009570610709488392 * f + 0.055917903780937195
        p = p * f + 0.24024732410907745
        p = p * f + 0.6931217908859253
        p = p * f + 0.9999992847442627
    else:
        p = 0.001327697653323412 * f + 0.009675545617938042
        p = p * f + 0.0555071160197258
        p = p * f + 0.24022120237350464
        p = p * f + 0.6931469440460205
        p = p * f + 1.0000001192092896
    return (p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _rcp(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _tanh(y, FAST: tl.constexpr, APPROX: tl.constexpr):
    """tanh(y): ``tanh.approx.f32`` when APPROX (GPU, 16-bit inputs), else (1 - e) / (1 + e)
    with e = exp(-2|y|), sign restored."""
    if APPROX:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [y], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        e = _ex2(-2.8853900817779268 * tl.abs(y), FAST)
        t = (1.0 - e) * _rcp(1.0 + e, FAST)
        return tl.where(y < 0, -t, t)


@triton.jit
def _u(x, inv_cap, CAP: tl.constexpr, FAST: tl.constexpr, APPROX: tl.constexpr):
    """The monotone part of the transform: z = u * kz with u = x (kz = 1/T) or
    u = tanh(x / c) (kz = c / T)."""
    if CAP == 0:
        return x
    else:
        return _tanh(x * inv_cap, FAST, APPROX)


@triton.jit
def _aligned(ptr, off, VEC: tl.constexpr):
    """(base, phase): the row ``ptr + off`` starts ``phase`` elements after the 16-byte aligned
    ``base`` (hinted as such, so full blocks from it load as 128-bit vectors)."""
    phase = ((ptr.to(tl.int64, bitcast=True) // (16 // VEC) + off) % VEC).to(tl.int32)
    return tl.multiple_of(ptr + (off - phase), 16), phase


# ----------------------------------------------------------------------------- merging running states
# A state is (mc, s[, t]) with mc the max in log2 units (-inf: empty), s = sum 2^v and
# t = sum e v (entropy) or sum e_r (v_r - v_p) (KL), v relative to mc. These merge lanes,
# the two tiles of a block, and the programs of a split row.


@triton.jit
def _rebase(mc, s, MC):
    """Weight 2^(mc - MC) of a state against the merged max MC, and s * (mc - MC) (0 if s == 0)."""
    d = tl.where(mc == -_INF, -_INF, mc - MC)
    return tl.exp2(d), tl.where(s > 0, s * d, 0.0)


@triton.jit
def _c_lse(m1, s1, m2, s2):
    m = tl.maximum(m1, m2)
    w1, _ = _rebase(m1, s1, m)
    w2, _ = _rebase(m2, s2, m)
    return m, w1 * s1 + w2 * s2


@triton.jit
def _c_ent(m1, s1, t1, m2, s2, t2):
    m = tl.maximum(m1, m2)
    w1, sd1 = _rebase(m1, s1, m)
    w2, sd2 = _rebase(m2, s2, m)
    t = tl.where(w1 > 0, w1 * (t1 + sd1), 0.0) + tl.where(w2 > 0, w2 * (t2 + sd2), 0.0)
    return m, w1 * s1 + w2 * s2, t


@triton.jit
def _c_argmax(b1, i1, b2, i2):
    """The larger value; on ties the smaller (first) column."""
    take = (b2 > b1) | ((b2 == b1) & (i2 < i1))
    return tl.where(take, b2, b1), tl.where(take, i2, i1)


@triton.jit
def _mc(m, c):
    """Lane max in log2 units (-inf stays -inf)."""
    return tl.where(m == -_INF, -_INF, m * c)


@triton.jit
def _lse_all(mc, s):
    """Merge the states along a vector (lanes, or the segments of a split row)."""
    MC = tl.max(mc, 0)
    w, _ = _rebase(mc, s, MC)
    return MC, tl.sum(w * s, 0)


@triton.jit
def _ent_all(mc, s, t):
    MC = tl.max(mc, 0)
    w, sd = _rebase(mc, s, MC)
    return MC, tl.sum(w * s, 0), tl.sum(tl.where(w > 0, w * (t + sd), 0.0), 0)


@triton.jit
def _argmax_all(best, col):
    B = tl.max(best, 0)
    return B, tl.min(tl.where(best == B, col, _BIG), 0)


@triton.jit
def _merge_policy(st, STATS: tl.constexpr):
    """Merge the lanes [L] of a policy state (max in log2 units) into scalars
    (mc, s, t, q2, zs, best, bcol) where q2 = sum e^2 merges as an lse state with the doubled max."""
    mc, s, t, s2, zs, best, bcol = st
    if STATS:
        MC, S, Tt = _ent_all(mc, s, t)
        _, S2 = _lse_all(2.0 * mc, s2)
        B, BI = _argmax_all(best, bcol)
        return MC, S, Tt, S2, tl.sum(zs, 0), B, BI
    else:
        MC, S = _lse_all(mc, s)
        return MC, S, 0.0, 0.0, 0.0, 0.0, 0


@triton.jit
def _merge_tiles(a, b, c, STATS: tl.constexpr, CAP: tl.constexpr):
    """Elementwise merge of the two tiles' lane states; the max goes to log2 units (times c)."""
    ma, sa, ta, qa, za, ba, ia = a
    mb, sb, tb, qb, zb, bb, ib = b
    if CAP != 1:  # running max: the best value is the max
        ba = ma
        bb = mb
    ma = _mc(ma, c)
    mb = _mc(mb, c)
    if STATS:
        m, s, t = _c_ent(ma, sa, ta, mb, sb, tb)
        _, q = _c_lse(2.0 * ma, qa, 2.0 * mb, qb)
        best, bcol = _c_argmax(ba, ia, bb, ib)
        return m, s, t, q, za + zb, best, bcol
    else:
        m, s = _c_lse(ma, sa, mb, sb)
        return m, s, ta, qa, za, ba, ia


# ----------------------------------------------------------------------------- one tile of one row


@triton.jit
def _tile_exp(u, m, c, CAP: tl.constexpr, POLY: tl.constexpr, FAST: tl.constexpr):
    """For a tile u [L, VEC] and the lanes' running max m [L] (u units): the new max mn, the
    exponents v = (u - mn) c (log2 units), e = 2^v, the rescale of the lanes' old sums
    ar = (m - mn) c (raw, -inf for an empty lane) and al = 2^ar."""
    if CAP == 1:  # fixed max u = 1
        v = u * c - c
        ar = tl.zeros(m.shape, tl.float32)
        al = ar + 1.0
        mn = m
    else:
        mn = tl.maximum(m, tl.max(u, axis=1))
        mcn = tl.where(mn == -_INF, 0.0, mn * c)
        ar = m * c - mcn
        al = _ex2(tl.maximum(ar, -256.0), FAST)
        v = u * c - mcn[:, None]
    if POLY != 0:
        if CAP == 2:  # its domain (2^-125 for smaller v: negligible); the fixed max keeps v >= -116
            e = _ex2_fma(tl.maximum(v, -125.0), POLY)
        else:
            e = _ex2_fma(v, POLY)
    else:
        e = _ex2(v, FAST)
    return mn, v, e, ar, al


@triton.jit
def _argmax_step(um, m, mn, col, best, bcol, CAP: tl.constexpr):
    """The chunk that first holds the lane's best value (and, with the fixed max, that value).
    With a running max the best value is the lane's max m itself (taken from it when merging:
    carrying a copy trips Triton's thread-locality pass), and a chunk raising it strictly holds
    it first."""
    if CAP == 1:
        cm = tl.max(um, axis=1)
        take = cm > best
        return tl.where(take, col, bcol), tl.where(take, cm, best)
    else:
        return tl.where(mn > m, col, bcol), best


@triton.jit
def _add(s, al, e, CAP: tl.constexpr):
    """A lane sum brought to the new max plus a tile's terms (fixed max: per element, no rescale)."""
    if CAP == 1:
        return s + e
    else:
        return s * al + tl.sum(e, axis=1)


@triton.jit
def _stats_step(u, um, ok, v, e, ar, al, m, mn, col, s, t, s2, zs, best, bcol, CAP: tl.constexpr,
                MASKED: tl.constexpr):
    """The statistics' sums of a tile: t = sum e v (entropy), s2 = sum e^2, zs = sum u, and the argmax."""
    if CAP == 0:
        vs = tl.maximum(v, -256.0)  # e v = 0 (not nan) for -inf logits
        t = tl.where(al > 0, al * (t + tl.where(s > 0, s * ar, 0.0)), 0.0) + tl.sum(e * vs, axis=1)
        s2 = s2 * al * al + tl.sum(e * e, axis=1)
    elif CAP == 1:
        t = t + e * v
        s2 = s2 + e * e
    else:
        t = tl.where(al > 0, al * (t + tl.where(s > 0, s * ar, 0.0)), 0.0) + tl.sum(e * v, axis=1)
        s2 = s2 * al * al + tl.sum(e * e, axis=1)
    uz = tl.where(ok, u, 0.0) if MASKED else u
    if CAP == 1:
        zs = zs + uz
    else:
        zs = zs + tl.sum(uz, axis=1)
    bcol, best = _argmax_step(um, m, mn, col, best, bcol, CAP)
    return t, s2, zs, best, bcol


@triton.jit
def _policy_tile(x, ok, col, st, c, inv_cap, CAP: tl.constexpr, STATS: tl.constexpr, MASKED: tl.constexpr,
                 POLY: tl.constexpr, FAST: tl.constexpr, APPROX: tl.constexpr):
    """Fold a tile of one row into its lanes' state (m, s, t = sum e v, s2 = sum e^2, zs = sum u,
    best = max u, bcol = first column of the chunk holding it); ``col`` [L] is each lane's chunk
    start (row column). Masked tiles hold 0 where ``ok`` is false."""
    m, s, t, s2, zs, best, bcol = st
    u = _u(x, inv_cap, CAP, FAST, APPROX)
    um = tl.where(ok, u, -_INF) if MASKED else u
    mn, v, e, ar, al = _tile_exp(um, m, c, CAP, POLY, FAST)
    if MASKED:
        v = tl.where(ok, v, 0.0)
        e = tl.where(ok, e, 0.0)
    if STATS:
        t, s2, zs, best, bcol = _stats_step(u, um, ok, v, e, ar, al, m, mn, col, s, t, s2, zs, best, bcol, CAP,
                                            MASKED)
    s = _add(s, al, e, CAP)
    return mn, s, t, s2, zs, best, bcol


@triton.jit
def _kl_tile(x, r, ok, col, st, rst, c, inv_cap, CAP: tl.constexpr, STATS: tl.constexpr,
             MASKED: tl.constexpr, POLY: tl.constexpr, FAST: tl.constexpr, APPROX: tl.constexpr):
    """The policy tile (as :func:`_policy_tile`) and the reference tile of the same columns,
    with the KL sum A = sum e_r (v_r - v_p) (terms with e_r = 0 count 0; p = 0 < q gives inf)."""
    m, s, t, s2, zs, best, bcol = st
    mr, sr, A = rst
    u = _u(x, inv_cap, CAP, FAST, APPROX)
    ur = _u(r, inv_cap, CAP, FAST, APPROX)
    if MASKED:
        um = tl.where(ok, u, -_INF)
        urm = tl.where(ok, ur, -_INF)
    else:
        um = u
        urm = ur
    mn, v, e, ar, al = _tile_exp(um, m, c, CAP, POLY, FAST)
    mrn, vr, er, arr, alr = _tile_exp(urm, mr, c, CAP, POLY, FAST)
    if MASKED:
        v = tl.where(ok, v, 0.0)
        e = tl.where(ok, e, 0.0)
        vr = tl.where(ok, vr, 0.0)
        er = tl.where(ok, er, 0.0)
    if CAP == 0:  # -inf logits: e_r = 0 terms count 0, p = 0 < q gives inf
        terms = tl.where(er > 0, er * (vr - v), 0.0)
    else:  # finite exponents: no guard needed
        terms = er * (vr - v)
    if CAP == 1:
        A = A + terms
    else:
        A = tl.where(alr > 0, alr * (A + tl.where(sr > 0, sr * (arr - ar), 0.0)), 0.0) + tl.sum(terms, axis=1)
    sr = _add(sr, alr, er, CAP)
    if STATS:
        t, s2, zs, best, bcol = _stats_step(u, um, ok, v, e, ar, al, m, mn, col, s, t, s2, zs, best, bcol, CAP,
                                            MASKED)
    s = _add(s, al, e, CAP)
    return (mn, s, t, s2, zs, best, bcol), (mrn, sr, A)


@triton.jit
def _init(LANES: tl.constexpr, VEC: tl.constexpr, CAP: tl.constexpr):
    """An empty lane state. With the fixed max the sums have no rescale, so they are kept per
    element ([LANES, VEC]: one FMA an element, summed once per row) and shared by both tiles."""
    m0 = tl.full([LANES], 1.0 if CAP == 1 else -_INF, tl.float32)
    z = tl.zeros([LANES], tl.float32)
    if CAP == 1:
        zv = tl.zeros([LANES, VEC], tl.float32)
    else:
        zv = z
    return m0, zv, zv, zv, zv, z - _INF, tl.full([LANES], _BIG, tl.int32)


@triton.jit
def _lanes(st, CAP: tl.constexpr):
    """A lane state with its per-element sums (fixed max) summed over each lane's elements."""
    m, s, t, s2, zs, best, bcol = st
    if CAP == 1:
        return m, tl.sum(s, axis=1), tl.sum(t, axis=1), tl.sum(s2, axis=1), tl.sum(zs, axis=1), best, bcol
    else:
        return st


@triton.jit
def _block_range(phase, V, b0, b1, BLOCK: tl.constexpr):
    """The blocks of [b0, b1) that lie fully inside a row of length V starting at ``phase``
    (lo, hi), whether the partial first block is in range (head), and the partial last block
    (tail, valid when tail < tail_end)."""
    n = phase + V
    first = (phase > 0).to(tl.int32)
    full_end = n // BLOCK
    lo = tl.maximum(b0, first)
    hi = tl.minimum(b1, full_end)
    head = (b0 == 0) & (first == 1)
    tail = tl.maximum(tl.maximum(full_end, b0), first)
    tail_end = tl.minimum(b1, (n + BLOCK - 1) // BLOCK)
    return lo, hi, head, tail, tail_end


@triton.jit
def _block_geometry(phase, V, a, LANES: tl.constexpr, VEC: tl.constexpr, MASKED: tl.constexpr):
    """A row block's [lanes, VEC] offsets, each lane's first column, and its two tiles' in-row masks
    (all true for a block inside the row)."""
    TILE: tl.constexpr = LANES * VEC
    lane = tl.arange(0, LANES)
    offs = lane[:, None] * VEC + tl.arange(0, VEC)[None, :]
    cola = a - phase + lane * VEC
    if MASKED:
        ca = a - phase + offs
        oka = (ca >= 0) & (ca < V)
        okb = (ca + TILE >= 0) & (ca + TILE < V)
    else:
        oka = True
        okb = True
    return offs, cola, oka, okb


@triton.jit
def _load_tiles(base, a, offs, oka, okb, TILE: tl.constexpr, MASKED: tl.constexpr):
    """The two [lanes, VEC] tiles of a row block, as float32 (masked where the block overhangs the row)."""
    if MASKED:
        xa = tl.load(base + a + offs, mask=oka, other=0.0).to(tl.float32)
        xb = tl.load(base + a + TILE + offs, mask=okb, other=0.0).to(tl.float32)
    else:
        xa = tl.load(base + a + offs).to(tl.float32)
        xb = tl.load(base + a + TILE + offs).to(tl.float32)
    return xa, xb


@triton.jit
def _row_block(base, phase, V, a, sta, stb, c, inv_cap, LANES: tl.constexpr, VEC: tl.constexpr,
               CAP: tl.constexpr, STATS: tl.constexpr, MASKED: tl.constexpr, POLY: tl.constexpr,
               FAST: tl.constexpr, APPROX: tl.constexpr):
    TILE: tl.constexpr = LANES * VEC
    offs, cola, oka, okb = _block_geometry(phase, V, a, LANES, VEC, MASKED)
    xa, xb = _load_tiles(base, a, offs, oka, okb, TILE, MASKED)
    sta = _policy_tile(xa, oka, cola, sta, c, inv_cap, CAP, STATS, MASKED, False, FAST, APPROX)
    if CAP == 1:
        sta = _policy_tile(xb, okb, cola + TILE, sta, c, inv_cap, CAP, STATS, MASKED, POLY, FAST, APPROX)
    else:
        stb = _policy_tile(xb, okb, cola + TILE, stb, c, inv_cap, CAP, STATS, MASKED, POLY, FAST, APPROX)
    return sta, stb


@triton.jit
def _row_reduce(base, phase, V, b0, b1, c, inv_cap, LANES: tl.constexpr, VEC: tl.constexpr, CAP: tl.constexpr,
                STATS: tl.constexpr, POLY: tl.constexpr, FAST: tl.constexpr, APPROX: tl.constexpr):
    """Blocks [b0, b1) of one row: its merged state (mc, s, t, s2, zs, best, bcol) as scalars."""
    BLOCK: tl.constexpr = 2 * LANES * VEC
    sta = _init(LANES, VEC, CAP)
    stb = _init(LANES, VEC, CAP)
    lo, hi, head, tail, tail_end = _block_range(phase, V, b0, b1, BLOCK)
    # The partial first block goes first (column order, and the loop then starts from a
    # non-constant state, which keeps Triton's thread-locality rewrite off these loops).
    if head:
        sta, stb = _row_block(base, phase, V, 0, sta, stb, c, inv_cap, LANES, VEC, CAP, STATS, True, POLY, FAST,
                              APPROX)
    for blk in range(lo, hi):
        sta, stb = _row_block(base, phase, V, blk * BLOCK, sta, stb, c, inv_cap, LANES, VEC, CAP, STATS, False,
                              POLY, FAST, APPROX)
    if tail < tail_end:
        sta, stb = _row_block(base, phase, V, tail * BLOCK, sta, stb, c, inv_cap, LANES, VEC, CAP, STATS, True,
                              POLY, FAST, APPROX)
    return _merge_policy(_merge_tiles(_lanes(sta, CAP), _lanes(stb, CAP), c, STATS, CAP), STATS)


@triton.jit
def _pair_block(xbase, rbase, phase, V, a, pa, pb, ra, rb, c, inv_cap, LANES: tl.constexpr, VEC: tl.constexpr,
                CAP: tl.constexpr, STATS: tl.constexpr, MASKED: tl.constexpr, POLY: tl.constexpr,
                FAST: tl.constexpr, APPROX: tl.constexpr):
    TILE: tl.constexpr = LANES * VEC
    offs, cola, oka, okb = _block_geometry(phase, V, a, LANES, VEC, MASKED)
    xa, xb = _load_tiles(xbase, a, offs, oka, okb, TILE, MASKED)
    qa, qb = _load_tiles(rbase, a, offs, oka, okb, TILE, MASKED)
    pa, ra = _kl_tile(xa, qa, oka, cola, pa, ra, c, inv_cap, CAP, STATS, MASKED, False, FAST, APPROX)
    if CAP == 1:
        pa, ra = _kl_tile(xb, qb, okb, cola + TILE, pa, ra, c, inv_cap, CAP, STATS, MASKED, POLY, FAST, APPROX)
    else:
        pb, rb = _kl_tile(xb, qb, okb, cola + TILE, pb, rb, c, inv_cap, CAP, STATS, MASKED, POLY, FAST, APPROX)
    return pa, pb, ra, rb


@triton.jit
def _pair_reduce(xbase, rbase, phase, V, b0, b1, c, inv_cap, LANES: tl.constexpr, VEC: tl.constexpr,
                 CAP: tl.constexpr, STATS: tl.constexpr, POLY: tl.constexpr, FAST: tl.constexpr,
                 APPROX: tl.constexpr):
    """Blocks [b0, b1) of a policy row and its reference row (same phase): the merged policy
    state and the reference (mc_r, s_r, A) with A rebased to both merged maxima."""
    BLOCK: tl.constexpr = 2 * LANES * VEC
    pa = _init(LANES, VEC, CAP)
    pb = _init(LANES, VEC, CAP)
    i0, i1, i2, _, _, _, _ = _init(LANES, VEC, CAP)
    ra = (i0, i1, i2)
    rb = (i0, i1, i2)
    lo, hi, head, tail, tail_end = _block_range(phase, V, b0, b1, BLOCK)
    if head:
        pa, pb, ra, rb = _pair_block(xbase, rbase, phase, V, 0, pa, pb, ra, rb, c, inv_cap, LANES, VEC, CAP, STATS,
                                     True, POLY, FAST, APPROX)
    for blk in range(lo, hi):
        pa, pb, ra, rb = _pair_block(xbase, rbase, phase, V, blk * BLOCK, pa, pb, ra, rb, c, inv_cap, LANES, VEC,
                                     CAP, STATS, False, POLY, FAST, APPROX)
    if tail < tail_end:
        pa, pb, ra, rb = _pair_block(xbase, rbase, phase, V, tail * BLOCK, pa, pb, ra, rb, c, inv_cap, LANES, VEC,
                                     CAP, STATS, True, POLY, FAST, APPROX)
    # Rebase each lane's A onto the merged policy max, then merge (mc_r, s_r, A) like an entropy.
    pa = _lanes(pa, CAP)
    pb = _lanes(pb, CAP)
    if CAP == 1:
        ra = (ra[0], tl.sum(ra[1], axis=1), tl.sum(ra[2], axis=1))
        rb = (rb[0], tl.sum(rb[1], axis=1), tl.sum(rb[2], axis=1))
    pol = _merge_tiles(pa, pb, c, STATS, CAP)
    mpa = _mc(pa[0], c)
    mpb = _mc(pb[0], c)
    MP = tl.maximum(tl.max(mpa, 0), tl.max(mpb, 0))
    _, dpa = _rebase(mpa, ra[1], MP)
    _, dpb = _rebase(mpb, rb[1], MP)
    ma, sa, ta = _c_ent(_mc(ra[0], c), ra[1], ra[2] - dpa, _mc(rb[0], c), rb[1], rb[2] - dpb)
    MR, SR, AR = _ent_all(ma, sa, ta)
    return _merge_policy(pol, STATS), MR, SR, AR


# ----------------------------------------------------------------------------- outputs of a row


@triton.jit
def _finish(x_row, r_row, row, label, V, state, rstate, kz, inv_cap, logp_ptr, lse_ptr, ref_ptr, st_ptr, kl_ptr,
            rlse_ptr, VEC: tl.constexpr, CAP: tl.constexpr, STATS, HAS_REF, KL, FAST: tl.constexpr,
            APPROX: tl.constexpr):
    """Write a row's outputs from its merged states (log2 units: lse = mc ln2 + ln s); the
    options are constexprs from the forward kernel, run-time flags from the combine kernel."""
    LN2: tl.constexpr = 0.6931471805599453
    MC, S, Tt, S2, ZS, B, BI = state
    MR, SR, AR = rstate
    nan = float("nan")
    safe = tl.minimum(tl.maximum(label, 0), V - 1)  # read in bounds; a label outside [0, V) gives NaN
    bad_label = safe != label
    bad = (S != S) | bad_label  # a NaN anywhere in the row, or a bad label
    log_s = tl.log(S)
    lse = tl.where(bad, nan, MC * LN2 + log_s)
    z_y = _u(tl.load(x_row + safe).to(tl.float32), inv_cap, CAP, FAST, False) * kz
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, z_y - lse)
    if STATS != 0:
        # The first column of the winning chunk equal to its max (the chunk is read again).
        cols = BI + tl.arange(0, VEC)
        okc = (cols >= 0) & (cols < V)
        uc = _u(tl.load(x_row + cols, mask=okc, other=0.0).to(tl.float32), inv_cap, CAP, FAST, APPROX)
        amax = tl.min(tl.where(okc & (uc == B), cols, V), 0)
        amax = tl.where(amax == V, 0, amax)  # all -inf: the first column, as torch.argmax
        tl.store(st_ptr + row * 4 + 0, tl.where(bad, nan, log_s - LN2 * Tt / S))
        tl.store(st_ptr + row * 4 + 1, tl.where(bad, nan, (amax == label).to(tl.float32)))
        tl.store(st_ptr + row * 4 + 2, tl.where(bad, nan, ZS * kz / V))
        tl.store(st_ptr + row * 4 + 3, tl.where(bad, nan, tl.log(S2) - 2.0 * log_s))
    if HAS_REF != 0:
        rlse = MR * LN2 + tl.log(SR)
        rz_y = _u(tl.load(r_row + safe).to(tl.float32), inv_cap, CAP, FAST, False) * kz
        if KL != 0:
            rlse = tl.where(bad, nan, rlse)
            tl.store(rlse_ptr + row, rlse)
            tl.store(kl_ptr + row, tl.where(bad, nan, LN2 * AR / SR - tl.log(SR) + log_s))
        else:
            rlse = tl.where(bad_label, nan, rlse)
        tl.store(ref_ptr + row, rz_y - rlse)


# ----------------------------------------------------------------------------- forward


@triton.jit(do_not_specialize=_FWD_INTS, do_not_specialize_on_alignment=_FWD_PTRS)
def logprobs_fwd_kernel(
    x_ptr, r_ptr, y_ptr, logp_ptr, lse_ptr, ref_ptr, st_ptr, kl_ptr, rlse_ptr, ws_ptr,
    T: tl.int64, sxb: tl.int64, sxt: tl.int64, srb: tl.int64, srt: tl.int64, V: tl.int32, BPS: tl.int32,
    ignore_index: tl.int64, kz, inv_cap, c,
    VEC: tl.constexpr, LANES: tl.constexpr, CAP: tl.constexpr, STATS: tl.constexpr, HAS_REF: tl.constexpr,
    KL: tl.constexpr, POLY: tl.constexpr, FAST: tl.constexpr, APPROX: tl.constexpr,
):
    """Program (row, segment): blocks [seg * BPS, (seg + 1) * BPS) of the row. ``kz`` scales u to
    z, ``c = kz log2 e``. A split row (more than one segment) writes its merged partial states
    to ``ws [rows, 10, segments]`` for :func:`logprobs_combine_kernel`."""
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    label = tl.load(y_ptr + row)
    if label == ignore_index:
        return  # outputs were zero-initialised
    b = row // T
    t = row % T
    x_row = x_ptr + (b * sxb + t * sxt)
    r_row = r_ptr + (b * srb + t * srt)
    xb, xp = _aligned(x_ptr, b * sxb + t * sxt, VEC)
    b0 = seg * BPS
    b1 = b0 + BPS
    if KL:
        rb, rp = _aligned(r_ptr, b * srb + t * srt, VEC)
        if rp == xp:
            state, MR, SR, AR = _pair_reduce(xb, rb, xp, V, b0, b1, c, inv_cap, LANES, VEC, CAP, STATS, POLY, FAST,
                                             APPROX)
        else:  # the reference row is not aligned like the policy's: its loads are not vectorised
            state, MR, SR, AR = _pair_reduce(xb, r_ptr + (b * srb + t * srt - xp), xp, V, b0, b1, c, inv_cap, LANES,
                                             VEC, CAP, STATS, POLY, FAST, APPROX)
    else:
        state = _row_reduce(xb, xp, V, b0, b1, c, inv_cap, LANES, VEC, CAP, STATS, POLY, FAST, APPROX)
        if HAS_REF:
            rb, rp = _aligned(r_ptr, b * srb + t * srt, VEC)
            MR, SR, _, _, _, _, _ = _row_reduce(rb, rp, V, b0, b1, c, inv_cap, LANES, VEC, CAP, False, POLY, FAST,
                                                APPROX)
            AR = 0.0
        else:
            MR = 0.0
            SR = 0.0
            AR = 0.0
    nseg = tl.num_programs(1)
    if nseg > 1:
        w = ws_ptr + row * 10 * nseg + seg
        MC, S, Tt, S2, ZS, B, BI = state
        tl.store(w + 0 * nseg, MC)
        tl.store(w + 1 * nseg, S)
        if STATS:
            tl.store(w + 2 * nseg, Tt)
            tl.store(w + 3 * nseg, S2)
            tl.store(w + 4 * nseg, ZS)
            tl.store(w + 5 * nseg, B)
            tl.store(w + 6 * nseg, BI.to(tl.float32, bitcast=True))
        if HAS_REF:
            tl.store(w + 7 * nseg, MR)
            tl.store(w + 8 * nseg, SR)
            if KL:
                tl.store(w + 9 * nseg, AR)
    else:
        _finish(x_row, r_row, row, label, V, state, (MR, SR, AR), kz, inv_cap, logp_ptr, lse_ptr, ref_ptr, st_ptr,
                kl_ptr, rlse_ptr, VEC, CAP, STATS, HAS_REF, KL, FAST, APPROX)


@triton.jit(do_not_specialize=_FWD_INTS[:6] + ["NSEG", "ignore_index", "STATS", "HAS_REF", "KL"],
            do_not_specialize_on_alignment=_FWD_PTRS)
def logprobs_combine_kernel(
    x_ptr, r_ptr, y_ptr, logp_ptr, lse_ptr, ref_ptr, st_ptr, kl_ptr, rlse_ptr, ws_ptr,
    T: tl.int64, sxb: tl.int64, sxt: tl.int64, srb: tl.int64, srt: tl.int64, V: tl.int32, NSEG: tl.int32,
    ignore_index: tl.int64, kz, inv_cap, STATS: tl.int32, HAS_REF: tl.int32, KL: tl.int32,
    SEGS: tl.constexpr, VEC: tl.constexpr, CAP: tl.constexpr, FAST: tl.constexpr, APPROX: tl.constexpr,
):
    """Merge the NSEG partial states of a split row (SEGS >= NSEG) and write its outputs. Per row,
    so the options are run-time flags here (one compiled kernel per dtype, soft cap or not, SEGS)."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(y_ptr + row)
    if label == ignore_index:
        return
    b = row // T
    t = row % T
    i = tl.arange(0, SEGS)
    ok = i < NSEG
    w = ws_ptr + row * 10 * NSEG + i
    mc = tl.load(w + 0 * NSEG, mask=ok, other=-_INF)
    s = tl.load(w + 1 * NSEG, mask=ok, other=0.0)
    okst = ok & (STATS != 0)
    okr = ok & (HAS_REF != 0)
    MC, S, Tt = _ent_all(mc, s, tl.load(w + 2 * NSEG, mask=okst, other=0.0))
    _, S2 = _lse_all(2.0 * mc, tl.load(w + 3 * NSEG, mask=okst, other=0.0))
    bi = tl.load(w + 6 * NSEG, mask=okst, other=0.0).to(tl.int32, bitcast=True)
    B, BI = _argmax_all(tl.load(w + 5 * NSEG, mask=okst, other=-_INF), tl.where(okst, bi, _BIG))
    state = (MC, S, Tt, S2, tl.sum(tl.load(w + 4 * NSEG, mask=okst, other=0.0), 0), B, BI)
    sr = tl.load(w + 8 * NSEG, mask=okr, other=0.0)
    # each segment's KL sum is relative to its own policy max: rebase onto the merged one
    _, dp = _rebase(mc, sr, MC)
    MR, SR, AR = _ent_all(tl.load(w + 7 * NSEG, mask=okr, other=-_INF), sr,
                          tl.load(w + 9 * NSEG, mask=ok & (KL != 0), other=0.0) - dp)
    _finish(x_ptr + (b * sxb + t * sxt), r_ptr + (b * srb + t * srt), row, label, V, state, (MR, SR, AR), kz,
            inv_cap, logp_ptr, lse_ptr, ref_ptr, st_ptr, kl_ptr, rlse_ptr, VEC, CAP, STATS, HAS_REF, KL, FAST, APPROX)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _grad_tile(x, r, is_y, g, g1, gk, lse2, rlse2, c, inv_cap, dzs, CAP: tl.constexpr, WITH_Q: tl.constexpr,
               FAST: tl.constexpr, APPROX: tl.constexpr):
    """(g 1[v == y] - g1 p - gk q) dz/dx of a tile (g1 = g - gk with the KL, else g)."""
    u = _u(x, inv_cap, CAP, FAST, APPROX)
    p = _ex2(u * c - lse2, FAST)
    gr = tl.where(is_y, g, 0.0) - g1 * p
    if WITH_Q:
        ur = _u(r, inv_cap, CAP, FAST, APPROX)
        gr = gr - gk * _ex2(ur * c - rlse2, FAST)
    if CAP == 0:
        return gr * dzs
    else:
        return gr * ((1.0 - u * u) * dzs)


@triton.jit
def _grad_block(xb, ob, rb, phase, V, a, label, g, g1, gk, lse2, rlse2, c, inv_cap, dzs, LANES: tl.constexpr,
                VEC: tl.constexpr, CAP: tl.constexpr, WITH_Q: tl.constexpr, MASKED: tl.constexpr,
                ZERO: tl.constexpr, FAST: tl.constexpr, APPROX: tl.constexpr):
    TILE: tl.constexpr = LANES * VEC
    offs = tl.arange(0, LANES)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    for h in tl.static_range(2):
        a_h = a + h * TILE
        if MASKED:
            ch = a_h - phase + offs
            ok = (ch >= 0) & (ch < V)
        if ZERO:
            grad = tl.zeros([LANES, VEC], tl.float32)
        else:
            if MASKED:
                x = tl.load(xb + a_h + offs, mask=ok, other=0.0).to(tl.float32)
                if WITH_Q:
                    r = tl.load(rb + a_h + offs, mask=ok, other=0.0).to(tl.float32)
                else:
                    r = x
            else:
                x = tl.load(xb + a_h + offs).to(tl.float32)
                if WITH_Q:
                    r = tl.load(rb + a_h + offs).to(tl.float32)
                else:
                    r = x
            grad = _grad_tile(x, r, offs == label - a_h, g, g1, gk, lse2, rlse2, c, inv_cap, dzs, CAP,
                              WITH_Q, FAST, APPROX)
        if MASKED:
            tl.store(ob + a_h + offs, grad.to(ob.dtype.element_ty), mask=ok)
        else:
            tl.store(ob + a_h + offs, grad.to(ob.dtype.element_ty))


@triton.jit
def _grad_range(xb, ob, rb, phase, V, b0, b1, label, g, g1, gk, lse2, rlse2, c, inv_cap, dzs, LANES: tl.constexpr,
                VEC: tl.constexpr, CAP: tl.constexpr, WITH_Q: tl.constexpr, ZERO: tl.constexpr, FAST: tl.constexpr,
                APPROX: tl.constexpr):
    BLOCK: tl.constexpr = 2 * LANES * VEC
    # the label in aligned coordinates, 32-bit (outside the row: never matches a column)
    label = (tl.minimum(tl.maximum(label, -1), V) + phase).to(tl.int32)
    lo, hi, head, tail, tail_end = _block_range(phase, V, b0, b1, BLOCK)
    if head:
        _grad_block(xb, ob, rb, phase, V, 0, label, g, g1, gk, lse2, rlse2, c, inv_cap, dzs, LANES, VEC, CAP, WITH_Q,
                    True, ZERO, FAST, APPROX)
    for blk in range(lo, hi):
        _grad_block(xb, ob, rb, phase, V, blk * BLOCK, label, g, g1, gk, lse2, rlse2, c, inv_cap, dzs, LANES, VEC,
                    CAP, WITH_Q, False, ZERO, FAST, APPROX)
    if tail < tail_end:
        _grad_block(xb, ob, rb, phase, V, tail * BLOCK, label, g, g1, gk, lse2, rlse2, c, inv_cap, dzs, LANES, VEC,
                    CAP, WITH_Q, True, ZERO, FAST, APPROX)


@triton.jit
def _grad_plain(xb, ob, o_any, xp, op, V, b0, b1, label, g, lse2, c, inv_cap, dzs, LANES: tl.constexpr,
                VEC: tl.constexpr, CAP: tl.constexpr, FAST: tl.constexpr, APPROX: tl.constexpr):
    """The gradient without the KL term; vector stores when the output row is aligned like the logits'."""
    if op == xp:
        _grad_range(xb, ob, xb, xp, V, b0, b1, label, g, g, 0.0, lse2, 0.0, c, inv_cap, dzs, LANES, VEC, CAP, False,
                    False, FAST, APPROX)
    else:
        _grad_range(xb, o_any, xb, xp, V, b0, b1, label, g, g, 0.0, lse2, 0.0, c, inv_cap, dzs, LANES, VEC, CAP,
                    False, False, FAST, APPROX)


@triton.jit(do_not_specialize=_BWD_INTS, do_not_specialize_on_alignment=_BWD_PTRS)
def logprobs_bwd_kernel(
    g_ptr, x_ptr, y_ptr, lse_ptr, out_ptr, gk_ptr, r_ptr, rlse_ptr,
    T: tl.int64, sxb: tl.int64, sxt: tl.int64, sob: tl.int64, sot: tl.int64, srb: tl.int64, srt: tl.int64,
    V: tl.int32, BPP: tl.int32, ignore_index: tl.int64, inv_cap, c, dzs,
    VEC: tl.constexpr, LANES: tl.constexpr, CAP: tl.constexpr, HAS_KL: tl.constexpr, FAST: tl.constexpr,
    APPROX: tl.constexpr,
):
    """Program (row, p): blocks [p * BPP, (p + 1) * BPP) of the row's gradient, in the logits'
    aligned coordinates; ``c = kz log2 e``, ``dzs = 1 / T``. The reference row is read only where
    ``gk != 0``."""
    row = tl.program_id(0).to(tl.int64)
    b0 = tl.program_id(1) * BPP
    b1 = b0 + BPP
    b = row // T
    t = row % T
    label = tl.load(y_ptr + row)
    g = tl.load(g_ptr + row).to(tl.float32)
    if HAS_KL:
        gk = tl.load(gk_ptr + row).to(tl.float32)
    else:
        gk = 0.0
    xo = b * sxb + t * sxt
    oo = b * sob + t * sot
    xb, xp = _aligned(x_ptr, xo, VEC)
    ob, op = _aligned(out_ptr, oo, VEC)
    if (label == ignore_index) | ((g == 0.0) & (gk == 0.0)):
        _grad_range(xb, ob, xb, op, V, b0, b1, 0, 0.0, 0.0, 0.0, 0.0, 0.0, c, inv_cap, dzs, LANES, VEC, CAP, False,
                    True, FAST, APPROX)
    else:
        lse2 = tl.load(lse_ptr + row) * 1.4426950408889634
        if HAS_KL:
            if gk != 0.0:
                ro = b * srb + t * srt
                rb, rp = _aligned(r_ptr, ro, VEC)
                rlse2 = tl.load(rlse_ptr + row) * 1.4426950408889634
                if (op == xp) & (rp == xp):
                    _grad_range(xb, ob, rb, xp, V, b0, b1, label, g, g - gk, gk, lse2, rlse2, c, inv_cap, dzs, LANES,
                                VEC, CAP, True, False, FAST, APPROX)
                else:  # rows aligned differently: only the logits' loads are vectorised
                    _grad_range(xb, out_ptr + (oo - xp), r_ptr + (ro - xp), xp, V, b0, b1, label, g, g - gk, gk,
                                lse2, rlse2, c, inv_cap, dzs, LANES, VEC, CAP, True, False, FAST, APPROX)
            else:
                _grad_plain(xb, ob, out_ptr + (oo - xp), xp, op, V, b0, b1, label, g, lse2, c, inv_cap, dzs, LANES,
                            VEC, CAP, FAST, APPROX)
        else:
            _grad_plain(xb, ob, out_ptr + (oo - xp), xp, op, V, b0, b1, label, g, lse2, c, inv_cap, dzs, LANES, VEC,
                        CAP, FAST, APPROX)


# ----------------------------------------------------------------------------- fused-linear folds
# A fused-linear loop computes the logits one [tokens, vocab chunk] tile at a
# time (tile = hidden @ W[v0:v0+c].T) and folds each tile while it is hot.


@triton.jit(do_not_specialize=["stride_n", "C", "v_offset"], do_not_specialize_on_alignment=["tile_ptr", "y_ptr"])
def lse_fold_kernel(
    tile_ptr, y_ptr, m_ptr, s_ptr, zy_ptr, stride_n: tl.int64, C: tl.int32, v_offset: tl.int64, kz, inv_cap, c,
    VEC: tl.constexpr, LANES: tl.constexpr, CAP: tl.constexpr, POLY: tl.constexpr, FAST: tl.constexpr,
    APPROX: tl.constexpr,
):
    """Fold one tile row into the running (m, s) of its token (nats: m = max z, s = sum e^(z - m))
    and pick up the label's z when the label falls inside this vocabulary chunk."""
    LN2: tl.constexpr = 0.6931471805599453
    row = tl.program_id(0).to(tl.int64)
    t_row = tile_ptr + row * stride_n
    base, phase = _aligned(tile_ptr, row * stride_n, VEC)
    MC, S, _, _, _, _, _ = _row_reduce(base, phase, C, 0, _BIG, c, inv_cap, LANES, VEC, CAP, False, POLY, FAST,
                                       APPROX)
    m = tl.load(m_ptr + row) * 1.4426950408889634  # to log2 units
    m, s = _c_lse(m, tl.load(s_ptr + row), MC, S)
    tl.store(m_ptr + row, tl.where(m == -_INF, -_INF, m * LN2))
    tl.store(s_ptr + row, s)
    label = tl.load(y_ptr + row) - v_offset
    if (label >= 0) & (label < C):
        tl.store(zy_ptr + row, _u(tl.load(t_row + label).to(tl.float32), inv_cap, CAP, FAST, False) * kz)


@triton.jit(do_not_specialize=["stride_n", "C", "v_offset", "BPP"],
            do_not_specialize_on_alignment=["tile_ptr", "y_ptr"])
def tile_grad_kernel(
    tile_ptr, y_ptr, lse_ptr, g_ptr, stride_n: tl.int64, C: tl.int32, v_offset: tl.int64, BPP: tl.int32, inv_cap, c,
    dzs,
    VEC: tl.constexpr, LANES: tl.constexpr, CAP: tl.constexpr, FAST: tl.constexpr, APPROX: tl.constexpr,
):
    """Overwrite a recomputed tile with its logits gradient g (onehot - p) dz/dx (0 where g == 0)."""
    row = tl.program_id(0).to(tl.int64)
    b0 = tl.program_id(1) * BPP
    g = tl.load(g_ptr + row).to(tl.float32)
    base, phase = _aligned(tile_ptr, row * stride_n, VEC)
    label = tl.load(y_ptr + row) - v_offset
    lse2 = tl.load(lse_ptr + row) * 1.4426950408889634
    if g == 0.0:
        _grad_range(base, base, base, phase, C, b0, b0 + BPP, label, g, g, 0.0, lse2, 0.0, c, inv_cap, dzs, LANES,
                    VEC, CAP, False, True, FAST, APPROX)
    else:
        _grad_range(base, base, base, phase, C, b0, b0 + BPP, label, g, g, 0.0, lse2, 0.0, c, inv_cap, dzs, LANES,
                    VEC, CAP, False, False, FAST, APPROX)


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
