"""FastDPOTrainer's ``fastdpo_diagnostics``: off, it logs exactly trl.DPOTrainer's metric names; on, it adds the
loss library's ``diagnostics/...`` metrics (in training and in evaluation), whose values equal a direct
full-logits computation on the trainer's own batch."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TQDM_DISABLE", "1")

from trl import DPOTrainer  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _diag_truth import truth  # noqa: E402
from _tiny_lm import char_tokenizer, preference_dataset, tiny_llama  # noqa: E402
from test_integrations_trl import STEPS  # noqa: E402
from test_integrations_trl import _args as _trl_args  # noqa: E402

from fastdpo.integrations.trl import FastDPOTrainer  # noqa: E402
from fastdpo.losses.diagnostics import PREFIX  # noqa: E402

DIAG_KEYS = {PREFIX + k for k in (
    "logratio/chosen", "logratio/rejected", "logratio_per_token/chosen", "logratio_per_token/rejected",
    "below_ref/chosen", "below_ref/rejected", "weight/mean", "weight/p10", "weight/p90", "weight/frac_small",
    "grad_norm/chosen", "grad_norm/rejected", "grad_norm/total", "grad_norm/ratio", "margin/mean", "margin/p10",
    "margin/p90")}


@pytest.fixture(scope="module")
def setup():
    tok = char_tokenizer()
    return tok, preference_dataset(8), tiny_llama(len(tok))


def _args(tmp_path, name):
    return _trl_args(tmp_path, name, per_device_eval_batch_size=4)


def _trainer(cls, setup, args, **kwargs):
    tok, data, model0 = setup
    return cls(model=copy.deepcopy(model0), ref_model=copy.deepcopy(model0), args=args, train_dataset=data,
               eval_dataset=data, processing_class=tok, **kwargs)


def _logged(trainer):
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    trainer.evaluate()
    return steps, trainer.state.log_history[-1]


def test_without_diagnostics_the_logged_metrics_are_trls(setup, tmp_path):
    ref_steps, ref_eval = _logged(_trainer(DPOTrainer, setup, _args(tmp_path, "trl")))
    steps, ev = _logged(_trainer(FastDPOTrainer, setup, _args(tmp_path, "fast"), fastdpo_backend="cpu"))
    assert len(steps) == len(ref_steps) == STEPS
    for a, b in zip(steps, ref_steps):
        assert a.keys() == b.keys()
    assert ev.keys() == ref_eval.keys()


def test_with_diagnostics_they_are_logged_beside_trls_metrics(setup, tmp_path):
    ref_steps, ref_eval = _logged(_trainer(DPOTrainer, setup, _args(tmp_path, "trl")))
    steps, ev = _logged(_trainer(FastDPOTrainer, setup, _args(tmp_path, "fast"), fastdpo_backend="cpu",
                                 fastdpo_diagnostics=True))
    for a, b in zip(steps, ref_steps):
        assert a.keys() == b.keys() | DIAG_KEYS
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)  # the training itself is unchanged
        assert a[PREFIX + "margin/mean"] == pytest.approx(a["rewards/margins"], rel=1e-5, abs=1e-7)
        assert all(torch.isfinite(torch.tensor(a[k])) for k in DIAG_KEYS)
    assert ev.keys() == ref_eval.keys() | {"eval_" + k for k in DIAG_KEYS}  # evaluation runs without grad


def test_logged_values_equal_a_full_logits_computation_on_the_batch(setup, tmp_path):
    trainer = _trainer(FastDPOTrainer, setup, _args(tmp_path, "fast"), fastdpo_backend="cpu",
                       fastdpo_diagnostics=True)
    trainer.train()  # away from the reference, so that log-ratios and weights spread
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.compute_loss(trainer.model, inputs)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith(PREFIX)}

    kwargs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
    with torch.no_grad():
        logits = trainer.model(**kwargs).logits[:, :-1].double()
        ref_logits = trainer.ref_model(**kwargs).logits[:, :-1].double()
    want, _, _ = truth("sigmoid", logits.requires_grad_(True), ref_logits, labels)
    assert logged.keys() == want.keys()
    assert want[PREFIX + "weight/p10"][0] < want[PREFIX + "weight/p90"][0]
    for k, (v, scale) in want.items():
        assert logged[k] == pytest.approx(float(v), rel=1e-5, abs=1e-5 * scale), k


def test_flag_must_be_a_bool(setup, tmp_path):
    with pytest.raises(TypeError, match="fastdpo_diagnostics must be True or False"):
        _trainer(FastDPOTrainer, setup, _args(tmp_path, "fast"), fastdpo_diagnostics="on")


def test_packed_batches_log_the_same_diagnostics(setup, tmp_path):
    """padding_free=True (packed rows) logs the diagnostics of the padded batches."""
    runs = []
    for packed in (False, True):
        trainer = _trainer(FastDPOTrainer, setup, _trl_args(tmp_path, f"packed-{packed}", padding_free=packed),
                           fastdpo_backend="cpu", fastdpo_diagnostics=True)
        trainer.train()
        runs.append([h for h in trainer.state.log_history if "loss" in h])
    for padded, packed in zip(*runs):
        assert packed.keys() == padded.keys() and DIAG_KEYS <= packed.keys()
        for k in DIAG_KEYS:
            # the model runs on packed rows instead of padded ones: float32 rounding differs (4.5e-6 measured)
            assert packed[k] == pytest.approx(padded[k], rel=5e-5, abs=1e-7), k
