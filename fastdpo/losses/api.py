"""One-call DPO-family losses from logits (:func:`dpo_loss`) or from LM-head inputs (:func:`linear_dpo_loss`).

Both run the fused per-token kernel once (policy + reference log-probs +
statistics) and then share one code path, :func:`_loss_from_tokens`: sequence
sums (LD-DPO, per-token weights), WPO weights, the registered objectives and
the TRL metrics, all ordinary torch code on ``[N, T]`` tensors.
"""

from __future__ import annotations

import dataclasses
import numbers

import torch

from fastdpo import _validation
from fastdpo.losses import registry
from fastdpo.losses.registry import LossConfig, SequenceStats, f_divergence_scores
from fastdpo.ops import linear
from fastdpo.ops.logprobs import FusedLogprobs, fused_logprobs
from fastdpo.ops.vocab_parallel import vocab_parallel_logprobs

@dataclasses.dataclass
class DPOOutput:
    """Result of :func:`dpo_loss` / :func:`linear_dpo_loss`.

    ``loss``: scalar. ``chosen_logps`` / ``rejected_logps``: per-pair policy sequence
    log-probs (after ``ld_alpha`` / ``token_weights``). ``chosen_rewards`` /
    ``rejected_rewards``: detached implicit rewards (``beta * log-ratio`` for
    reference-based losses). ``metrics``: detached 0-d tensors under TRL's keys.
    ``policy_logps`` / ``ref_logps``: all ``N`` sequence log-probs (``ref_logps`` None
    when reference-free).
    """

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict
    policy_logps: torch.Tensor
    ref_logps: torch.Tensor | None


@dataclasses.dataclass
class _Plan:
    terms: list  # [(LossSpec, LossConfig, weight)]
    num_blocks: int
    unpaired: bool
    common: dict

    @property
    def kl_losses(self) -> list[str]:
        """The objectives that read the token-level KL (the kernels must compute it)."""
        return [sp.name for sp, _, _ in self.terms if sp.token_kl]

    @property
    def token_kl(self) -> bool:
        return bool(self.kl_losses)


def _check_number(x, name, *, lo=None, hi=None, lo_open=False, hi_open=False):
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"fastdpo: {name} must be a number, got {type(x).__name__}")
    x = float(x)
    if (lo is not None and (x < lo or (lo_open and x == lo))) or (hi is not None and (x > hi or (hi_open and x == hi))):
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"fastdpo: {name} must lie in {lb}{lo}, {hi}{rb}, got {x}")
    return x


def _plan(loss_type, loss_weights, beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef, ld_alpha,
          use_weighting, discopop_tau, variant_options) -> _Plan:
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError("fastdpo: loss_type must be a name or a non-empty list of names")
    specs = [registry.get_loss(t) for t in types]
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        weights = [_check_number(w, "loss_weights[i]") for w in loss_weights]
        if len(weights) != len(types):
            raise ValueError(
                f"fastdpo: loss_weights has {len(weights)} entries but loss_type has {len(types)} ({types}); "
                "give one weight per loss type"
            )
    if isinstance(beta, torch.Tensor):
        if not beta.dtype.is_floating_point:
            raise TypeError(f"fastdpo: a tensor beta must be floating point, got {beta.dtype}")
    else:
        _check_number(beta, "beta", lo=0.0, lo_open=True)
    label_smoothing = _check_number(label_smoothing, "label_smoothing", lo=0.0, hi=1.0)
    if f_divergence_type not in registry.F_DIVERGENCES:
        raise ValueError(
            f"fastdpo: unknown f_divergence_type {f_divergence_type!r}; expected one of {', '.join(registry.F_DIVERGENCES)}"
        )
    f_alpha_divergence_coef = _check_number(f_alpha_divergence_coef, "f_alpha_divergence_coef")
    if ld_alpha is not None:
        _check_number(ld_alpha, "ld_alpha", lo=0.0, hi=1.0)
    discopop_tau = _check_number(discopop_tau, "discopop_tau", lo=0.0, lo_open=True)
    if f_divergence_type != "reverse_kl":
        bad = [sp.name for sp in specs if not sp.f_divergence]
        if bad:
            raise ValueError(
                f"fastdpo: f_divergence_type={f_divergence_type!r} is not supported by loss_type {bad}; supported: "
                f"{[n for n in registry.available_losses() if registry.get_loss(n).f_divergence]}"
            )
    if use_weighting:
        bad = [sp.name for sp in specs if not sp.weighting]
        if bad:
            raise ValueError(f"fastdpo: use_weighting=True (WPO) is not supported by loss_type {bad}")
    known = set().union(*(sp.defaults for sp in specs))
    unknown = sorted(set(variant_options) - known)
    if unknown:
        raise TypeError(
            f"fastdpo: unexpected option(s) {unknown} for loss_type {types}; "
            f"options these losses accept: {sorted(known) or 'none'}"
        )
    common = dict(beta=beta, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
                  f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau)
    terms = []
    for sp, w in zip(specs, weights):
        opts = {k: variant_options.get(k, v) for k, v in sp.defaults.items()}
        cfg = LossConfig(**common, **opts)
        if sp.validate is not None:
            sp.validate(cfg)
        terms.append((sp, cfg, w))
    blocks = {sp.blocks(cfg) for sp, cfg, _ in terms}
    if len(blocks) != 1:
        raise ValueError(f"fastdpo: loss types {types} expect different batch layouts and cannot be combined")
    unpaired = {sp.unpaired for sp in specs}
    if len(unpaired) != 1:
        raise ValueError(f"fastdpo: paired and unpaired loss types cannot be combined ({types})")
    return _Plan(terms, blocks.pop(), unpaired.pop(), common)


