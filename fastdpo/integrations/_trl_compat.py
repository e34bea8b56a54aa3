"""Which TRL releases the TRL integration runs on, and a check of exactly the TRL internals it relies on.

TRL releases often and its trainers' internals move. Rather than refusing every release newer than the ones
tested, :func:`check` looks at what :mod:`fastdpo.integrations.trl` overrides or calls, on the installed TRL:

- ``DPOTrainer._compute_loss(model, inputs, return_outputs)`` and ``DPOTrainer.compute_ref_log_probs(model,
  inputs)`` (overridden), and that ``compute_loss`` / the precompute pass still call them;
- ``trl.trainer.utils._ChunkedLogProbFunction`` (swapped for fastdpo's kernel), its ``forward`` parameters, and
  that ``add_fused_lm_head`` (which ``DPOTrainer.__init__`` must call) still goes through it;
- the fields of ``FusedCausalLMOutput`` the trainer reads, ``use_adapter`` and ``disable_gradient_checkpointing``.

A missing internal raises ImportError naming it; a changed signature, or a release newer than the tested ones,
warns (:class:`TRLCompatibilityWarning`) and carries on. Releases older than :data:`MIN_TRL` have no fused LM head
and are refused.
"""

from __future__ import annotations

import inspect
import warnings

MIN_TRL = "1.15.0"
TESTED_TRL = ("1.15.0", "1.16.0")  # the oldest and newest releases the test suite runs the trainer on
SUPPORTED_TRL = f">={MIN_TRL}"

# Parameters of ``_ChunkedLogProbFunction.forward`` (after ``ctx``) in the tested releases, and those we must have.
HEAD_PARAMS = ("hidden", "weight", "bias", "targets", "temperature", "chunk_size", "final_logit_softcapping",
               "logit_scale", "outputs")
HEAD_REQUIRED = ("hidden", "weight", "bias", "targets", "temperature")
OUTPUT_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask", "aux_loss")
_OVERRIDES = {"_compute_loss": ("self", "model", "inputs", "return_outputs"),
              "compute_ref_log_probs": ("self", "model", "inputs")}


class TRLCompatibilityWarning(UserWarning):
    """The installed TRL is newer than the tested releases, or an internal fastdpo uses changed its signature."""


def version_tuple(v: str) -> tuple:
    from packaging.version import Version

    r = Version(v).release
    return tuple(r) + (0,) * (3 - len(r))


def check_version(version: str) -> str:
    """Raise ImportError for a TRL older than :data:`MIN_TRL`; return the version."""
    if version_tuple(version) < version_tuple(MIN_TRL):
        raise ImportError(
            f"fastdpo.integrations.trl needs trl{SUPPORTED_TRL} (the first release with the fused LM head it "
            f"plugs into), found trl {version}: pip install -U 'fastdpo[trl]'"
        )
    return version


def is_newer_than_tested(version: str) -> bool:
    return version_tuple(version)[:2] > version_tuple(TESTED_TRL[-1])[:2]


def _names(code) -> set:
    """Global and attribute names a function's code (and the functions defined in it) refers to."""
    out = set(code.co_names)
    for c in code.co_consts:
        if inspect.iscode(c):
            out |= _names(c)
    return out


def _calls(fn, name) -> bool:
    fn = inspect.unwrap(fn)
    return hasattr(fn, "__code__") and name in _names(fn.__code__)


def head_params(fn) -> tuple:
    """Parameter names (without ``ctx``) of a fused-LM-head function: an autograd Function's ``forward`` or an
    object exposing ``trl_params`` (fastdpo's own replacement)."""
    if hasattr(fn, "trl_params"):
        return tuple(fn.trl_params)
    params = list(inspect.signature(fn.forward).parameters)
    return tuple(params[1:]) if params and params[0] == "ctx" else tuple(params)


