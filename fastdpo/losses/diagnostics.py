r"""Training-dynamics diagnostics of a DPO-family loss, from what the loss already holds.

Everything here is computed from the fused pass's per-token outputs (policy and reference
log-probs, ``log sum_v p_v^2``), the per-sequence :class:`SequenceStats` and the loss graph on
those small tensors: no extra pass over the vocabulary. Formulas, conventions and the papers
they come from are in ``docs/diagnostics.md``; in short, with ``G`` groups (pairs, K-way lists,
or single sequences for unpaired objectives), ``c_i`` the policy sequence log-prob the objective
sees for group i's chosen (block 0 / desirable) response and ``L`` the batch loss:

* displacement: the chosen / rejected log-ratios ``log pi - log pi_ref`` (per sequence, per token)
  and the fraction below 0 (Kim et al. 2025, arXiv:2506.04272; Yan et al. 2024, arXiv:2406.07327);
* loss reweighting: ``w_i = -G dL/dc_i`` (unpaired: signed so that w > 0 pushes a desirable
  response up and an undesirable one down); ``beta * sigmoid(-beta * Delta_i)`` for ``sigmoid``
  (Wang et al. 2025, arXiv:2512.00778);
* positive vs negative learning: the norm of ``dL/dlogits`` over the chosen and the rejected
  tokens, from ``||d log p_y / dz||^2 = (1 - p_y)^2 + sum_v p_v^2 - p_y^2`` scaled by the token's
  coefficient ``g_t = dL/dlogp_t`` and ``1 / temperature`` (arXiv:2512.00778; Ma et al. 2025,
  arXiv:2502.20847);
* margin: the per-pair reward margins.

The coefficients come from autograd on the loss graph of the small per-token tensor: the graph
the loss already has (``retain_graph``), or, when the loss is evaluated without one (no grad,
the fused-linear gradient-in-forward strategy), a detached leaf copy of the per-token log-probs
the loss is evaluated on once under ``enable_grad`` (:class:`Probe`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch

from fastdpo.losses.metrics import block_masks
from fastdpo.losses.registry import SequenceStats
from fastdpo.ops.logprobs import FusedLogprobs

PREFIX = "diagnostics/"
SMALL_WEIGHT = 0.01  # a group's weight counts as small below this fraction of the batch maximum


def check_flag(diagnostics) -> None:
    if not isinstance(diagnostics, bool):
        raise TypeError(f"fastdpo: diagnostics must be True or False, got {diagnostics!r}")


class Probe:
    """The per-token policy log-probs the loss is evaluated on when diagnostics are asked for.

    The tensor itself when it is already part of an autograd graph; otherwise (no grad mode,
    or log-probs without a graph) a detached leaf copy, with :meth:`context` turning grad mode on
    for the one evaluation of the loss; :attr:`detach_outputs` then tells the caller, in no grad
    mode, to hand back detached outputs (under grad mode the loss keeps its graph to other inputs,
    e.g. a learnable ``beta``).
    """

    def __init__(self, tok: FusedLogprobs):
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "fastdpo: diagnostics=True differentiates the loss w.r.t. the per-token log-probs, which "
                "torch.inference_mode() forbids; evaluate under torch.no_grad() instead")
        self.leaf = not (torch.is_grad_enabled() and tok.logps.requires_grad)
        self.detach_outputs = not torch.is_grad_enabled()
        if self.leaf:
            tok = tok._replace(logps=tok.logps.detach().requires_grad_(),
                               kl=None if tok.kl is None else tok.kl.detach())
        self.tok = tok

    def context(self):
        return torch.enable_grad() if self.leaf else contextlib.nullcontext()


@dataclasses.dataclass
class Diagnostics:
    """A batch's raw diagnostic values (detached); :meth:`summary` turns them into the logged metrics.

    ``weights``: ``[G]`` per-group loss weights w. ``margins``: ``[P]`` per-pair reward margins (None
    when chosen and rejected rewards do not pair up). ``chosen_logratios`` / ``rejected_logratios``:
    per-sequence log-ratios to the reference of the chosen (block 0 / desirable) and rejected
    (block 1 / undesirable) responses, None when reference-free; ``chosen_tokens`` /
    ``rejected_tokens``: their response-token counts. ``grad_sq``: ``[3]`` squared norms of the
    logits gradient over the chosen tokens, the rejected tokens and all tokens.
    """

    weights: torch.Tensor
    margins: torch.Tensor | None
    chosen_logratios: torch.Tensor | None
    rejected_logratios: torch.Tensor | None
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    grad_sq: torch.Tensor

    def summary(self) -> dict[str, torch.Tensor]:
        """The ``diagnostics/...`` metrics as 0-d tensors (see docs/diagnostics.md)."""
        out = {}
        if self.chosen_logratios is not None:
            for side, lr, n in (("chosen", self.chosen_logratios, self.chosen_tokens),
                                ("rejected", self.rejected_logratios, self.rejected_tokens)):
                out[f"{PREFIX}logratio/{side}"] = lr.mean()
                out[f"{PREFIX}logratio_per_token/{side}"] = lr.sum() / n.sum().clamp(min=1.0)
                out[f"{PREFIX}below_ref/{side}"] = (lr < 0).to(lr.dtype).mean()
        w = self.weights
        _spread(out, "weight", w)
        top = w.max()
        out[f"{PREFIX}weight/frac_small"] = torch.where(top > 0, (w < SMALL_WEIGHT * top).to(w.dtype).mean(),
                                                        torch.ones((), dtype=w.dtype, device=w.device))
        c, r, t = self.grad_sq.sqrt().unbind()
        out.update({f"{PREFIX}grad_norm/chosen": c, f"{PREFIX}grad_norm/rejected": r,
                    f"{PREFIX}grad_norm/total": t, f"{PREFIX}grad_norm/ratio": c / r})
        if self.margins is not None:
            _spread(out, "margin", self.margins)
        return out

    def gathered(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> "Diagnostics":
        """The diagnostics of the batch over all processes, from ``gather`` (e.g. ``accelerator.gather``:
        each process's tensor concatenated along dim 0). Per-group and per-sequence values are
        concatenated; the gradient norms are those of the process-averaged gradient (as
        DistributedDataParallel applies it): squared norms summed over processes / processes^2."""
        def g(x):
            return None if x is None else gather(x.contiguous())

        sq = gather(self.grad_sq).view(-1, 3)
        return Diagnostics(g(self.weights), g(self.margins), g(self.chosen_logratios), g(self.rejected_logratios),
                           g(self.chosen_tokens), g(self.rejected_tokens), sq.sum(0) / sq.shape[0] ** 2)


def _spread(out: dict, name: str, x: torch.Tensor) -> None:
    q = torch.quantile(x, torch.tensor([0.1, 0.9], dtype=x.dtype, device=x.device))
    out[f"{PREFIX}{name}/mean"], out[f"{PREFIX}{name}/p10"], out[f"{PREFIX}{name}/p90"] = x.mean(), q[0], q[1]


def token_grad_sq(logps: torch.Tensor, log_sum_p2: torch.Tensor) -> torch.Tensor:
    r""":math:`\|\partial \log p_y / \partial z\|^2 = \|e_y - p\|^2 = (1 - p_y)^2 + (\sum_v p_v^2 - p_y^2)`
    per token, from the token's log-prob and ``log sum_v p_v^2`` of the same pass (0 at ignored tokens,
    whose log-prob and statistics are 0). ``(1 - p_y)`` is formed as ``-expm1(log p_y)``, accurate when
    the label is likely; the second term is clamped at 0 against rounding."""
    one_minus_p = -torch.expm1(logps)
    others = (log_sum_p2.exp() - (2 * logps).exp()).clamp(min=0.0)
    return one_minus_p * one_minus_p + others


def compute(tok: FusedLogprobs, s: SequenceStats, layout, loss: torch.Tensor, chosen_rewards: torch.Tensor,
            rejected_rewards: torch.Tensor, *, temperature: float = 1.0, retain_graph: bool = True) -> Diagnostics:
    """The diagnostics of one evaluated loss: ``tok`` / ``s`` / ``loss`` from that evaluation (``tok.logps``
    in its graph, see :class:`Probe`), ``layout`` its token layout, the detached rewards it logged, and the
    temperature the kernel divided the logits by."""
    if tok.stats is None:
        raise ValueError("fastdpo: diagnostics need the per-token statistics of the fused pass (log sum p^2)")
    lp_seq = s.logps
    g_tok = g_seq = None
    if loss.requires_grad:
        g_tok, g_seq = torch.autograd.grad(loss, (tok.logps, lp_seq), retain_graph=retain_graph, allow_unused=True)
    with torch.no_grad():
        g_tok = torch.zeros_like(tok.logps) if g_tok is None else g_tok
        g_seq = torch.zeros_like(lp_seq) if g_seq is None else g_seq
        n = lp_seq.shape[0]
        desirable = s.desirable
        if desirable is not None:  # unpaired: each sequence is a group, pushed up if desirable, down if not
            w = -n * torch.where(desirable, g_seq, -g_seq)
            pick = (lambda x: x[desirable]), (lambda x: x[~desirable])
        else:
            w = -(n // s.num_blocks) * s.block(g_seq, 0)
            pick = (lambda x: s.block(x, 0)), (lambda x: s.block(x, 1))
        margins = (chosen_rewards - rejected_rewards) if chosen_rewards.shape == rejected_rewards.shape else None
        lr = s.logratios.detach() if s.ref_logps is not None else None

        logp = layout.tokens(tok.logps.detach())
        g = layout.tokens(g_tok) / temperature
        sq = g * g * token_grad_sq(logp, layout.tokens(tok.stats[..., 3]).to(logp.dtype))
        cm, rm, m = block_masks(layout, desirable, s.num_blocks, sq.dtype)
        grad_sq = torch.stack([(sq * cm).sum(), (sq * rm).sum(), (sq * m).sum()])
        return Diagnostics(
            weights=w.detach(), margins=None if margins is None else margins.detach(),
            chosen_logratios=None if lr is None else pick[0](lr), rejected_logratios=None if lr is None else pick[1](lr),
            chosen_tokens=pick[0](s.n_tokens), rejected_tokens=pick[1](s.n_tokens), grad_sq=grad_sq)
