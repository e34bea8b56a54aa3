"""Parity with TRL's own DPOTrainer loss code (skipped when trl is not importable).

TRL computes the loss inside ``DPOTrainer._compute_loss(model, inputs)``; it is called here on a
lightweight stand-in trainer whose "models" return per-token outputs (log-probs, entropy, mean logit,
top-1 hit, log sum p^2) computed with plain torch from the same logits we feed to fastdpo.
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")

import fastdpo.losses as L  # noqa: E402

TRL_LOSSES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
B, T, V = 3, 7, 13


class _FakeLM(torch.nn.Module):
    """Stands in for a model patched with TRL's fused LM head: returns per-token outputs for ``labels[:, 1:]``."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.is_gradient_checkpointing = False

    def forward(self, *, input_ids, labels, **kwargs):
        y = labels[:, 1:]
        valid = y != -100
        logp_all = torch.log_softmax(self.logits.double(), -1)
        lp = logp_all.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~valid, 0.0)
        p = logp_all.exp()
        # float32 outputs, like the fused head (TRL's alpha-divergence clamp table has no float64 entry)
        return types.SimpleNamespace(
            log_probs=lp.float(),
            entropy=-(p * logp_all).sum(-1).float(),
            mean_logits=self.logits.double().mean(-1).float(),
            is_top1=self.logits.argmax(-1) == y,
            log_sum_sq_probs=torch.logsumexp(2 * logp_all, -1).float(),
            aux_loss=None,
        )


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    n = 2 * B
    logits = (torch.randn(n, T, V, generator=g, dtype=torch.float64) * 2)
    ref_logits = logits + torch.randn(n, T, V, generator=g, dtype=torch.float64)
    input_ids = torch.randint(0, V, (n, T + 1), generator=g)
    completion_mask = torch.zeros(n, T + 1, dtype=torch.long)
    for i in range(n):  # prompt of 1-3 tokens, completion of varying length, then padding
        start = 1 + i % 3
        end = min(T + 1, start + 2 + (5 * i) % 5)
        completion_mask[i, start:end] = 1
    labels = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100)
    return logits, ref_logits, input_ids, completion_mask, labels


def _trl(logits, ref_logits, input_ids, completion_mask, *, loss_types, loss_weights=None, beta=0.1,
         label_smoothing=0.0, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, ld_alpha=None,
         use_weighting=False, discopop_tau=0.05, ref_logps=None):
    trainer = types.SimpleNamespace(
        model=_FakeLM(logits), ref_model=_FakeLM(ref_logits),
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x,
                                          gather=lambda x: x),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=discopop_tau),
        aux_loss_enabled=False, ld_alpha=ld_alpha, precompute_ref_logps=ref_logps is not None,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        loss_types=loss_types, loss_weights=loss_weights or [1.0] * len(loss_types), beta=beta,
        label_smoothing=label_smoothing, use_weighting=use_weighting,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": completion_mask}
    if ref_logps is not None:
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref_logps.chunk(2)
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}


CASES = [dict(loss_types=[t]) for t in TRL_LOSSES if t != "exo_pair"] + [  # exo_pair needs epsilon > 0
    dict(loss_types=["exo_pair"], label_smoothing=1e-3),
    dict(loss_types=["robust"], label_smoothing=0.2),
    dict(loss_types=["aot"], label_smoothing=0.1),
    dict(loss_types=["aot_unpaired"], label_smoothing=0.1),
    dict(loss_types=["sigmoid", "sft", "bco_pair"], loss_weights=[0.8, 0.2, 1.0]),
    dict(loss_types=["sigmoid"], ld_alpha=0.5),
    dict(loss_types=["ipo"], ld_alpha=0.0),
    dict(loss_types=["sigmoid"], use_weighting=True),
    dict(loss_types=["ipo"], use_weighting=True),
    dict(loss_types=["apo_zero"], use_weighting=True),
    dict(loss_types=["discopop"], discopop_tau=0.3, beta=0.5),
    dict(loss_types=["sigmoid"], label_smoothing=0.3),  # TRL's sigmoid ignores label smoothing
] + [dict(loss_types=[t], f_divergence_type=f, f_alpha_divergence_coef=a)
     for t in ["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm"]
     for f, a in [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 1.0)]]


