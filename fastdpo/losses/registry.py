"""Registry of preference objectives written as small torch functions.

An objective never touches the vocabulary: it receives a :class:`PairStats`
(sequence-level log-probs of the chosen and rejected halves of the batch, their
reference counterparts, f-divergence scores, token counts, per-token log-probs
for NLL terms) and returns the per-pair loss ``[B]``. The kernels did the
vocabulary-wide work; autograd carries each token's coefficient back to them.

Add your own::

    @fastdpo.register_loss("my_loss", needs_reference=True)
    def my_loss(s: fastdpo.PairStats) -> torch.Tensor:
        return -torch.nn.functional.logsigmoid(s.beta * (s.chosen_logratios - s.rejected_logratios) - 0.1)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch


@dataclasses.dataclass
class PairStats:
    """Sequence-level inputs of a paired objective; every tensor is ``[B]`` unless noted.

    ``*_logps`` are sums of per-token log-probs over the completion (with LD-DPO
    and per-token weights applied), differentiable for the policy. Without a
    reference, ``ref_*_logps`` are zeros and ``has_reference`` is False.
    ``*_scores`` are the log-ratios mapped by the f-divergence (equal to the
    log-ratios for reverse KL). ``*_lengths`` count completion tokens (float).
    ``*_token_logps`` / ``*_mask`` are ``[B, T]``, for NLL-type terms.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_scores: torch.Tensor
    rejected_scores: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    chosen_token_logps: torch.Tensor
    rejected_token_logps: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_mask: torch.Tensor
    has_reference: bool
    beta: float
    label_smoothing: float = 0.0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected_logps - self.ref_rejected_logps

    @property
    def delta_score(self) -> torch.Tensor:
        return self.chosen_scores - self.rejected_scores

    def option(self, name: str, default: Any) -> Any:
        return self.options.get(name, default)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[[PairStats], torch.Tensor]
    needs_reference: bool  # an error without ref_logits / ref_logps
    reference_free: bool  # an error with them (the objective has no reference term)
    f_divergence: bool  # accepts f_divergence_type other than reverse_kl (TRL's rule)
    check: Callable[[dict[str, Any]], None] | None  # validates the loss's own options
    nll: bool  # has an NLL term: metrics report nll_loss


_REGISTRY: dict[str, LossSpec] = {}


def register_loss(
    name: str,
    *,
    needs_reference: bool = False,
    reference_free: bool = False,
    f_divergence: bool = False,
    check: Callable[[dict[str, Any]], None] | None = None,
    nll: bool = False,
):
    """Decorator: register ``fn(stats: PairStats) -> per-pair loss [B]`` under ``name``."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"fastdpo: a loss named {name!r} is already registered")
        _REGISTRY[name] = LossSpec(name, fn, needs_reference, reference_free, f_divergence, check, nll)
        return fn

    return deco


def get_loss(name: str) -> LossSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"fastdpo: unknown loss_type {name!r}; registered: {', '.join(sorted(_REGISTRY))}"
        ) from None


def registered_losses() -> list[str]:
    return sorted(_REGISTRY)
