"""Kernel launches on the device of their inputs.

A Triton launch goes to the *current* CUDA device and its current stream, not to the device of
its arguments, and ``torch.library.triton_op`` adds no guard. So logits on ``cuda:1`` while
``cuda:0`` is current (``device_map="auto"`` puts the LM head on the last GPU) would be read by a
kernel running on ``cuda:0``. Every function that launches a Triton kernel is decorated with
:func:`on_input_device`: it makes the device of its first tensor argument current for the call,
so the launch (and every torch op in the function) runs on that device, on its current stream.
(Torch's own ops and the CUDA C++ binding guard themselves.)
"""

from __future__ import annotations

import functools
import inspect
import threading

import torch

_state = threading.local()


def guarded_device() -> torch.device | None:
    """The device made current by the innermost :func:`on_input_device` call (None outside one)."""
    return getattr(_state, "device", None)


def on_input_device(fn):
    """Run ``fn`` with the device of its first tensor argument current (``torch.cuda.device``)."""

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        t = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if t is None:
            return fn(*args, **kwargs)
        prev = guarded_device()
        _state.device = t.device
        try:
            if t.device.type == "cuda":
                with torch.cuda.device(t.device):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)
        finally:
            _state.device = prev

    # torch.library infers op schemas from the signature, evaluating string annotations in the
    # function's globals: hand it the wrapped function's, already evaluated there.
    try:
        guarded.__signature__ = inspect.signature(fn, eval_str=True)
    except (NameError, TypeError, SyntaxError):
        pass
    return guarded