def _ours(logits, ref_logits, labels, backend, case, ref_logps=None):
    return L.dpo_loss(
        logits, labels, ref_logits=None if ref_logps is not None else ref_logits, ref_logps=ref_logps,
        loss_type=case["loss_types"], loss_weights=case.get("loss_weights"), beta=case.get("beta", 0.1),
        label_smoothing=case.get("label_smoothing", 0.0), f_divergence_type=case.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=case.get("f_alpha_divergence_coef", 0.5), ld_alpha=case.get("ld_alpha"),
        use_weighting=case.get("use_weighting", False), discopop_tau=case.get("discopop_tau", 0.05), backend=backend,
    )


def _compare(case, backend, seed=0, precomputed=False):
    logits, ref_logits, input_ids, cmask, labels = _batch(seed)
    lt = logits.clone().requires_grad_(True)
    ref_logps = None
    if precomputed:
        lp = torch.log_softmax(ref_logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        ref_logps = (lp * (labels != -100)).sum(1).float()
    trl_kwargs = {k: v for k, v in case.items()}
    t_loss, t_metrics = _trl(lt, ref_logits, input_ids, cmask, ref_logps=ref_logps, **trl_kwargs)
    t_loss.backward()
    lo = logits.float().clone().requires_grad_(True)
    out = _ours(lo, ref_logits.float(), labels, backend, case,
                ref_logps=None if ref_logps is None else ref_logps.float())
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), t_loss.detach().double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lo.grad.double(), lt.grad, rtol=1e-5, atol=1e-6)
    for k, v in t_metrics.items():
        assert k in out.metrics, k
        torch.testing.assert_close(out.metrics[k].double().item(), float(v), rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_trl_parity(case, backend):
    _compare(case, backend)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "apo_down"])
def test_trl_parity_precomputed_reference(loss):
    _compare(dict(loss_types=[loss]), "cpu", seed=3, precomputed=True)


def test_all_trl_loss_types_registered():
    assert set(TRL_LOSSES) <= set(L.available_losses())


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_cpo_loss_types_match_trl_cpo_trainer(kind, alpha):
    cpo_mod = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2 * B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100
    x = logits.clone().requires_grad_(True)
    out = L.dpo_loss(x, labels, loss_type="cpo", cpo_loss_type=kind, alpha=alpha, cpo_alpha=0.0, beta=0.2,
                     backend="torch")
    out.loss.backward()

    x2 = logits.clone().requires_grad_(True)
    lp = torch.log_softmax(x2, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    seq = (lp * (labels != -100)).sum(-1)
    fake = types.SimpleNamespace(alpha=alpha, beta=0.2, label_smoothing=0.0, simpo_gamma=0.5, loss_type=kind,
                                 accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    losses, cr, rr = cpo_mod.CPOTrainer.cpo_loss(fake, seq[:B], seq[B:])
    losses.mean().backward()
    torch.testing.assert_close(out.loss.double(), losses.mean(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out.chosen_rewards.double(), cr, rtol=1e-6, atol=1e-8)


def test_cpo_loss_type_validation():
    logits = torch.randn(4, 3, 5)
    labels = torch.randint(0, 5, (4, 3))
    with pytest.raises(ValueError, match="cpo_loss_type"):
        L.dpo_loss(logits, labels, loss_type="cpo", cpo_loss_type="squared", backend="torch")
    with pytest.raises(ValueError, match="simpo_gamma"):
        L.dpo_loss(logits, labels, loss_type="cpo", cpo_loss_type="hinge", simpo_gamma=0.5, backend="torch")
