r"""Vocabulary-parallel per-token log-probs (Megatron-style tensor parallelism of the LM head).

Each rank of ``process_group`` holds a contiguous shard ``[v_r, v_r + V_r)`` of the
vocabulary (shards in rank order; sizes may differ); labels are global token ids and
the same on every rank. Per row, every rank folds its shard with the backend's fused
forward kernel, then the ranks combine with all-reduces over ``[B, T]`` tensors (never
the logits):

.. math::
    m = \max_r \mathrm{lse}_r,\quad \mathrm{lse} = m + \log \textstyle\sum_r e^{\mathrm{lse}_r - m},\quad
    z_y = \textstyle\sum_r [y \in \text{shard } r]\, z_{r,y},\quad \log p_y = z_y - \mathrm{lse}

and the statistics from their per-shard parts (entropy :math:`H = \mathrm{lse} - \sum_r
e^{\mathrm{lse}_r - \mathrm{lse}} (\mathrm{lse}_r - H_r)`, :math:`\log\sum p^2 =
\mathrm{logsumexp}_r(2(\mathrm{lse}_r - \mathrm{lse}) + \log\sum p_r^2)`, the mean logit
weighted by shard size, the argmax hit from the shards' maxima). Backward gives each rank
the gradient of its own shard, ``g * (onehot_local - exp(z - lse)) * dz/dx``; the label's
one-hot exists only on the rank that holds it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastdpo import _backends, _validation
from fastdpo._backends import Backend
from fastdpo.kernels.reference import _acc_dtype, _capped
from fastdpo.ops.logprobs import FusedLogprobs, _as_3d, _resolve
from fastdpo.ops.schema import NUM_STATS

_CHUNK_ELEMS = 1 << 24  # backward upcasts at most this many logits at a time


def shard_layout(local_vocab: int, process_group) -> tuple[int, int]:
    """``(vocab_start, total_vocab)`` of this rank's shard: shards are contiguous in rank order."""
    sizes = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(sizes, int(local_vocab), group=process_group)
    rank = dist.get_rank(process_group)
    return sum(sizes[:rank]), sum(sizes)


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    dist.all_reduce(x, op=op, group=group)
    return x


def _combine_lse(logp_l, lse_l, in_shard, valid, group):
    """Global (logp, lse) of a row from each shard's local log-prob of the label and log-sum-exp."""
    m = _all_reduce(lse_l.clone(), dist.ReduceOp.MAX, group)
    lse = m + torch.log(_all_reduce(torch.exp(lse_l - m), dist.ReduceOp.SUM, group))  # sum_r e^{lse_r - m}
    z_label = _all_reduce(torch.where(in_shard, logp_l + lse_l, 0.0), dist.ReduceOp.SUM, group)
    return torch.where(valid, z_label - lse, 0.0), torch.where(valid, lse, 0.0)


def _fold(kern, x, labels, local, in_shard, valid, o, stats: bool, group, ref=None, kl: bool = False):
    """Global (logp, lse, stats|None) of the shard ``x`` [B, T, V_r]; with ``kl`` (and the reference
    shard ``ref``) also the global (ref_logp, ref_lse, kl) from the same kernel call."""
    ii, temperature, softcap, vocab, _ = o
    klabels = torch.where(valid, torch.where(in_shard, local, 0), ii)
    logp_l, lse_l, rlogp_l, st_l, kl_l, rlse_l = kern.logprobs_fwd(x, klabels, ref if kl else None, ii, temperature,
                                                                   softcap, stats, kl)
    logp, lse = _combine_lse(logp_l, lse_l, in_shard, valid, group)
    st = None
    if stats:
        share = torch.exp(lse_l - lse)  # this shard's probability mass
        ent = lse - _all_reduce(share * (lse_l - st_l[..., 0]), dist.ReduceOp.SUM, group)
        lsp2 = torch.log(_all_reduce(share * share * torch.exp(st_l[..., 3]), dist.ReduceOp.SUM, group))
        mean = _all_reduce(st_l[..., 2] * (x.shape[-1] / vocab), dist.ReduceOp.SUM, group)
        # First argmax: the label's shard must hold the global maximum and be the first shard that does.
        zmax_l = _capped(x.amax(-1).to(lse.dtype), softcap) / temperature
        zmax = _all_reduce(zmax_l.clone(), dist.ReduceOp.MAX, group)
        rank = float(dist.get_rank(group))
        first = _all_reduce(torch.where(zmax_l == zmax, rank, float("inf")), dist.ReduceOp.MIN, group)
        hit = _all_reduce(torch.where(in_shard & (first == rank), st_l[..., 1], 0.0), dist.ReduceOp.SUM, group)
        st = torch.where(valid.unsqueeze(-1), torch.stack([ent, hit, mean, lsp2], dim=-1), 0.0)
    if not kl:
        return logp, lse, st
    ref_logp, ref_lse = _combine_lse(rlogp_l, rlse_l, in_shard, valid, group)
    # KL = sum_r w_r (KL_r + (ref_lse_r - ref_lse) - (lse_r - lse)), w_r = e^{ref_lse_r - ref_lse} the shard's
    # reference mass: each shard's local KL re-based to the global normalisers.
    w = torch.exp(rlse_l - ref_lse)
    part = torch.where(w > 0, w * (kl_l + (rlse_l - ref_lse) - (lse_l - lse)), 0.0)
    kl_out = torch.where(valid, _all_reduce(part, dist.ReduceOp.SUM, group), 0.0)
    return logp, lse, st, ref_logp, ref_lse, kl_out