def _check_batch(plan: _Plan, n: int, desirable, ref_logps, have_ref_tokens, pair_weights, token_weights, labels):
    if desirable is None and (n % plan.num_blocks != 0 or n == 0):
        layout = "[chosen; rejected]" if plan.num_blocks == 2 else f"{plan.num_blocks} equal blocks"
        raise ValueError(
            f"fastdpo: the batch dimension must hold {layout} for loss_type "
            f"{[sp.name for sp, _, _ in plan.terms]}, got {n} sequences (not a positive multiple of {plan.num_blocks})"
        )
    if desirable is not None:
        if not plan.unpaired:
            raise ValueError("fastdpo: desirable= is only accepted by unpaired loss types (kto, bco, ...)")
        _validation.check_tensor(desirable, "desirable")
        if desirable.dtype != torch.bool or tuple(desirable.shape) != (n,):
            raise ValueError(f"fastdpo: desirable must be a bool tensor of shape ({n},), got {desirable.dtype} {tuple(desirable.shape)}")
    if ref_logps is not None:
        _validation.check_float_tensor(ref_logps, "ref_logps")
        if have_ref_tokens:
            raise ValueError("fastdpo: pass either ref_logits/ref_hidden or ref_logps, not both")
        if tuple(ref_logps.shape) != (n,):
            raise ValueError(
                f"fastdpo: ref_logps must be the [{n}] sequence-level reference log-probs in the batch order, "
                f"got shape {tuple(ref_logps.shape)}"
            )
    has_ref = have_ref_tokens or ref_logps is not None
    if plan.token_kl and not have_ref_tokens:
        raise ValueError(
            f"fastdpo: loss_type {plan.kl_losses} regularises with the token-level KL to the reference over the whole "
            "vocabulary, which needs the reference model's logits: pass ref_logits (ref_hidden for the linear form)"
            + ("; precomputed ref_logps are not enough" if ref_logps is not None else "")
        )
    for sp, _, _ in plan.terms:
        if sp.reference == "required" and not has_ref:
            raise ValueError(
                f"fastdpo: loss_type={sp.name!r} needs a reference: pass ref_logits (ref_hidden for the linear form) "
                "or ref_logps"
            )
    if pair_weights is not None:
        _validation.check_float_tensor(pair_weights, "pair_weights")
        groups = n if plan.unpaired else n // plan.num_blocks
        if tuple(pair_weights.shape) != (groups,):
            raise ValueError(f"fastdpo: pair_weights must have shape ({groups},), got {tuple(pair_weights.shape)}")
    if token_weights is not None:
        _validation.check_float_tensor(token_weights, "token_weights")
        _validation.check_same_shape(labels, token_weights, "labels", "token_weights")


