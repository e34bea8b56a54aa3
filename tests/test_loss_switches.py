"""Switches every entry point shares: ``average_log_prob`` (in the one sequence reduction), the ``nll_loss``
metric of an ``sft`` term, option validation when a module form is built, and one keyword (``stats``) for
the per-token statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdpo

B, T, V, H = 3, 7, 29, 8


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * B, T, V, generator=g, dtype=torch.float64)
    ref = torch.randn(2 * B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100  # prompt
    labels[1, 5:] = -100  # padding: unequal lengths
    labels[B + 2, 4:] = -100
    return logits, ref, labels


def _seq(logits, labels, average):
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    m = labels != -100
    s = (lp * m).sum(1)
    return s / m.sum(1) if average else s


def test_average_log_prob_is_the_per_token_mean():
    logits, ref, labels = _batch()
    beta = 0.7
    out = fastdpo.dpo_loss(logits.float(), labels, ref_logits=ref.float(), beta=beta, average_log_prob=True,
                           backend="torch")
    pol, rp = _seq(logits, labels, True), _seq(ref, labels, True)
    r = pol - rp
    want = -F.logsigmoid(beta * (r[:B] - r[B:])).mean()
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.chosen_logps.double(), pol[:B], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics["logps/rejected"].double(), pol[B:].mean(), rtol=1e-5, atol=1e-6)


def test_average_log_prob_with_precomputed_reference_sums():
    """Precomputed ``ref_logps`` are sequence sums, averaged like the policy's."""
    logits, ref, labels = _batch(1)
    a = fastdpo.dpo_loss(logits.float(), labels, ref_logits=ref.float(), average_log_prob=True)
    b = fastdpo.dpo_loss(logits.float(), labels, ref_logps=_seq(ref, labels, False).float(), average_log_prob=True)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm", "simpo", "orpo"])
def test_length_normalising_objectives_normalise_once(loss_type):
    logits, ref, labels = _batch(2)
    a = fastdpo.dpo_loss(logits.float(), labels, ref_logits=ref.float(), loss_type=loss_type)
    b = fastdpo.dpo_loss(logits.float(), labels, ref_logits=ref.float(), loss_type=loss_type, average_log_prob=True)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)


def test_average_log_prob_in_the_linear_form():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2 * B, T, H, generator=g)
    ref_hidden = torch.randn(2 * B, T, H, generator=g)
    w = torch.randn(V, H, generator=g)
    _, _, labels = _batch(3)
    a = fastdpo.linear_dpo_loss(hidden, w, labels, ref_hidden=ref_hidden, average_log_prob=True, loss_type="hinge")
    b = fastdpo.dpo_loss(hidden @ w.t(), labels, ref_logits=ref_hidden @ w.t(), average_log_prob=True,
                         loss_type="hinge")
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    c = fastdpo.LinearDPOLoss(average_log_prob=True, loss_type="hinge")(hidden, w, labels, ref_hidden=ref_hidden)
    torch.testing.assert_close(c.loss, a.loss)


def test_sft_term_logs_nll_loss():
    logits, ref, labels = _batch(4)
    out = fastdpo.dpo_loss(logits.float(), labels, ref_logits=ref.float(), loss_type=["sigmoid", "sft"],
                           loss_weights=[1.0, 0.3])
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    m = labels[:B] != -100
    want = -(lp[:B] * m).sum() / m.sum()
    torch.testing.assert_close(out.metrics["nll_loss"].double(), want, rtol=1e-5, atol=1e-6)
    assert "nll_loss" not in fastdpo.dpo_loss(logits.float(), labels, ref_logits=ref.float()).metrics


@pytest.mark.parametrize("cls", [fastdpo.DPOLoss, fastdpo.LinearDPOLoss])
@pytest.mark.parametrize("options,error,named", [
    (dict(loss_type="not_a_loss"), ValueError, "not_a_loss"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(loss_type="simpo", simpo_gama=0.5), TypeError, "simpo_gama"),
    (dict(loss_type="ipo", use_weighting=True, label_smoothing=2.0), ValueError, "label_smoothing"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), ValueError, "loss_weights"),
    (dict(average_log_prob="yes"), TypeError, "average_log_prob"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(labels=torch.zeros(2, 3)), TypeError, "per-call"),
])
def test_module_forms_validate_at_construction(cls, options, error, named):
    with pytest.raises(error, match=named):
        cls(**options)


def test_module_form_strategy_validated_at_construction():
    with pytest.raises(ValueError, match="strategy"):
        fastdpo.LinearDPOLoss(strategy="fastest")
    fastdpo.LinearDPOLoss(strategy="recompute", memory_budget=1 << 20, loss_type="rrpo", rrpo_alpha=0.1)


def test_module_form_options_work_per_call():
    logits, ref, labels = _batch(5)
    mod = fastdpo.DPOLoss(loss_type="simpo", simpo_gamma=0.2, beta=2.0, backend="torch")
    a = mod(logits.float(), labels)
    b = fastdpo.dpo_loss(logits.float(), labels, loss_type="simpo", simpo_gamma=0.2, beta=2.0, backend="torch")
    torch.testing.assert_close(a.loss, b.loss)


def test_one_statistics_keyword():
    """``stats=True`` in token_logprobs, fused_logprobs and linear_token_logprobs gives the same statistics."""
    g = torch.Generator().manual_seed(6)
    h = torch.randn(11, H, generator=g)
    w = torch.randn(V, H, generator=g)
    y = torch.randint(0, V, (11,), generator=g)
    y[3] = -100
    a = fastdpo.token_logprobs(h @ w.t(), y, stats=True)
    b = fastdpo.fused_logprobs(h @ w.t(), y, stats=True)
    c = fastdpo.linear_token_logprobs(h, w, y, stats=True)
    for i, name in enumerate(("entropy", "argmax_hit", "mean_logit", "log_sum_p2")):
        torch.testing.assert_close(getattr(a, name), b.stats[..., i], msg=name)
        torch.testing.assert_close(c.stats[..., i], b.stats[..., i], rtol=1e-5, atol=1e-5, msg=name)
    with pytest.raises(TypeError):
        fastdpo.token_logprobs(h @ w.t(), y, return_stats=True)
