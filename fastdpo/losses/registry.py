"""Registry of preference objectives written as small torch functions of sequence-level statistics.

An objective never sees the vocabulary. It receives a :class:`SequenceStats`
(policy / reference sequence log-probs, token counts, the batch layout) and a
:class:`LossConfig` (beta and the other options) and returns per-pair (or
per-sequence) losses, which the caller averages; or a 0-d tensor when the
objective is already a batch mean. Register a new one with::

    @register_loss("my_loss", defaults={"gamma": 1.0})
    def my_loss(s, cfg):
        return -F.logsigmoid(cfg.beta * (s.chosen_logratios - s.rejected_logratios) - cfg.gamma)

and call ``fastdpo.dpo_loss(..., loss_type="my_loss", gamma=2.0)``; no kernel changes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

Objective = Callable[["SequenceStats", "LossConfig"], torch.Tensor]


@dataclasses.dataclass
class SequenceStats:
    """Sequence-level inputs of an objective; dim 0 of every tensor is the batch of sequences.

    The batch is ``num_blocks`` equal blocks (``[chosen; rejected]`` for pairs,
    ``[chosen; rejected; gold]`` for TPO, ``[rank 1; ...; rank K]`` for listwise
    objectives). ``logps`` / ``ref_logps`` are the (LD-DPO / per-token weighted)
    sums the losses use; ``sum_logps`` is the plain sum of policy token log-probs
    (for NLL terms, as cross-entropy over response tokens); ``n_tokens`` counts
    the response tokens. ``ref_logps`` is None when reference-free. ``desirable``
    (unpaired objectives) marks desirable sequences. ``kl`` (objectives registered
    with ``token_kl=True``) is each sequence's sum over its response tokens of the
    full-vocabulary ``KL(pi_ref(.|x, y_<t) || pi(.|x, y_<t))``, from the same kernel
    pass (not weighted by ``token_weights`` / ``ld_alpha``). Objectives may add
    entries to ``metrics``. ``length_averaged`` (``average_log_prob=True``): ``logps`` and
    ``ref_logps`` are already per-token means, so length-normalising objectives use them as they are.
    """

    logps: torch.Tensor
    ref_logps: torch.Tensor | None
    sum_logps: torch.Tensor
    n_tokens: torch.Tensor
    num_blocks: int = 2
    desirable: torch.Tensor | None = None
    scores: torch.Tensor | None = None  # f-divergence transform of logratios (set by the caller)
    metrics: dict = dataclasses.field(default_factory=dict)
    kl: torch.Tensor | None = None
    length_averaged: bool = False

    def block(self, x: torch.Tensor | None, i: int) -> torch.Tensor | None:
        return None if x is None else x.chunk(self.num_blocks, dim=0)[i]

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``[K*B] -> [B, K]`` (column k is block k)."""
        return x.view(self.num_blocks, -1).t()

    @property
    def logratios(self) -> torch.Tensor:
        """log pi(y|x) - log pi_ref(y|x) (the policy log-prob itself when reference-free)."""
        return self.logps if self.ref_logps is None else self.logps - self.ref_logps

    @property
    def mean_logps(self) -> torch.Tensor:
        """Length-normalised policy log-probs ``logps / max(n_tokens, 1)`` (``logps`` when already averaged)."""
        return self.per_token(self.logps)

    def per_token(self, x: torch.Tensor, block: int | None = None) -> torch.Tensor:
        """A per-sequence sum ``x`` (of all sequences, or of one block) divided by its sequences' token counts;
        ``x`` itself when the sequence log-probs are already per-token means (``length_averaged``)."""
        if self.length_averaged:
            return x
        n = self.n_tokens if block is None else self.block(self.n_tokens, block)
        return x / n.clamp(min=1.0)

    chosen_logps = property(lambda s: s.block(s.logps, 0))
    rejected_logps = property(lambda s: s.block(s.logps, 1))
    ref_chosen_logps = property(lambda s: s.block(s.ref_logps, 0))
    ref_rejected_logps = property(lambda s: s.block(s.ref_logps, 1))
    chosen_logratios = property(lambda s: s.block(s.logratios, 0))
    rejected_logratios = property(lambda s: s.block(s.logratios, 1))
    chosen_tokens = property(lambda s: s.block(s.n_tokens, 0))
    rejected_tokens = property(lambda s: s.block(s.n_tokens, 1))
    chosen_kl = property(lambda s: s.block(s.kl, 0))
    rejected_kl = property(lambda s: s.block(s.kl, 1))
    chosen_scores = property(lambda s: s.block(s.scores, 0))
    rejected_scores = property(lambda s: s.block(s.scores, 1))

    def nll(self, block: int = 0) -> torch.Tensor:
        """Token-mean negative log-likelihood of one block (cross-entropy over its response tokens)."""
        return -self.block(self.sum_logps, block).sum() / self.block(self.n_tokens, block).sum().clamp(min=1.0)


