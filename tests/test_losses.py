"""fastdpo.losses against independent plain-torch implementations written from the formulas
(full logits, log_softmax, autograd), plus gradcheck, fixed values and option validation.
TRL's 15 DPOTrainer loss types are also checked against TRL itself in test_losses_trl.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastdpo.losses as L
from fastdpo.losses.registry import LossConfig, SequenceStats

V = 11


def _data(n, T=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, T, V, generator=g) * 2
    ref = logits + torch.randn(n, T, V, generator=g)
    labels = torch.randint(0, V, (n, T), generator=g)
    for i in range(n):  # prompt (ignored), response of varying length, padding (ignored)
        labels[i, : 1 + i % 2] = -100
        labels[i, 2 + (3 * i) % 4 + 1 :] = -100
    return logits.to(dtype), ref.to(dtype), labels


def _naive_tokens(logits, labels):
    lp = torch.log_softmax(logits.double(), -1)
    return lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)


def _naive_seq(logits, ref_logits, labels, token_weights=None):
    m = labels != -100
    tok = _naive_tokens(logits, labels)
    w = 1.0 if token_weights is None else token_weights.double()
    pol = (tok * w).sum(1)
    ref = None if ref_logits is None else (_naive_tokens(ref_logits, labels) * w).sum(1)
    return pol, ref, m.sum(1).double(), tok.sum(1)


def _log1mexp(x):
    return torch.log(-torch.expm1(x))


def _nll(tok_sum, n):
    return -tok_sum.sum() / n.sum()


# Independent formulas: (pol, ref, n, tok_sum) -> scalar loss, with the batch halves/blocks split here.
def _halves(x):
    return x.chunk(2)


def ref_simpo(pol, ref, n, ts, beta=0.1, gamma=0.5):
    a = pol / n
    w, l = _halves(a)
    return (-F.logsigmoid(beta * (w - l) - gamma)).mean()


def ref_cpo(pol, ref, n, ts, beta=0.1):
    w, l = _halves(pol)
    return (-F.logsigmoid(beta * (w - l))).mean() + _nll(*[_halves(ts)[0], _halves(n)[0]])


def ref_alphapo(pol, ref, n, ts, beta=0.1, alpha=0.25, gamma=0.5):
    p = torch.exp(pol / n)
    r = (1 - p ** (-alpha)) / alpha
    w, l = _halves(r)
    return (-F.logsigmoid(beta * (w - l) - gamma)).mean()


def ref_orpo(pol, ref, n, ts, beta=0.1):
    a = pol / n
    w, l = _halves(a)
    odds = lambda x: x - _log1mexp(x)  # noqa: E731
    return _nll(_halves(ts)[0], _halves(n)[0]) - beta * F.logsigmoid(odds(w) - odds(l)).mean()


def ref_kto(pol, ref, n, ts, beta=0.1, kl=0.3, dw=1.5, uw=0.7):
    w, l = _halves(pol - ref)
    return torch.cat([dw * (1 - torch.sigmoid(beta * (w - kl))), uw * (1 - torch.sigmoid(beta * (kl - l)))]).mean()


def ref_bco(pol, ref, n, ts, beta=0.1):
    r = beta * (pol - ref)
    d = r.mean().detach()
    w, l = _halves(r)
    return torch.cat([-F.logsigmoid(w - d), -F.logsigmoid(-(l - d))]).mean()


def ref_bco_udm(pol, ref, n, ts, beta=0.1, prob=None, lo=0.5, hi=10.0):
    """BCO with TRL's underlying-distribution-matching weight on the undesirable half."""
    r = beta * (pol - ref)
    d = r.mean().detach()
    w, l = _halves(r)
    pl = _halves(prob.double())[1]
    ratio = torch.clamp(pl / (1 - pl + 1e-8), min=lo, max=hi)
    return torch.cat([-F.logsigmoid(w - d), -ratio * F.logsigmoid(-(l - d))]).mean()


_UDM = torch.tensor([0.3, 0.6, 0.05, 0.995])


