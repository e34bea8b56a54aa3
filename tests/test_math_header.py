"""Functions of csrc/include/fastdpo/math.h that only the GPU kernels call, compiled for the host
and checked here: the FMA-only reciprocal the soft-capped KL backward uses for the reference row,
and the tanh it gives."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from fastdpo import _build

PROGRAM = r"""
#include <cmath>
#include <cstdio>
#include "fastdpo/math.h"
int main() {
  double worst_r = 0, worst_t = 0;
  for (int i = 0; i <= (1 << 20); ++i) {  // d over [1, 2], where the soft cap needs 1 / d
    const float d = 1.0f + float(i) / float(1 << 20);
    worst_r = std::fmax(worst_r, std::fabs(double(fastdpo::rcp_1_2(d)) * double(d) - 1.0));
  }
  for (int i = 0; i <= 200000; ++i) {  // tanh(a) = (1 - e) r, e = exp(-2a), r = 1 / (1 + e)
    const float a = 20.0f * float(i) / 200000.0f;
    const float e = std::exp(-2.0f * a);
    const float r = fastdpo::rcp_1_2(1.0f + e);
    worst_t = std::fmax(worst_t, std::fabs(double(-e * r + r) - std::tanh(double(a))));
  }
  std::printf("%.9g %.9g\n", worst_r, worst_t);
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_fma_reciprocal_and_the_tanh_it_gives(tmp_path):
    src = tmp_path / "t.cpp"
    src.write_text(PROGRAM)
    exe = tmp_path / "t"
    subprocess.run(["c++", "-O2", "-std=c++17", f"-I{_build.csrc_dir() / 'include'}", str(src), "-o", str(exe)],
                   check=True, capture_output=True, timeout=120)
    worst_r, worst_t = map(float, subprocess.run([str(exe)], check=True, capture_output=True, text=True,
                                                 timeout=60).stdout.split())
    assert worst_r < 1.5 * 2.0**-23  # relative error of 1 / d: about 1.5 float ulp
    assert worst_t < 2e-7  # absolute error of tanh: as exp's and the product's roundings allow
