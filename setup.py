"""Build script.

A plain ``pip install .`` is quick: it ships the C++/CUDA sources inside the
package (as ``fastdpo/csrc``) and the extensions are compiled on first use
(``python -m fastdpo build`` precompiles them).

Ahead-of-time build, opt-in through the environment (needs torch installed in
the build environment, hence ``--no-build-isolation``)::

    FASTDPO_AOT=1 pip install --no-build-isolation .
    FASTDPO_AOT=1 FASTDPO_CUDA_ARCHS="80;90" pip install --no-build-isolation .

``FASTDPO_AOT=1`` builds the CPU extension, and the CUDA one too when torch is
a CUDA build and nvcc is found. ``FASTDPO_CUDA_ARCHS`` picks the GPU
architectures (default ``80;90``).
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    """Copy the top-level ``csrc/`` into the built package as ``fastdpo/csrc``."""

    def run(self):
        super().run()
        dst = Path(self.build_lib) / "fastdpo" / "csrc"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(ROOT / "csrc", dst)


def _aot_extensions():
    if os.environ.get("FASTDPO_AOT", "0") != "1":
        return [], {}
    import sys

    sys.path.insert(0, str(ROOT))
    from fastdpo import _build  # noqa: E402  (needs torch, hence --no-build-isolation)

    return _build.setuptools_extensions(Path("csrc"))  # setuptools wants relative source paths


ext_modules, extra_cmdclass = _aot_extensions()

setup(
    cmdclass={"build_py": BuildPyWithSources, **extra_cmdclass},
    ext_modules=ext_modules,
)
