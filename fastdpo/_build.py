"""JIT build of the C++/CUDA extensions, with a safe on-disk cache.

Each extension is compiled with ``torch.utils.cpp_extension`` + ninja on first
use, in a child process whose output goes to a log file (the parent shows
progress), into a cache directory keyed by a hash of:

* the sources (every file under ``csrc/``),
* the torch version and its CUDA version, the Python version,
* the compiler flags and target architectures, and the host CPU's features
  (CPU code is built with ``-march=native``).

Concurrency: a per-entry file lock makes N processes that start together (for
example 8 ranks) build once; the others wait and then load the result. A
finished entry holds ``build.json`` with the SHA-256 of the library; an entry
whose library is missing, truncated or does not match is rebuilt.

The library registers its kernels with ``TORCH_LIBRARY_IMPL`` under the op
names defined in :mod:`fastdpo.ops.schema`; loading it is all it takes.

Environment:

``FASTDPO_CACHE_DIR``       cache root (default ``$XDG_CACHE_HOME/fastdpo`` or ``~/.cache/fastdpo``)
``FASTDPO_CPU_ARCH_FLAGS``  CPU target flags (default ``-march=native``)
``FASTDPO_CUDA_ARCHS``      GPU architectures, e.g. ``80;90`` (default ``80;90``); the newest is also
                            embedded as PTX, which newer GPUs JIT-compile
``FASTDPO_BUILD_VERBOSE=1`` echo the compiler output
``CUDA_HOME``               CUDA toolkit root (else found from ``nvcc``)
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

__all__ = ["BuildError", "UnsupportedGPUError", "EXTENSIONS", "load_extension", "cache_root", "csrc_dir", "cuda_home"]


class BuildError(RuntimeError):
    """A C++/CUDA extension could not be built or loaded; ``log_path`` has the details."""

    def __init__(self, message: str, log_path: str | None = None):
        super().__init__(message + (f"\n  build log: {log_path}" if log_path else ""))
        self.log_path = log_path


class UnsupportedGPUError(BuildError):
    """The CUDA library has no code this GPU can run (its compute capability against the built architectures)."""


@dataclasses.dataclass(frozen=True)
class ExtSpec:
    name: str
    sources: tuple[str, ...]  # relative to csrc/
    cuda: bool
    expected_seconds: int  # rough build time on 2 cores, shown to the user


EXTENSIONS: dict[str, ExtSpec] = {
    "cpu": ExtSpec("fastdpo_cpu", ("cpu/logprobs_cpu.cpp", "cpu/linear_cpu.cpp", "cpu/segment_cpu.cpp"), cuda=False,
                   expected_seconds=90),
    "cuda": ExtSpec(
        "fastdpo_cuda", ("cuda/logprobs_cuda.cu", "cuda/bindings.cpp"), cuda=True, expected_seconds=240
    ),
}

_loaded: dict[str, str] = {}
_load_lock = threading.Lock()


# --------------------------------------------------------------------------- paths


def csrc_dir() -> Path:
    """The C++/CUDA sources: shipped inside the package, or the repository's ``csrc/``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / "include" / "fastdpo" / "math.h").is_file():
            return cand
    raise BuildError(f"fastdpo: C++ sources not found (looked in {here / 'csrc'} and {here.parent / 'csrc'})")


