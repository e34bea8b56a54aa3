"""Benchmark providers: one entry per implementation a user could pick.

A provider turns a :class:`Case` into a zero-argument ``step`` callable that
runs the requested mode (``fwd``, ``bwd`` or ``fwd+bwd``) once. Providers whose
package is missing or whose backend cannot run here are skipped with a note,
never faked. The same providers serve the CLI and the pytest-benchmark suites
under ``bench/``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Case:
    N: int
    V: int
    dtype: str  # key of DTYPES
    mode: str  # "fwd", "bwd" or "fwd+bwd"
    device: str = "cpu"
    seed: int = 0
    H: int = 0  # hidden size: > 0 for the fused-linear (hidden states + LM head) benchmark
    T: int = 256  # sequence length of the fused-linear batch (N = 2 * pairs * T)
    kl: bool = False  # log-probs plus the token-level KL to reference logits (RRPO / TDPO)
    softcap: float = 0.0  # Gemma-style soft cap of the logits paths (0 = none)

    @property
    def linear(self) -> bool:
        return self.H > 0

    def label(self) -> str:
        if self.linear:
            return f"linear {self.mode} {self.dtype} N={self.N} H={self.H} V={self.V}"
        cap = f" cap={self.softcap:g}" if self.softcap else ""
        return f"{'kl ' if self.kl else ''}{self.mode} {self.dtype} N={self.N} V={self.V}{cap}"


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    kind: str  # "fastdpo", "reference" (fastdpo's plain-torch oracle and fallback), "variant", "anchor" or "floor"
    build: Callable[[Case], Callable[[], None]]
    unavailable: Callable[[str], str | None] = lambda device: None  # None = runnable, else the reason
    impl: str = ""  # the implementation across suites (one colour per implementation in every plot)
    label: str = ""  # how plots name it (default: its implementation's label)

    @property
    def style(self) -> "Style":
        return STYLES[self.impl or self.name]

    @property
    def display(self) -> str:
        return self.label or self.style.label


@dataclasses.dataclass(frozen=True)
class Style:
    """How an implementation is named and drawn in every plot."""

    label: str
    color: str
    hatch: str = ""


# One entry per implementation; the token_logprobs, fused-linear and token-KL providers of the same
# implementation share it (Provider.impl), so a colour means the same thing in every plot.
STYLES = {
    "fastdpo-cpu": Style("fastdpo cpu", "#1f77b4"),
    "fastdpo-cpu-inplace": Style("fastdpo cpu, inplace_backward", "#17becf"),
    "fastdpo-triton": Style("fastdpo triton", "#2ca02c"),
    "fastdpo-cuda": Style("fastdpo cuda", "#9467bd"),
    "fastdpo-torch": Style("fastdpo torch backend (the reference; fallback)", "#c5b0d5", "//"),
    "fastdpo-cpu-diag": Style("fastdpo cpu, diagnostics=True", "#aec7e8", "xx"),
    "fastdpo-triton-diag": Style("fastdpo triton, diagnostics=True", "#98df8a", "xx"),
    "fastdpo-cuda-diag": Style("fastdpo cuda, diagnostics=True", "#b5a3d9", "xx"),
    "naive": Style("naive torch + autograd", "#d62728"),
    "naive-compile": Style("torch.compile of naive", "#ff7f0e"),
    "trl": Style("TRL", "#8c564b"),
    "liger": Style("Liger", "#e377c2"),
    "cce": Style("Cut Cross-Entropy", "#393b79"),
    "floor": Style("floor (unavoidable work)", "#7f7f7f", ".."),
    "floor-response": Style("floor over response tokens", "#bcbd22", ".."),
}


def _inputs(case: Case):
    """Logits and labels, filled in row blocks so that creating them never
    allocates more than the logits themselves (peak-memory accounting)."""
    g = torch.Generator(device="cpu").manual_seed(case.seed)
    x = torch.empty(case.N, case.V, device=case.device, dtype=DTYPES[case.dtype])
    step = max(1, (1 << 22) // case.V)
    for i in range(0, case.N, step):
        x[i : i + step] = torch.randn(min(step, case.N - i), case.V, generator=g).to(x.device, x.dtype)
    y = torch.randint(0, case.V, (case.N,), generator=g).to(case.device)
    return x, y


def _mode_step(mode: str, forward: Callable[[], None], loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """The step of ``mode``: ``forward()`` without grad (fwd), ``loss().backward()`` (fwd+bwd), or
    the backward of a ``loss()`` built untimed by ``step.prepare`` (bwd)."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                forward()
        return step
    if mode == "fwd+bwd":
        return lambda: loss().backward()

    def prepare():
        timed.pending = loss()

    def timed():
        timed.pending.backward()

    timed.prepare = prepare
    return timed


