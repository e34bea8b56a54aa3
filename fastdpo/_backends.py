"""Backend names and the one dispatcher that picks a kernel module.

Every kernel module (``fastdpo.kernels.<name>``) implements the same contract
on 3-D logits ``[B, T, V]`` (any strides on B and T, stride 1 on V)::

    unavailable_reason(device) -> str | None        # None when usable (may build/load code)
    logprobs_fwd(logits, labels, ref_logits, ignore_index, temperature, softcap, stats, kl=False)
        -> (logp [B,T], lse [B,T], ref_logp [B,T] or empty, stats [B,T,4] or empty,
            kl [B,T] or empty, ref_lse [B,T] or empty)
    logprobs_bwd(grad_logp, logits, labels, lse, ignore_index, temperature, softcap, inplace,
                 grad_kl=None, ref_logits=None, ref_lse=None)
        -> grad_logits [B,T,V] (``logits`` itself when inplace)
    segment_sum(values [M], offsets [S+1] int64) -> [S]   # per-sequence sums of packed batches,
                                                          # each segment in a fixed order (deterministic)

``kl=True`` (with ``ref_logits``) adds the per-token KL(reference || policy) over the
whole vocabulary; its gradient ``grad_kl * (p - q)`` joins the backward when
``grad_kl`` is given (see ``kernels/reference.py`` for the formulas).

with ``softcap == 0.0`` meaning "no soft cap" and float32 outputs (float64 for
float64 logits). The torch reference (``kernels/reference.py``) is the oracle.
"""

from __future__ import annotations

import enum
import importlib
import os
import warnings
from types import ModuleType

import torch

from fastdpo._build import BuildError


class Backend(str, enum.Enum):
    AUTO = "auto"
    TORCH = "torch"  # plain torch reference, every device
    CPU = "cpu"  # native C++ (csrc/cpu)
    TRITON = "triton"  # Triton kernels (GPU; CPU tensors under TRITON_INTERPRET=1)
    CUDA = "cuda"  # CUDA C++ (csrc/cuda)

    def __str__(self) -> str:
        return self.value


BACKEND_NAMES = tuple(b.value for b in Backend)

# What "auto" tries, in order, for each device type.
AUTO_ORDER: dict[str, tuple[Backend, ...]] = {
    "cpu": (Backend.CPU, Backend.TORCH),
    "cuda": (Backend.CUDA, Backend.TRITON, Backend.TORCH),
}

_MODULES = {
    Backend.TORCH: "fastdpo.kernels.reference",
    Backend.CPU: "fastdpo.kernels.cpu",
    Backend.TRITON: "fastdpo.kernels.triton",
    Backend.CUDA: "fastdpo.kernels.cuda",
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


_resolved: dict[tuple[str, str], Backend] = {}
_reasons: dict[tuple[Backend, str], str | None] = {}
_build_failed: set[tuple[Backend, str]] = set()
_warned: set[tuple[Backend, str]] = set()


def parse_backend(name: str | Backend) -> Backend:
    try:
        return Backend(name)
    except ValueError:
        raise ValueError(f"fastdpo: unknown backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}") from None


_modules: dict[Backend, ModuleType] = {}


def kernel_module(backend: Backend) -> ModuleType:
    # A dict hit after the first use keeps this traceable by torch.compile.
    mod = _modules.get(backend)
    if mod is None:
        mod = _modules[backend] = importlib.import_module(_MODULES[backend])
    return mod


def unavailable_reason(backend: Backend, device: torch.device) -> str | None:
    """None when ``backend`` can run on ``device``, else a sentence saying why not (cached)."""
    key = (backend, device.type)
    if key not in _reasons:
        try:
            _reasons[key] = kernel_module(backend).unavailable_reason(device)
        except BuildError as e:
            _reasons[key] = str(e)
            _build_failed.add(key)
    return _reasons[key]


def resolve(name: str | Backend, device: torch.device) -> Backend:
    """The concrete backend for ``name`` on ``device``.

    ``auto`` (or ``$FASTDPO_BACKEND`` when set) tries the device's backends in
    order; one that fails to build warns once (with its build log) and is
    skipped. An explicitly named backend that cannot run raises
    :class:`BackendUnavailableError`.
    """
    key = (str(name), device.type)
    hit = _resolved.get(key)
    if hit is not None:
        return hit
    backend = parse_backend(name)
    if backend is Backend.AUTO and os.environ.get("FASTDPO_BACKEND"):
        backend = parse_backend(os.environ["FASTDPO_BACKEND"])
    if backend is Backend.AUTO:
        for cand in AUTO_ORDER.get(device.type, (Backend.TORCH,)):
            reason = unavailable_reason(cand, device)
            if reason is None:
                backend = cand
                break
            if (cand, device.type) in _build_failed and (cand, device.type) not in _warned:
                _warned.add((cand, device.type))
                warnings.warn(
                    f"fastdpo: the {cand} backend is unavailable, falling back to the next usable backend of "
                    f"{'/'.join(b.value for b in AUTO_ORDER.get(device.type, ()))}: {reason}\n"
                    "What this costs: the last fallback, the plain-torch reference (backend='torch'), runs at about "
                    "the speed of naive log_softmax + gather, several times slower than the native kernel, with "
                    f"bounded memory. Pass backend={cand.value!r} to make this an error instead.", stacklevel=3)
    else:
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise BackendUnavailableError(f"fastdpo: backend {backend.value!r} cannot run on {device}: {reason}")
    _resolved[key] = backend
    return backend


def available_backends(device: torch.device) -> list[Backend]:
    return [b for b in Backend if b is not Backend.AUTO and unavailable_reason(b, device) is None]
