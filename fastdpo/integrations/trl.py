"""TRL integration: ``FastDPOTrainer`` and fastdpo's kernel behind TRL's fused LM head.

- :class:`FastDPOTrainer` is ``trl.DPOTrainer`` with the per-token work (policy and
  reference log-probs, entropy, mean logit, top-1 hit, ``log sum p^2``) done by
  fastdpo's fused kernel and the objective computed by fastdpo's loss library.
  Same constructor, same ``DPOConfig``, same logged metric names::

      from fastdpo.integrations.trl import FastDPOTrainer   # instead of: from trl import DPOTrainer

  ``loss_type`` takes TRL's objectives and every paired objective registered with fastdpo
  (``simpo``, ``rrpo``, ``tdpo``, ... or your own); :class:`FastDPOConfig` adds their options.

- :func:`patch_fused_lm_head` puts fastdpo's kernel behind TRL's fused LM head
  (``trl.trainer.utils.add_fused_lm_head``), which TRL's GRPO, RLOO, KTO, SFT and
  DPO trainers use, with the same per-token outputs and gradients.

TRL versions: :data:`SUPPORTED_TRL`, tested on :data:`TESTED_TRL`; newer releases are checked for the
internals this module relies on when it is imported (:mod:`fastdpo.integrations._trl_compat`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any

import torch

from fastdpo.integrations import _losses, _packing, _trl_compat
from fastdpo.integrations._linear import DEFAULT_BLOCK_ELEMENTS, OPTIONAL_OUTPUTS, linear_token_logprobs
from fastdpo.integrations._packing import DataCollatorForPackedPreference
from fastdpo.integrations._trl_compat import SUPPORTED_TRL, TESTED_TRL, TRLCompatibilityWarning
from fastdpo.losses.diagnostics import PREFIX as DIAGNOSTICS_PREFIX
from fastdpo.losses.metrics import block_masks
from fastdpo.losses.registry import get_loss
from fastdpo.losses.sequences import make_layout
from fastdpo.ops import linear as _ops_linear
from fastdpo.ops.schema import STAT_NAMES


def check_trl_version(version: str | None = None) -> str:
    """Raise ImportError for a TRL older than the first supported release (:data:`SUPPORTED_TRL`); return the
    installed (or given) version. Newer releases pass: :func:`_trl_compat.check` checks their internals."""
    if version is None:
        try:
            import trl
        except ImportError as e:
            raise ImportError(f"fastdpo.integrations.trl needs TRL: pip install 'trl{SUPPORTED_TRL}' (or, in a fastdpo "
                              "checkout, pip install -e '.[trl]')") from e
        version = trl.__version__
    return _trl_compat.check_version(version)


_trl_compat.check()

import trl  # noqa: E402
import trl.trainer.utils as _trl_utils  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from accelerate.utils import is_peft_model  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.trainer.utils import use_adapter  # noqa: E402


__all__ = ["FastDPOTrainer", "FastDPOConfig", "TokenOutputs", "FastChunkedLogProbFunction", "patch_fused_lm_head",
           "is_fused_lm_head_patched", "check_trl_version", "trainer_losses", "DataCollatorForPackedPreference",
           "SUPPORTED_TRL", "TESTED_TRL", "TRL_LOSS_TYPES", "TRLCompatibilityWarning"]

TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
_STAT = {name: i for i, name in enumerate(STAT_NAMES)}


# ---------------------------------------------------------------------------------------------------------------
# TRL's fused LM head, backed by fastdpo


class FastChunkedLogProbFunction:
    """Drop-in for ``trl.kernels.ChunkedLogProbFunction``: ``apply(hidden [N, H], weight [V, H], bias, targets [N],
    temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0, outputs=...)`` returns
    ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, each ``[N]`` (None when not in ``outputs``),
    ``log_probs`` and ``entropy`` differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.

    The logits are formed a block of rows at a time and run through fastdpo's fused kernel (``backend``);
    ``chunk_size`` (TRL's vocabulary tile width) does not apply, since the kernel reads whole rows.
    Positional arguments are read by the parameter names of the TRL function replaced (``trl_params``), so a
    release that reorders or adds parameters keeps working; a value for a parameter fastdpo does not know,
    other than that parameter's default, raises naming it.
    """

    extra_outputs: tuple = ()  # returned whatever TRL asks for (same kernel pass; FastDPOTrainer's diagnostics)

    def __init__(self, backend: str = "auto", block_elements: int = DEFAULT_BLOCK_ELEMENTS,
                 trl_params=_trl_compat.HEAD_PARAMS, unknown_defaults: dict | None = None):
        self.backend = backend
        self.block_elements = block_elements
        self.trl_params = tuple(trl_params)
        self.unknown_defaults = dict(unknown_defaults or {})
        self._local = threading.local()

    @classmethod
    def replacing(cls, fn, backend: str = "auto", block_elements: int = DEFAULT_BLOCK_ELEMENTS):
        """An instance that takes the arguments of TRL's fused-LM-head function ``fn``."""
        if isinstance(fn, FastChunkedLogProbFunction):
            return cls(backend, block_elements, fn.trl_params, fn.unknown_defaults)
        import inspect

        params = list(inspect.signature(fn.forward).parameters.values())[1:]  # without ctx
        unknown = {p.name: p.default for p in params if p.name not in _trl_compat.HEAD_PARAMS}
        return cls(backend, block_elements, [p.name for p in params], unknown)

    def _bind(self, args, kwargs) -> dict:
        if len(args) > len(self.trl_params):
            raise TypeError(f"fastdpo: TRL's fused LM head passed {len(args)} arguments, expected at most "
                            f"{len(self.trl_params)} ({', '.join(self.trl_params)})")
        call = dict(zip(self.trl_params, args))
        call.update(kwargs)
        for name in set(call) - set(_trl_compat.HEAD_PARAMS):
            default = self.unknown_defaults.get(name, _MISSING)
            if default is _MISSING or call[name] is not default and call[name] != default:
                raise TypeError(
                    f"fastdpo: TRL's fused LM head passed {name}={call[name]!r}, an argument of trl "
                    f"{trl.__version__} that fastdpo's kernel does not know how to honour; remove "
                    "patch_fused_lm_head / use trl.DPOTrainer, or a tested TRL release "
                    f"({', '.join(TESTED_TRL)})")
        return call

    def apply(self, *args, **kwargs):
        call = self._bind(args, kwargs)
        call["outputs"] = tuple(call.get("outputs", OPTIONAL_OUTPUTS)) + self.extra_outputs
        pairing = getattr(self._local, "pairing", None)
        if pairing is not None:
            return pairing.head(self, call)
        return linear_token_logprobs(call["hidden"], call["weight"], call["targets"], bias=call.get("bias"),
                                     temperature=call["temperature"],
                                     softcap=call.get("final_logit_softcapping"),
                                     logit_scale=call.get("logit_scale", 1.0), outputs=call["outputs"],
                                     ignore_index=-100,
                                     backend=self.backend, block_elements=self.block_elements)

    @contextlib.contextmanager
    def pairing(self):
        """Within this context (this thread), the first fused-head call is the reference model's: its inputs are
        kept, not projected; the second, the policy's, folds them into its own pass with the token-level KL.
        Yields the :class:`_ReferencePairing` that then holds the reference log-probs and the KL."""
        if getattr(self._local, "pairing", None) is not None:
            raise RuntimeError("fastdpo: fused-head pairings do not nest")
        self._local.pairing = pair = _ReferencePairing()
        try:
            yield pair
        finally:
            self._local.pairing = None

    def __repr__(self):
        return f"FastChunkedLogProbFunction(backend={self.backend!r})"


_MISSING = object()


class _ReferencePairing:
    """One batch of a token-level-KL objective (rrpo, tdpo) through TRL's fused LM head.

    The reference forward's head inputs (hidden states, head weight and bias) are kept; the policy forward's
    head projects the policy and reference tiles side by side in one pass
    (:func:`fastdpo.ops.linear.linear_token_logprobs` with ``ref_hidden`` and ``kl=True``), so the per-token KL of
    the reference to the policy over the whole vocabulary comes from the same tiles as the log-probs.
    ``ref_logps`` and ``kl`` are then per head row; :meth:`per_token` lays them out as the model's outputs.
    """

    def __init__(self):
        self.ref = None
        self.ref_logps = self.kl = None

    def head(self, fn: FastChunkedLogProbFunction, call: dict):
        h, w, b, y = call["hidden"], call["weight"], call.get("bias"), call["targets"]
        transform = (float(call["temperature"]), call.get("final_logit_softcapping"),
                     float(call.get("logit_scale", 1.0)))
        outputs = tuple(call.get("outputs", OPTIONAL_OUTPUTS))
        if self.ref is None:
            # ZeRO-3 gathers the head only for the duration of this call: keep a copy of a partitioned weight
            def keep(t):
                return t.detach().clone() if hasattr(t, "ds_id") else t.detach()

            self.ref = (h.detach(), keep(w), keep(b) if b is not None else None, y, transform)
            zero = h.new_zeros(h.shape[0], dtype=torch.float32)
            return (zero, *(None if k not in outputs else zero.bool() if k == "is_top1" else zero
                            for k in OPTIONAL_OUTPUTS))
        if self.kl is not None:
            raise RuntimeError("fastdpo: a fused-head pairing holds one reference and one policy call")
        rh, rw, rb, ry, rtransform = self.ref
        if ry.shape != y.shape or not torch.equal(ry, y) or rtransform != transform:
            raise RuntimeError("fastdpo: the reference and policy fused-head calls of a token-KL objective must score "
                               "the same tokens with the same temperature / soft cap / logit scale")
        # under autocast the fused-linear path forms both heads' logits in the autocast dtype, like the plain path
        rh, = _ops_linear.cast(h.dtype, rh)
        rw, rb = _ops_linear.cast(w.dtype, rw, rb)
        tok = _ops_linear.linear_token_logprobs(h, w, y, bias=b, ref_hidden=rh, ref_weight=rw, ref_bias=rb,
                                                temperature=transform[0], softcap=transform[1],
                                                logit_scale=transform[2], stats=True, kl=True, backend=fn.backend)
        self.ref_logps, self.kl = tok.ref_logps, tok.kl
        st = tok.stats
        pick = {"entropy": st[:, _STAT["entropy"]], "log_sum_sq_probs": st[:, _STAT["log_sum_p2"]],
                "mean_logits": st[:, _STAT["mean_logit"]], "is_top1": st[:, _STAT["argmax_hit"]] > 0.5}
        return (tok.logps, *(pick[k] if k in outputs else None for k in OPTIONAL_OUTPUTS))

    def per_token(self, x: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
        """Head rows -> the ``label_mask``-shaped per-token layout of the model's outputs (0 where not scored),
        as TRL's ``add_fused_lm_head`` lays out its own outputs (every position, or only the scored ones)."""
        if x.numel() == label_mask.numel():
            return x.view(label_mask.shape).masked_fill(~label_mask, 0)
        return x.new_zeros(label_mask.shape).masked_scatter(label_mask, x)


_patch_lock = threading.RLock()


class patch_fused_lm_head:  # noqa: N801 - used like a function / context manager
    """Route TRL's fused LM head through fastdpo's kernel.

    Every model given a fused LM head by TRL (``add_fused_lm_head``: the DPO, GRPO, RLOO, KTO and SFT
    trainers) then computes its per-token outputs with fastdpo; the outputs and gradients are TRL's
    (same formulas, float32 accumulation). Takes effect at once; undo with ``.remove()``, or scope it::

        with patch_fused_lm_head():
            trainer = GRPOTrainer(...)
            trainer.train()

    Patches nest (the innermost removal restores the previous function). The swap is process-wide while
    active, so it also applies to other threads.
    """

    def __init__(self, backend: str = "auto", block_elements: int = DEFAULT_BLOCK_ELEMENTS):
        with _patch_lock:
            self._previous = _trl_utils._ChunkedLogProbFunction
            self.function = FastChunkedLogProbFunction.replacing(self._previous, backend, block_elements)
            _trl_utils._ChunkedLogProbFunction = self.function
        self.active = True

    def remove(self) -> None:
        with _patch_lock:
            if self.active:
                if _trl_utils._ChunkedLogProbFunction is not self.function:
                    raise RuntimeError("fastdpo: patches of TRL's fused LM head must be removed innermost first")
                _trl_utils._ChunkedLogProbFunction = self._previous
                self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def is_fused_lm_head_patched() -> bool:
    return isinstance(_trl_utils._ChunkedLogProbFunction, FastChunkedLogProbFunction)


# ---------------------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class FastDPOConfig(DPOConfig):
    """``trl.DPOConfig`` plus the options of fastdpo's own objectives.

    ``loss_type`` (already in ``DPOConfig``) takes any paired objective registered with fastdpo
    (:func:`trainer_losses`), alone or in a list with ``loss_weights``; ``loss_options`` sets their
    options, e.g. ``FastDPOConfig(loss_type="simpo", beta=2.0, loss_options={"simpo_gamma": 0.5})`` or
    ``FastDPOConfig(loss_type="rrpo", loss_options={"rrpo_alpha": 0.01})``; ``average_log_prob`` (Liger's
    name) length-averages the sequence log-probs. A plain ``DPOConfig`` works too (the objectives then
    take their default options). Options are validated here, when the config is built.
    """

    loss_options: dict[str, Any] | str | None = dataclasses.field(
        default=None,
        metadata={"help": "Options of the fastdpo objectives in `loss_type` (e.g. `{\"simpo_gamma\": 0.5}`, "
                          "`{\"rrpo_alpha\": 0.01}`); see `fastdpo.available_losses()` and docs/losses.md."},
    )
    average_log_prob: bool = dataclasses.field(
        default=False,
        metadata={"help": "Length-averaged sequence log-probs: each sequence's (LD-DPO / token-weighted) sum, policy "
                          "and reference, divided by its number of completion tokens (Liger's `average_log_prob`)."},
    )

    _VALID_DICT_FIELDS = [*getattr(DPOConfig, "_VALID_DICT_FIELDS", []), "loss_options"]

    def __post_init__(self):
        super().__post_init__()
        objective_plan(self)


# DPOConfig options (beyond transformers.TrainingArguments) and how FastDPOTrainer honours them. Any other option
# a future DPOConfig adds is refused when set away from its default, rather than silently ignored.
HONOURED_OPTIONS = {
    # objective: fastdpo's loss library
    "loss_type": "loss library", "loss_weights": "loss library", "beta": "loss library",
    "label_smoothing": "loss library", "f_divergence_type": "loss library", "f_alpha_divergence_coef": "loss library",
    "ld_alpha": "loss library", "use_weighting": "loss library (WPO weights from the kernel's log sum p^2)",
    "discopop_tau": "loss library", "loss_options": "loss library (FastDPOConfig)",
    "average_log_prob": "loss library (FastDPOConfig)",
    # reference
    "precompute_ref_log_probs": "TRL's precompute pass, through fastdpo's kernel",
    "precompute_ref_batch_size": "TRL", "sync_ref_model": "TRL", "ref_model_mixup_alpha": "TRL",
    "ref_model_sync_steps": "TRL",
    # model, data and training loop: TRL's own code, unchanged
    "learning_rate": "TRL", "model_init_kwargs": "TRL", "trust_remote_code": "TRL",
    "router_aux_loss_coef": "added to the loss as TRL does", "disable_dropout": "TRL", "dataset_num_proc": "TRL",
    "max_length": "TRL", "truncation_mode": "TRL", "padding_free": "packed batches (fastdpo)",
    "pad_to_multiple_of": "TRL", "activation_offloading": "TRL", "pad_token": "TRL",
}


def trainer_losses() -> list[str]:
    """The objectives ``FastDPOTrainer`` trains with their default options: every registered paired objective
    (two responses per prompt, ``[chosen; rejected]``). ``tpo`` needs ``loss_options={"tpo_alpha": 0}`` (TRL's
    preference data has no gold response)."""
    from fastdpo.losses.registry import LossConfig, available_losses

    out = []
    for name in available_losses():
        spec = get_loss(name)
        if spec.unpaired:
            continue
        try:
            blocks = spec.blocks(LossConfig(**spec.defaults))
        except Exception:  # a layout that depends on options without a usable default
            blocks = None
        if blocks == 2 or name == "tpo":
            out.append(name)
    return out


def _loss_options(args) -> dict:
    types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    extra = getattr(args, "loss_options", None) or {}
    if not isinstance(extra, dict):
        raise TypeError(f"FastDPOTrainer: loss_options must be a dict of objective options, got {type(extra).__name__}")
    shared = sorted(set(extra) & set(_losses.LOSS_DEFAULTS))
    if shared:
        raise ValueError(f"FastDPOTrainer: set {shared} as the config fields of the same name, not in loss_options")
    return dict(loss_type=types, loss_weights=args.loss_weights or [1.0] * len(types), beta=args.beta,
                label_smoothing=args.label_smoothing, f_divergence_type=args.f_divergence_type,
                f_alpha_divergence_coef=args.f_alpha_divergence_coef, ld_alpha=args.ld_alpha,
                use_weighting=args.use_weighting, discopop_tau=args.discopop_tau,
                average_log_prob=getattr(args, "average_log_prob", False), **extra)


def objective_plan(args):
    """Validate the objective a (Fast)DPOConfig asks for and return its loss plan; errors name the option."""
    try:
        plan = _losses.check_loss_options(**_loss_options(args))
    except (ValueError, TypeError) as e:
        if str(e).startswith("FastDPOTrainer"):
            raise
        raise type(e)(f"FastDPOTrainer: a DPOConfig option cannot be honoured: {e}") from e
    if plan.unpaired:
        raise ValueError(f"FastDPOTrainer: loss_type {plan.names} is unpaired (one response per example with a "
                         "desirable flag); FastDPOTrainer trains on TRL's paired preference data. Use trl.KTOTrainer "
                         "(with patch_fused_lm_head) or fastdpo.dpo_loss(..., desirable=...)")
    if plan.num_blocks != 2:
        hint = ' (tpo without a gold response: loss_options={"tpo_alpha": 0})' if "tpo" in plan.names else ""
        raise ValueError(f"FastDPOTrainer: loss_type {plan.names} expects {plan.num_blocks} responses per prompt "
                         f"with these options, but TRL's preference data has 2 (chosen, rejected){hint}")
    if plan.token_kl and args.precompute_ref_log_probs:
        raise ValueError(f"FastDPOTrainer: loss_type {plan.kl_losses} needs the reference model's full distribution "
                         "at every token (the token-level KL), which precompute_ref_log_probs=True does not keep; "
                         "set precompute_ref_log_probs=False")
    return plan


def _check_config(args) -> None:
    """Refuse options this trainer cannot honour, naming them."""
    if args is None:
        return
    if not isinstance(args, DPOConfig):
        raise TypeError(f"FastDPOTrainer: args must be a trl.DPOConfig, got {type(args).__name__}")
    from transformers import TrainingArguments

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    for f in dataclasses.fields(args):
        if f.name in base or f.name in HONOURED_OPTIONS or not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if getattr(args, f.name) != default:
            raise ValueError(
                f"FastDPOTrainer does not support the DPOConfig option `{f.name}` (= {getattr(args, f.name)!r}) of "
                f"trl {trl.__version__}: fastdpo does not know how to honour it. Leave it at its default "
                f"({default!r}) or use trl.DPOTrainer."
            )
    objective_plan(args)


@contextlib.contextmanager
def _trl_validation_of(args, plan):
    """TRL's constructor validates ``loss_type`` against its own 15 objectives; fastdpo's plan has validated the
    objective already, so TRL's constructor sees plain ``sigmoid`` when the list holds others."""
    if all(name in TRL_LOSS_TYPES for name in plan.names):
        yield
        return
    saved = args.loss_type, args.loss_weights, args.f_divergence_type
    args.loss_type, args.loss_weights, args.f_divergence_type = ["sigmoid"], None, "reverse_kl"
    try:
        yield
    finally:
        args.loss_type, args.loss_weights, args.f_divergence_type = saved


# ---------------------------------------------------------------------------------------------------------------
# FastDPOTrainer


@dataclasses.dataclass
class TokenOutputs:
    """Per-token outputs of one batch in TRL's ``[chosen; rejected]`` layout, ``[2B, T]`` with ``T`` the shifted
    sequence length: what the loss library turns into the objective and the metrics."""

    labels: torch.Tensor  # shifted labels, -100 where nothing is scored (prompt, padding)
    logps: torch.Tensor  # policy log-probs, differentiable
    stats: torch.Tensor  # [2B, T, 4]: entropy, argmax hit, mean logit, log sum p^2 (no gradient)
    ref_token_logps: torch.Tensor | None = None  # reference log-probs per token
    ref_logps: torch.Tensor | None = None  # or precomputed reference sequence log-probs [2B]
    kl: torch.Tensor | None = None  # token-level KL(ref || policy) for the token-KL objectives, differentiable
    model_outputs: Any = None  # the policy forward's output (its aux_loss for MoE models)
    cu_seqlens: torch.Tensor | None = None  # a packed batch ([1, N_total] tokens): its sequence offsets

    @property
    def mask(self) -> torch.Tensor:
        return self.labels != -100


class FastDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` with fastdpo computing the per-token log-probs (policy and reference, through TRL's
    fused LM head backed by fastdpo's kernel) and the objective (fastdpo's loss library).

    Same constructor and ``DPOConfig``; logs TRL's metrics under TRL's names. ``loss_type`` may name any
    objective of :func:`trainer_losses` (options in :class:`FastDPOConfig`). ``fastdpo_backend`` (keyword only,
    default ``"auto"``) picks the kernel backend. ``fastdpo_diagnostics=True`` (keyword only) also logs the loss
    library's training-dynamics diagnostics under ``diagnostics/...`` (docs/diagnostics.md), from the same kernel
    pass. Options it cannot honour raise a ValueError naming them.

    One training step: :meth:`_token_outputs` (the forwards: per-token outputs) -> :meth:`_fastdpo_loss` (the
    loss library) -> :meth:`_log_fastdpo_metrics`.

    ``DPOConfig(padding_free=True)`` (which TRL itself turns into padding) trains on packed batches: each
    batch's 2B sequences go end to end in one row with ``position_ids`` restarting at 0 per sequence
    (:class:`DataCollatorForPackedPreference`), the model runs on that row
    with no padding, the fused LM head scores its tokens and the loss library reduces them per sequence
    (the same loss, metrics and gradients as the padded batch). The attention implementation must keep the
    sequences apart (``sdpa``, ``eager``, ``flex_attention`` or flash-attention; others raise).
    """

    _tag_names = [*getattr(DPOTrainer, "_tag_names", []), "fastdpo"]
    # DPOTrainer attributes set by its constructor that this trainer reads
    _TRL_ATTRIBUTES = ("precompute_ref_logps", "aux_loss_enabled", "router_aux_loss_coef", "_metrics",
                       "_total_train_tokens", "_tp_size", "ref_model")

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None, *,
                 fastdpo_backend: str = "auto", fastdpo_diagnostics: bool = False):
        _check_config(args)
        if not isinstance(fastdpo_diagnostics, bool):
            raise TypeError(f"FastDPOTrainer: fastdpo_diagnostics must be True or False, got {fastdpo_diagnostics!r}")
        self.fastdpo_backend = fastdpo_backend
        self.fastdpo_diagnostics = fastdpo_diagnostics
        packed = bool(args is not None and args.padding_free)
        if packed:
            if data_collator is not None:
                raise ValueError("FastDPOTrainer(padding_free=True) packs batches with its own collator; leave "
                                 "data_collator=None or set DPOConfig(padding_free=False)")
            if isinstance(model, torch.nn.Module):
                _packing.check_packing_support(model)  # before TRL's constructor does its work
            args.padding_free = False  # TRL would warn and pad; fastdpo packs instead (set back below)
        plan = objective_plan(args) if args is not None else None
        # TRL runs the reference precompute pass inside its constructor, so the kernel is in place already
        try:
            with self._fastdpo_head(), (_trl_validation_of(args, plan) if plan else contextlib.nullcontext()):
                super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                                 train_dataset=train_dataset, eval_dataset=eval_dataset,
                                 processing_class=processing_class, compute_metrics=compute_metrics,
                                 callbacks=callbacks, optimizers=optimizers,
                                 quantization_config=quantization_config, peft_config=peft_config)
        finally:
            if packed:
                args.padding_free = True
        missing = [a for a in self._TRL_ATTRIBUTES if not hasattr(self, a)]
        if missing:
            raise RuntimeError(f"FastDPOTrainer: trl {trl.__version__}'s DPOTrainer no longer sets {missing}, which "
                               f"fastdpo reads; tested releases: {', '.join(TESTED_TRL)}")
        if packed:
            self._setup_packing()
        _check_config(self.args)
        self._fastdpo_plan = objective_plan(self.args)
        self._fastdpo_options = _loss_options(self.args)
        self._fastdpo_needs_reference = any(sp.reference != "unused" for sp, _, _ in self._fastdpo_plan.terms)

    @contextlib.contextmanager
    def _fastdpo_head(self):
        """fastdpo's kernel behind TRL's fused LM head (unless already patched); yields the head function."""
        # the diagnostics' gradient norms need log sum p^2, which TRL's head computes only for WPO
        extra = ("log_sum_sq_probs",) if self.fastdpo_diagnostics else ()
        with contextlib.ExitStack() as stack:
            if not (is_fused_lm_head_patched() and set(extra) <= set(_trl_utils._ChunkedLogProbFunction.extra_outputs)):
                stack.enter_context(patch_fused_lm_head(self.fastdpo_backend)).function.extra_outputs = extra
            yield _trl_utils._ChunkedLogProbFunction

    def compute_ref_log_probs(self, model, inputs):
        with self._fastdpo_head():
            return super().compute_ref_log_probs(model, inputs)

    def _model_kwargs(self, inputs) -> dict:
        # a packed row (padding_free=True, see _setup_packing) carries its sequence offsets too
        _non_model_keys = (_packing.NON_MODEL_KEYS if "cu_seqlens" in inputs
                           else {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})
        model_kwargs = {k: v for k, v in inputs.items() if k not in _non_model_keys}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        return model_kwargs

    def _reference_outputs(self, model_kwargs, labels):
        """The reference model's fused-head forward (the base model with the adapter disabled under PEFT)."""
        ref_model_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if is_peft_model(self.model) and self.ref_model is None:
                # the reference is the base model (adapter disabled) or the frozen copy of the adapter named "ref"
                unwrapped = self.accelerator.unwrap_model(self.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    return self.model(**ref_model_kwargs, labels=labels, fused_lm_head=True)
            return self.ref_model(**ref_model_kwargs, labels=labels, fused_lm_head=True)

    def _token_outputs(self, model, inputs) -> TokenOutputs:
        """The forwards of one batch: policy and reference per-token outputs through fastdpo's fused head."""
        model_kwargs = self._model_kwargs(inputs)
        completion_mask = inputs["completion_mask"]
        cu_seqlens = inputs.get("cu_seqlens")
        if cu_seqlens is not None:
            # every position scored as given: its next token inside its own sequence (TRL's shift_labels)
            labels = None
            shift_labels = _packing.next_token_labels(inputs["input_ids"], completion_mask, cu_seqlens)
            model_kwargs["shift_labels"] = shift_labels
        else:
            labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
            shift_labels = labels[:, 1:]
        seq_len = shift_labels.size(1)
        ref_token_logps = ref_logps = kl = None
        with self._fastdpo_head() as head:
            if self._fastdpo_plan.token_kl:
                # the reference's head inputs are folded into the policy's head pass, which adds the token-level KL
                with head.pairing() as pair:
                    self._reference_outputs(model_kwargs, labels)
                    outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
                ref_token_logps = pair.per_token(pair.ref_logps, outputs.label_mask)
                kl = pair.per_token(pair.kl, outputs.label_mask)
            else:
                outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
                if self.precompute_ref_logps:
                    ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).float()
                elif self._fastdpo_needs_reference:
                    ref_token_logps = self._reference_outputs(model_kwargs, labels).log_probs

        # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
        def tail(x):
            return None if x is None else x[:, -seq_len:]

        stats = _losses.stats_from_fields(
            shift_labels.shape, entropy=tail(outputs.entropy), is_top1=tail(outputs.is_top1),
            mean_logits=tail(outputs.mean_logits), log_sum_sq_probs=tail(outputs.log_sum_sq_probs),
            device=shift_labels.device)
        return TokenOutputs(shift_labels, tail(outputs.log_probs), stats, tail(ref_token_logps), ref_logps, tail(kl),
                            outputs, cu_seqlens)

    def _fastdpo_loss(self, tokens: TokenOutputs):
        """The objective from the per-token outputs (fastdpo's loss library, as ``fastdpo.dpo_loss``)."""
        return _losses.loss_from_token_logprobs(tokens.logps, tokens.labels, ref_token_logps=tokens.ref_token_logps,
                                                ref_logps=tokens.ref_logps, stats=tokens.stats, kl=tokens.kl,
                                                diagnostics=self.fastdpo_diagnostics, **self._layout_kw(tokens),
                                                **self._fastdpo_options)

    def _layout_kw(self, tokens: TokenOutputs) -> dict:
        return {} if tokens.cu_seqlens is None else dict(cu_seqlens=tokens.cu_seqlens, backend=self.fastdpo_backend)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        tokens = self._token_outputs(model, inputs)
        out = self._fastdpo_loss(tokens)
        loss = out.loss
        if self.aux_loss_enabled:
            aux_loss = tokens.model_outputs.aux_loss
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_fastdpo_metrics(mode, inputs, out, tokens)
        if self.fastdpo_diagnostics:
            self._log_fastdpo_diagnostics(mode, out, tokens.model_outputs)
        if return_outputs:
            # as TRL: the logits handed to compute_metrics need a plain forward
            with torch.no_grad():
                outputs = model(**self._model_kwargs(inputs))
            return loss, outputs
        return loss

    # metrics formed from the per-token statistics and per-pair values below, under TRL's names
    _TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                    "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")

    def _log_fastdpo_metrics(self, mode, inputs, out, tokens: TokenOutputs):
        """TRL's metrics under TRL's names, aggregated across processes as TRL does (token-weighted means of the
        per-token statistics, means over all pairs of the per-pair values), plus the objectives' own metrics
        (``nll_loss`` with an NLL term, ``kl/chosen`` and ``kl/rejected`` with the token-level KL, ...) as means
        over processes. Padded and packed batches alike (the block masks of the batch's token layout)."""
        acc = self.accelerator
        m = self._metrics[mode]
        layout = make_layout(tokens.labels, -100, **self._layout_kw(tokens))
        chosen_mask, rejected_mask, mask = block_masks(layout, None, 2, tokens.stats.dtype)
        stats = tokens.stats.reshape(*mask.shape, -1)
        st_c = st_r = stats  # the block masks span the whole batch

        def ratio(num, den):
            num = acc.gather_for_metrics(num.detach()).sum()
            den = acc.gather_for_metrics(den.detach()).sum()
            return (num / den).item() if den > 0 else 0.0

        m["entropy"].append(ratio((stats[..., 0] * mask).sum(), mask.sum()))
        if mode == "train":
            tokens = (inputs["attention_mask"].sum() if "attention_mask" in inputs  # a packed row has no padding
                      else torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device))
            num_tokens = acc.gather_for_metrics(tokens).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        m["num_tokens"] = [self._total_train_tokens]
        m["logits/chosen"].append(ratio((st_c[..., 2] * chosen_mask).sum(), chosen_mask.sum()))
        m["logits/rejected"].append(ratio((st_r[..., 2] * rejected_mask).sum(), rejected_mask.sum()))
        m["mean_token_accuracy"].append(ratio((st_c[..., 1] * chosen_mask).sum(), chosen_mask.sum()))
        cr, rr = out.chosen_rewards.detach(), out.rejected_rewards.detach()
        m["rewards/chosen"].append(acc.gather(cr).mean().item())
        m["rewards/rejected"].append(acc.gather(rr).mean().item())
        m["rewards/accuracies"].append(acc.gather((cr > rr).float()).mean().item())
        m["rewards/margins"].append(acc.gather(cr - rr).mean().item())
        m["logps/chosen"].append(acc.gather(out.chosen_logps.detach()).mean().item())
        m["logps/rejected"].append(acc.gather(out.rejected_logps.detach()).mean().item())
        for k, v in out.metrics.items():  # the diagnostics are gathered by _log_fastdpo_diagnostics
            if (k not in self._TRL_METRICS and not k.startswith(DIAGNOSTICS_PREFIX) and isinstance(v, torch.Tensor)
                    and v.numel() == 1):
                m[k].append(acc.gather_for_metrics(v.detach().float().reshape(1)).mean().item())

    def _log_fastdpo_diagnostics(self, mode, out, outputs):
        """The loss library's ``diagnostics/...`` metrics of the batch over all processes (per-pair values
        gathered, gradient norms of the process-averaged gradient; docs/diagnostics.md)."""
        if outputs.log_sum_sq_probs is None:
            raise RuntimeError("FastDPOTrainer: fastdpo_diagnostics=True needs log_sum_sq_probs from the fused LM "
                               "head, which the active head did not return")
        summary = out.diagnostics.gathered(self.accelerator.gather).summary()
        for k, v in zip(summary, torch.stack(list(summary.values())).tolist()):  # one device sync
            self._metrics[mode][k].append(v)

    # ----------------------------------------------------------------------------------- packed batches

    def _setup_packing(self):
        """``padding_free=True``: check that the model keeps packed sequences apart and pack the batches."""
        if self._is_vision_dataset:
            raise ValueError("FastDPOTrainer(padding_free=True) packs text batches; vision-language datasets need "
                             "DPOConfig(padding_free=False)")
        unwrapped = self.accelerator.unwrap_model(self.model)
        if is_peft_model(unwrapped) and unwrapped.active_peft_config.is_prompt_learning:
            raise ValueError("FastDPOTrainer(padding_free=True): prompt-learning adapters prepend virtual tokens to "
                             "each sequence, which a packed row cannot hold; set DPOConfig(padding_free=False)")
        impl = _packing.check_packing_support(unwrapped)
        self.padding_free = True
        self._padded_collator = self.data_collator  # TRL's, for its reference precompute pass
        self.data_collator = DataCollatorForPackedPreference(
            max_length=self.args.max_length, truncation_mode=self.args.truncation_mode,
            flash_attention_kwargs=impl in _packing.FLASH_ATTENTION)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # TRL's precompute pass (compute_ref_log_probs) reads padded batches: give it TRL's collator.
        padded = getattr(self, "_padded_collator", None)
        if padded is None:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        collator, self.data_collator = self.data_collator, padded
        try:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            self.data_collator = collator
