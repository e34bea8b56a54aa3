"""The TRL integration on every tested TRL release, not only the installed one.

For each release of ``TESTED_TRL`` other than the installed one, a virtual environment that sees this
environment's packages (``--system-site-packages``) gets that TRL release alone (``pip install --no-deps``), and
the TRL tests run there in a subprocess: the trainer parity test against that release's own DPOTrainer, the
fused-head tests, the internals check and a few fastdpo objectives. The environment is cached by TRL and
Python version under fastdpo's cache directory (``FASTDPO_CACHE_DIR``), so only the first run installs.
The shared environment's TRL is never touched. Installing needs the package index; set
``FASTDPO_SKIP_TRL_MATRIX=1`` to skip these tests where it cannot be reached.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

trl = pytest.importorskip("trl")

from fastdpo import _build  # noqa: E402
from fastdpo.integrations._trl_compat import TESTED_TRL  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHILD_TESTS = ["tests/test_integrations_trl.py", "tests/test_integrations_trl_head.py",
               "tests/test_trl_compat.py::test_installed_trl_has_every_internal",
               "tests/test_trl_objectives.py::test_objective_trains_and_matches_dpo_loss[rrpo]",
               "tests/test_trl_objectives.py::test_objective_trains_and_matches_dpo_loss[simpo]",
               "tests/test_trl_objectives.py::test_objective_trains_and_matches_dpo_loss[tdpo]"]
OTHER_RELEASES = [v for v in TESTED_TRL if v != trl.__version__]


def _venv_python(version: str) -> Path:
    """A cached venv over this interpreter's packages with trl==version installed on top; its python."""
    tag = hashlib.sha256(sys.executable.encode()).hexdigest()[:8]
    root = _build.cache_root() / "trl-venvs" / f"py{sys.version_info[0]}.{sys.version_info[1]}-{tag}"
    venv = root / f"trl-{version}"
    python = venv / "bin" / "python"
    done = venv / ".complete"
    with _build._FileLock(root / f"trl-{version}.lock", f"the trl {version} test environment"):
        if not done.is_file():
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", "--clear",
                            str(venv)], check=True, capture_output=True, text=True)
            # the base interpreter's pip, run by the venv's python, installs into the venv only
            r = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed",
                                "--disable-pip-version-check", "--quiet", f"trl=={version}"],
                               capture_output=True, text=True)
            assert r.returncode == 0, (f"installing trl=={version} into {venv} failed (set FASTDPO_SKIP_TRL_MATRIX=1 "
                                       f"where the package index cannot be reached):\n{r.stdout}\n{r.stderr}")
            done.write_text(version)
    return python


@pytest.mark.skipif(os.environ.get("FASTDPO_SKIP_TRL_MATRIX") == "1", reason="FASTDPO_SKIP_TRL_MATRIX=1")
@pytest.mark.skipif(not OTHER_RELEASES, reason="only the installed TRL release is tested")
@pytest.mark.parametrize("version", OTHER_RELEASES)
def test_trl_integration_on_tested_release(version):
    python = _venv_python(version)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    got = subprocess.run([str(python), "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True,
                         env=env, check=True).stdout.strip()
    assert got == version, f"the test environment imports trl {got}, not {version}"
    r = subprocess.run([str(python), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *CHILD_TESTS],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, f"TRL tests failed on trl {version}:\n{tail}"
    assert " passed" in r.stdout, tail