class _VocabParallelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ref_logits, vocab_start, o, stats, kl, group):
        kern = _backends.kernel_module(Backend(o[4]))
        V_r = logits.shape[-1]
        valid = labels != o[0]
        local = labels - vocab_start
        in_shard = valid & (local >= 0) & (local < V_r)
        kl_out = ref_lse = logits.new_empty(0, dtype=_acc_dtype(logits.dtype))
        if kl:
            logp, lse, st, ref, ref_lse, kl_out = _fold(kern, logits, labels, local, in_shard, valid, o, stats, group,
                                                        ref_logits, True)
        else:
            logp, lse, st = _fold(kern, logits, labels, local, in_shard, valid, o, stats, group)
            ref = (_fold(kern, ref_logits, labels, local, in_shard, valid, o, False, group)[0]
                   if ref_logits is not None else logp.new_empty(0))
        ctx.save_for_backward(logits, local, in_shard, valid, lse, *((ref_logits, ref_lse) if kl else ()))
        ctx.o = o
        out_st = st if stats else logp.new_empty(0)
        ctx.mark_non_differentiable(ref, out_st)
        return logp, ref, out_st, kl_out

    @staticmethod
    def backward(ctx, grad_logp, _g_ref, _g_st, grad_kl):
        x, local, in_shard, valid, lse, *kl_saved = ctx.saved_tensors
        _, temperature, softcap, _, _ = ctx.o
        V_r = x.shape[-1]
        xs, g = x.reshape(-1, V_r), torch.where(valid, grad_logp, 0.0).reshape(-1)
        lse, local, in_shard = lse.reshape(-1), local.reshape(-1), in_shard.reshape(-1)
        if kl_saved:
            rs, ref_lse = kl_saved[0].reshape(-1, V_r), kl_saved[1].reshape(-1)
            gk = torch.where(valid, grad_kl, 0.0).reshape(-1)
        out = torch.empty_like(xs)
        acc = _acc_dtype(x.dtype)
        step = max(1, _CHUNK_ELEMS // max(V_r, 1))

        def transformed(t):
            if softcap > 0:
                th = torch.tanh(t / softcap)
                return softcap * th / temperature, (1 - th * th) / temperature
            return t / temperature, 1.0 / temperature

        for i in range(0, xs.shape[0], step):
            sl = slice(i, i + step)
            z, dzdx = transformed(xs[sl].to(acc))
            gi = g[sl].to(acc).unsqueeze(-1)
            p = torch.exp(z - lse[sl].unsqueeze(-1))
            if kl_saved:  # + gk (p - q): the token-level KL's gradient on this shard
                gki = gk[sl].to(acc).unsqueeze(-1)
                q = torch.exp(transformed(rs[sl].to(acc))[0] - ref_lse[sl].unsqueeze(-1))
                grad = -(gi - gki) * p - gki * q
            else:
                grad = -gi * p
            hot = in_shard[sl].unsqueeze(-1)
            grad.scatter_add_(-1, torch.where(hot, local[sl].unsqueeze(-1), 0), torch.where(hot, gi, 0.0))
            out[sl] = (grad * dzdx).to(x.dtype)
        return out.view_as(x), None, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    process_group,
    ref_logits: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    stats: bool = False,
    kl: bool = False,
    backend: str | Backend = "auto",
) -> FusedLogprobs:
    """Per-token log-probs when each rank of ``process_group`` holds a vocabulary shard of the logits.

    Args:
        logits: ``[..., V_r]`` this rank's shard (shards contiguous in rank order, sizes may differ).
        labels: global token ids shaped like ``logits.shape[:-1]``, identical on every rank.
        process_group: a ``torch.distributed`` group (``dist.group.WORLD`` for all ranks).
        ref_logits: the reference model's logits, sharded the same way (no gradient).
        stats: also the per-token statistics of :func:`fastdpo.fused_logprobs`.
        kl: also the per-token KL of the reference to the policy over the whole vocabulary (needs
            ``ref_logits``), from each shard's local KL re-based to the global normalisers.

    Returns:
        :class:`FusedLogprobs` with the global values, identical on every rank; ``logps`` is
        differentiable w.r.t. this rank's ``logits``. Collective: every rank must call it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("fastdpo: process_group given but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    if process_group is None:
        raise ValueError("fastdpo: vocab_parallel_logprobs needs a process_group (e.g. torch.distributed.group.WORLD)")
    ignore_index, temperature, softcap = _validation.check_logprob_inputs(
        logits, labels, ref_logits, ignore_index, temperature, softcap
    )
    if kl and ref_logits is None:
        raise ValueError("fastdpo: kl=True (the per-token KL to the reference) needs ref_logits")
    vocab_start, vocab = shard_layout(logits.shape[-1], process_group)
    _validation.check_label_range(labels, vocab, ignore_index)
    backend = _resolve(str(backend), logits.device.type)
    x = _as_3d(logits)
    y = labels.reshape(x.shape[:2]).long().contiguous()
    r = _as_3d(ref_logits.detach()) if ref_logits is not None else None
    o = (ignore_index, temperature, softcap, vocab, backend)
    logp, ref, st, kl_out = _VocabParallelFunction.apply(x, y, r, vocab_start, o, bool(stats), bool(kl),
                                                         process_group)
    shape = labels.shape
    return FusedLogprobs(logp.view(shape), ref.view(shape) if r is not None else None,
                         st.view(*shape, NUM_STATS) if stats else None, kl_out.view(shape) if kl else None)


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (replicated input, sharded use)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.contiguous().clone(), dist.ReduceOp.SUM, ctx.group), None


def vocab_parallel_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    process_group,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    **kwargs,
) -> FusedLogprobs:
    """:func:`vocab_parallel_logprobs` when each rank holds rows of the LM head: ``weight`` is this
    rank's ``[V_r, H]`` shard (``bias`` its ``[V_r]`` part), ``hidden`` is replicated on the group.

    The rank's logits shard ``hidden @ weight.T`` is formed once (``[..., V_r]``); the gradient of
    ``hidden`` is summed over the group in backward (every rank's shard contributes), so each rank
    ends with the full hidden gradient, as after Megatron's copy-to-tensor-parallel region.
    ``ref_weight`` / ``ref_bias`` default to ``weight`` / ``bias``. Other arguments as
    :func:`vocab_parallel_logprobs`.
    """
    _validation.check_float_tensor(hidden, "hidden")
    _validation.check_float_tensor(weight, "weight")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"fastdpo: weight must be this rank's [V_r, H] shard with H = hidden.shape[-1] = "
                         f"{hidden.shape[-1]}, got {tuple(weight.shape)}")
    if process_group is None:
        raise ValueError("fastdpo: vocab_parallel_linear_logprobs needs a process_group")
    h = _CopyToGroup.apply(hidden, process_group) if hidden.requires_grad else hidden
    logits = torch.nn.functional.linear(h, weight, bias)
    ref = None
    if ref_hidden is not None:
        rw, rb = (weight, bias) if ref_weight is None else (ref_weight, ref_bias)
        with torch.no_grad():
            ref = torch.nn.functional.linear(ref_hidden, rw, rb)
    return vocab_parallel_logprobs(logits, labels, process_group=process_group, ref_logits=ref, **kwargs)