def ref_ties_rk(pol, ref, n, ts, beta=0.1, nu=2.0, ties=None):
    w, l = _halves(pol - ref)
    d = beta * (w - l)
    pw = 1 / (1 + nu * torch.exp(-d))
    pt = (nu**2 - 1) / ((1 + nu * torch.exp(-d)) * (1 + nu * torch.exp(d)))
    return -torch.where(ties, torch.log(pt), torch.log(pw)).mean()


def ref_ties_dav(pol, ref, n, ts, beta=0.1, nu=2.0, ties=None):
    w, l = _halves(pol - ref)
    d = beta * (w - l)
    pi_w, pi_l = torch.exp(d), torch.ones_like(d)
    den = pi_w + pi_l + nu * torch.sqrt(pi_w * pi_l)
    return -torch.where(ties, torch.log(nu * torch.sqrt(pi_w * pi_l) / den), torch.log(pi_w / den)).mean()


def ref_margin(pol, ref, n, ts, beta=None, margin=None):
    w, l = _halves(pol - ref)
    return (-F.logsigmoid(beta * (w - l) - margin)).mean()


def ref_asft(pol, ref, n, ts, beta=0.1):
    w, l = _halves(pol / n)
    f = lambda x: x - _log1mexp(x)  # noqa: E731
    return _nll(_halves(ts)[0], _halves(n)[0]) + beta * (-F.logsigmoid(f(w)) - F.logsigmoid(-f(l))).mean()


def ref_tpo(pol, ref, n, ts, beta=0.1):
    w, l, _ = pol.chunk(3)
    return (-F.logsigmoid(beta * (w - l))).mean() + _nll(ts.chunk(3)[2], n.chunk(3)[2])


def ref_pl(pol, ref, n, ts, beta=0.1, K=3):
    r = beta * (pol - ref).view(K, -1).t()
    loss = 0
    for k in range(K - 1):
        loss = loss - (r[:, k] - torch.logsumexp(r[:, k:], -1))
    return loss.mean()


def ref_adpo(pol, ref, n, ts, beta=0.1, K=3, q=None):
    r = beta * (pol - ref).view(K, -1).t()
    return -(q * torch.log_softmax(r, -1)).sum(-1).mean()


def ref_cdpo(pol, ref, n, ts, beta=0.1, eps=0.2):
    w, l = _halves(pol - ref)
    z = beta * (w - l)
    return (-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)).mean()


def ref_sigmoid(pol, ref, n, ts, beta=0.1):
    w, l = _halves(pol - (0 if ref is None else ref))
    return (-F.logsigmoid(beta * (w - l))).mean()


_TIES = torch.tensor([True, False, True])
_Q = torch.softmax(torch.arange(9.0).view(3, 3) / 3, -1)

