"""Reading compiled GPU code without a GPU: the CUDA binary tools, SASS text and per-kernel resource usage.

``cuobjdump`` and ``nvdisasm`` come with the CUDA toolkit and with Triton's NVIDIA backend
(``triton/backends/nvidia/bin``), so they are found even where only pip packages are installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path


def tool(name: str) -> str:
    """Path of a CUDA binary tool (``cuobjdump``, ``nvdisasm``): the toolkit's, else Triton's, else PATH's."""
    from fastdpo import _build

    cands = []
    home = _build.cuda_home()
    if home:
        cands.append(Path(home) / "bin" / name)
    try:
        import triton

        cands.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(
        f"fastdpo: {name} not found (looked in {', '.join(map(str, cands)) or 'no CUDA toolkit'} and PATH); "
        "install the CUDA toolkit or triton"
    )


def _run(args: list[str]) -> str:
    p = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"fastdpo: {' '.join(args[:2])} failed ({p.returncode}): {p.stderr.strip()[:500]}")
    return p.stdout


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin (one ELF for one architecture), as ``nvdisasm`` prints it."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return _run([tool("nvdisasm"), "-c", f.name])


def library_sass(path: str | os.PathLike, arch: str = "sm_90") -> str:
    """SASS of every kernel a fat binary (a ``.so``) holds for ``arch``."""
    return _run([tool("cuobjdump"), "-sass", "-arch", arch, str(path)])


_FUNC = re.compile(r"^\s*Function (\S+):\s*$")
_RES = re.compile(r"(\w+(?:\[\d+\])?):(\d+)")


def resource_usage(path: str | os.PathLike) -> dict[str, dict[str, dict[str, int]]]:
    """``{arch: {kernel: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": .., ...}}}`` from
    ``cuobjdump --dump-resource-usage`` of a fat binary or cubin."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    arch = None
    func = None
    for line in _run([tool("cuobjdump"), "--dump-resource-usage", str(path)]).splitlines():
        m = re.match(r"\s*arch = (\S+)", line)
        if m:
            arch = m.group(1)
            out.setdefault(arch, {})
            continue
        m = _FUNC.match(line)
        if m:
            func = m.group(1)
            continue
        if func is not None and "REG:" in line and arch is not None:
            out[arch][func] = {k: int(v) for k, v in _RES.findall(line)}
            func = None
    return out


def embedded_ptx(path: str | os.PathLike) -> list[str]:
    """Names of the PTX files a fat binary embeds (empty when it has none)."""
    p = subprocess.run([tool("cuobjdump"), "-lptx", str(path)], capture_output=True, text=True, timeout=300)
    return re.findall(r"PTX file\s+\d+:\s*(\S+)", p.stdout)