class LossConfig:
    """Options of one objective: ``beta`` (a float, or a per-pair tensor), ``label_smoothing``,
    ``discopop_tau``, ``f_divergence_type``, ``f_alpha_divergence_coef`` and the objective's
    own options (its registered defaults overridden by the caller), as attributes."""

    def __init__(self, **options: Any):
        self.__dict__.update(options)

    def __repr__(self) -> str:
        return f"LossConfig({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A registered objective and how to call it.

    ``reference``: "required" (error without one), "optional" (reference-free when
    absent: log-ratios become policy log-probs) or "unused".
    ``f_divergence``: accepts ``f_divergence_type`` other than reverse_kl.
    ``weighting``: accepts WPO ``use_weighting``.
    ``num_blocks``: blocks in dim 0 (an int, or a function of the config).
    ``rewards``: ``(s, cfg) -> (chosen_rewards, rejected_rewards)`` for logging;
    default ``beta * logratios`` of blocks 0 and 1.
    ``validate``: ``cfg -> None`` raising ValueError on bad options.
    ``separable``: a group's (pair's) gradient does not depend on the values of other groups
    (true for per-pair losses and for batch means with value-independent normalisers; false
    when the batch is sorted or a batch statistic of the values enters, as in AOT and BCO).
    The fused-linear gradient-in-forward strategy needs it.
    ``token_kl``: the objective reads ``SequenceStats.kl``, the token-level KL to the
    reference that the kernels compute in the same pass; it needs reference logits
    (``ref_logits`` / ``ref_hidden``), not just precomputed ``ref_logps``.
    """

    name: str
    fn: Objective
    reference: str = "optional"
    f_divergence: bool = False
    weighting: bool = True
    num_blocks: int | Callable[[LossConfig], int] = 2
    unpaired: bool = False
    defaults: dict = dataclasses.field(default_factory=dict)
    rewards: Callable | None = None
    validate: Callable[[LossConfig], None] | None = None
    separable: bool = True
    token_kl: bool = False

    def blocks(self, cfg: LossConfig) -> int:
        return self.num_blocks(cfg) if callable(self.num_blocks) else self.num_blocks


_REGISTRY: dict[str, LossSpec] = {}


def register_loss(
    name: str,
    *,
    reference: str = "optional",
    f_divergence: bool = False,
    weighting: bool = True,
    num_blocks: int | Callable[[LossConfig], int] = 2,
    unpaired: bool = False,
    defaults: dict | None = None,
    rewards: Callable | None = None,
    validate: Callable[[LossConfig], None] | None = None,
    separable: bool | None = None,
    token_kl: bool = False,
    overwrite: bool = False,
):
    """Decorator registering ``fn(s: SequenceStats, cfg: LossConfig) -> Tensor`` under ``name``.

    ``separable`` (see :class:`LossSpec`) defaults to False for objectives defined outside
    fastdpo, so a user's loss is never given the gradient-in-forward strategy unless it says
    ``separable=True``.
    """
    if reference not in ("required", "optional", "unused"):
        raise ValueError(f"fastdpo: reference must be 'required', 'optional' or 'unused', got {reference!r}")

    def deco(fn: Objective) -> Objective:
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"fastdpo: a loss named {name!r} is already registered (pass overwrite=True)")
        _REGISTRY[name] = LossSpec(
            name, fn, reference, f_divergence, weighting, num_blocks, unpaired, dict(defaults or {}), rewards, validate,
            fn.__module__.startswith("fastdpo.") if separable is None else bool(separable), bool(token_kl),
        )
        return fn

    return deco


def get_loss(name: str) -> LossSpec:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"fastdpo: unknown loss_type {name!r}; expected one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_losses() -> list[str]:
    return sorted(_REGISTRY)


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces of objectives


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_scores(logratios: torch.Tensor, kind: str, alpha_coef: float) -> torch.Tensor:
    r"""f'(pi/pi_ref) of the f-DPO paper (Wang et al. 2023, arXiv:2309.16240), as TRL computes it.

    reverse_kl: :math:`\log t`; forward_kl: :math:`1 - 1/t`; js_divergence: :math:`\log 2 + \log\sigma(\log t)`;
    alpha_divergence: :math:`(t^{\alpha-1} - 1)/(\alpha - 1)` with the exponent clamped at 80 (11 in float16),
    and :math:`\log t` when :math:`|\alpha - 1| < 10^{-6}`.
    """
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence":
        if abs(alpha_coef - 1.0) < 1e-6:
            return logratios
        t = (alpha_coef - 1.0) * logratios
        clamp_max = 11.0 if t.dtype == torch.float16 else 80.0
        return (torch.exp(torch.clamp(t.float(), max=clamp_max)) - 1.0).to(t.dtype) / (alpha_coef - 1.0)
    raise ValueError(f"fastdpo: unknown f_divergence_type {kind!r}; expected one of {', '.join(F_DIVERGENCES)}")


def smoothed_sigmoid_loss(z: torch.Tensor, eps) -> torch.Tensor:
    """``-(1 - eps) log sigma(z) - eps log sigma(-z)`` (conservative / label-smoothed logistic loss)."""
    loss = -F.logsigmoid(z)
    if isinstance(eps, torch.Tensor) or eps != 0:
        loss = loss * (1 - eps) - F.logsigmoid(-z) * eps
    return loss