# name -> (n sequences, options for dpo_loss, reference function, reference kwargs, uses ref)
CASES = {
    "simpo": (4, dict(loss_type="simpo"), ref_simpo, {}, False),
    "cpo": (4, dict(loss_type="cpo"), ref_cpo, {}, False),
    "alphapo": (4, dict(loss_type="alphapo"), ref_alphapo, {}, False),
    "orpo": (4, dict(loss_type="orpo"), ref_orpo, {}, False),
    "kto": (4, dict(loss_type="kto", kl=0.3, desirable_weight=1.5, undesirable_weight=0.7), ref_kto, {}, True),
    "bco": (4, dict(loss_type="bco"), ref_bco, {}, True),
    "bco_udm": (4, dict(loss_type="bco", udm_prob=_UDM), ref_bco_udm, dict(prob=_UDM), True),
    "ties_rk": (6, dict(loss_type="dpo_ties", ties=_TIES), ref_ties_rk, dict(ties=_TIES), True),
    "ties_davidson": (6, dict(loss_type="dpo_ties", ties=_TIES, tie_model="davidson"), ref_ties_dav,
                      dict(ties=_TIES), True),
    "margin": (6, dict(loss_type="margin_dpo", beta=torch.tensor([0.1, 0.2, 0.3]), margin=torch.tensor([0.0, 0.5, 1.0])),
               ref_margin, dict(beta=torch.tensor([0.1, 0.2, 0.3]).double(), margin=torch.tensor([0.0, 0.5, 1.0]).double()), True),
    "asft": (4, dict(loss_type="asft"), ref_asft, {}, False),
    "tpo": (6, dict(loss_type="tpo"), ref_tpo, {}, False),
    "plackett_luce": (9, dict(loss_type="plackett_luce", num_responses=3), ref_pl, {}, True),
    "adpo": (9, dict(loss_type="adpo", num_responses=3, targets=_Q), ref_adpo, dict(q=_Q.double()), True),
    "cdpo": (4, dict(loss_type="sigmoid", cdpo=True, label_smoothing=0.2), ref_cdpo, {}, True),
    "reference_free_sigmoid": (4, dict(loss_type="sigmoid", reference_free=True), ref_sigmoid, {}, False),
}


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_grad_vs_naive(name, backend):
    n, opts, ref_fn, ref_kw, uses_ref = CASES[name]
    logits, ref_logits, labels = _data(n, seed=hash(name) % 100)
    x = logits.clone().requires_grad_(True)
    out = L.dpo_loss(x, labels, ref_logits=ref_logits if uses_ref else None, backend=backend, **opts)
    out.loss.backward()
    x64 = logits.double().requires_grad_(True)
    pol, ref, cnt, ts = _naive_seq(x64, ref_logits if uses_ref else None, labels)
    expect = ref_fn(pol, ref, cnt, ts, **ref_kw)
    expect.backward()
    torch.testing.assert_close(out.loss.double(), expect.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)


def test_token_weights_and_pair_weights():
    logits, ref_logits, labels = _data(6, seed=5)
    tw = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))
    pw = torch.tensor([0.5, 1.0, 2.0])
    x = logits.clone().requires_grad_(True)
    out = L.dpo_loss(x, labels, ref_logits=ref_logits, token_weights=tw, pair_weights=pw, backend="cpu")
    out.loss.backward()
    x64 = logits.double().requires_grad_(True)
    pol, ref, _, _ = _naive_seq(x64, ref_logits, labels, token_weights=tw)
    w, l = _halves(pol - ref)
    expect = (-F.logsigmoid(0.1 * (w - l)) * pw.double()).mean()
    expect.backward()
    torch.testing.assert_close(out.loss.double(), expect.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)


def test_kto_kl_from_mismatched_pairs_and_desirable_mask():
    logits, ref_logits, labels = _data(5, seed=7)
    desirable = torch.tensor([True, False, False, True, True])
    kl_logps, ref_kl_logps = torch.tensor([-3.0, -4.0]), torch.tensor([-3.5, -4.1])
    out = L.dpo_loss(logits, labels, ref_logits=ref_logits, loss_type="kto", desirable=desirable,
                     kl_logps=kl_logps, ref_kl_logps=ref_kl_logps, backend="cpu")
    pol, ref, _, _ = _naive_seq(logits, ref_logits, labels)
    kl = 0.3  # mean(kl_logps - ref_kl_logps), positive
    rho = pol - ref
    expect = torch.where(desirable, 1 - torch.sigmoid(0.1 * (rho - kl)), 1 - torch.sigmoid(0.1 * (kl - rho))).mean()
    torch.testing.assert_close(out.loss.double(), expect, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.metrics["kl"].double().item(), kl, rtol=1e-6, atol=1e-6)
    assert out.chosen_rewards.shape == (3,) and out.rejected_rewards.shape == (2,)


