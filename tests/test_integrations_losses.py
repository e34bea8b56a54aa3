"""torchtune- and OpenRLHF-style loss modules against independent formulas from their documented definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdpo.integrations import openrlhf, torchtune


def _logps(seed, b=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-torch.rand(b, generator=g, dtype=dtype) * 20 for _ in range(4))
    return pc.requires_grad_(True), pr.requires_grad_(True), rc, rr


def _check(ours, ref, inputs):
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b.detach())
    assert not ours[1].requires_grad and not ours[2].requires_grad
    ga = torch.autograd.grad(ours[0].sum(), inputs[:2])
    gb = torch.autograd.grad(ref[0].sum(), inputs[:2])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


def _rewards(beta, pc, pr, rc, rr):
    return beta * (pc - rc).detach(), beta * (pr - rr).detach()


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_torchtune_dpo(beta, eps):
    x = _logps(0)
    pc, pr, rc, rr = x
    z = (pc - pr) - (rc - rr)
    ref = (-F.logsigmoid(beta * z) * (1 - eps) - F.logsigmoid(-beta * z) * eps, *_rewards(beta, *x))
    _check(torchtune.DPOLoss(beta=beta, label_smoothing=eps)(*x), ref, x)
    assert torchtune.DPOLoss().beta == 0.1


def test_torchtune_rso():
    x = _logps(1)
    pc, pr, rc, rr = x
    gamma = 0.3
    z = (pc - pr) - (rc - rr)
    _check(torchtune.RSOLoss(gamma=gamma)(*x), (torch.relu(1 - gamma * z), *_rewards(gamma, *x)), x)


def test_torchtune_ipo():
    x = _logps(2)
    pc, pr, rc, rr = x
    tau = 0.2
    z = (pc - pr) - (rc - rr)
    _check(torchtune.IPOLoss(tau=tau)(*x), ((z - 1 / (2 * tau)) ** 2, *_rewards(tau, *x)), x)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_torchtune_simpo(eps):
    pc, pr, _, _ = _logps(3)
    pc, pr = pc / 10, pr / 10  # average per-token log-probs
    beta, gamma = 2.0, 0.5
    z = beta * ((pc - pr) - gamma / beta)
    ref = (-F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps, beta * pc.detach(), beta * pr.detach())
    _check(torchtune.SimPOLoss(beta=beta, gamma=gamma, label_smoothing=eps)(pc, pr), ref, (pc, pr))


@pytest.mark.parametrize("beta,eps,ipo", [(0.1, 0.0, False), (0.3, 0.1, False), (0.5, 0.0, True)])
def test_openrlhf_dpo(beta, eps, ipo):
    x = _logps(4)
    pc, pr, rc, rr = x
    z = (pc - pr) - (rc - rr)
    if ipo:
        losses = (z - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * z) * (1 - eps) - F.logsigmoid(-beta * z) * eps
    _check(openrlhf.DPOLoss(beta, label_smoothing=eps, ipo=ipo)(*x), (losses.mean(), *_rewards(beta, *x)), x)


def test_float32_inputs():
    x = _logps(5, dtype=torch.float32)
    loss, cr, rr = openrlhf.DPOLoss(0.1)(*x)
    assert loss.dtype == cr.dtype == torch.float32 and loss.dim() == 0 and cr.shape == (6,)