def _softcapped(fn: Callable, softcap: float) -> Callable:
    """``fn`` under the case's soft cap: fastdpo takes it as an option (``fn.softcap``), the
    others see the capped logits c * tanh(x / c), as a model's LM head hands them over."""
    if not softcap:
        return fn
    if getattr(fn, "softcap", False):
        return lambda *a: fn(*a, softcap=softcap)

    def capped(*a):
        return fn(*(softcap * torch.tanh(t / softcap) if t.is_floating_point() else t for t in a))

    return capped


def _logprob_step(fn: Callable, case: Case) -> Callable[[], None]:
    """Wrap ``fn(x, y) -> logps`` as a step of the requested mode."""
    fn = _softcapped(fn, case.softcap)
    x, y = _inputs(case)
    xr = x.clone().requires_grad_() if case.mode != "fwd" else None
    w = torch.randn(case.N, device=case.device)
    # In-place backward needs logits produced by an op (as an LM head's output);
    # a view of the input stands in, so the gradient overwrites the input itself.
    nonleaf = getattr(fn, "needs_nonleaf", False)

    def loss():
        xr.grad = None
        return (fn(xr.view_as(xr) if nonleaf else xr, y).float() * w).sum()

    step = _mode_step(case.mode, lambda: fn(x, y), loss)
    if case.mode == "bwd":
        step.prepare()  # a graph exists before the first timed call
    return step


def _fastdpo(backend: str, device: str, inplace: bool = False):
    import fastdpo
    from fastdpo import _backends

    _backends.resolve(backend, torch.device(device))  # load native code before memory accounting

    def fn(x, y, softcap=None):
        return fastdpo.token_logprobs(x, y, backend=backend, inplace_backward=inplace, softcap=softcap)

    fn.needs_nonleaf = inplace  # in-place backward needs logits produced by an op (as from an LM head)
    fn.softcap = True
    return fn


def _fastdpo_unavailable(backend: str):
    def check(device: str) -> str | None:
        from fastdpo import _backends

        return _backends.unavailable_reason(_backends.Backend(backend), torch.device(device))

    return check


