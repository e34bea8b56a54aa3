"""Command line: ``python -m fastdpo info``, ``python -m fastdpo build`` and ``python -m fastdpo --version``."""

from __future__ import annotations

import argparse
import platform
import sys

# The keys of fastdpo._build.EXTENSIONS, here so that the parser needs no torch import.
EXTENSION_NAMES = ("cpu", "cuda")


def _info() -> int:
    import torch

    import fastdpo
    from fastdpo import _backends, _build

    print(f"fastdpo {fastdpo.__version__}")
    print(f"python  {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton  {triton.__version__}")
    except ImportError:
        print("triton  not installed")
    print(f"cache   {_build.cache_root()}")
    print(f"cuda    toolkit: {_build.cuda_home() or 'not found'}; device: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in devices:
        print(f"\nbackends on {dev.type}:")
        for b in _backends.Backend:
            if b is _backends.Backend.AUTO:
                continue
            reason = _backends.unavailable_reason(b, dev)
            print(f"  {b.value:<7} {'usable' if reason is None else 'unavailable: ' + reason.splitlines()[0]}")
        print(f"  auto -> {_backends.resolve('auto', dev).value}")
    return 0


def _build_all(which: list[str]) -> int:
    import torch

    from fastdpo import _build

    failed = 0
    for name in which:
        spec = _build.EXTENSIONS[name]
        if spec.cuda and not torch.version.cuda:
            print(f"skip   {name}: torch is a CPU-only build")
            continue
        if spec.cuda and not _build.cuda_home():
            print(f"skip   {name}: no CUDA toolkit found (set CUDA_HOME)")
            continue
        try:
            path = _build.build_extension(name)
            print(f"built  {name}: {path}")
        except _build.BuildError as e:
            failed += 1
            print(f"FAILED {name}: {e}")
    return 1 if failed else 0


def _extension(name: str) -> str:
    # Checked per argument rather than with choices=: Python < 3.12 checks the empty default of
    # nargs="*" against choices and rejects a bare "build".
    if name not in EXTENSION_NAMES:
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {', '.join(map(repr, EXTENSION_NAMES))})")
    return name


def _version() -> str:
    # read from the file rather than imported: importing fastdpo imports torch, and the parser needs neither
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).parent / "_version.py").read_text())
    return next(n.value.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "__version__")


def parser() -> argparse.ArgumentParser:
    __version__ = _version()
    p = argparse.ArgumentParser(prog="python -m fastdpo", description=__doc__)
    p.add_argument("--version", action="version", version=f"fastdpo {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, cache location and which backends are usable")
    b = sub.add_parser("build", help="precompile the C++/CUDA extensions into the cache")
    b.add_argument("which", nargs="*", type=_extension, metavar="{" + ",".join(EXTENSION_NAMES) + "}",
                   help="extensions to build (default: all available)")
    return p


def which(args: argparse.Namespace) -> list[str]:
    """The extensions ``build`` was asked for (all of them by default)."""
    return list(args.which) or list(EXTENSION_NAMES)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.cmd == "info":
        return _info()
    return _build_all(which(args))


if __name__ == "__main__":
    sys.exit(main())
