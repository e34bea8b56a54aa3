"""Training-dynamics diagnostics (``diagnostics=True``) against a direct full-logits autograd computation.

The truth (tests/_diag_truth.py) is computed from the formulas, in float64, on the full ``[N, T, V]``
logits: log_softmax, sequence sums, the objective written out again, ``torch.autograd.grad`` for the
per-pair weights and ``.backward()`` to the logits for the gradient norms. fastdpo computes the same quantities from the fused
pass's per-token outputs (log-probs and ``log sum p^2``) in float32.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

import fastdpo
from fastdpo import _backends
from fastdpo.losses.diagnostics import PREFIX, Diagnostics

sys.path.insert(0, os.path.dirname(__file__))
from _diag_truth import BETA, OBJECTIVES, _token_logps, check, loss_sigmoid, truth  # noqa: E402
from test_losses import V, _data  # noqa: E402  (logits, reference logits, labels with prompt and padding)

TRITON = _backends.unavailable_reason(_backends.Backend.TRITON, torch.device("cpu")) is None
BACKENDS = ["torch", "cpu", pytest.param("triton", marks=[pytest.mark.skipif(not TRITON, reason="triton unavailable"),
                                                   pytest.mark.filterwarnings("ignore::RuntimeWarning")])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_dpo_loss_diagnostics_match_full_logits_autograd(name, backend):
    opts, uses_ref, unpaired, _ = OBJECTIVES[name]
    logits, ref, labels = _data(6, seed=len(name))
    x = logits.clone().requires_grad_(True)
    out = fastdpo.dpo_loss(x, labels, ref_logits=ref if uses_ref else None, beta=BETA, backend=backend,
                           diagnostics=True, **opts)
    want, loss, w = truth(name, logits.double().requires_grad_(True), ref, labels)
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-5, atol=0.0)
    check(out, want)
    torch.testing.assert_close(out.diagnostics.weights.double(), w, rtol=1e-5, atol=0.0)


def _linear_batch():
    """Hidden states, an LM head (weight, bias), reference hidden states and labels: 3 pairs of 7 tokens."""
    g = torch.Generator().manual_seed(7)
    n, T, H = 6, 7, 8
    hidden = torch.randn(n, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.7
    bias = torch.randn(V, generator=g) * 0.1
    ref_hidden = hidden + 0.3 * torch.randn(n, T, H, generator=g)
    return hidden, weight, bias, ref_hidden, _data(n, T, seed=3)[2]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("strategy", ["recompute", "grad_in_forward"])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_linear_dpo_loss_diagnostics_match_full_logits_autograd(name, strategy, backend):
    """Through the fused-linear path the gradient norms are w.r.t. the logits the tiles hold."""
    opts, uses_ref, unpaired, _ = OBJECTIVES[name]
    hidden, weight, bias, ref_hidden, labels = _linear_batch()
    h, w_, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    out = fastdpo.linear_dpo_loss(h, w_, labels, bias=b, ref_hidden=ref_hidden if uses_ref else None, beta=BETA,
                                  backend=backend, strategy=strategy, memory_budget=9 * V * 4, diagnostics=True,
                                  **opts)
    out.loss.backward()
    h64 = hidden.double().requires_grad_(True)
    logits = h64 @ weight.double().t() + bias.double()
    ref_logits = ref_hidden.double() @ weight.double().t() + bias.double()
    want, loss, _ = truth(name, logits, ref_logits, labels)
    check(out, want)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-7)  # the loss gradient is unchanged


def test_sigmoid_weight_is_beta_sigmoid_of_minus_beta_margin():
    logits, ref, labels = _data(8, seed=1)
    out = fastdpo.dpo_loss(logits, labels, ref_logits=ref, beta=0.3, diagnostics=True, backend="torch")
    delta = (out.chosen_rewards - out.rejected_rewards) / 0.3
    torch.testing.assert_close(out.diagnostics.weights, 0.3 * torch.sigmoid(-0.3 * delta), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_kto_with_a_desirable_mask(backend):
    logits, ref, labels = _data(5, seed=2)
    desirable = torch.tensor([True, False, False, True, False])
    opts = OBJECTIVES["kto"][0]
    out = fastdpo.dpo_loss(logits, labels, ref_logits=ref, beta=BETA, backend=backend, desirable=desirable,
                           diagnostics=True, **opts)
    want, _, _ = truth("kto", logits.double().requires_grad_(True), ref, labels, desirable=desirable)
    assert PREFIX + "margin/mean" not in want  # 2 desirable, 3 undesirable: no pairs, no margins
    check(out, want)


@pytest.mark.parametrize("temperature, softcap", [(0.7, None), (1.3, 5.0)])
def test_temperature_and_softcap(temperature, softcap):
    """1/T scales the norm exactly; with a soft cap the norm reported is w.r.t. the capped logits, an upper
    bound of the norm w.r.t. the raw logits (d tanh <= 1)."""
    g = torch.Generator().manual_seed(5)
    n, T, H = 4, 7, 8
    hidden, weight = torch.randn(n, T, H, generator=g), torch.randn(V, H, generator=g) * 2
    ref_hidden = hidden + 0.3 * torch.randn(n, T, H, generator=g)
    labels = _data(n, T, seed=6)[2]
    out = fastdpo.linear_dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, beta=BETA, backend="cpu",
                                  temperature=temperature, softcap=softcap, logit_scale=1.5, diagnostics=True)
    logits = (1.5 * hidden.double() @ weight.double().t()).requires_grad_(True)
    ref_logits = 1.5 * ref_hidden.double() @ weight.double().t()
    want, _, _ = truth("sigmoid", logits, ref_logits, labels, temperature=temperature, softcap=softcap)
    check(out, want)
    raw = logits.grad.norm()
    if softcap:
        assert raw < want[PREFIX + "grad_norm/total"][0] * (1 - 1e-3)  # strictly below: the cap bites here
    else:
        torch.testing.assert_close(raw, want[PREFIX + "grad_norm/total"][0], rtol=1e-12, atol=0.0)


def test_no_grad_evaluation_gives_the_same_diagnostics():
    logits, ref, labels = _data(6, seed=4)
    x = logits.clone().requires_grad_(True)
    a = fastdpo.dpo_loss(x, labels, ref_logits=ref, diagnostics=True, backend="cpu")
    with torch.no_grad():
        b = fastdpo.dpo_loss(x, labels, ref_logits=ref, diagnostics=True, backend="cpu")
    assert not b.loss.requires_grad and not b.chosen_logps.requires_grad and not b.policy_logps.requires_grad
    for k, v in a.metrics.items():
        torch.testing.assert_close(b.metrics[k], v, rtol=0, atol=0, msg=k)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        fastdpo.dpo_loss(logits, labels, ref_logits=ref, diagnostics=True, backend="cpu")


def test_diagnostics_change_neither_loss_nor_gradient_and_are_off_by_default():
    logits, ref, labels = _data(6, seed=5)
    grads, outs = [], []
    for diag in (False, True):
        x = logits.clone().requires_grad_(True)
        out = fastdpo.dpo_loss(x, labels, ref_logits=ref, loss_type=["sigmoid", "sft"], diagnostics=diag,
                               backend="cpu")
        out.loss.backward()
        grads.append(x.grad)
        outs.append(out)
    off, on = outs
    assert off.diagnostics is None and not any(k.startswith(PREFIX) for k in off.metrics)
    assert torch.equal(off.loss, on.loss.detach()) and torch.equal(grads[0], grads[1])
    assert {k: v for k, v in on.metrics.items() if not k.startswith(PREFIX)}.keys() == off.metrics.keys()


def test_module_forms_take_the_flag():
    logits, ref, labels = _data(4, seed=6)
    out = fastdpo.DPOLoss(loss_type="ipo", diagnostics=True, backend="torch")(logits, labels, ref_logits=ref)
    assert out.diagnostics is not None and PREFIX + "weight/mean" in out.metrics
    hidden, weight = torch.randn(*labels.shape, 8), torch.randn(V, 8)
    out = fastdpo.LinearDPOLoss(loss_type="simpo", diagnostics=True)(hidden, weight, labels)
    assert PREFIX + "grad_norm/ratio" in out.metrics and PREFIX + "logratio/chosen" not in out.metrics  # ref-free


def test_bad_flag_is_refused_before_the_kernel_runs():
    logits, ref, labels = _data(4)
    with pytest.raises(TypeError, match="diagnostics must be True or False"):
        fastdpo.dpo_loss(logits, labels, ref_logits=ref, diagnostics="yes")
    with pytest.raises(TypeError, match="diagnostics must be True or False"):
        fastdpo.linear_dpo_loss(torch.randn(*labels.shape, 8), torch.randn(V, 8), labels, diagnostics=1)


def test_gathered_halves_equal_the_whole_batch():
    """Two processes with half the pairs each, gathered, give the diagnostics of the whole batch (the
    DDP-averaged gradient of the mean loss)."""
    logits, ref, labels = _data(8, seed=8)
    whole = fastdpo.dpo_loss(logits, labels, ref_logits=ref, diagnostics=True, backend="cpu")
    parts = []
    for half in (slice(0, 2), slice(2, 4)):
        rows = torch.cat([torch.arange(8)[half], torch.arange(8)[half] + 4])
        parts.append(fastdpo.dpo_loss(logits[rows], labels[rows], ref_logits=ref[rows], diagnostics=True,
                                      backend="cpu").diagnostics)
    fields = [f.name for f in dataclasses.fields(Diagnostics)]

    def gather(x):  # as accelerator.gather: this process's tensor, concatenated with the other's
        name = next(f for f in fields if getattr(parts[0], f) is x)
        return torch.cat([getattr(p, name) for p in parts])

    merged = parts[0].gathered(gather).summary()
    for k, v in whole.metrics.items():
        if k.startswith(PREFIX):
            torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=0.0, msg=k)


def test_token_kl_objectives_report_the_log_prob_term():
    """rrpo / tdpo: the KL term's logits gradient (p - q) is not in the norms (docs/diagnostics.md)."""
    logits, ref, labels = _data(4, seed=9)
    out = fastdpo.dpo_loss(logits, labels, ref_logits=ref, loss_type="rrpo", rrpo_alpha=0.5, diagnostics=True,
                           backend="cpu")
    x = logits.double().requires_grad_(True)
    tok = _token_logps(x, labels)[0]
    rtok = _token_logps(ref.double(), labels)[0]
    pol, rr = tok.sum(1), rtok.sum(1)
    loss_sigmoid(pol, rr, None, None).backward()  # the log-prob term of rrpo; its KL term has no log-prob
    torch.testing.assert_close(out.metrics[PREFIX + "grad_norm/total"].double(), x.grad.norm(), rtol=1e-5, atol=0.0)