def cache_root() -> Path:
    env = os.environ.get("FASTDPO_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fastdpo"


def cuda_home() -> str | None:
    """Root of the CUDA toolkit: ``$CUDA_HOME``, else the real location of ``nvcc``.

    ``nvcc`` on PATH may be a wrapper script, so its directory is not trusted:
    ``nvcc -dryrun`` prints the toolkit's ``TOP`` directory.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for cand in sorted(Path("/usr/local").glob("cuda*"), reverse=True):
            if (cand / "bin" / "nvcc").is_file():
                return str(cand)
        return None
    try:
        out = subprocess.run(
            [nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
        m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
        if m:
            return str(Path(m.group(1)).resolve())
    except (OSError, subprocess.SubprocessError):
        pass
    return str(Path(nvcc).resolve().parent.parent)


def _pip_cuda_include_dirs() -> list[str]:
    """CUDA library headers that torch's headers include (cublas, cusparse, ...),
    shipped with torch's pip dependencies under ``site-packages/nvidia``."""
    dirs = []
    for entry in sys.path:
        base = Path(entry) / "nvidia"
        if not base.is_dir():
            continue
        for inc in sorted(base.glob("*/include")) + sorted(base.glob("*/*/include")):
            if inc.is_dir() and str(inc) not in dirs:
                dirs.append(str(inc))
    return dirs


# --------------------------------------------------------------------------- flags


def cuda_archs() -> list[str]:
    raw = os.environ.get("FASTDPO_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace(".", "") for a in re.split(r"[;, ]+", raw) if a.strip()]
    for a in archs:
        if not re.fullmatch(r"\d+[a-z]?", a):
            raise BuildError(f"fastdpo: FASTDPO_CUDA_ARCHS entry {a!r} is not an architecture like '80' or '90a'")
    return archs


def _arch_number(arch: str) -> int:
    return int(re.match(r"\d+", arch).group())


def ptx_arch() -> str:
    """The architecture whose PTX the CUDA library embeds, so that GPUs newer than every built one
    JIT-compile it: the newest of FASTDPO_CUDA_ARCHS without an arch-specific suffix (PTX of "90a"
    runs on sm_90 only), else the newest one's number."""
    archs = cuda_archs()
    generic = [a for a in archs if a.isdigit()]
    return max(generic, key=int) if generic else str(max(_arch_number(a) for a in archs))


def torch_arch_list() -> str:
    """FASTDPO_CUDA_ARCHS ("80;90a") in TORCH_CUDA_ARCH_LIST form, with PTX for :func:`ptx_arch`
    ("8.0+PTX;9.0a")."""
    archs = cuda_archs()
    ptx = ptx_arch()
    if ptx not in archs:
        archs = archs + [ptx]

    def spelled(a):
        return f"{a[:-1]}.{a[-1]}" if a[-1].isdigit() else f"{a[:-2]}.{a[-2:]}"

    return ";".join(spelled(a) + ("+PTX" if a == ptx else "") for a in archs)


# The kernels' oldest target (bf16 arithmetic, the memory model they are written for).
MIN_CUDA_ARCH = 80


def cuda_arch_problem(major: int, minor: int) -> str | None:
    """Why the CUDA library built for FASTDPO_CUDA_ARCHS cannot run on a GPU of compute capability
    ``major.minor``, or None when it can: SASS for sm_XY runs on X.Z with Z >= Y (an arch-specific
    "XYa" on X.Y only), and the embedded PTX (compute_P) is JIT-compiled on any GPU >= P."""
    cc = major * 10 + minor
    archs = cuda_archs()
    built = ", ".join(f"sm_{a}" for a in archs) + f" + PTX compute_{ptx_arch()}"
    where = (f"the CUDA library is built for {built} (FASTDPO_CUDA_ARCHS="
             f"{os.environ.get('FASTDPO_CUDA_ARCHS', '80;90')!r})")
    if cc < MIN_CUDA_ARCH:
        return (f"this GPU has compute capability {major}.{minor} and the cuda kernels need "
                f"{MIN_CUDA_ARCH // 10}.{MIN_CUDA_ARCH % 10} or newer ({where})")
    for a in archs:
        n = _arch_number(a)
        if (n == cc) if not a.isdigit() else (n // 10 == major and n % 10 <= minor):
            return None
    if cc >= int(ptx_arch()):
        return None
    return (f"{where}, which has no code for this GPU (compute capability {major}.{minor}); "
            f"add {major}{minor} to FASTDPO_CUDA_ARCHS")


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _flags(spec: ExtSpec) -> dict[str, list[str]]:
    inc = str(csrc_dir() / "include")
    # Warnings in our own sources are errors; torch's headers come in via -isystem.
    # The C++ standard is left to torch (C++17 or C++20 depending on its version).
    # -fno-trapping-math lets the compiler if-convert (and so vectorise) the
    # selects in the exp/soft-cap code; NaN and inf semantics are unchanged.
    # -fopenmp: at::parallel_for is an inline OpenMP region in torch's headers,
    # so without it the kernels would run on one thread (torch ships libgomp).
    cflags = ["-O3", "-fopenmp", "-fno-trapping-math", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"]
    arch = os.environ.get("FASTDPO_CPU_ARCH_FLAGS")
    if arch is None:
        arch = "-march=native"
        if " avx2 " in f" {_cpu_features()} ":
            # Some tunings (e.g. znver1) default to 128-bit vectors; the exp
            # loops run ~20% faster with 256-bit ones.
            arch += " -mprefer-vector-width=256"
    cflags += arch.split()
    flags = {"extra_cflags": cflags, "extra_include_paths": [inc], "extra_cuda_cflags": [], "extra_ldflags": ["-fopenmp"]}
    if spec.cuda:
        # Target architectures reach nvcc through TORCH_CUDA_ARCH_LIST (set for the
        # build process from FASTDPO_CUDA_ARCHS), so torch adds no others.
        flags["extra_cuda_cflags"] = [
            "-O3",
            "--expt-relaxed-constexpr",
            "-Xcompiler=-Wall,-Wextra,-Wno-unused-parameter,-Werror",
            "--Werror=all-warnings",
        ]
        flags["extra_include_paths"] += _pip_cuda_include_dirs()
    return flags


def _entry_key(spec: ExtSpec) -> str:
    h = hashlib.sha256()
    root = csrc_dir()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    h.update(repr(sorted(_flags(spec).items())).encode())
    h.update(f"{torch.__version__}|{torch.version.cuda}|{sys.version_info[:2]}|{spec}".encode())
    h.update(_cpu_features().encode())
    if spec.cuda:
        h.update(torch_arch_list().encode())  # the architectures and the embedded PTX
    return h.hexdigest()[:20]


# --------------------------------------------------------------------------- cache entries


def _lib_path(entry: Path, spec: ExtSpec) -> Path:
    return entry / f"{spec.name}.so"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _entry_ok(entry: Path, spec: ExtSpec) -> bool:
    """True when the entry is complete: its library exists and matches the recorded hash."""
    lib, meta = _lib_path(entry, spec), entry / "build.json"
    try:
        recorded = json.loads(meta.read_text())["sha256"]
        return lib.is_file() and _sha256(lib) == recorded
    except (OSError, ValueError, KeyError):
        return False


class _Progress:
    """Shows that a long build is alive: elapsed time and the latest ninja step."""

    def __init__(self, what: str, log: Path, expected: int):
        self.what, self.log, self.expected = what, log, expected
        self._stop = threading.Event()
        self._tty = sys.stderr.isatty()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _step(self) -> str:
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.startswith("[")]
            return lines[-1][:80] if lines else ""
        except OSError:
            return ""

    def _run(self):
        t0, last = time.monotonic(), 0.0
        while not self._stop.wait(1.0):
            el = time.monotonic() - t0
            if self._tty:
                sys.stderr.write(f"\r  {self.what}: {el:5.0f}s / ~{self.expected}s  {self._step():<60}")
                sys.stderr.flush()
            elif el - last >= 20:
                last = el
                sys.stderr.write(f"  {self.what}: still compiling, {el:.0f}s so far {self._step()}\n")
                sys.stderr.flush()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if self._tty:
            sys.stderr.write("\n")


_CHILD = r"""
import sys, json, os
from torch.utils import cpp_extension
args = json.loads(sys.argv[1])
if args.get("cuda_home"):
    os.environ["CUDA_HOME"] = args["cuda_home"]
    cpp_extension.CUDA_HOME = args["cuda_home"]
if args.get("arch_list"):
    os.environ["TORCH_CUDA_ARCH_LIST"] = args["arch_list"]
os.environ.setdefault("MAX_JOBS", str(max(1, os.cpu_count() or 1)))
# Build and link (loading it here is harmless); the parent loads it from the cache.
cpp_extension.load(
    name=args["name"], sources=args["sources"], build_directory=args["build_dir"],
    extra_cflags=args["extra_cflags"], extra_cuda_cflags=args["extra_cuda_cflags"],
    extra_ldflags=args["extra_ldflags"], extra_include_paths=args["extra_include_paths"],
    with_cuda=args["with_cuda"], is_python_module=False, verbose=True,
)
"""


def _compile(spec: ExtSpec, entry: Path) -> None:
    """Compile into a temporary directory beside ``entry`` and move it into place."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp-", dir=entry.parent))
    log = entry.parent / f"{entry.name}.log"
    args = {
        "name": spec.name,
        "sources": [str(csrc_dir() / s) for s in spec.sources],
        "build_dir": str(tmp),
        "with_cuda": spec.cuda,
        "cuda_home": cuda_home() if spec.cuda else None,
        "arch_list": torch_arch_list() if spec.cuda else None,
        **_flags(spec),
    }
    if spec.cuda and not args["cuda_home"]:
        raise BuildError("fastdpo: cannot build the CUDA extension: no CUDA toolkit (set CUDA_HOME or put nvcc on PATH)")
    verbose = os.environ.get("FASTDPO_BUILD_VERBOSE") == "1"
    sys.stderr.write(
        f"fastdpo: compiling the {spec.name} extension (first use with these sources; about "
        f"{spec.expected_seconds}s on 2 cores)\n  log: {log}\n"
    )
    sys.stderr.flush()
    t0 = time.monotonic()
    with open(log, "w") as lf, _Progress(spec.name, log, spec.expected_seconds):
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(args)],
            stdout=None if verbose else lf,
            stderr=subprocess.STDOUT if not verbose else None,
            stdin=subprocess.DEVNULL,
        )
    lib = tmp / f"{spec.name}.so"
    if proc.returncode != 0 or not lib.is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise BuildError(f"fastdpo: building the {spec.name} extension failed (exit code {proc.returncode})", str(log))
    (tmp / "build.json").write_text(
        json.dumps({"sha256": _sha256(lib), "torch": torch.__version__, "seconds": round(time.monotonic() - t0, 1)})
    )
    if entry.exists():  # a stale or corrupt entry: replace it
        shutil.rmtree(entry, ignore_errors=True)
    os.rename(tmp, entry)
    sys.stderr.write(f"fastdpo: built {spec.name} in {time.monotonic() - t0:.0f}s -> {entry}\n")


class _FileLock:
    def __init__(self, path: Path, what: str):
        self.path, self.what, self.fd = path, what, None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.stderr.write(f"fastdpo: waiting for another process that is building {self.what}\n")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _prebuilt(spec: ExtSpec) -> str | None:
    """An ahead-of-time build installed with the package (``FASTDPO_AOT=1``), if any."""
    found = importlib.util.find_spec(f"fastdpo._C_{spec.name.split('_', 1)[1]}")
    return found.origin if found and found.origin else None


def build_extension(which: str) -> Path:
    """Make sure the cache holds a good build of ``which``; return its library path."""
    spec = EXTENSIONS[which]
    if spec.cuda and not torch.version.cuda:
        raise BuildError("fastdpo: the CUDA extension needs a CUDA build of torch (this torch is CPU-only)")
    entry = cache_root() / f"{spec.name}-{_entry_key(spec)}"
    if not _entry_ok(entry, spec):
        with _FileLock(entry.parent / f"{entry.name}.lock", spec.name):
            if not _entry_ok(entry, spec):  # someone else may have built it meanwhile
                _compile(spec, entry)
    return _lib_path(entry, spec)


def load_extension(which: str) -> str:
    """Build (if needed) and load extension ``which`` ('cpu' or 'cuda') into this process."""
    with _load_lock:
        if which in _loaded:
            return _loaded[which]
        spec = EXTENSIONS[which]
        from fastdpo.ops import schema  # noqa: F401  (the op schemas must exist before kernels register)

        path = _prebuilt(spec)
        if path is None:
            lib = build_extension(which)
            try:
                torch.ops.load_library(str(lib))
            except OSError as e:  # unreadable despite a matching hash: drop it and build once more
                shutil.rmtree(lib.parent, ignore_errors=True)
                lib = build_extension(which)
                try:
                    torch.ops.load_library(str(lib))
                except OSError as e2:
                    raise BuildError(f"fastdpo: cannot load {lib}: {e2}") from e
            path = str(lib)
        else:
            torch.ops.load_library(path)
        _loaded[which] = path
        return path


def setuptools_extensions(csrc: Path):
    """Extensions for an ahead-of-time ``setup.py`` build (``FASTDPO_AOT=1``)."""
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    exts = []
    for key, spec in EXTENSIONS.items():
        if spec.cuda and not (torch.version.cuda and cuda_home()):
            continue
        if not all((Path(csrc) / src).is_file() for src in spec.sources):
            continue  # a backend whose sources are not part of this version
        fl = _flags(spec)
        cls = CUDAExtension if spec.cuda else CppExtension
        if spec.cuda:
            os.environ.setdefault("CUDA_HOME", cuda_home())
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", torch_arch_list())
        exts.append(
            cls(
                name=f"fastdpo._C_{key}",
                sources=[str(Path(csrc) / s) for s in spec.sources],
                include_dirs=fl["extra_include_paths"],
                extra_compile_args={"cxx": fl["extra_cflags"], "nvcc": fl["extra_cuda_cflags"]},
            )
        )
    return exts, {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}
