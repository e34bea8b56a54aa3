"""Option planning and batch checks: which objectives run, with which options, on which batch layout.

:func:`make_plan` validates the loss options once (no tensors needed, so the module
forms and the trainer can check them at construction) and returns a :class:`LossPlan`;
:func:`check_batch` validates a batch against a plan.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers

import torch

from fastdpo import _validation
from fastdpo.losses import registry
from fastdpo.losses.registry import LossConfig


@dataclasses.dataclass
class LossPlan:
    terms: list  # [(LossSpec, LossConfig, weight)]
    num_blocks: int
    unpaired: bool
    common: dict
    average_log_prob: bool = False
    reference_free: bool = False

    @property
    def names(self) -> list[str]:
        return [sp.name for sp, _, _ in self.terms]

    @property
    def kl_losses(self) -> list[str]:
        """The objectives that read the token-level KL (the kernels must compute it)."""
        return [sp.name for sp, _, _ in self.terms if sp.token_kl]

    @property
    def token_kl(self) -> bool:
        return bool(self.kl_losses)


# Options every loss type accepts (the loss-specific ones come from each objective's registered defaults).
COMMON_OPTIONS = ("beta", "label_smoothing", "loss_weights", "f_divergence_type", "f_alpha_divergence_coef",
                  "ld_alpha", "use_weighting", "discopop_tau", "average_log_prob", "reference_free")
# Per-batch arguments of the entry points, for suggestions when one is misspelt.
BATCH_ARGUMENTS = ("ref_logits", "ref_hidden", "ref_weight", "ref_bias", "ref_logps", "token_weights", "pair_weights",
                   "desirable", "ignore_index", "backend", "temperature", "softcap", "logit_scale", "strategy",
                   "memory_budget", "process_group", "diagnostics", "cu_seqlens", "position_ids")
# How a reference can be given to the loss library's entry points.
REFERENCE_WAYS = ("ref_logits (the reference model's logits), ref_hidden (its hidden states, for linear_dpo_loss) or "
                  "ref_logps (precomputed [N] sequence log-probs)")


def check_number(x, name, *, lo=None, hi=None, lo_open=False, hi_open=False):
    """``float(x)`` for a finite real number within the given bounds; else a TypeError / ValueError
    naming ``name`` and the value."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"fastdpo: {name} must be a number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"fastdpo: {name} must be a finite number, got {x}")
    if (lo is not None and (x < lo or (lo_open and x == lo))) or (hi is not None and (x > hi or (hi_open and x == hi))):
        bounds = ([f"{'>' if lo_open else '>='} {lo:g}"] if lo is not None else []) + (
            [f"{'<' if hi_open else '<='} {hi:g}"] if hi is not None else [])
        raise ValueError(f"fastdpo: {name} must be {' and '.join(bounds)}, got {x:g}")
    return x