def test_benchmark_variant_runs_the_step_with_diagnostics_on(monkeypatch):
    """``fastdpo-linear-cpu-diag`` (the benchmark row the overhead is read from) is the fused-linear step of
    ``fastdpo-linear-cpu`` with diagnostics on."""
    from fastdpo.bench.providers import PROVIDERS, Case

    seen = []
    real = fastdpo.linear_dpo_loss

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((kwargs["diagnostics"], out.diagnostics is not None))
        return out

    monkeypatch.setattr(fastdpo, "linear_dpo_loss", spy)
    case = Case(512, 300, "fp32", "fwd+bwd", H=16)
    for name, want in (("fastdpo-linear-cpu-diag", True), ("fastdpo-linear-cpu", False)):
        assert PROVIDERS[name].kind == ("variant" if want else "fastdpo")
        PROVIDERS[name].build(case)()
        assert seen.pop() == (want, want)


_EVERY = {"kto": dict(kl=0.0), "exo_pair": dict(label_smoothing=1e-3), "plackett_luce": dict(num_responses=3),
          "adpo": dict(num_responses=3), "tpo": {}}


@pytest.mark.parametrize("name", fastdpo.available_losses())
def test_every_objective(name):
    """Every registered objective: the diagnostics are finite (the weight too: autograd, no per-loss formula),
    the loss is unchanged, and the total gradient norm is the norm of the real logits gradient (objectives
    with the token-level KL: of its log-prob term, checked in test_token_kl_objectives_report_the_log_prob_term)."""
    spec = fastdpo.get_loss(name)
    opts = _EVERY.get(name, {})
    logits, ref, labels = _data(9 if name in ("plackett_luce", "adpo", "tpo") else 6, seed=11)
    ref_logits = None if spec.reference == "unused" else ref
    outs = []
    for diag in (False, True):
        x = logits.clone().requires_grad_(True)
        out = fastdpo.dpo_loss(x, labels, ref_logits=ref_logits, loss_type=name, diagnostics=diag, backend="cpu",
                               **opts)
        out.loss.backward()
        outs.append((out, x.grad))
    (off, g_off), (on, g_on) = outs
    assert torch.equal(off.loss, on.loss) and torch.equal(g_off, g_on)
    d = {k: v for k, v in on.metrics.items() if k.startswith(PREFIX)}
    assert (PREFIX + "logratio/chosen" in d) == (ref_logits is not None)
    assert all(torch.isfinite(v) for k, v in d.items() if not k.endswith("grad_norm/ratio")), d
    if not spec.token_kl:
        torch.testing.assert_close(d[PREFIX + "grad_norm/total"], g_on.norm(), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("grad", [True, False])
def test_bco_running_mean_is_updated_once_per_call(grad):
    """The loss is evaluated once with diagnostics on (a second evaluation would update the running mean twice)."""
    logits, ref, labels = _data(6, seed=12)
    loss = fastdpo.BCOLoss(diagnostics=True, backend="cpu")
    with torch.set_grad_enabled(grad):
        for _ in range(3):
            loss(logits.clone().requires_grad_(grad), labels, ref_logits=ref)
    assert loss.running.count.item() == 3


# ----------------------------------------------------------------------------- packed (padding-free) batches



def _pack(x, labels):
    """Each sequence's rows up to its last scored token, concatenated, and flash-attention's cu_seqlens."""
    lens = [int((labels[i] != -100).nonzero().max()) + 1 for i in range(labels.shape[0])]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.cat([x[i, :n] for i, n in enumerate(lens)]), cu


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_packed_dpo_loss_diagnostics_match_full_logits_autograd(name, backend):
    opts, uses_ref, unpaired, _ = OBJECTIVES[name]
    logits, ref, labels = _data(6, seed=len(name))
    (px, cu), (pr, _), (py, _) = _pack(logits, labels), _pack(ref, labels), _pack(labels, labels)
    out = fastdpo.dpo_loss(px.clone().requires_grad_(True), py, ref_logits=pr if uses_ref else None, cu_seqlens=cu,
                           beta=BETA, backend=backend, diagnostics=True, **opts)
    want, loss, w = truth(name, logits.double().requires_grad_(True), ref, labels)
    check(out, want)
    torch.testing.assert_close(out.diagnostics.weights.double(), w, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("strategy", ["recompute", "grad_in_forward"])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_packed_linear_dpo_loss_diagnostics_match_full_logits_autograd(name, strategy):
    opts, uses_ref, unpaired, _ = OBJECTIVES[name]
    hidden, weight, bias, ref_hidden, labels = _linear_batch()
    (ph, cu), (prh, _), (py, _) = _pack(hidden, labels), _pack(ref_hidden, labels), _pack(labels, labels)
    out = fastdpo.linear_dpo_loss(ph, weight, py, bias=bias, ref_hidden=prh if uses_ref else None, cu_seqlens=cu,
                                  beta=BETA, backend="cpu", strategy=strategy, memory_budget=9 * V * 4,
                                  diagnostics=True, **opts)
    logits = (hidden.double() @ weight.double().t() + bias.double()).requires_grad_(True)
    want, _, _ = truth(name, logits, ref_hidden.double() @ weight.double().t() + bias.double(), labels)
    check(out, want)


def test_a_learnable_beta_keeps_its_gradient_when_the_logits_have_none():
    logits, ref, labels = _data(4, seed=13)
    grads = []
    for diag in (False, True):
        beta = torch.tensor(0.2, requires_grad=True)
        fastdpo.dpo_loss(logits, labels, ref_logits=ref, beta=beta, diagnostics=diag, backend="cpu").loss.backward()
        grads.append(beta.grad)
    assert grads[0] is not None and torch.equal(grads[0], grads[1])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_gpu_backends_diagnostics_match_full_logits_autograd(name, backend):
    """CUDA tensors at a realistic vocabulary (the truth in float64 on the CPU)."""
    opts, uses_ref, unpaired, _ = OBJECTIVES[name]
    g = torch.Generator().manual_seed(17)
    n, T, vocab = 8, 64, 32000
    logits = torch.randn(n, T, vocab, generator=g) * 2
    ref = logits + torch.randn(n, T, vocab, generator=g) * 0.5
    labels = torch.randint(0, vocab, (n, T), generator=g)
    labels[:, :16] = -100
    labels[::3, 48:] = -100
    out = fastdpo.dpo_loss(logits.cuda().requires_grad_(True), labels.cuda(), ref_logits=ref.cuda() if uses_ref else None,
                           beta=BETA, backend=backend, diagnostics=True, **opts)
    out.metrics = {k: v.cpu() for k, v in out.metrics.items()}
    want, _, _ = truth(name, logits.double().requires_grad_(True), ref, labels)
    check(out, want)
