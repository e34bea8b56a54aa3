"""``python -m fastdpo`` as users run it: ``--help``, ``build`` and ``build cpu`` as subprocesses
(``info``: tests/test_build.py). Argument parsing is also checked on every other CPython 3.10-3.13 found here (they
need not have torch: the parser is built without it), since argparse's handling of optional
positionals changed between versions."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(*args, timeout=1500):
    return subprocess.run([sys.executable, "-m", "fastdpo", *args], env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_help():
    p = _cli("--help", timeout=300)
    assert p.returncode == 0, p.stderr
    assert "info" in p.stdout and "build" in p.stdout
    p = _cli("build", "--help", timeout=300)
    assert p.returncode == 0 and "cpu" in p.stdout and "cuda" in p.stdout, p.stderr


def test_build_cpu_and_build_everything():
    p = _cli("build", "cpu")
    assert p.returncode == 0, p.stderr
    assert "built  cpu" in p.stdout and "cuda" not in p.stdout
    p = _cli("build")  # no argument: everything available (the README's command)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "built  cpu" in p.stdout
    assert "built  cuda" in p.stdout or "skip   cuda" in p.stdout, p.stdout


def test_the_cli_names_every_extension():
    from fastdpo import __main__ as cli
    from fastdpo import _build

    assert set(cli.EXTENSION_NAMES) == set(_build.EXTENSIONS)


def test_unknown_extension_is_a_clear_error():
    p = _cli("build", "gpu", timeout=300)
    assert p.returncode == 2
    assert "gpu" in p.stderr and "cpu" in p.stderr and "cuda" in p.stderr, p.stderr


def _other_pythons() -> dict[str, str]:
    """CPython 3.10-3.13 interpreters on PATH or under pyenv, other than this one."""
    found = {}
    cands = [shutil.which(f"python3.{m}") for m in (10, 11, 12, 13)]
    cands += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[0-3].*/bin/python3")))
    for c in filter(None, cands):
        try:
            v = subprocess.run([c, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True,
                               timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        ver = v.stdout.strip()
        if v.returncode == 0 and ver and ver != str(sys.version_info[:2]) and ver not in found:
            found[ver] = c
    return dict(sorted(found.items()))


_PARSE = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("fastdpo_cli", sys.argv[1])
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)  # no torch needed to build the parser
p = cli.parser()
print(cli.which(p.parse_args(["build"])), cli.which(p.parse_args(["build", "cpu"])),
      cli.which(p.parse_args(["build", "cuda", "cpu"])), p.parse_args(["info"]).cmd)
try:
    p.parse_args(["build", "gpu"])
except SystemExit as e:
    print("exit", e.code)
"""


@pytest.mark.parametrize("python", [pytest.param(path, id=ver) for ver, path in _other_pythons().items()] or [
    pytest.param(None, marks=pytest.mark.skip(reason="no other CPython 3.10-3.13 found here"))])
def test_build_arguments_parse_on_other_pythons(python):
    p = subprocess.run([python, "-c", _PARSE, str(ROOT / "fastdpo" / "__main__.py")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[0] == "['cpu', 'cuda'] ['cpu'] ['cuda', 'cpu'] info", p.stdout
    assert "exit 2" in p.stdout and "invalid choice: 'gpu'" in p.stderr, p.stdout + p.stderr