def check_option_value(value, name) -> None:
    """Numbers (and CPU tensors: no device sync) given as loss options must be finite."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        check_number(value, name)
    elif isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dtype.is_floating_point:
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"fastdpo: {name} must be finite, got a tensor holding {value[~torch.isfinite(value)][0]}")


def unknown_options_error(unknown, types, known) -> TypeError:
    """The error for misspelt or unsupported options: the common options, the loss-specific ones, and
    the closest matches."""
    candidates = [*COMMON_OPTIONS, *sorted(known), *BATCH_ARGUMENTS]
    hints = [f"{u!r} -> did you mean {m[0]!r}?" for u in unknown if (m := difflib.get_close_matches(u, candidates, 1))]
    return TypeError(
        f"fastdpo: unexpected option(s) {unknown} for loss_type {types}"
        + (f" ({'; '.join(hints)})" if hints else "")
        + f". Options every loss type accepts: {', '.join(COMMON_OPTIONS)}; options of {types}: "
        f"{', '.join(sorted(known)) or 'none'}"
    )


def make_plan(loss_type, loss_weights, beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef, ld_alpha,
              use_weighting, discopop_tau, variant_options, *, average_log_prob=False,
              reference_free: bool = False) -> LossPlan:
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError("fastdpo: loss_type must be a name or a non-empty list of names")
    specs = [registry.get_loss(t) for t in types]
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        weights = [check_number(w, f"loss_weights[{i}]") for i, w in enumerate(loss_weights)]
        if len(weights) != len(types):
            raise ValueError(
                f"fastdpo: loss_weights has {len(weights)} entries but loss_type has {len(types)} ({types}); "
                "give one weight per loss type"
            )
    if isinstance(beta, torch.Tensor):
        if not beta.dtype.is_floating_point:
            raise TypeError(f"fastdpo: a tensor beta must be floating point, got {beta.dtype}")
        check_option_value(beta, "beta")
    else:
        check_number(beta, "beta", lo=0.0, lo_open=True)
    label_smoothing = check_number(label_smoothing, "label_smoothing", lo=0.0, hi=1.0)
    if f_divergence_type not in registry.F_DIVERGENCES:
        raise ValueError(
            f"fastdpo: unknown f_divergence_type {f_divergence_type!r}; expected one of {', '.join(registry.F_DIVERGENCES)}"
        )
    f_alpha_divergence_coef = check_number(f_alpha_divergence_coef, "f_alpha_divergence_coef")
    if ld_alpha is not None:
        check_number(ld_alpha, "ld_alpha", lo=0.0, hi=1.0)
    discopop_tau = check_number(discopop_tau, "discopop_tau", lo=0.0, lo_open=True)
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
        raise unknown_options_error(unknown, types, known)
    for k, v in variant_options.items():
        check_option_value(v, k)
    if not isinstance(reference_free, bool):
        raise TypeError(f"fastdpo: reference_free must be True or False, got {reference_free!r}")
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
    if not isinstance(average_log_prob, bool):
        raise TypeError(f"fastdpo: average_log_prob must be True or False, got {average_log_prob!r}")
    return LossPlan(terms, blocks.pop(), unpaired.pop(), common, average_log_prob, reference_free)


def check_batch(plan: LossPlan, n: int, desirable, ref_logps, have_ref_tokens, pair_weights, token_weights, labels):
    if desirable is None and (n % plan.num_blocks != 0 or n == 0):
        layout = "[chosen; rejected]" if plan.num_blocks == 2 else f"{plan.num_blocks} equal blocks"
        raise ValueError(
            f"fastdpo: the batch dimension must hold {layout} for loss_type "
            f"{plan.names}, got {n} sequences (not a positive multiple of {plan.num_blocks})"
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
    check_reference(plan, has_ref)
    if pair_weights is not None:
        _validation.check_float_tensor(pair_weights, "pair_weights")
        groups = n if plan.unpaired else n // plan.num_blocks
        if tuple(pair_weights.shape) != (groups,):
            raise ValueError(f"fastdpo: pair_weights must have shape ({groups},), got {tuple(pair_weights.shape)}")
    if token_weights is not None:
        _validation.check_float_tensor(token_weights, "token_weights")
        _validation.check_same_shape(labels, token_weights, "labels", "token_weights")


def check_reference(plan: LossPlan, has_ref: bool, ways: str = REFERENCE_WAYS) -> None:
    """A reference-anchored objective needs a reference or an explicit ``reference_free=True``; one that
    requires a reference cannot be reference-free; a reference and ``reference_free=True`` contradict."""
    if plan.reference_free and has_ref:
        raise ValueError("fastdpo: reference_free=True, but a reference was given as well; pass one or the other")
    for sp, _, _ in plan.terms:
        if sp.reference == "required" and not has_ref:
            raise ValueError(
                f"fastdpo: loss_type={sp.name!r} needs a reference"
                + (" and cannot be reference-free" if plan.reference_free else "") + f": pass {ways}")
    anchored = [sp.name for sp, _, _ in plan.terms if sp.reference == "optional"]
    if anchored and not has_ref and not plan.reference_free:
        raise ValueError(
            f"fastdpo: loss_type {anchored} is anchored to a reference model and none was given: pass {ways}; "
            "or pass reference_free=True to use the policy log-probs alone (an implicit uniform reference)")


def groups(plan: LossPlan, n: int) -> list[list[int]]:
    """Sequence indices of each group whose loss terms belong together (pairs, K-way lists)."""
    if plan.unpaired:
        return [[i] for i in range(n)]
    g = n // plan.num_blocks
    return [[i + k * g for k in range(plan.num_blocks)] for i in range(g)]


# The loss options every entry point accepts (beyond the objectives' own), with their defaults.
LOSS_DEFAULTS = dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.0, loss_weights=None,
                     f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, ld_alpha=None,
                     use_weighting=False, discopop_tau=0.05, average_log_prob=False, reference_free=False)


def plan_from_options(**options) -> LossPlan:
    """:func:`make_plan` from keyword options as the entry points take them (:data:`LOSS_DEFAULTS` for the missing
    ones; any other keyword is an option of the chosen objectives). Needs no tensors."""
    opts = {**LOSS_DEFAULTS, **options}
    variant = {k: v for k, v in opts.items() if k not in LOSS_DEFAULTS}
    return make_plan(opts["loss_type"], opts["loss_weights"], opts["beta"], opts["label_smoothing"],
                     opts["f_divergence_type"], opts["f_alpha_divergence_coef"], opts["ld_alpha"],
                     opts["use_weighting"], opts["discopop_tau"], variant, average_log_prob=opts["average_log_prob"],
                     reference_free=opts["reference_free"])