def test_bco_module_running_mean():
    mod = L.BCOLoss(beta=0.1, backend="cpu")
    seen = []
    for seed in range(3):
        logits, ref_logits, labels = _data(4, seed=seed)
        out = mod(logits, labels, ref_logits=ref_logits)
        pol, ref, _, _ = _naive_seq(logits, ref_logits, labels)
        r = 0.1 * (pol - ref)
        seen.append(r.mean())
        d = torch.stack(seen).mean()
        w, l = _halves(r)
        expect = torch.cat([-F.logsigmoid(w - d), -F.logsigmoid(-(l - d))]).mean()
        torch.testing.assert_close(out.loss.double(), expect, rtol=1e-5, atol=1e-7)
    assert int(mod.running.count) == 3 and "running.mean" in mod.state_dict()


def test_fixed_values():
    pc, pr = torch.tensor([-0.5, -10.0, -1.0]), torch.tensor([-0.1, -30.0, -21.0])
    rc, rr = torch.tensor([-0.5, -10.1, -0.1]), torch.tensor([-0.1, -20.1, -0.1])
    s = SequenceStats(torch.cat([pc, pr]), torch.cat([rc, rr]), torch.cat([pc, pr]), torch.ones(6))
    s.scores = s.logratios
    cfg = LossConfig(beta=0.1, label_smoothing=0.0, cdpo=False)
    per = L.get_loss("sigmoid").fn(s, cfg)
    torch.testing.assert_close(per, -F.logsigmoid(torch.tensor([0.0, 1.0, 2.0])), rtol=1e-5, atol=1e-6)
    # the same through dpo_loss with precomputed reference log-probs: one-token sequences whose log-probs are given
    labels = torch.zeros(6, 1, dtype=torch.long)
    logits = torch.zeros(6, 1, 2)
    logits[:, 0, 1] = torch.log(torch.expm1(-torch.cat([pc, pr])))  # p(label 0) = exp(logp)
    out = L.dpo_loss(logits, labels, ref_logps=torch.cat([rc, rr]), backend="cpu")
    torch.testing.assert_close(out.loss, -F.logsigmoid(torch.tensor([0.0, 1.0, 2.0])).mean(), rtol=1e-5, atol=1e-6)


def _gradcheck_cfg(name):
    spec = L.get_loss(name)
    opts = dict(spec.defaults)
    extra = {"kto": dict(kl=0.2), "bco": dict(delta=0.05),  # the running shift has no gradient by design
             "dpo_ties": dict(ties=torch.tensor([True, False, True])),
             "plackett_luce": dict(num_responses=3), "adpo": dict(num_responses=3)}
    opts.update(extra.get(name, {}))
    cfg = LossConfig(beta=0.7, label_smoothing=0.1, discopop_tau=0.5, f_divergence_type="reverse_kl",
                     f_alpha_divergence_coef=0.5, **opts)
    return spec, cfg


@pytest.mark.parametrize("name", L.available_losses())
def test_gradcheck_sequence_level(name):
    spec, cfg = _gradcheck_cfg(name)
    k = spec.blocks(cfg)
    n = 3 * k
    g = torch.Generator().manual_seed(0)
    logps = -(torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.5)
    ref = -(torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.5)
    ntok = torch.randint(1, 5, (n,), generator=g).double()
    desirable = torch.arange(n) < n // 2

    kl = torch.rand(n, generator=g, dtype=torch.float64) if spec.token_kl else None  # token-level KL sums

    def f(lp, ts):
        s = SequenceStats(lp, None if spec.reference == "unused" else ref, ts, ntok, k,
                          desirable if spec.unpaired else None, kl=kl)
        s.scores = s.logratios
        return spec.fn(s, cfg)

    assert torch.autograd.gradcheck(f, (logps.clone().requires_grad_(True), (logps * 1.1).requires_grad_(True)))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "orpo", "kto"])
