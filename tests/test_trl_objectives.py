"""Every paired objective registered with fastdpo trains in FastDPOTrainer.

Per objective: 3 optimizer steps of the tiny Llama through ``FastDPOConfig(loss_type=..., loss_options=...)``,
and at every step the trainer's loss equals ``fastdpo.dpo_loss`` on the same batch's full policy and reference
logits from the same parameters (a plain forward of both models). The token-level-KL objectives (rrpo, tdpo)
get their KL from the trainer's fused head, which folds the reference hidden states into the policy's pass.
"""

from __future__ import annotations

import copy
import math
import os
import sys

import pytest
import torch

pytest.importorskip("trl")

sys.path.insert(0, os.path.dirname(__file__))
import _trl_runs  # noqa: E402
from _trl_runs import STEPS  # noqa: E402

import fastdpo  # noqa: E402
from fastdpo.integrations.trl import FastDPOConfig, FastDPOTrainer, trainer_losses  # noqa: E402

# Options per objective beyond its defaults: config fields, and loss_options (the objective's own)
CONFIG = {"exo_pair": dict(label_smoothing=0.1), "robust": dict(label_smoothing=0.1),
          "rdpo": dict(label_smoothing=0.1), "simpo": dict(beta=2.0)}
LOSS_OPTIONS = {"tpo": {"tpo_alpha": 0.0}, "margin_dpo": {"margin": 0.5}, "simpo": {"simpo_gamma": 0.3},
                "rrpo": {"rrpo_alpha": 0.05}, "tdpo": {"tdpo_alpha": 0.5, "tdpo_variant": "tdpo2"},
                "dpo_ties": {"tie_model": "davidson", "tie_nu": 0.5}, "cpo": {"cpo_alpha": 0.5}}


@pytest.fixture(scope="module")
def setup():
    return _trl_runs.setup()


class _Checked(FastDPOTrainer):
    """Records, at every step, the trainer's loss and fastdpo.dpo_loss on the full logits of the same batch."""

    def __init__(self, *args, expected_options, **kwargs):
        super().__init__(*args, **kwargs)
        self.expected_options = expected_options
        self.checked = []

    def _compute_loss(self, model, inputs, return_outputs):
        loss = super()._compute_loss(model, inputs, return_outputs)
        with torch.no_grad():
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
            kw = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            logits = model(**kw).logits[:, :-1].float()
            ref_logits = self.ref_model(**kw).logits[:, :-1].float()
            want = fastdpo.dpo_loss(logits, labels, ref_logits=ref_logits, backend="torch", **self.expected_options)
        self.checked.append((loss.detach().item(), want.loss.item(), want.metrics))
        return loss


def _run(setup, tmp_path, name, loss_options=None, **config):
    tok, data, model0 = setup
    args = _trl_runs.dpo_args(tmp_path / name, config_cls=FastDPOConfig, loss_type=name, loss_options=loss_options,
                              **config)
    expected = dict(loss_type=name, beta=args.beta, label_smoothing=args.label_smoothing,
                    average_log_prob=args.average_log_prob, **(loss_options or {}))
    trainer = _Checked(model=copy.deepcopy(model0), ref_model=copy.deepcopy(model0), args=args, train_dataset=data,
                       processing_class=tok, expected_options=expected, fastdpo_backend="cpu")
    trainer.train()
    return trainer


def _check_run(trainer, setup):
    assert len(trainer.checked) == STEPS
    for step, (got, want, _) in enumerate(trainer.checked):
        assert math.isfinite(got)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (step, got, want)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == STEPS
    moved = any(not torch.equal(p, setup[2].get_parameter(n)) for n, p in trainer.model.named_parameters())
    assert moved, "training did not change the parameters"
    return logs


def test_every_registered_paired_objective_is_tested():
    names = set(trainer_losses())
    assert {"simpo", "rdpo", "dpo_ties", "margin_dpo", "asft", "tpo", "rrpo", "tdpo", "sigmoid", "orpo"} <= names
    assert not names & {"kto", "bco", "apo_zero_unpaired"}  # unpaired


@pytest.mark.parametrize("name", trainer_losses())
def test_objective_trains_and_matches_dpo_loss(name, setup, tmp_path):
    trainer = _run(setup, tmp_path, name, LOSS_OPTIONS.get(name), **CONFIG.get(name, {}))
    logs = _check_run(trainer, setup)
    if name in ("rrpo", "tdpo"):
        for log, (_, _, metrics) in zip(logs, trainer.checked):
            assert log["kl/chosen"] == pytest.approx(metrics["kl/chosen"].item(), rel=1e-4, abs=1e-6)
        assert logs[-1]["kl/chosen"] > 0  # the policy moved away from the reference


