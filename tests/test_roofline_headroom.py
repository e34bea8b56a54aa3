"""The Triton kernels the losses use by default have at least 1.25x headroom over HBM bandwidth
in the static SASS roofline at H100 rates (the CUDA kernels' check is in test_cuda_static.py)."""

from __future__ import annotations

import pytest

from fastdpo.bench import roofline

triton_static = pytest.importorskip("fastdpo.bench.triton_static",
                                    reason="fastdpo.bench.triton_static (the Triton kernels' static compiler) is absent")


def test_every_default_triton_variant_has_headroom_at_h100_rates():
    rows, note = roofline.triton_rows()
    assert note is None and rows, note
    assert roofline.failures(rows) == [], roofline.format_table(rows)