def _naive(x, y):
    return torch.log_softmax(x.float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


# Anchors are loaded when the provider is built, before memory accounting
# starts, so one-time import costs are not charged to the step.


def _naive_compiled():
    import torch._inductor.compile_fx  # noqa: F401  (import cost outside the measurement)

    return torch.compile(_naive, dynamic=False)


def _trl_selective():
    from trl.trainer.utils import selective_log_softmax

    return selective_log_softmax


def _missing(module: str, pip_name: str):
    def check(device: str) -> str | None:
        return None if importlib.util.find_spec(module) else f"{pip_name} is not installed (pip install {pip_name})"

    return check


def _floor(case: Case) -> Callable[[], None]:
    """What no logits-input method avoids: read the logits (forward), then read
    them again and write a gradient of the same size (backward)."""
    x, _ = _inputs(case)
    out = torch.empty_like(x)
    if case.mode == "fwd":
        return lambda: x.sum()
    if case.mode == "bwd":
        return lambda: out.copy_(x)

    def step():
        x.sum()
        out.copy_(x)

    return step


# ----------------------------------------------------------------------------- token-level KL
# Per-token log-probs and KL(reference || policy) over the vocabulary from policy and reference
# logits (what RRPO and TDPO need); the step's loss is sum(w * logp) + sum(wk * kl).


def _kl_step(fn: Callable, case: Case) -> Callable[[], None]:
    """Wrap ``fn(x, r, y) -> (logps, kl)`` as a step of the requested mode."""
    fn = _softcapped(fn, case.softcap)
    x, y = _inputs(case)
    r, _ = _inputs(dataclasses.replace(case, seed=case.seed + 1))
    w, wk = torch.randn(case.N, device=case.device), torch.randn(case.N, device=case.device)
    xr = x.clone().requires_grad_() if case.mode != "fwd" else None

    def loss():
        xr.grad = None
        lp, kl = fn(xr, r, y)
        return (lp.float() * w).sum() + (kl.float() * wk).sum()

    return _mode_step(case.mode, lambda: fn(x, r, y), loss)


def _fastdpo_kl(backend: str, device: str):
    import fastdpo
    from fastdpo import _backends

    _backends.resolve(backend, torch.device(device))

    def fn(x, r, y, softcap=None):
        out = fastdpo.fused_logprobs(x, y, ref_logits=r, kl=True, backend=backend, softcap=softcap)
        return out.logps, out.kl

    fn.softcap = True
    return fn


def _naive_kl(x, r, y):
    """As the RRPO / TDPO reference code computes it: full log-softmaxes of both, the KL sum."""
    logp = torch.log_softmax(x.float(), dim=-1)
    logq = torch.log_softmax(r.float(), dim=-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    return logp.gather(-1, y.unsqueeze(-1)).squeeze(-1), kl


def _kl_floor(case: Case) -> Callable[[], None]:
    """What no logits-input method avoids: read both logits (forward), read both again and write
    the gradient (backward)."""
    x, _ = _inputs(case)
    r = x.clone()
    out = torch.empty_like(x)
    if case.mode == "fwd":
        return lambda: (x.sum(), r.sum())
    if case.mode == "bwd":
        return lambda: torch.add(x, r, out=out)

    def step():
        x.sum()
        r.sum()
        torch.add(x, r, out=out)

    return step


KL_PROVIDERS: list[Provider] = [
    Provider(f"fastdpo-{b}-kl", "reference" if b == "torch" else "fastdpo",
             (lambda b: lambda c: _kl_step(_fastdpo_kl(b, c.device), c))(b), _fastdpo_unavailable(b), f"fastdpo-{b}")
    for b in ("cpu", "triton", "cuda", "torch")
] + [
    Provider("naive-kl", "anchor", lambda c: _kl_step(_naive_kl, c), impl="naive",
             label="naive: two log_softmaxes + KL + autograd"),
    Provider("floor-kl", "floor", _kl_floor, impl="floor", label="floor: read both logits twice, write the gradient"),
]


LOGPROB_PROVIDERS: list[Provider] = [
    Provider("fastdpo-cpu", "fastdpo", lambda c: _logprob_step(_fastdpo("cpu", c.device), c),
             _fastdpo_unavailable("cpu")),
    Provider("fastdpo-cpu-inplace", "fastdpo", lambda c: _logprob_step(_fastdpo("cpu", c.device, True), c),
             _fastdpo_unavailable("cpu")),
    Provider("fastdpo-triton", "fastdpo", lambda c: _logprob_step(_fastdpo("triton", c.device), c),
             _fastdpo_unavailable("triton")),
    Provider("fastdpo-cuda", "fastdpo", lambda c: _logprob_step(_fastdpo("cuda", c.device), c),
             _fastdpo_unavailable("cuda")),
    Provider("fastdpo-torch", "reference", lambda c: _logprob_step(_fastdpo("torch", c.device), c),
             _fastdpo_unavailable("torch")),
    Provider("naive", "anchor", lambda c: _logprob_step(_naive, c)),
    Provider("naive-compile", "anchor", lambda c: _logprob_step(_naive_compiled(), c)),
    Provider("trl-selective", "anchor", lambda c: _logprob_step(_trl_selective(), c), _missing("trl", "trl"), "trl",
             "TRL selective_log_softmax"),
    Provider("floor", "floor", _floor, label="floor: read the logits, write the gradient"),
]


# ----------------------------------------------------------------------------- fused linear
# DPO (sigmoid, beta = 0.1) from hidden states and the LM head, policy forward +
# backward and reference forward, as a trainer step runs it. The batch is
# [chosen; rejected], T tokens each, the first quarter of every sequence prompt.


def _linear_inputs(case: Case):
    g = torch.Generator(device="cpu").manual_seed(case.seed)
    dt = DTYPES[case.dtype]
    seqs = case.N // case.T
    if seqs < 2 or seqs % 2:
        raise ValueError(f"fused-linear case needs N = 2 * pairs * T; got N={case.N}, T={case.T}")
    h = (torch.randn(seqs, case.T, case.H, generator=g)).to(case.device, dt).requires_grad_()
    rh = (torch.randn(seqs, case.T, case.H, generator=g)).to(case.device, dt)
    w = (torch.randn(case.V, case.H, generator=g) / case.H**0.5).to(case.device, dt).requires_grad_()
    y = torch.randint(0, case.V, (seqs, case.T), generator=g).to(case.device)
    y[:, : case.T // 4] = -100
    return h, rh, w, y


def _sigmoid_dpo(logps: torch.Tensor, ref: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    n = logps.shape[0] // 2
    d = (logps[:n] - ref[:n]) - (logps[n:] - ref[n:])
    return -torch.nn.functional.logsigmoid(beta * d).mean()


def _linear_step(loss_fn: Callable, case: Case) -> Callable[[], None]:
    """``loss_fn(h, rh, w, y) -> loss``; fwd runs it without grad, fwd+bwd with backward."""
    h, rh, w, y = _linear_inputs(case)

    def loss():
        h.grad = w.grad = None
        return loss_fn(h, rh, w, y)

    return _mode_step(case.mode, lambda: loss_fn(h, rh, w, y), loss)


def _fastdpo_linear(backend: str, device: str, diagnostics: bool = False):
    import fastdpo
    from fastdpo import _backends

    _backends.resolve(backend, torch.device(device))

    def loss(h, rh, w, y):
        return fastdpo.linear_dpo_loss(h, w, y, ref_hidden=rh, loss_type="sigmoid", beta=0.1, backend=backend,
                                       diagnostics=diagnostics).loss

    return loss


def _naive_linear(h, rh, w, y):
    mask = y != -100

    def seq_logps(hid, weight):
        lp = torch.log_softmax((hid @ weight.T).float(), -1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (lp * mask).sum(-1)

    with torch.no_grad():
        ref = seq_logps(rh, w)
    return _sigmoid_dpo(seq_logps(h, w), ref)


def _trl_chunked():
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE, ChunkedLogProbFunction

    def loss(h, rh, w, y):
        mask = y != -100
        H = h.shape[-1]

        def seq_logps(hid, weight):
            lp = ChunkedLogProbFunction.apply(hid.reshape(-1, H), weight, None, y.clamp(min=0).reshape(-1), 1.0,
                                              TOKEN_CHUNK_SIZE, None, 1.0, ())[0]
            return (lp.view(y.shape) * mask).sum(-1)

        with torch.no_grad():
            ref = seq_logps(rh, w)
        return _sigmoid_dpo(seq_logps(h, w), ref)

    return loss


def _liger_dpo():
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    mod = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=True)

    def loss(h, rh, w, y):
        return mod(w, h, y, ref_input=rh, ref_weight=w.detach())[0]

    return loss


def _cce_dpo():
    """Apple's Cut Cross-Entropy: per-token log-probs as minus its unreduced loss."""
    from cut_cross_entropy import linear_cross_entropy

    def loss(h, rh, w, y):
        mask = y != -100

        def seq_logps(hid, weight):
            nll = linear_cross_entropy(hid, weight, y, ignore_index=-100, reduction="none")
            return -(nll.float() * mask).sum(-1)

        with torch.no_grad():
            ref = seq_logps(rh, w)
        return _sigmoid_dpo(seq_logps(h, w), ref)

    return loss


def _gemm_floor(case: Case, response_only: bool = False) -> Callable[[], None]:
    """The GEMMs no exact method avoids: policy logits, their two gradients
    (w.r.t. hidden and weight) and the reference logits; over every token, or
    (``response_only``) only over the tokens that are not ``ignore_index``."""
    h, rh, w, y = _linear_inputs(case)
    h2, rh2, wd = h.detach().reshape(-1, case.H), rh.reshape(-1, case.H), w.detach()
    if response_only:
        keep = (y != -100).reshape(-1)
        h2, rh2 = h2[keep].contiguous(), rh2[keep].contiguous()
    if case.mode == "fwd":
        return lambda: (h2 @ wd.T, rh2 @ wd.T)

    # CPU bf16/fp16 GEMMs are fast only as "A @ B.T" with both operands contiguous, so the
    # floor uses that layout (the transposes are a few percent of a GEMM).
    nt = case.device == "cpu" and case.dtype != "fp32"

    def step():
        g = h2 @ wd.T  # stands in for the logits gradient
        if nt:
            g @ wd.T.contiguous().T
            g.T.contiguous() @ h2.T.contiguous().T
        else:
            g @ wd
            g.T @ h2
        if case.mode == "fwd+bwd":
            rh2 @ wd.T

    return step


LINEAR_PROVIDERS: list[Provider] = [
    Provider("fastdpo-linear-cpu", "fastdpo", lambda c: _linear_step(_fastdpo_linear("cpu", c.device), c),
             _fastdpo_unavailable("cpu"), "fastdpo-cpu"),
    Provider("fastdpo-linear-triton", "fastdpo", lambda c: _linear_step(_fastdpo_linear("triton", c.device), c),
             _fastdpo_unavailable("triton"), "fastdpo-triton"),
    Provider("fastdpo-linear-cuda", "fastdpo", lambda c: _linear_step(_fastdpo_linear("cuda", c.device), c),
             _fastdpo_unavailable("cuda"), "fastdpo-cuda"),
    Provider("naive-linear", "anchor", lambda c: _linear_step(_naive_linear, c), impl="naive",
             label="naive: full logits + autograd"),
    Provider("trl-chunked", "anchor", lambda c: _linear_step(_trl_chunked(), c), _missing("trl", "trl"), "trl",
             "TRL ChunkedLogProbFunction"),
    Provider("liger-dpo", "anchor", lambda c: _linear_step(_liger_dpo(), c), _missing("liger_kernel", "liger-kernel"),
             "liger", "Liger LigerFusedLinearDPOLoss"),
    Provider("cce-dpo", "anchor", lambda c: _linear_step(_cce_dpo(), c),
             lambda device: _missing("cut_cross_entropy", "cut-cross-entropy")(device) or (
                 None if device.startswith("cuda") else "Cut Cross-Entropy runs on CUDA devices only"),
             "cce", "Cut Cross-Entropy (DPO from its per-token losses)"),
    Provider("floor-gemm", "floor", _gemm_floor, impl="floor", label="floor: the 4 GEMMs over every token"),
    Provider("floor-gemm-response", "floor", lambda c: _gemm_floor(c, response_only=True), impl="floor-response",
             label="floor: the 4 GEMMs over response tokens"),
]

# The same fused-linear step with the training-dynamics diagnostics on (docs/diagnostics.md), to read their
# cost against the plain fastdpo row. Kind "variant": neither an anchor nor a candidate for "fastest fastdpo".
LINEAR_PROVIDERS += [
    Provider(f"fastdpo-linear-{b}-diag", "variant",
             (lambda b: lambda c: _linear_step(_fastdpo_linear(b, c.device, diagnostics=True), c))(b),
             _fastdpo_unavailable(b), f"fastdpo-{b}-diag")
    for b in ("cpu", "triton", "cuda")
]

PROVIDERS = {p.name: p for p in LOGPROB_PROVIDERS + LINEAR_PROVIDERS + KL_PROVIDERS}