def _sequence_stats(tok: FusedLogprobs, labels, ignore_index, ref_logps, ld_alpha, token_weights, num_blocks, desirable):
    """Per-token -> per-sequence: the only place sequences are summed."""
    logp = tok.logps.reshape(labels.shape[0], -1)
    mask = (labels != ignore_index).reshape(logp.shape)
    n_tokens = mask.sum(1).to(logp.dtype)
    w = None
    if ld_alpha is not None:
        # LD-DPO (Liu et al. 2024, arXiv:2409.06411): tokens beyond the shorter response of the group weigh ld_alpha.
        pos = mask.cumsum(1)
        shared = mask.sum(1).view(num_blocks, -1).min(0).values.repeat(num_blocks)
        w = torch.where(pos <= shared.unsqueeze(1), 1.0, float(ld_alpha)).to(logp.dtype)
    if token_weights is not None:
        tw = token_weights.reshape(logp.shape).to(logp.dtype)
        w = tw if w is None else w * tw
    seq = (lambda x: (x * w).sum(1)) if w is not None else (lambda x: x.sum(1))
    if tok.ref_logps is not None:
        ref = seq(tok.ref_logps.reshape(logp.shape))
    elif ref_logps is not None:
        ref = ref_logps.detach().to(logp.dtype)
    else:
        ref = None
    kl = tok.kl.reshape(logp.shape).sum(1) if tok.kl is not None else None  # 0 at ignored tokens
    return SequenceStats(seq(logp), ref, logp.sum(1), n_tokens, num_blocks, desirable, kl=kl), logp, mask


def _wpo_weights(logp, mask, stats, n_tokens, num_blocks):
    """WPO (Zhou et al. 2024, arXiv:2406.11827, Eq. 2): w(y) = exp(mean_t [log p_t - log sum_v p_v^2]),
    per pair the product over its responses; no gradient."""
    with torch.no_grad():
        lsp2 = stats[..., 3].reshape(logp.shape)
        w = torch.exp(((logp - lsp2) * mask).sum(1) / n_tokens.clamp(min=1.0))
        return w.view(num_blocks, -1).prod(0)


def _loss_from_tokens(tok: FusedLogprobs, labels, *, ref_logps, plan: _Plan, ld_alpha, use_weighting, ignore_index,
                      token_weights, pair_weights, desirable) -> DPOOutput:
    n = labels.shape[0]
    K = 1 if (plan.unpaired and desirable is not None) else plan.num_blocks
    if plan.unpaired and desirable is None:
        desirable = torch.arange(n, device=labels.device) < n // 2
    if ld_alpha is not None and K == 1:
        raise ValueError("fastdpo: ld_alpha needs paired responses ([chosen; rejected] layout), not desirable=")
    if plan.token_kl and tok.kl is None:
        raise ValueError(
            f"fastdpo: loss_type {plan.kl_losses} needs the token-level KL to "
            "the reference over the vocabulary, which per-token log-probs do not carry; use fastdpo.dpo_loss with "
            "ref_logits (or linear_dpo_loss with ref_hidden)")
    s, logp, mask = _sequence_stats(tok, labels, ignore_index, ref_logps, ld_alpha, token_weights, K, desirable)
    s.scores = f_divergence_scores(s.logratios, plan.common["f_divergence_type"], plan.common["f_alpha_divergence_coef"])
    wpo = _wpo_weights(logp, mask, tok.stats, s.n_tokens, K) if use_weighting else None

    loss = 0.0
    for sp, cfg, weight in plan.terms:
        per = sp.fn(s, cfg)
        if wpo is not None:
            per = per * wpo
        if pair_weights is not None:
            per = per * pair_weights.to(per.dtype)
        loss = loss + per.mean() * weight

    sp0, cfg0, _ = plan.terms[0]
    with torch.no_grad():
        if sp0.rewards is not None:
            cr, rr = sp0.rewards(s, cfg0)
        else:
            r = cfg0.beta * (s.logratios.view(K, -1) if K > 1 else s.logratios)
            if desirable is not None:
                r = r.reshape(-1)
                cr, rr = r[desirable], r[~desirable]
            else:
                cr, rr = r[0], r[1]
        cr, rr = cr.detach(), rr.detach()
        metrics = _metrics(s, tok.stats, mask, cr, rr, desirable, K)
    if "nll_loss" in s.metrics:
        metrics["nll_loss"] = s.metrics.pop("nll_loss").detach()
    metrics.update({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in s.metrics.items()})
    if desirable is not None:
        chosen, rejected = s.logps[desirable], s.logps[~desirable]
    else:
        chosen, rejected = s.chosen_logps, s.rejected_logps
    if not isinstance(loss, torch.Tensor):  # pragma: no cover - every objective returns a tensor
        loss = torch.tensor(loss, device=labels.device)
    return DPOOutput(loss, chosen, rejected, cr, rr, metrics, s.logps, s.ref_logps)


