"""CUDA C++ backend (not implemented yet): asking for it raises a clear error."""

from __future__ import annotations

import torch


def unavailable_reason(device: torch.device) -> str | None:
    return "the cuda backend is not implemented in this version of fastdpo"
