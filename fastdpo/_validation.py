"""Input checks shared by every public entry point.

Each check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right
kind, wrong value) with a message naming the argument, what it was and what
was expected.
"""

from __future__ import annotations

import math
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fastdpo: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float_tensor(x, name: str) -> torch.Tensor:
    check_tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fastdpo: {name} must be float32, bfloat16 or float16 (float64 for testing), got {x.dtype}")
    return x


def check_labels(labels, logits: torch.Tensor, name: str = "labels") -> torch.Tensor:
    check_tensor(labels, name)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"fastdpo: {name} must be an integer tensor (token ids), got {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"fastdpo: {name} must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])} "
            f"(one target per logits row, already shifted), got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"fastdpo: {name} are on {labels.device} but logits are on {logits.device}")
    return labels


def host_checks(t: torch.Tensor) -> bool:
    """Whether a check of ``t``'s values may read them on the host: for CPU tensors outside torch.compile
    (free there), or with ``FASTDPO_SYNC_CHECKS=1`` (a host synchronisation per check on GPUs, for
    debugging). Elsewhere checks are queued on the device (:func:`require`)."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or os.environ.get("FASTDPO_SYNC_CHECKS") == "1"


def require(ok: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless the 0-d bool tensor ``ok`` is true. Without host checks
    (GPU tensors, compiled graphs) it is ``torch._assert_async``: no host synchronisation, a
    device-side assertion that surfaces at the next synchronisation on GPUs (a RuntimeError with
    the message on CPU)."""
    if host_checks(ok):
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int, name: str = "labels") -> None:
    """Labels must lie in [0, vocab) or equal ignore_index. On the host where that is free (a
    ValueError naming the first bad label), else without a host synchronisation (:func:`require`);
    the kernels also return NaN for such a label."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    expected = f"labels must be token ids or ignore_index ({ignore_index})"
    if host_checks(labels):
        if bool(bad.any()):
            first = labels[bad].flatten()[0].item()
            raise ValueError(f"fastdpo: {name} contain {first}, outside the vocabulary [0, {vocab}); {expected}")
        return
    torch._assert_async(~bad.any(), f"fastdpo: {name} contain a value outside the vocabulary [0, {vocab}); {expected}")


def check_positive(value, name: str, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"fastdpo: {name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"fastdpo: {name} must be a finite number > 0, got {value}")
    return float(value)


def check_finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"fastdpo: {name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"fastdpo: {name} must be a finite number, got {value}")
    return float(value)


def check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"fastdpo: {name} must be an int, got {type(value).__name__}")
    return value


def check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"fastdpo: {name_b} must have the shape of {name_a} {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"fastdpo: {name_b} is on {b.device} but {name_a} is on {a.device}")


def check_logprob_inputs(logits, labels, ref_logits, ignore_index, temperature, softcap):
    """The checks every logits-in entry point shares; returns ``(ignore_index, temperature, softcap)``
    with ``softcap = 0.0`` for none."""
    check_float_tensor(logits, "logits")
    if logits.dim() == 0:
        raise ValueError("fastdpo: logits must have a vocabulary dimension [..., V], got a 0-d tensor")
    if logits.shape[-1] == 0:
        raise ValueError(f"fastdpo: logits have an empty vocabulary dimension, shape {tuple(logits.shape)}")
    check_labels(labels, logits)
    ignore_index = check_int(ignore_index, "ignore_index")
    temperature = check_positive(temperature, "temperature")
    softcap = check_positive(softcap, "softcap", allow_none=True) or 0.0
    if ref_logits is not None:
        check_float_tensor(ref_logits, "ref_logits")
        check_same_shape(logits, ref_logits, "logits", "ref_logits")
        if ref_logits.dtype != logits.dtype:
            raise TypeError(
                f"fastdpo: ref_logits must have the dtype of logits ({logits.dtype}), got {ref_logits.dtype}; "
                "cast the reference logits (e.g. ref_logits.to(logits.dtype))"
            )
    return ignore_index, temperature, softcap
