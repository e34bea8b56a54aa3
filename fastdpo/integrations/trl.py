"""TRL integration: ``FastDPOTrainer`` and fastdpo's kernel behind TRL's fused LM head.

- :class:`FastDPOTrainer` is ``trl.DPOTrainer`` with the per-token work (policy and
  reference log-probs, entropy, mean logit, top-1 hit, ``log sum p^2``) done by
  fastdpo's fused kernel and the objective computed by fastdpo's loss library.
  Same constructor, same ``DPOConfig``, same logged metric names::

      from fastdpo.integrations.trl import FastDPOTrainer   # instead of: from trl import DPOTrainer

- :func:`patch_fused_lm_head` puts fastdpo's kernel behind TRL's fused LM head
  (``trl.trainer.utils.add_fused_lm_head``), which TRL's GRPO, RLOO, KTO, SFT and
  DPO trainers use, with the same per-token outputs and gradients.

Supported TRL versions: :data:`SUPPORTED_TRL` (checked on import of this module).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import torch

from fastdpo.integrations import _losses
from fastdpo.integrations._linear import DEFAULT_BLOCK_ELEMENTS, OPTIONAL_OUTPUTS, linear_token_logprobs

SUPPORTED_TRL = ">=1.15.0,<1.17"
_MIN, _MAX = (1, 15, 0), (1, 17)


def _version_tuple(v: str):
    from packaging.version import Version

    r = Version(v).release
    return tuple(r) + (0,) * (3 - len(r))


def check_trl_version(version: str | None = None) -> str:
    """Raise ImportError unless the installed (or given) TRL version is in :data:`SUPPORTED_TRL`."""
    if version is None:
        try:
            import trl
        except ImportError as e:
            raise ImportError("fastdpo.integrations.trl needs TRL: pip install 'fastdpo[trl]'") from e
        version = trl.__version__
    t = _version_tuple(version)
    if not (_MIN <= t[:3] and t[:2] < _MAX):
        raise ImportError(
            f"fastdpo.integrations.trl supports trl{SUPPORTED_TRL} (its DPOTrainer loss code and fused LM head), "
            f"found trl {version}. Install a supported version: pip install 'fastdpo[trl]'"
        )
    return version


check_trl_version()

import trl  # noqa: E402
import trl.trainer.utils as _trl_utils  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from accelerate.utils import is_peft_model  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.trainer.utils import use_adapter  # noqa: E402


__all__ = ["FastDPOTrainer", "FastChunkedLogProbFunction", "patch_fused_lm_head", "is_fused_lm_head_patched",
           "check_trl_version",
           "SUPPORTED_TRL", "TRL_LOSS_TYPES"]

TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


# ---------------------------------------------------------------------------------------------------------------
# TRL's fused LM head, backed by fastdpo


class FastChunkedLogProbFunction:
    """Drop-in for ``trl.kernels.ChunkedLogProbFunction``: ``apply(hidden [N, H], weight [V, H], bias, targets [N],
    temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0, outputs=...)`` returns
    ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, each ``[N]`` (None when not in ``outputs``),
    ``log_probs`` and ``entropy`` differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.

    The logits are formed a block of rows at a time and run through fastdpo's fused kernel (``backend``);
    ``chunk_size`` (TRL's vocabulary tile width) does not apply, since the kernel reads whole rows.
    """

    extra_outputs: tuple = ()  # returned whatever TRL asks for (same kernel pass; FastDPOTrainer's diagnostics)

    def __init__(self, backend: str = "auto", block_elements: int = DEFAULT_BLOCK_ELEMENTS):
        self.backend = backend
        self.block_elements = block_elements

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size=None, final_logit_softcapping=None,
              logit_scale=1.0, outputs=OPTIONAL_OUTPUTS):
        return linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                     softcap=final_logit_softcapping, logit_scale=logit_scale,
                                     outputs=tuple(outputs) + self.extra_outputs,
                                     ignore_index=-100, backend=self.backend, block_elements=self.block_elements)

    def __repr__(self):
        return f"FastChunkedLogProbFunction(backend={self.backend!r})"


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
        self.function = FastChunkedLogProbFunction(backend, block_elements)
        with _patch_lock:
            self._previous = _trl_utils._ChunkedLogProbFunction
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
# FastDPOTrainer

# DPOConfig options (beyond transformers.TrainingArguments) and how FastDPOTrainer honours them. Any other option
# a future DPOConfig adds is refused when set away from its default, rather than silently ignored.
HONOURED_OPTIONS = {
    # objective: fastdpo's loss library
    "loss_type": "loss library", "loss_weights": "loss library", "beta": "loss library",
    "label_smoothing": "loss library", "f_divergence_type": "loss library", "f_alpha_divergence_coef": "loss library",
    "ld_alpha": "loss library", "use_weighting": "loss library (WPO weights from the kernel's log sum p^2)",
    "discopop_tau": "loss library",
    # reference
    "precompute_ref_log_probs": "TRL's precompute pass, through fastdpo's kernel",
    "precompute_ref_batch_size": "TRL", "sync_ref_model": "TRL", "ref_model_mixup_alpha": "TRL",
    "ref_model_sync_steps": "TRL",
    # model, data and training loop: TRL's own code, unchanged
    "learning_rate": "TRL", "model_init_kwargs": "TRL", "trust_remote_code": "TRL",
    "router_aux_loss_coef": "added to the loss as TRL does", "disable_dropout": "TRL", "dataset_num_proc": "TRL",
    "max_length": "TRL", "truncation_mode": "TRL", "padding_free": "TRL (which currently falls back to padding)",
    "pad_to_multiple_of": "TRL", "activation_offloading": "TRL", "pad_token": "TRL",
}


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
    types = list(args.loss_type) if not isinstance(args.loss_type, str) else [args.loss_type]
    bad = [t for t in types if t not in TRL_LOSS_TYPES]
    if bad:
        raise ValueError(
            f"FastDPOTrainer: DPOConfig option `loss_type` contains {bad}, which trl.DPOTrainer does not define; "
            f"supported: {list(TRL_LOSS_TYPES)}"
        )
    try:
        _losses.check_loss_options(**_loss_options(args))
    except (ValueError, TypeError) as e:
        raise type(e)(f"FastDPOTrainer: a DPOConfig option cannot be honoured: {e}") from e


def _loss_options(args) -> dict:
    types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    return dict(loss_type=types, loss_weights=args.loss_weights or [1.0] * len(types), beta=args.beta,
                label_smoothing=args.label_smoothing, f_divergence_type=args.f_divergence_type,
                f_alpha_divergence_coef=args.f_alpha_divergence_coef, ld_alpha=args.ld_alpha,
                use_weighting=args.use_weighting, discopop_tau=args.discopop_tau)


class FastDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` with fastdpo computing the per-token log-probs (policy and reference, through TRL's
    fused LM head backed by fastdpo's kernel) and the objective (fastdpo's loss library).

    Same constructor and ``DPOConfig``; logs TRL's metrics under TRL's names. ``fastdpo_backend`` (keyword
    only, default ``"auto"``) picks the kernel backend. ``fastdpo_diagnostics=True`` (keyword only) also logs
    the loss library's training-dynamics diagnostics under ``diagnostics/...`` (docs/diagnostics.md), from
    the same kernel pass. Options it cannot honour raise a ValueError naming them.
    """

    _tag_names = [*getattr(DPOTrainer, "_tag_names", []), "fastdpo"]

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None, *,
                 fastdpo_backend: str = "auto", fastdpo_diagnostics: bool = False):
        _check_config(args)
        if not isinstance(fastdpo_diagnostics, bool):
            raise TypeError(f"FastDPOTrainer: fastdpo_diagnostics must be True or False, got {fastdpo_diagnostics!r}")
        self.fastdpo_backend = fastdpo_backend
        self.fastdpo_diagnostics = fastdpo_diagnostics
        # TRL runs the reference precompute pass inside its constructor, so the kernel is in place already
        with self._fastdpo_head():
            super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                             train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=processing_class, compute_metrics=compute_metrics, callbacks=callbacks,
                             optimizers=optimizers, quantization_config=quantization_config, peft_config=peft_config)
        _check_config(self.args)
        self._fastdpo_options = _loss_options(self.args)

    def _fastdpo_head(self):
        # the diagnostics' gradient norms need log sum p^2, which TRL's head computes only for WPO
        extra = ("log_sum_sq_probs",) if self.fastdpo_diagnostics else ()
        if is_fused_lm_head_patched() and set(extra) <= set(_trl_utils._ChunkedLogProbFunction.extra_outputs):
            return contextlib.nullcontext()
        patch = patch_fused_lm_head(self.fastdpo_backend)
        patch.function.extra_outputs = extra
        return patch

    def compute_ref_log_probs(self, model, inputs):
        with self._fastdpo_head():
            return super().compute_ref_log_probs(model, inputs)

    def _reference_token_logps(self, model_kwargs, labels, seq_len):
        ref_model_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if is_peft_model(self.model) and self.ref_model is None:
                # the reference is the base model (adapter disabled) or the frozen copy of the adapter named "ref"
                unwrapped = self.accelerator.unwrap_model(self.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    ref_outputs = self.model(**ref_model_kwargs, labels=labels, fused_lm_head=True)
            else:
                ref_outputs = self.ref_model(**ref_model_kwargs, labels=labels, fused_lm_head=True)
        return ref_outputs.log_probs[:, -seq_len:]

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        _non_model_keys = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        model_kwargs = {k: v for k, v in inputs.items() if k not in _non_model_keys}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        shift_labels = labels[:, 1:]
        seq_len = shift_labels.size(1)

        with self._fastdpo_head():
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
            ref_token_logps = ref_logps = None
            if self.precompute_ref_logps:
                ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).float()
            else:
                ref_token_logps = self._reference_token_logps(model_kwargs, labels, seq_len)

        # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
        def tail(x):
            return None if x is None else x[:, -seq_len:]

        stats = _losses.stats_from_fields(
            shift_labels.shape, entropy=tail(outputs.entropy), is_top1=tail(outputs.is_top1),
            mean_logits=tail(outputs.mean_logits), log_sum_sq_probs=tail(outputs.log_sum_sq_probs),
            device=shift_labels.device)
        out = _losses.loss_from_token_logprobs(
            tail(outputs.log_probs), shift_labels, ref_token_logps=ref_token_logps, ref_logps=ref_logps, stats=stats,
            diagnostics=self.fastdpo_diagnostics, **self._fastdpo_options)
        loss = out.loss

        if self.aux_loss_enabled:
            aux_loss = outputs.aux_loss
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        self._log_fastdpo_metrics(mode, inputs, out, stats, shift_labels != -100)
        if self.fastdpo_diagnostics:
            self._log_fastdpo_diagnostics(mode, out, outputs)

        if return_outputs:
            # as TRL: the logits handed to compute_metrics need a plain forward
            with torch.no_grad():
                outputs = model(**model_kwargs)
        return (loss, outputs) if return_outputs else loss

    def _log_fastdpo_metrics(self, mode, inputs, out, stats, mask):
        """TRL's metrics under TRL's names, aggregated across processes as TRL does (token-weighted means of the
        per-token statistics, means over all pairs of the per-pair values)."""
        acc = self.accelerator
        m = self._metrics[mode]
        mask = mask.to(stats.dtype)
        chosen_mask, rejected_mask = mask.chunk(2, dim=0)
        st_c, st_r = stats.chunk(2, dim=0)

        def ratio(num, den):
            num = acc.gather_for_metrics(num.detach()).sum()
            den = acc.gather_for_metrics(den.detach()).sum()
            return (num / den).item() if den > 0 else 0.0

        m["entropy"].append(ratio((stats[..., 0] * mask).sum(), mask.sum()))
        if mode == "train":
            num_tokens = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
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

    def _log_fastdpo_diagnostics(self, mode, out, outputs):
        """The loss library's ``diagnostics/...`` metrics of the batch over all processes (per-pair values
        gathered, gradient norms of the process-averaged gradient; docs/diagnostics.md)."""
        if outputs.log_sum_sq_probs is None:
            raise RuntimeError("FastDPOTrainer: fastdpo_diagnostics=True needs log_sum_sq_probs from the fused LM "
                               "head, which the active head did not return")
        summary = out.diagnostics.gathered(self.accelerator.gather).summary()
        for k, v in zip(summary, torch.stack(list(summary.values())).tolist()):  # one device sync
            self._metrics[mode][k].append(v)
