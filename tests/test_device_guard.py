"""Every Triton launch runs under a guard for its input's device (``kernels/_device.py``).

Two checks that fail when a launch site is outside the guard:

* dynamic: every kernel of ``kernels/triton_logprobs.py`` is launched through every entry point
  (the ``triton_op`` bodies and the building blocks) with the kernel class's launch entry
  instrumented; each launch must happen inside a guard for the device of its tensor arguments,
  and every kernel the module defines must have been launched (a new kernel needs a test here);
* static: in every module that uses the Triton kernels, each launch expression ``kernel[grid](...)``
  lies in a function decorated with ``on_input_device``.
"""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import pytest
import torch

from fastdpo import _backends
from fastdpo.kernels import _device

ROOT = Path(__file__).resolve().parents[1]
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")

needs_triton = pytest.mark.skipif(_backends.unavailable_reason(_backends.Backend.TRITON, DEV) is not None,
                                  reason="triton backend unavailable here")


def _kernels():
    from fastdpo.kernels import triton_logprobs as k

    cls = type(k.logprobs_fwd_kernel)
    # Launchable kernels are the public ones; ``_helpers`` are device functions called by kernels.
    return cls, {name: obj for name, obj in vars(k).items() if isinstance(obj, cls) and not name.startswith("_")}


def _exercise_every_entry_point():
    from fastdpo.kernels import triton as tk

    g = torch.Generator().manual_seed(0)
    B, T, V = 2, 3, 19
    x = torch.randn(B, T, V, generator=g).to(DEV)
    r = x + 0.3
    y = torch.randint(0, V, (B, T), generator=g).to(DEV)
    y[0, 0] = -100
    ops = torch.ops.fastdpo
    _, lse, _, _, _, rlse = ops.logprobs_fwd_triton(x, y, r, -100, 1.0, 0.0, True, True)
    ops.logprobs_fwd_triton(x, y, None, -100, 0.7, 3.0, False)
    grad = torch.randn(B, T, generator=g).to(DEV)
    ops.logprobs_bwd_triton(grad, x, y, lse, -100, 1.0, 0.0)
    ops.logprobs_bwd_triton(grad, x, y, lse, -100, 1.0, 0.0, grad, r, rlse)
    ops.logprobs_bwd_triton_(grad, x.clone(), y, lse, -100, 1.0, 0.0)
    # few rows of a larger vocabulary are split over it; the combine kernel merges the parts
    sms = tk._SM_INTERPRETED
    tk._SM_INTERPRETED = 132  # the interpreter does not split by default
    try:
        ops.logprobs_fwd_triton(torch.randn(1, 2, 5000, generator=g).to(DEV), y[:1, :2].contiguous(), None, -100,
                                1.0, 0.0, True)
    finally:
        tk._SM_INTERPRETED = sms
    tile, yt = x[0].contiguous(), y[0].clamp(min=0)
    m = torch.full((T,), float("-inf"), device=DEV)
    s, zy = torch.zeros(T, device=DEV), torch.zeros(T, device=DEV)
    tk.lse_fold(tile, yt, 0, m, s, zy)
    tk.tile_grad_(tile, yt, 0, m + s.log(), grad[0].contiguous())
    tk.segment_sum(torch.randn(7, generator=g).to(DEV), torch.tensor([0, 2, 5, 7], device=DEV))  # offsets