def _masked_mean(x, m):
    return (x * m).sum() / m.sum().clamp(min=1)


def _metrics(s: SequenceStats, stats, mask, cr, rr, desirable, K):
    """The metrics TRL's DPOTrainer logs, from the statistics of the same kernel pass."""
    st = stats.reshape(*mask.shape, -1)
    m = mask.to(st.dtype)
    if desirable is not None:
        cm = m * desirable.unsqueeze(1).to(m.dtype)
        rm = m * (~desirable).unsqueeze(1).to(m.dtype)
        lc, lr = s.logps[desirable], s.logps[~desirable]
    else:
        rows = torch.arange(mask.shape[0], device=mask.device) // (mask.shape[0] // K)
        cm = m * (rows == 0).unsqueeze(1).to(m.dtype)
        rm = m * (rows == 1).unsqueeze(1).to(m.dtype)
        lc, lr = s.chosen_logps, s.rejected_logps
    out = {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
    }
    if cr.shape == rr.shape:
        out["rewards/accuracies"] = (cr > rr).float().mean()
        out["rewards/margins"] = (cr - rr).mean()
    out.update({
        "logps/chosen": lc.detach().mean(),
        "logps/rejected": lr.detach().mean(),
        "logits/chosen": _masked_mean(st[..., 2], cm),
        "logits/rejected": _masked_mean(st[..., 2], rm),
        "entropy": _masked_mean(st[..., 0], m),
        "mean_token_accuracy": _masked_mean(st[..., 1], cm),
    })
    if s.kl is not None:  # objectives with the token-level KL: mean per-sequence KL sums
        kc, kr = (s.kl[desirable], s.kl[~desirable]) if desirable is not None else (s.chosen_kl, s.rejected_kl)
        out["kl/chosen"], out["kl/rejected"] = kc.detach().mean(), kr.detach().mean()
    return out


_LOSS_DOC = """
    Loss options (same for both forms):
        loss_type: a registered name (``fastdpo.available_losses()``) or a list of names,
            combined as ``sum_i loss_weights[i] * loss_i``.
        beta: float > 0, or a per-pair tensor (margin-adaptive losses).
        label_smoothing: robust / exo_pair / aot epsilon; cDPO with ``loss_type='sigmoid', cdpo=True``.
        f_divergence_type, f_alpha_divergence_coef: f-DPO score transform (reverse_kl, forward_kl,
            js_divergence, alpha_divergence), for the losses built on the chosen-rejected difference.
        ld_alpha: LD-DPO weight of the tokens beyond the shorter response (policy and reference).
        use_weighting: WPO pair weights from the per-token ``log sum p^2`` of the same pass.
        discopop_tau: DiscoPOP temperature.
        token_weights: per-token weights shaped like ``labels`` inside every sequence sum.
        pair_weights: per-pair weights multiplying the per-pair loss (Sem-DPO style).
        desirable: bool ``[N]`` for unpaired losses (kto, bco); default ``[True]*N/2 + [False]*N/2``.
        **variant_options: options of the chosen loss type(s) (see their docstrings).
"""


def _run(tok_fn, labels, n, have_ref_tokens, *, ref_logps, loss_type, beta, label_smoothing, loss_weights,
         f_divergence_type, f_alpha_divergence_coef, ld_alpha, use_weighting, discopop_tau, ignore_index,
         token_weights, pair_weights, desirable, variant_options):
    plan = _plan(loss_type, loss_weights, beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef,
                 ld_alpha, use_weighting, discopop_tau, variant_options)
    _validation.check_int(ignore_index, "ignore_index")
    _check_batch(plan, n, desirable, ref_logps, have_ref_tokens, pair_weights, token_weights, labels)
    tok = tok_fn(plan.token_kl)
    return _loss_from_tokens(tok, labels, ref_logps=ref_logps, plan=plan, ld_alpha=ld_alpha,
                             use_weighting=use_weighting, ignore_index=ignore_index, token_weights=token_weights,
                             pair_weights=pair_weights, desirable=desirable)


def dpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ref_logits: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    loss_type="sigmoid",
    beta=0.1,
    label_smoothing: float = 0.0,
    loss_weights=None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    discopop_tau: float = 0.05,
    ignore_index: int = -100,
    backend="auto",
    token_weights: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
    desirable: torch.Tensor | None = None,
    process_group=None,
    **variant_options,
) -> DPOOutput:
    """DPO-family loss from policy logits in one fused pass over the vocabulary.

    Args:
        logits: ``[N, T, V]`` policy logits; dim 0 is ``[chosen; rejected]`` (N = 2B) or the
            loss type's blocks. Any strides on N and T (``logits[:, :-1]`` is not copied).
        labels: ``[N, T]`` token ids aligned with the logits (already shifted);
            ``ignore_index`` marks prompt and padding.
        ref_logits: reference-model logits shaped like ``logits`` (no gradient), or
        ref_logps: ``[N]`` precomputed sequence-level reference log-probs in the same order.
            With neither the loss is reference-free (log-ratios become policy log-probs), or an
            error for losses that need a reference.
        backend: kernel backend (``auto``, ``torch``, ``cpu``, ``triton``, ``cuda``).
        process_group: vocabulary-parallel: ``logits`` / ``ref_logits`` are this rank's vocabulary
            shard (see :func:`fastdpo.vocab_parallel_logprobs`); the loss and metrics are then the
            same on every rank and the gradient flows to the local shard.

    Returns:
        :class:`DPOOutput`.
    """ + _LOSS_DOC
    _validation.check_float_tensor(logits, "logits")
    if logits.dim() != 3:
        raise ValueError(f"fastdpo: logits must be [N, T, V] (N sequences), got shape {tuple(logits.shape)}")
    _validation.check_labels(labels, logits)

    def tok_fn(kl: bool):
        if process_group is not None:
            return vocab_parallel_logprobs(logits, labels, process_group=process_group, ref_logits=ref_logits,
                                           ignore_index=ignore_index, stats=True, kl=kl, backend=backend)
        return fused_logprobs(logits, labels, ref_logits=ref_logits, ignore_index=ignore_index, stats=True, kl=kl,
                              backend=backend)

    return _run(tok_fn, labels, logits.shape[0], ref_logits is not None, ref_logps=ref_logps, loss_type=loss_type,
                beta=beta, label_smoothing=label_smoothing, loss_weights=loss_weights,
                f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
                ld_alpha=ld_alpha, use_weighting=use_weighting, discopop_tau=discopop_tau,
                ignore_index=ignore_index, token_weights=token_weights, pair_weights=pair_weights,
                desirable=desirable, variant_options=variant_options)


def _groups(plan: _Plan, n: int, desirable) -> list[list[int]]:
    """Sequence indices of each group whose loss terms belong together (pairs, K-way lists)."""
    if plan.unpaired:
        return [[i] for i in range(n)]
    g = n // plan.num_blocks
    return [[i + k * g for k in range(plan.num_blocks)] for i in range(g)]


def linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    loss_type="sigmoid",
    beta=0.1,
    label_smoothing: float = 0.0,
    loss_weights=None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    discopop_tau: float = 0.05,
    ignore_index: int = -100,
    backend="auto",
    token_weights: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
    desirable: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    strategy: str = "auto",
    memory_budget: int | None = None,
    **variant_options,
) -> DPOOutput:
    """DPO-family loss from the LM head's inputs, ``logits = logit_scale * (hidden @ weight.T + bias)``,
    never holding more than ``memory_budget`` bytes of logits.

    Args:
        hidden: ``[N, T, H]`` final hidden states of the policy (dim 0 as in :func:`dpo_loss`).
        weight: ``[V, H]`` LM-head weight (dtype of ``hidden``); ``bias``: ``[V]`` or None.
        labels: ``[N, T]`` as in :func:`dpo_loss`.
        ref_hidden: ``[N, T, H]`` reference hidden states (no gradient); ``ref_weight`` /
            ``ref_bias`` default to ``weight`` / ``bias`` (a shared, frozen head) when
            ``ref_weight`` is None. Or ``ref_logps`` (``[N]``) instead.
        temperature, softcap: as in :func:`fastdpo.token_logprobs` (e.g. Gemma-2's
            ``final_logit_softcapping``); ``logit_scale``: multiplies the logits first (Cohere).
        strategy: ``"recompute"`` (forward keeps per-token log-sum-exp only; backward projects
            every tile again: 4 policy GEMM passes), ``"grad_in_forward"`` (each chunk of whole
            pairs is projected once and its gradient formed in forward: 3 policy GEMM passes;
            needs a separable loss and a pair's logits within ``memory_budget``; only ``.loss``
            carries the gradient) or ``"auto"`` (grad_in_forward when allowed and a gradient is
            needed, else recompute).
        memory_budget: bytes of logits held at once (default: ``$FASTDPO_LINEAR_BUDGET_MB``,
            else 1 GiB on GPUs, 2^24 logits on CPU: 64 MiB fp32, 32 MiB bf16).

    Gradients flow to ``hidden``, ``weight`` and ``bias``, accumulated in fp32.
    """ + _LOSS_DOC
    _validation.check_tensor(hidden, "hidden")
    if hidden.dim() != 3:
        raise ValueError(f"fastdpo: hidden must be [N, T, H] (N sequences), got shape {tuple(hidden.shape)}")
    if strategy not in linear.STRATEGIES:
        raise ValueError(f"fastdpo: unknown strategy {strategy!r}; expected one of {', '.join(linear.STRATEGIES)}")
    plan = _plan(loss_type, loss_weights, beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef,
                 ld_alpha, use_weighting, discopop_tau, variant_options)
    _validation.check_int(ignore_index, "ignore_index")
    h, y, rh, rw, rb, idx, o = linear.prepare(
        hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
        ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
        memory_budget=memory_budget, backend=backend, kl=plan.token_kl and ref_hidden is not None)
    n, T = labels.shape
    _check_batch(plan, n, desirable, ref_logps, ref_hidden is not None, pair_weights, token_weights, labels)

    def finish(tok: FusedLogprobs) -> DPOOutput:
        return _loss_from_tokens(tok, labels, ref_logps=ref_logps, plan=plan, ld_alpha=ld_alpha,
                                 use_weighting=use_weighting, ignore_index=ignore_index, token_weights=token_weights,
                                 pair_weights=pair_weights, desirable=desirable)

    need = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    chunks = None
    if strategy != "recompute" and any(need):
        budget = o.rows * weight.shape[0] * hidden.element_size()
        not_separable = [sp.name for sp, _, _ in plan.terms if not sp.separable]
        with_kl = plan.kl_losses
        if not not_separable and not with_kl:
            counts = (labels != ignore_index).sum(1).tolist()
            chunks = linear.group_chunks(counts, _groups(plan, n, desirable), weight.shape[0], hidden.element_size(),
                                         budget)
        if chunks is None and strategy == "grad_in_forward":
            why = (f"loss_type {not_separable} is not separable over pairs" if not_separable else
                   f"loss_type {with_kl} needs the token-level KL, whose gradient the recompute strategy forms"
                   if with_kl else f"one pair's logits exceed memory_budget={budget} bytes")
            raise ValueError(f"fastdpo: strategy='grad_in_forward' cannot be used: {why}; use strategy='recompute' "
                             "or 'auto'")
    if chunks is None:
        logp, ref, st, kl = linear._LinearLogprobsFunction.apply(h, weight, bias, y, idx, rh, rw, rb, True, o,
                                                                 plan.token_kl)
        return finish(FusedLogprobs(logp.view(n, T), ref.view(n, T) if rh is not None else None, st.view(n, T, -1),
                                    kl.view(n, T) if plan.token_kl else None))
    res = linear.linear_grad_in_forward(h, weight, bias, y, rh, rw, rb, o, T, chunks, lambda tok: finish(tok).loss,
                                        *need)
    with torch.no_grad():
        out = finish(res.tokens)
    out.loss = linear.AttachGrads.apply(out.loss, (res.grad_hidden, res.grad_weight, res.grad_bias), h, weight, bias)
    return out


class DPOLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`dpo_loss`: options fixed at construction, overridable per call.

    ``DPOLoss(loss_type="ipo", beta=0.5)(logits, labels, ref_logits=ref) -> DPOOutput``
    """

    _fn = staticmethod(dpo_loss)

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, *args, **kwargs) -> DPOOutput:
        return type(self)._fn(*args, **{**self.options, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if not isinstance(v, torch.Tensor))


class LinearDPOLoss(DPOLoss):
    """``nn.Module`` form of :func:`linear_dpo_loss`: ``LinearDPOLoss(...)(hidden, weight, labels, ...)``."""

    _fn = staticmethod(linear_dpo_loss)
