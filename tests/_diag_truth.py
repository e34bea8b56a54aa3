"""Training-dynamics diagnostics computed directly: float64, the full ``[N, T, V]`` logits, the objective written
out again from its formula, ``torch.autograd.grad`` for the per-pair weights and ``.backward()`` to the logits
for the gradient norms (shared by the loss-library and the trainer tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdpo.losses.diagnostics import PREFIX

BETA = 0.1
KL0 = 0.3  # KTO reference point


def _sig(z):
    return -F.logsigmoid(z)


def _pairs(x):
    return x.chunk(2)


def loss_sigmoid(pol, ref, n, d):
    (w, l), (wr, lr) = _pairs(pol), _pairs(ref)
    return _sig(BETA * ((w - wr) - (l - lr))).mean()


def loss_ipo(pol, ref, n, d):
    (w, l), (wr, lr), (nw, nl) = _pairs(pol), _pairs(ref), _pairs(n)
    return ((((w - wr) / nw - (l - lr) / nl) - 1 / (2 * BETA)) ** 2).mean()


def loss_simpo(pol, ref, n, d, gamma=0.5):
    (w, l), (nw, nl) = _pairs(pol), _pairs(n)
    return _sig(BETA * (w / nw - l / nl) - gamma).mean()


def loss_rdpo(pol, ref, n, d, eps=0.2):
    (w, l), (wr, lr) = _pairs(pol), _pairs(ref)
    z = BETA * ((w - wr) - (l - lr))
    return ((-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)).mean()


def loss_kto(pol, ref, n, d, dw=1.5, uw=0.7):
    rho = pol - ref
    return torch.where(d, dw * (1 - torch.sigmoid(BETA * (rho - KL0))), uw * (1 - torch.sigmoid(BETA * (KL0 - rho)))).mean()


# name -> (dpo_loss options, uses a reference, unpaired, the objective from (pol, ref, n, desirable))
OBJECTIVES = {
    "sigmoid": (dict(loss_type="sigmoid"), True, False, loss_sigmoid),
    "ipo": (dict(loss_type="ipo"), True, False, loss_ipo),
    "simpo": (dict(loss_type="simpo"), False, False, loss_simpo),
    "rdpo": (dict(loss_type="rdpo", label_smoothing=0.2), True, False, loss_rdpo),
    "kto": (dict(loss_type="kto", kl=KL0, desirable_weight=1.5, undesirable_weight=0.7), True, True, loss_kto),
}


def _token_logps(x, labels, temperature=1.0, softcap=None):
    s = softcap * torch.tanh(x / softcap) if softcap else x
    lp = torch.log_softmax(s / temperature, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * (labels != -100), s


def _quantiles(x):
    q = torch.quantile(x, torch.tensor([0.1, 0.9], dtype=x.dtype))
    return x.mean(), q[0], q[1]


def truth(name, logits, ref_logits, labels, desirable=None, temperature=1.0, softcap=None):
    """Every diagnostic, from the full logits in float64 with autograd (``logits`` a float64 leaf or a
    float64 function of leaves: the gradient norms are taken w.r.t. ``logits``, and w.r.t. the soft-capped
    logits when ``softcap`` is set)."""
    opts, uses_ref, unpaired, fn = OBJECTIVES[name]
    N = labels.shape[0]
    if unpaired and desirable is None:
        desirable = torch.arange(N) < N // 2
    tok, s = _token_logps(logits, labels, temperature, softcap)
    s.retain_grad()
    pol = tok.sum(1)
    n = (labels != -100).sum(1).double()
    ref = _token_logps(ref_logits.double(), labels, temperature, softcap)[0].sum(1) if uses_ref else None
    loss = fn(pol, ref if uses_ref else torch.zeros_like(pol), n, desirable)
    (g_pol,) = torch.autograd.grad(loss, pol, retain_graph=True)
    if logits.is_leaf:
        logits.grad = None
    else:
        logits.retain_grad()
    loss.backward()
    out = {}
    if unpaired:
        sign = torch.where(desirable, 1.0, -1.0).double()
        w = -N * sign * g_pol
        chosen, rejected = desirable, ~desirable
    else:
        w = -(N // 2) * g_pol[: N // 2]
        chosen, rejected = torch.arange(N) < N // 2, torch.arange(N) >= N // 2
    out["weight/mean"], out["weight/p10"], out["weight/p90"] = _quantiles(w)
    out["weight/frac_small"] = (w < 0.01 * w.max()).double().mean()
    # Differences of float32 sums (log-ratios, margins) carry the rounding of the sums: 1e-5 of their
    # magnitude is allowed as absolute error there (e.g. two -15 log-probs agree to ~1e-6 in float32).
    scale = {}
    mag = (pol.abs() + (ref.abs() if uses_ref else 0)).detach()
    rewards = BETA * (pol / n if name == "simpo" else pol - ref)
    if chosen.sum() == rejected.sum():  # margins of the i-th chosen and i-th rejected response
        margin = rewards[chosen] - rewards[rejected]
        out["margin/mean"], out["margin/p10"], out["margin/p90"] = _quantiles(margin)
        for q in ("mean", "p10", "p90"):
            scale[f"margin/{q}"] = BETA * (mag / n if name == "simpo" else mag).max()
    if uses_ref:
        rho = pol - ref
        for side, sel in (("chosen", chosen), ("rejected", rejected)):
            out[f"logratio/{side}"] = rho[sel].mean()
            out[f"logratio_per_token/{side}"] = rho[sel].sum() / n[sel].sum()
            out[f"below_ref/{side}"] = (rho[sel] < 0).double().mean()
            scale[f"logratio/{side}"] = mag[sel].mean()
            scale[f"logratio_per_token/{side}"] = mag[sel].sum() / n[sel].sum()
    grad = (s.grad if softcap else logits.grad).detach()
    c, r = grad[chosen].norm(), grad[rejected].norm()
    out.update({"grad_norm/chosen": c, "grad_norm/rejected": r, "grad_norm/total": grad.norm(),
                "grad_norm/ratio": c / r})
    want = {PREFIX + k: (v.detach(), float(scale.get(k, 0.0))) for k, v in out.items()}
    return want, loss.detach(), w.detach()


def check(out, want, rtol=1e-5):
    got = {k: v for k, v in out.metrics.items() if k.startswith(PREFIX)}
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for k, (v, scale) in want.items():
        torch.testing.assert_close(got[k].double(), v, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{k}: {m}")
