"""Out-of-range labels: a clear error on every backend, eager or under torch.compile, and never a
silently wrong log-prob from a kernel (the kernels return NaN for such a label).

On CPU tensors outside torch.compile the check is eager (a ValueError naming the label). On GPUs and
under torch.compile it is queued on the device with ``torch._assert_async`` (no host synchronisation;
on CPU tensors that assertion raises a RuntimeError with the same message).
"""

from __future__ import annotations

import math

import pytest
import torch

import fastdpo
from fastdpo import _backends

V = 11


def _triton_here() -> bool:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return _backends.unavailable_reason(_backends.Backend.TRITON, dev) is None


BACKENDS = ["torch", "cpu"] + (["triton"] if _triton_here() else [])


def _case(bad: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, V, generator=g)
    y = torch.randint(0, V, (2, 3), generator=g)
    y[0, 1] = -100
    y[1, 2] = bad
    return x, y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [V, V + 5, -1, -7])
def test_eager_out_of_range_label_is_a_clear_error(backend, bad):
    x, y = _case(bad)
    with pytest.raises(ValueError, match=rf"labels contain {bad}, outside the vocabulary \[0, {V}\)"):
        fastdpo.token_logprobs(x, y, backend=backend)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fastdpo.dpo_loss(torch.cat([x, x]), torch.cat([y, y]), ref_logits=torch.cat([x, x]), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_compiled_out_of_range_label_is_a_clear_error(backend, compile_backend):
    """Under torch.compile the label check is traced (a device-side assertion), so it still fires."""
    x, y = _case(V + 2)
    ok = y.clamp(min=-100, max=V - 1)

    def f(a, b):
        return fastdpo.token_logprobs(a, b, backend=backend, temperature=0.9)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    torch.testing.assert_close(compiled(x, ok), f(x, ok), rtol=1e-5, atol=1e-6)  # the graph runs at all
    with pytest.raises(RuntimeError, match=rf"outside the vocabulary \[0, {V}\)"):
        compiled(x, y)
    torch._dynamo.reset()


def test_compiled_dpo_loss_with_out_of_range_label_is_a_clear_error():
    x, y = _case(-3)
    xs, ys = torch.cat([x, x + 0.1]), torch.cat([y, y])

    def f(a, r, b):
        return fastdpo.dpo_loss(a, b, ref_logits=r, backend="cpu").loss

    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        torch.compile(f, backend="aot_eager")(xs, xs * 0.5, ys)
    torch._dynamo.reset()


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable here")
@pytest.mark.parametrize("bad", [V, -2])
@pytest.mark.parametrize("ref", [False, True])
def test_triton_kernel_gives_nan_not_a_clamped_logprob(bad, ref):
    """The kernel itself (no Python check in front) never returns the clamped label's log-prob."""
    x, y = _case(bad)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, y = x.to(dev), y.to(dev)
    r = x + 0.5 if ref else None
    logp, lse, ref_logp, st, _, _ = torch.ops.fastdpo.logprobs_fwd_triton(x, y, r, -100, 1.0, 0.0, True)
    assert math.isnan(logp[1, 2].item()), logp
    if ref:
        assert math.isnan(ref_logp[1, 2].item()), ref_logp
    good = torch.ones_like(y, dtype=torch.bool)
    good[1, 2] = False
    assert torch.isfinite(logp[good]).all()
    want = torch.log_softmax(x, -1).gather(-1, y.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logp[good & (y != -100)], want[good & (y != -100)], rtol=1e-5, atol=1e-5)


def test_cuda_kernel_source_returns_nan_for_a_bad_label():
    """The CUDA kernel (compiled, not run here) marks a label outside [0, V) as NaN rather than clamping silently."""
    from fastdpo import _build

    src = (_build.csrc_dir() / "cuda" / "logprobs_cuda.cu").read_text()
    assert "y != label" in src and "nan" in src


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_out_of_range_label_fails_without_a_host_sync(backend):
    """On CUDA the check is an asynchronous device assertion: the call returns, the next sync raises.
    Run in a child process since a device-side assertion leaves the CUDA context unusable."""
    import subprocess
    import sys

    code = f"""
import torch, fastdpo
x = torch.randn(2, 3, {V}, device="cuda"); y = torch.zeros(2, 3, dtype=torch.long, device="cuda"); y[1, 2] = {V}
lp = fastdpo.token_logprobs(x, y, backend="{backend}")
torch.cuda.synchronize()
print("no error", lp)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "no error" not in p.stdout, p.stdout
    assert "assert" in p.stderr.lower(), p.stderr[-2000:]