def find_problems(dpo_trainer, utils, models_utils) -> tuple[list[str], list[str]]:
    """``(missing, changed)``: descriptions of the internals that are missing (fatal) or changed (a warning)."""
    missing, changed = [], []
    for name, params in _OVERRIDES.items():
        fn = getattr(dpo_trainer, name, None)
        if not callable(fn):
            missing.append(f"DPOTrainer.{name}")
            continue
        got = tuple(inspect.signature(fn).parameters)
        if got != params:
            changed.append(f"DPOTrainer.{name}{params} is now {got}")
    if callable(getattr(dpo_trainer, "compute_loss", None)) and not _calls(dpo_trainer.compute_loss, "_compute_loss"):
        missing.append("DPOTrainer.compute_loss calling self._compute_loss")
    pre = getattr(dpo_trainer, "_precompute_ref_logps", None)
    if pre is not None and not _calls(pre, "compute_ref_log_probs"):
        changed.append("DPOTrainer._precompute_ref_logps no longer calls compute_ref_log_probs")
    if not _calls(dpo_trainer.__init__, "add_fused_lm_head"):
        missing.append("DPOTrainer.__init__ calling add_fused_lm_head")
    head = getattr(utils, "_ChunkedLogProbFunction", None)
    if head is None:
        missing.append("trl.trainer.utils._ChunkedLogProbFunction")
    else:
        params = head_params(head)
        lacking = [p for p in HEAD_REQUIRED if p not in params]
        if lacking:
            missing.append(f"_ChunkedLogProbFunction.forward parameter(s) {lacking}")
        elif params != HEAD_PARAMS:
            changed.append(f"_ChunkedLogProbFunction.forward{HEAD_PARAMS} is now {params}")
    add = getattr(utils, "add_fused_lm_head", None)
    if add is None:
        missing.append("trl.trainer.utils.add_fused_lm_head")
    elif not _calls(add, "_ChunkedLogProbFunction"):
        missing.append("add_fused_lm_head calling _ChunkedLogProbFunction")
    out = getattr(utils, "FusedCausalLMOutput", None)
    if out is None:
        missing.append("trl.trainer.utils.FusedCausalLMOutput")
    else:
        fields = getattr(out, "__dataclass_fields__", {})
        lacking = [f for f in OUTPUT_FIELDS if f not in fields]
        if lacking:
            missing.append(f"FusedCausalLMOutput field(s) {lacking}")
    for mod, name in ((utils, "use_adapter"), (utils, "maybe_gather_lm_head_ctx"),
                      (models_utils, "disable_gradient_checkpointing")):
        if not callable(getattr(mod, name, None)):
            missing.append(f"{mod.__name__}.{name}")
    return missing, changed


def check(version: str | None = None, *, dpo_trainer=None, utils=None, models_utils=None) -> str:
    """Check the installed TRL (or the given version / objects, for tests); returns the version.

    Raises ImportError for a release older than :data:`MIN_TRL` or a missing internal (naming it); warns
    :class:`TRLCompatibilityWarning` for a changed signature or a release newer than :data:`TESTED_TRL`.
    """
    if version is None or dpo_trainer is None or utils is None or models_utils is None:
        try:
            import trl
        except ImportError as e:
            raise ImportError("fastdpo.integrations.trl needs TRL: pip install 'fastdpo[trl]'") from e
        version = version or trl.__version__
    check_version(version)
    if dpo_trainer is None:
        from trl import DPOTrainer as dpo_trainer
    if utils is None:
        import trl.trainer.utils as utils
    if models_utils is None:
        import trl.models.utils as models_utils
    missing, changed = find_problems(dpo_trainer, utils, models_utils)
    if missing:
        raise ImportError(
            f"fastdpo.integrations.trl cannot run on trl {version}: it relies on {'; '.join(missing)}, which this "
            f"release does not have. Tested releases: {', '.join(TESTED_TRL)} (pip install 'trl=={TESTED_TRL[-1]}')"
        )
    if changed or is_newer_than_tested(version):
        warnings.warn(
            f"fastdpo.integrations.trl was tested with trl {' and '.join(TESTED_TRL)}; found trl {version}. The TRL "
            "internals it overrides are present"
            + (f", but changed: {'; '.join(changed)}" if changed else " with the tested signatures")
            + ". Compare a few steps against trl.DPOTrainer before relying on it.",
            TRLCompatibilityWarning, stacklevel=3,
        )
    return version
