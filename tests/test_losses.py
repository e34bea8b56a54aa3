"""The loss library against an independent plain-torch oracle written from the
formulas (TRL 1.16's DPOTrainer for the TRL loss types) with full logits and
autograd, on the torch and cpu backends."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastdpo
from fastdpo.losses import TRL_LOSS_TYPES, compute_loss, make_config

BACKENDS = ["torch", "cpu"]
REF_FREE = ("simpo", "cpo", "alphapo", "orpo")


# ----------------------------------------------------------------------------- oracle


def oracle(logits, labels, ref_logits=None, ref_logps=None, *, loss_type="sigmoid", beta=0.1, label_smoothing=0.0,
           loss_weights=None, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, ld_alpha=None,
           use_weighting=False, discopop_tau=0.05, temperature=1.0, **opts):
    """Loss from full logits, written out step by step (no fastdpo code)."""
    mask = labels != -100
    safe = labels.clamp(min=0).unsqueeze(-1)
    lsm = torch.log_softmax(logits.double() / temperature, -1)
    tok = lsm.gather(-1, safe).squeeze(-1) * mask
    n = labels.shape[0] // 2
    lens = mask.sum(-1)

    def seq(t):
        if ld_alpha is None:
            return t.sum(-1)
        pos = mask.cumsum(-1)
        shared = torch.minimum(lens[:n], lens[n:]).repeat(2)[:, None]
        return (t * (pos <= shared) * mask).sum(-1) + ld_alpha * (t * (pos > shared) * mask).sum(-1)

    logps = seq(tok)
    if ref_logps is not None:
        ref = ref_logps.double()
    elif ref_logits is not None:
        rl = torch.log_softmax(ref_logits.double() / temperature, -1).gather(-1, safe).squeeze(-1) * mask
        ref = seq(rl)
    else:
        ref = torch.zeros_like(logps)
    cw, rw = logps[:n], logps[n:]
    rcw, rrw = ref[:n], ref[n:]
    cr, rr = cw - rcw, rw - rrw
    if f_divergence_type == "reverse_kl":
        cs, rs = cr, rr
    elif f_divergence_type == "forward_kl":
        cs, rs = 1 - torch.exp(-cr), 1 - torch.exp(-rr)
    elif f_divergence_type == "js_divergence":
        cs, rs = math.log(2) + F.logsigmoid(cr), math.log(2) + F.logsigmoid(rr)
    else:
        a = f_alpha_divergence_coef
        cs, rs = (torch.exp((a - 1) * cr) - 1) / (a - 1), (torch.exp((a - 1) * rr) - 1) / (a - 1)
    d = cs - rs
    eps = label_smoothing
    cl, rl_ = lens[:n].double(), lens[n:].double()
    nll = -tok[:n].sum() / mask[:n].sum()
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    weights = loss_weights or [1.0] * len(types)
    total = 0.0
    for t, w in zip(types, weights):
        if t == "sigmoid":
            L = -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)
        elif t == "hinge":
            L = torch.relu(1 - beta * d)
        elif t == "ipo":
            L = (cs / cl - rs / rl_ - 1 / (2 * beta)) ** 2
        elif t == "exo_pair":
            L = torch.sigmoid(beta * d) * (F.logsigmoid(beta * d) - math.log(1 - eps)) + torch.sigmoid(-beta * d) * (
                F.logsigmoid(-beta * d) - math.log(eps))
        elif t == "nca_pair":
            L = -F.logsigmoid(beta * cr) - 0.5 * F.logsigmoid(-beta * cr) - 0.5 * F.logsigmoid(-beta * rr)
        elif t == "robust":
            L = (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps)
        elif t == "bco_pair":
            L = -F.logsigmoid(beta * cr) - F.logsigmoid(-beta * rr)
        elif t == "sppo_hard":
            L = (cr - 0.5 / beta) ** 2 + (rr + 0.5 / beta) ** 2
        elif t in ("aot", "aot_unpaired"):
            if t == "aot":
                dd = torch.sort(cw - rw).values - torch.sort(rcw - rrw).values
            else:
                dd = torch.sort(cr).values - torch.sort(rr).values
            L = -F.logsigmoid(beta * dd) * (1 - eps) - F.logsigmoid(-beta * dd) * eps
        elif t == "apo_zero":
            L = 1 - torch.sigmoid(beta * cr) + torch.sigmoid(beta * rr)
        elif t == "apo_down":
            L = torch.sigmoid(beta * cr) + 1 - torch.sigmoid(beta * (cr - rr))
        elif t == "discopop":
            h = beta * d
            m = torch.sigmoid(h / discopop_tau)
            L = -F.logsigmoid(h) * (1 - m) + torch.exp(-h) * m
        elif t == "sft":
            L = nll.expand(n)
        elif t == "sigmoid_norm":
            L = -F.logsigmoid(beta * (cs / cl - rs / rl_))
        elif t == "simpo":
            L = -F.logsigmoid(beta * (cw / cl - rw / rl_) - opts.get("simpo_gamma", 0.5))
        elif t == "cpo":
            L = -F.logsigmoid(beta * (cw - rw)) + opts.get("cpo_alpha", 1.0) * nll
        elif t == "alphapo":
            al = opts.get("alpha", 0.25)
            pw, pl = torch.exp(cw / cl), torch.exp(rw / rl_)
            L = -F.logsigmoid(beta * ((1 - pw ** -al) / al - (1 - pl ** -al) / al) - opts.get("simpo_gamma", 0.5))
        elif t == "orpo":
            aw, al_ = cw / cl, rw / rl_
            lo = (aw - al_) - (torch.log1p(-torch.exp(aw)) - torch.log1p(-torch.exp(al_)))
            L = nll - beta * F.logsigmoid(lo)
        else:
            raise AssertionError(t)
        if use_weighting:
            with torch.no_grad():
                lsp2 = torch.logsumexp(2 * lsm, -1)
                wts = torch.exp(((tok - lsp2) * mask).sum(-1) / lens)
            L = L * wts[:n] * wts[n:]
        total = total + L.mean() * w
    return total


# ----------------------------------------------------------------------------- cases


def batch(B=3, T=7, V=41, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2 * B, T, V, generator=g) * 2).to(dtype)
    r = (x.float() + 0.3 * torch.randn(2 * B, T, V, generator=g)).to(dtype)
    y = torch.randint(0, V, (2 * B, T), generator=g)
    y[:, :2] = -100  # prompt
    y[0, -2:] = -100  # padding: unequal lengths
    y[B + 1, -1] = -100
    return x, r, y


def check_against_oracle(backend, loss_kw, dtype=torch.float32, with_ref=True, rtol=1e-5):
    x, r, y = batch(dtype=dtype)
    ref = r if with_ref else None
    xa = x.detach().clone().requires_grad_()
    out = fastdpo.dpo_loss(xa, y, ref_logits=ref, backend=backend, **loss_kw)
    out.loss.backward()
    xb = x.detach().double().requires_grad_()
    expect = oracle(xb, y, None if ref is None else ref.double(), **loss_kw)
    expect.backward()
    tol = rtol if dtype == torch.float32 else 3e-2
    assert abs(out.loss.item() - expect.item()) <= tol * max(1.0, abs(expect.item())), (out.loss.item(), expect.item())
    gerr = (xa.grad.double() - xb.grad).abs().max().item()
    assert gerr <= tol * max(1e-3, xb.grad.abs().max().item()) + (1e-7 if dtype == torch.float32 else 1e-3), gerr


LOSS_CASES = [dict(loss_type=t) for t in TRL_LOSS_TYPES if t not in ("exo_pair", "robust")] + [
    dict(loss_type="exo_pair", label_smoothing=0.2),
    dict(loss_type="robust", label_smoothing=0.2),
    dict(loss_type="robust"),
    dict(loss_type="sigmoid", label_smoothing=0.1),
    dict(loss_type="aot", label_smoothing=0.1),
    dict(loss_type=["sigmoid", "sft", "ipo"], loss_weights=[1.0, 0.5, 0.25]),
    dict(loss_type="sigmoid", f_divergence_type="forward_kl"),
    dict(loss_type="sigmoid", f_divergence_type="js_divergence"),
    dict(loss_type="hinge", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss_type="sigmoid", ld_alpha=0.5),
    dict(loss_type="ipo", ld_alpha=0.0),
    dict(loss_type="sigmoid", use_weighting=True),
    dict(loss_type=["sigmoid", "bco_pair"], use_weighting=True, ld_alpha=0.7),
    dict(loss_type="discopop", discopop_tau=0.2, beta=0.5),
    dict(loss_type="sigmoid", temperature=0.7),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", LOSS_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_trl_losses_match_oracle(backend, kw):
    check_against_oracle(backend, kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [dict(loss_type="simpo", beta=2.0, simpo_gamma=0.3), dict(loss_type="cpo"),
                                dict(loss_type="cpo", cpo_alpha=0.0), dict(loss_type="alphapo", beta=2.0, alpha=0.1),
                                dict(loss_type="orpo", beta=0.2)], ids=lambda kw: kw["loss_type"])
def test_reference_free_losses_match_oracle(backend, kw):
    check_against_oracle(backend, kw, with_ref=False)


@pytest.mark.parametrize("kw", [dict(loss_type="sigmoid"), dict(loss_type="ipo"), dict(loss_type="orpo")])
def test_bf16_is_bounded(kw):
    check_against_oracle("cpu", kw, dtype=torch.bfloat16, with_ref=kw["loss_type"] != "orpo")


def test_reference_free_dpo_uses_zero_reference():
    x, _, y = batch()
    out = fastdpo.dpo_loss(x, y, loss_type="sigmoid", backend="cpu")
    assert abs(out.loss.item() - oracle(x, y).item()) < 1e-5
    assert torch.allclose(out.chosen_rewards, 0.1 * out.chosen_logps.detach())


def test_precomputed_reference_logps_equal_reference_logits():
    x, r, y = batch()
    with_logits = fastdpo.dpo_loss(x, y, ref_logits=r, backend="cpu")
    mask = y != -100
    ref_seq = (torch.log_softmax(r.double(), -1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * mask).sum(-1)
    with_logps = fastdpo.dpo_loss(x, y, ref_logps=ref_seq.float(), backend="cpu")
    assert abs(with_logits.loss.item() - with_logps.loss.item()) < 1e-5


def test_fixed_values_from_published_case():
    pc = torch.tensor([-0.5, -10.0, -1.0])
    pr = torch.tensor([-0.1, -30.0, -21.0])
    rc = torch.tensor([-0.5, -10.1, -0.1])
    rr = torch.tensor([-0.1, -20.1, -0.1])
    token_logps = torch.cat([pc, pr]).unsqueeze(-1)  # one completion token per sequence
    labels = torch.zeros(6, 1, dtype=torch.long)
    out = compute_loss(token_logps, labels, make_config("sigmoid", beta=0.1), ref_logps=torch.cat([rc, rr]))
    expect = -F.logsigmoid(torch.tensor([0.0, 1.0, 2.0]))
    assert torch.allclose(out.loss, expect.mean(), atol=1e-6)
    assert torch.allclose(out.chosen_rewards, 0.1 * (pc - rc), atol=1e-6)
    assert out.metrics["rewards/accuracies"].item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("name", sorted(set(TRL_LOSS_TYPES) | set(REF_FREE)))
def test_gradcheck_sequence_level(name):
    torch.manual_seed(0)
    n, T = 3, 4
    tok = (-torch.rand(2 * n, T, dtype=torch.float64) * 2 - 0.05).requires_grad_()
    labels = torch.zeros(2 * n, T, dtype=torch.long)
    labels[0, 0] = -100
    opts = {"label_smoothing": 0.2} if name in ("exo_pair", "robust") else {}
    cfg = make_config(name, beta=0.5, **opts)
    ref = None if name in REF_FREE else torch.randn(2 * n, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: compute_loss(t, labels, cfg, ref_logps=ref).loss, (tok,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_follow_trl_definitions(backend):
    x, r, y = batch()
    out = fastdpo.dpo_loss(x, y, ref_logits=r, backend=backend, beta=0.2, temperature=0.8)
    m = out.metrics
    n = x.shape[0] // 2
    z = x.double() / 0.8
    mask = y != -100
    logp = torch.log_softmax(z, -1)
    ent = -(logp.exp() * logp).sum(-1)
    hit = (z.argmax(-1) == y).double()
    mean_z = z.mean(-1)
    assert m["entropy"].item() == pytest.approx((ent * mask).sum().item() / mask.sum().item(), rel=1e-5)
    assert m["logits/chosen"].item() == pytest.approx((mean_z[:n] * mask[:n]).sum().item() / mask[:n].sum().item(),
                                                      rel=1e-5, abs=1e-6)
    assert m["mean_token_accuracy"].item() == pytest.approx((hit[:n] * mask[:n]).sum().item() / mask[:n].sum().item())
    assert m["rewards/margins"].item() == pytest.approx((out.chosen_rewards - out.rejected_rewards).mean().item())
    assert set(m) >= {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                      "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"}
    assert "nll_loss" not in m
    assert "nll_loss" in fastdpo.dpo_loss(x, y, loss_type="cpo", backend=backend).metrics


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_dpo_loss_matches_full_logits(backend):
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 2, 6, 16, 53
    hidden = torch.randn(2 * B, T, H, generator=g, requires_grad=True)
    ref_hidden = torch.randn(2 * B, T, H, generator=g)
    weight = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    bias = torch.randn(V, generator=g).requires_grad_()
    _, _, y = batch(B, T, V)
    out = fastdpo.linear_dpo_loss(hidden, weight, y, bias=bias, ref_hidden=ref_hidden, ref_bias=bias.detach(),
                                  loss_type=["sigmoid", "sft"], backend=backend)
    out.loss.backward()
    hd, wd, bd = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    expect = oracle(F.linear(hd, wd, bd), y, F.linear(ref_hidden.double(), wd.detach(), bd.detach()),
                    loss_type=["sigmoid", "sft"])
    expect.backward()
    assert out.loss.item() == pytest.approx(expect.item(), rel=1e-5)
    for got, want in ((hidden.grad, hd.grad), (weight.grad, wd.grad), (bias.grad, bd.grad)):
        assert (got.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item() + 1e-7


def test_modules_and_custom_registered_loss():
    x, r, y = batch()
    assert fastdpo.DPOLoss("ipo", beta=0.3, backend="cpu")(x, y, ref_logits=r).loss.item() == pytest.approx(
        fastdpo.dpo_loss(x, y, ref_logits=r, loss_type="ipo", beta=0.3, backend="cpu").loss.item())

    name = "test_margin_dpo"
    if name not in fastdpo.registered_losses():
        @fastdpo.register_loss(name, needs_reference=True)
        def _margin(s):
            return -F.logsigmoid(s.beta * s.delta_score - s.option("margin", 0.0))

    got = fastdpo.dpo_loss(x, y, ref_logits=r, loss_type=name, margin=0.0, backend="cpu").loss
    assert got.item() == pytest.approx(fastdpo.dpo_loss(x, y, ref_logits=r, backend="cpu").loss.item(), rel=1e-6)


def test_token_weights_scale_the_sequence_sums():
    x, r, y = batch()
    w = torch.rand(y.shape)
    out = fastdpo.dpo_loss(x, y, ref_logits=r, token_weights=w, backend="cpu")
    mask = y != -100
    lp = torch.log_softmax(x.double(), -1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * mask
    assert torch.allclose(torch.cat([out.chosen_logps, out.rejected_logps]).double(), (lp * w).sum(-1), atol=1e-5)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(loss_type="nope"), "unknown loss_type 'nope'"),
        (dict(loss_type="robust", label_smoothing=0.5), "robust needs label_smoothing"),
        (dict(loss_type="exo_pair"), "exo_pair needs label_smoothing"),
        (dict(loss_type="sigmoid", beta=0.0), "beta"),
        (dict(loss_type="sigmoid", label_smoothing=1.2), "label_smoothing"),
        (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), "loss_weights"),
        (dict(loss_type="nca_pair", f_divergence_type="forward_kl"), "not supported by loss_type"),
        (dict(loss_type="sigmoid", f_divergence_type="tv"), "unknown f_divergence_type"),
        (dict(loss_type="aot", use_weighting=True), "use_weighting"),
        (dict(loss_type="sigmoid", ld_alpha=2.0), "ld_alpha"),
        (dict(loss_type=3), "loss_type must be"),
    ],
)
def test_invalid_options_raise(kw, match):
    x, r, y = batch()
    with pytest.raises((ValueError, TypeError), match=match):
        fastdpo.dpo_loss(x, y, ref_logits=r, **kw)


def test_invalid_inputs_raise():
    x, r, y = batch()
    with pytest.raises(ValueError, match="needs a reference"):
        fastdpo.dpo_loss(x, y, loss_type="apo_zero")
    with pytest.raises(ValueError, match="reference-free"):
        fastdpo.dpo_loss(x, y, ref_logits=r, loss_type="simpo")
    with pytest.raises(ValueError, match="even number"):
        fastdpo.dpo_loss(x[:5], y[:5], ref_logits=r[:5])
    with pytest.raises(ValueError, match="ref_logps must be"):
        fastdpo.dpo_loss(x, y, ref_logps=torch.zeros(3))
    with pytest.raises(ValueError, match="either ref_logits or ref_logps"):
        fastdpo.dpo_loss(x, y, ref_logits=r, ref_logps=torch.zeros(6))
    with pytest.raises(ValueError, match="token_weights"):
        fastdpo.dpo_loss(x, y, ref_logits=r, token_weights=torch.ones(6, 2))
    with pytest.raises(ValueError, match="weight must be"):
        fastdpo.linear_dpo_loss(torch.randn(6, 7, 8), torch.randn(10, 9), y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_weights_scale_each_pairs_loss(backend):
    x, r, y = batch()
    pw = torch.tensor([0.2, 1.0, 2.5])
    xa = x.clone().requires_grad_()
    out = fastdpo.dpo_loss(xa, y, ref_logits=r, loss_type="ipo", pair_weights=pw, backend=backend)
    out.loss.backward()
    mask = y != -100
    lp = lambda t: (torch.log_softmax(t.double(), -1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * mask)  # noqa: E731
    xb = x.double().requires_grad_()
    seq, ref = lp(xb).sum(-1), lp(r).sum(-1)
    lens = mask.sum(-1)
    sc = (seq - ref) / lens
    per_pair = (sc[:3] - sc[3:] - 1 / (2 * 0.1)) ** 2
    expect = (per_pair * pw.double()).mean()
    expect.backward()
    assert out.loss.item() == pytest.approx(expect.item(), rel=1e-5)
    assert torch.allclose(xa.grad.double(), xb.grad, atol=1e-6)
    with pytest.raises(ValueError, match="pair_weights must be"):
        fastdpo.dpo_loss(x, y, ref_logits=r, pair_weights=torch.ones(6))
