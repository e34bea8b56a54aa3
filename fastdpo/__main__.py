"""Command line: ``python -m fastdpo info``, ``python -m fastdpo build`` and ``python -m fastdpo --version``."""

from __future__ import annotations

import argparse
import platform
import sys

import torch


def _info() -> int:
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


def main(argv: list[str] | None = None) -> int:
    from fastdpo._version import __version__

    parser = argparse.ArgumentParser(prog="python -m fastdpo", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fastdpo {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, cache location and which backends are usable")
    b = sub.add_parser("build", help="precompile the C++/CUDA extensions into the cache")
    b.add_argument("which", nargs="*", choices=["cpu", "cuda"], help="extensions to build (default: all available)")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        return _info()
    return _build_all(args.which or ["cpu", "cuda"])


if __name__ == "__main__":
    sys.exit(main())