def test_linear_form_matches_naive(loss_type, backend):
    g = torch.Generator().manual_seed(3)
    n, T, H = 4, 5, 8
    hidden = torch.randn(n, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g) * 0.1
    ref_hidden = hidden + 0.3 * torch.randn(n, T, H, generator=g)
    _, _, labels = _data(n, T=T, seed=4)
    extra = dict(kl=0.1) if loss_type == "kto" else {}
    h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    out = L.linear_dpo_loss(h, w, labels, bias=b, ref_hidden=ref_hidden, loss_type=loss_type, backend=backend,
                            memory_budget=7 * V * 4, **extra)
    out.loss.backward()
    h64, w64, b64 = (t.double().requires_grad_(True) for t in (hidden, weight, bias))
    logits64 = h64 @ w64.t() + b64
    ref_logits = (ref_hidden.double() @ weight.double().t() + bias.double())
    uses_ref = loss_type not in ("orpo",)
    pol, ref, cnt, ts = _naive_seq(logits64, ref_logits if uses_ref else None, labels)
    fn = {"sigmoid": ref_sigmoid, "orpo": ref_orpo, "kto": lambda *a: ref_kto(*a, kl=0.1, dw=1.0, uw=1.0),
          "ipo": lambda p, r, c, t: ((((p - r) / c).chunk(2)[0] - ((p - r) / c).chunk(2)[1] - 1 / 0.2) ** 2).mean()}
    expect = fn[loss_type](pol, ref, cnt, ts)
    expect.backward()
    torch.testing.assert_close(out.loss.double(), expect.detach(), rtol=1e-5, atol=1e-6)
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo", "apo_zero"])
def test_bf16_bounded(loss_type, backend):
    logits, ref_logits, labels = _data(6, seed=9)
    uses_ref = loss_type != "simpo"
    lb = logits.bfloat16().requires_grad_(True)
    out = L.dpo_loss(lb, labels, ref_logits=ref_logits.bfloat16() if uses_ref else None, loss_type=loss_type,
                     backend=backend)
    out.loss.backward()
    # ground truth on the bf16-rounded inputs in float64, and plain torch's own bf16 error as the yardstick
    l64 = lb.detach().double().requires_grad_(True)
    r64 = ref_logits.bfloat16().double() if uses_ref else None
    fn = {"sigmoid": ref_sigmoid, "simpo": ref_simpo,
          "apo_zero": lambda p, r, c, t: (1 - torch.sigmoid(0.1 * (p - r).chunk(2)[0]) + torch.sigmoid(0.1 * (p - r).chunk(2)[1])).mean()}[loss_type]
    truth = fn(*_naive_seq(l64, r64, labels))
    truth.backward()
    lt = lb.detach().clone().requires_grad_(True)  # the same formulas evaluated by plain torch in bf16
    tok = torch.log_softmax(lt, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)
    rtok = None
    if uses_ref:
        rb = ref_logits.bfloat16()
        rtok = (torch.log_softmax(rb, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)).sum(1)
    tl = fn(tok.sum(1), rtok, (labels != -100).sum(1).to(torch.bfloat16), tok.sum(1))
    tl.backward()
    torch_err = (tl.double() - truth).abs().item()
    assert (out.loss.double() - truth).abs().item() <= 2 * torch_err + 1e-3
    g_err = (lb.grad.double() - l64.grad).abs().max().item()
    g_torch = (lt.grad.double() - l64.grad).abs().max().item()
    assert g_err <= 2 * g_torch + 1e-3


def test_metrics_match_naive():
    logits, ref_logits, labels = _data(6, seed=11)
    out = L.dpo_loss(logits, labels, ref_logits=ref_logits, loss_type="cpo", backend="cpu")
    m = labels != -100
    lp = torch.log_softmax(logits.double(), -1)
    ent = -(lp.exp() * lp).sum(-1)
    hit = (logits.argmax(-1) == labels)
    cm = m.clone()
    cm[3:] = False
    rm = m.clone()
    rm[:3] = False
    pol, _, cnt, ts = _naive_seq(logits, None, labels)
    want = {
        "entropy": ent[m].mean(), "mean_token_accuracy": hit[cm].double().mean(),
        "logits/chosen": logits.double().mean(-1)[cm].mean(), "logits/rejected": logits.double().mean(-1)[rm].mean(),
        "logps/chosen": pol[:3].mean(), "logps/rejected": pol[3:].mean(),
        "rewards/chosen": 0.1 * pol[:3].mean(), "rewards/margins": 0.1 * (pol[:3] - pol[3:]).mean(),
        "rewards/accuracies": (pol[:3] > pol[3:]).double().mean(), "nll_loss": _nll(ts[:3], cnt[:3]),
    }
    for k, v in want.items():
        torch.testing.assert_close(out.metrics[k].double(), v, rtol=1e-5, atol=1e-6, msg=k)
    assert out.chosen_logps.shape == (3,) and out.chosen_rewards.shape == (3,)
    assert not out.chosen_rewards.requires_grad