def test_user_registered_objective(setup, tmp_path):
    import torch.nn.functional as F

    @fastdpo.register_loss("test_trainer_margin", defaults={"gamma": 0.0}, overwrite=True)
    def my_loss(s, cfg):
        return -F.logsigmoid(cfg.beta * (s.chosen_logratios - s.rejected_logratios) - cfg.gamma)

    trainer = _run(setup, tmp_path, "test_trainer_margin", {"gamma": 0.2})
    _check_run(trainer, setup)


def test_average_log_prob(setup, tmp_path):
    trainer = _run(setup, tmp_path, "sigmoid", average_log_prob=True, beta=2.0)
    logs = _check_run(trainer, setup)
    # per-token means (about -3.5 for this vocabulary of 34) instead of sums over ~10 tokens (about -22)
    assert -5.0 < logs[0]["logps/chosen"] < 0
    assert logs[0]["logps/chosen"] == pytest.approx(trainer.checked[0][2]["logps/chosen"].item(), rel=1e-5)


def test_nll_loss_logged_with_an_sft_term(setup, tmp_path):
    tok, data, model0 = setup
    args = _trl_runs.dpo_args(tmp_path / "nll", config_cls=FastDPOConfig, loss_type=["sigmoid", "sft"],
                              loss_weights=[1.0, 0.5])
    trainer = _Checked(model=copy.deepcopy(model0), ref_model=copy.deepcopy(model0), args=args, train_dataset=data,
                       processing_class=tok, expected_options=dict(loss_type=["sigmoid", "sft"],
                                                                   loss_weights=[1.0, 0.5]))
    trainer.train()
    logs = _check_run(trainer, setup)
    for log, (_, _, metrics) in zip(logs, trainer.checked):
        assert log["nll_loss"] == pytest.approx(metrics["nll_loss"].item(), rel=1e-5)
        assert log["nll_loss"] > 0


def test_loss_options_from_the_command_line(tmp_path):
    """TRL's CLI passes dict options as JSON strings."""
    args = _trl_runs.dpo_args(tmp_path, config_cls=FastDPOConfig, loss_type="simpo",
                              loss_options='{"simpo_gamma": 0.7}')
    assert args.loss_options == {"simpo_gamma": 0.7}


@pytest.mark.parametrize("options,named", [
    (dict(loss_type="simpo", loss_options={"simpo_gama": 0.5}), "simpo_gama"),
    (dict(loss_type="rrpo", loss_options={"rrpo_alpha": -1.0}), "rrpo_alpha"),
    (dict(loss_type="tpo"), "tpo_alpha"),
    (dict(loss_type="kto"), "unpaired"),
    (dict(loss_type="rrpo", precompute_ref_log_probs=True), "precompute_ref_log_probs"),
    (dict(loss_type="simpo", loss_options={"beta": 2.0}), "beta"),
    (dict(loss_type="simpo", average_log_prob="yes"), "average_log_prob"),
])
def test_config_validates_at_construction(options, named, tmp_path):
    with pytest.raises((ValueError, TypeError), match=named):
        _trl_runs.dpo_args(tmp_path, config_cls=FastDPOConfig, **options)


def test_token_kl_objective_projects_reference_in_the_policy_pass(setup, tmp_path, monkeypatch):
    """rrpo: the reference forward's head inputs go into the policy's fused-linear pass (one call of
    fastdpo.ops.linear.linear_token_logprobs with ref_hidden and kl=True per step), and the plain TRL head
    function is not called."""
    import fastdpo.integrations._linear as lin
    import fastdpo.ops.linear as ops_linear

    calls = []
    orig = ops_linear.linear_token_logprobs

    def spy(*a, **k):
        calls.append((k.get("ref_hidden") is not None, k.get("kl")))
        return orig(*a, **k)

    monkeypatch.setattr(ops_linear, "linear_token_logprobs", spy)
    monkeypatch.setattr(lin.LinearLogprobsFunction, "apply",
                        staticmethod(lambda *a: (_ for _ in ()).throw(AssertionError("separate head pass"))))
    trainer = _run(setup, tmp_path, "rrpo", {"rrpo_alpha": 0.05})
    _check_run(trainer, setup)
    assert calls == [(True, True)] * STEPS


@pytest.mark.parametrize("name", ["rrpo", "tdpo"])
def test_token_kl_objective_under_bf16_autocast(name, setup, tmp_path):
    """The paired head pass under ``bf16=True``: both heads form their logits in bf16, as the model's own
    forward does under the same autocast, so the loss equals fastdpo.dpo_loss on the model's bf16 logits (measured:
    within 1e-7 relative; the bound leaves room for the GEMMs' summation order)."""
    trainer = _run(setup, tmp_path, name, LOSS_OPTIONS.get(name), bf16=True)
    assert len(trainer.checked) == STEPS
    for got, want, _ in trainer.checked:
        assert math.isfinite(got)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