@needs_triton
def test_every_triton_launch_runs_under_a_guard_for_its_inputs_device(monkeypatch):
    cls, kernels = _kernels()
    launches = []
    run = cls.run

    def recording_run(self, *args, **kwargs):
        devices = {a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
        launches.append((self.fn.__name__, _device.guarded_device(), devices))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", recording_run)
    _exercise_every_entry_point()
    assert launches, "no kernel was launched"
    for name, guarded, devices in launches:
        assert guarded is not None, f"{name} was launched outside a device guard"
        assert devices == {guarded}, f"{name} was launched under a guard for {guarded} with tensors on {devices}"
    missing = set(kernels) - {name for name, _, _ in launches}
    assert not missing, f"kernels never launched by the entry points this test covers: {sorted(missing)}"


def _launch_sites_outside_guard(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    bad = []

    def guarded(fn: ast.AST) -> bool:
        return any("on_input_device" in ast.unparse(d) for d in getattr(fn, "decorator_list", ()))

    def visit(node, stack):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            inner = next((f for f in reversed(stack) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
            if inner is None or not guarded(inner):
                bad.append(f"{path.name}:{node.lineno}: {ast.unparse(node.func)}")
        for child in ast.iter_child_nodes(node):
            visit(child, stack + [node])

    visit(tree, [])
    return bad


def test_every_launch_site_is_in_a_guarded_function():
    users = [p for p in (ROOT / "fastdpo").rglob("*.py")
             if "triton_logprobs" in p.read_text() and p.name != "triton_logprobs.py"]
    assert any(p.name == "triton.py" for p in users)
    bad = [site for p in users if "bench" not in p.parts for site in _launch_sites_outside_guard(p)]
    assert not bad, "Triton launches outside an @on_input_device function:\n" + "\n".join(bad)


def test_the_scan_sees_an_unguarded_launch(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text("def f(x):\n    k.kern[(1,)](x)\n\n@on_input_device\ndef g(x):\n    k.kern[(1,)](x)\n")
    assert _launch_sites_outside_guard(src) == ["mod.py:2: k.kern[1,]"]


def test_guard_makes_the_input_device_current(monkeypatch):
    """For a tensor on cuda:1 the guard enters torch.cuda.device(cuda:1) (checked with a fake tensor)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    entered = []

    @contextlib.contextmanager
    def fake_cuda_device(d):
        entered.append(torch.device(d))
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)

    @_device.on_input_device
    def launch(scale, t):
        return _device.guarded_device()

    with FakeTensorMode(allow_non_fake_inputs=True):
        try:
            t = torch.empty(3, device="cuda:1")
        except (RuntimeError, AssertionError) as e:  # a torch that cannot fake CUDA tensors without a GPU
            pytest.skip(f"cannot create a fake CUDA tensor here: {e}")
    assert launch(2.0, t) == torch.device("cuda:1")
    assert entered == [torch.device("cuda:1")]
    assert _device.guarded_device() is None
    assert launch(2.0, torch.empty(2)) == torch.device("cpu") and entered == [torch.device("cuda:1")]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_on_the_second_gpu_while_the_first_is_current():
    import fastdpo

    x = torch.randn(3, 5, 1000, device="cuda:1", requires_grad=True)
    y = torch.randint(0, 1000, (3, 5), device="cuda:1")
    with torch.cuda.device(0):
        lp = fastdpo.token_logprobs(x, y, backend="triton")
        lp.sum().backward()
        want = torch.log_softmax(x.detach().float(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp, want, rtol=1e-5, atol=1e-5)
    assert x.grad.device == torch.device("cuda:1") and torch.isfinite(x.grad).all()


def test_cuda_binding_guards_the_device_and_launches_on_its_current_stream():
    """Each CUDA kernel launch in the C++ binding comes after a CUDAGuard for the input's device,
    and its stream is torch's current stream, taken after the guard (so: that device's)."""
    import re

    src = (ROOT / "csrc" / "cuda" / "bindings.cpp").read_text()
    launches = list(re.finditer(r"cuda::launch_\w+\(", src))
    assert launches
    for m in launches:
        fn_start = src.rfind("\n}", 0, m.start())  # end of the previous top-level function
        body = src[fn_start : m.start()]
        guard = re.search(r"c10::cuda::CUDAGuard\s+\w+\s*[({]\s*\w+\.device\(\)", body)
        assert guard, f"no CUDAGuard for the input's device before {m.group()} in bindings.cpp"
        stream = body.find("getCurrentCUDAStream(", guard.end())
        line_end = src.find(";", m.start())
        assert stream >= 0 or "getCurrentCUDAStream(" in src[m.start() : line_end], \
            f"{m.group()} does not use the current stream taken after the guard"