def test_custom_objective_registration():
    @L.register_loss("test_shifted_sigmoid", defaults={"shift": 0.0}, overwrite=True)
    def shifted(s, cfg):
        return -F.logsigmoid(cfg.beta * (s.chosen_logratios - s.rejected_logratios) - cfg.shift)

    logits, ref_logits, labels = _data(4, seed=2)
    out = L.DPOLoss(loss_type="test_shifted_sigmoid", shift=0.5, backend="cpu")(logits, labels, ref_logits=ref_logits)
    pol, ref, _, _ = _naive_seq(logits, ref_logits, labels)
    w, l = _halves(pol - ref)
    torch.testing.assert_close(out.loss.double(), (-F.logsigmoid(0.1 * (w - l) - 0.5)).mean(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_type="nope"), "loss_type"),
    (dict(loss_type="bco", min_density_ratio=2.0, max_density_ratio=1.0), "min_density_ratio"),
    (dict(loss_type="bco", udm_prob=torch.ones(3) * 0.5), "udm_prob"),
    (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
    (dict(loss_type="exo_pair"), "label_smoothing"),
    (dict(loss_type="apo_zero", ref_logits=None), "reference"),
    (dict(loss_type="kto", ref_logits=None), "reference"),
    (dict(n=3), "chosen; rejected"),
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), "loss_weights"),
    (dict(f_divergence_type="foo"), "f_divergence_type"),
    (dict(loss_type="nca_pair", f_divergence_type="forward_kl"), "f_divergence_type"),
    (dict(loss_type="aot", use_weighting=True), "use_weighting"),
    (dict(ld_alpha=1.5), "ld_alpha"),
    (dict(beta=0.0), "beta"),
    (dict(gamma=1.0), "gamma"),
    (dict(loss_type="kto"), "kl"),
    (dict(ref_logps=torch.zeros(3)), "ref_logps"),
    (dict(loss_type="plackett_luce", num_responses=1), "num_responses"),
    (dict(loss_type="dpo_ties", tie_model="x"), "tie_model"),
])
def test_invalid_options(kwargs, match):
    kwargs = dict(kwargs)
    n = kwargs.pop("n", 4)
    logits, ref_logits, labels = _data(n)
    kwargs.setdefault("ref_logits", ref_logits)
    with pytest.raises((ValueError, TypeError), match=match):
        L.dpo_loss(logits, labels, backend="torch", **kwargs)


def test_linear_form_separate_reference_head_equals_dpo_loss():
    g = torch.Generator().manual_seed(8)
    n, T, H = 4, 5, 8
    hidden, ref_hidden = torch.randn(n, T, H, generator=g), torch.randn(n, T, H, generator=g)
    weight, ref_weight = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    _, _, labels = _data(n, T=T, seed=1)
    h = hidden.clone().requires_grad_(True)
    out = L.LinearDPOLoss(loss_type="ipo", ld_alpha=0.5, backend="cpu")(
        h, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, memory_budget=3 * V * 4)
    out.loss.backward()
    h2 = hidden.clone().requires_grad_(True)
    ref = L.dpo_loss(h2 @ weight.t(), labels, ref_logits=ref_hidden @ ref_weight.t(), loss_type="ipo", ld_alpha=0.5,
                     backend="torch")
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)
    for k in ref.metrics:
        torch.testing.assert_close(out.metrics[k], ref.metrics[k], rtol=1e-5, atol=1e-6, msg=k)
