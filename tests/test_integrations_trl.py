"""End to end: trl.DPOTrainer and fastdpo's FastDPOTrainer train a tiny random Llama the same way.

Each configuration runs a few optimizer steps with both trainers from the same seed; the logged loss and
metrics of every step and the final parameters must agree. Plus: options that cannot be honoured raise an
error naming them, TRL's version is guarded, and ``import fastdpo`` never imports TRL.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")

from trl import DPOConfig, DPOTrainer  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import _trl_runs  # noqa: E402
from _trl_runs import STEPS  # noqa: E402

from fastdpo.integrations import _trl_compat  # noqa: E402
from fastdpo.integrations.trl import SUPPORTED_TRL, TESTED_TRL, FastDPOTrainer, check_trl_version  # noqa: E402

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"]

CONFIGS = {
    "sigmoid": dict(loss_type="sigmoid"),
    "ipo": dict(loss_type="ipo", beta=0.5),
    "robust": dict(loss_type="robust", label_smoothing=0.2),
    "multi": dict(loss_type=["sigmoid", "sft", "bco_pair"], loss_weights=[0.8, 0.2, 1.0]),
    "f_divergence": dict(loss_type="sigmoid", f_divergence_type="js_divergence"),
    "ld_alpha": dict(loss_type="sigmoid", ld_alpha=0.5),
    "use_weighting": dict(loss_type="sigmoid", use_weighting=True),
    "precompute": dict(loss_type="sigmoid", precompute_ref_log_probs=True),
}


@pytest.fixture(scope="module")
def setup():
    return _trl_runs.setup()


def _args(tmp_path, name, **options):
    return _trl_runs.dpo_args(tmp_path / name, **options)


def _train(cls, setup, args, **kwargs):
    return _trl_runs.train(cls, setup, args, **kwargs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fastdpo_trainer_matches_dpo_trainer(name, setup, tmp_path):
    options = CONFIGS[name]
    ref_logs, ref_params = _train(DPOTrainer, setup, _args(tmp_path, "trl-" + name, **options))
    logs, params = _train(FastDPOTrainer, setup, _args(tmp_path, "fast-" + name, **options),
                          fastdpo_backend="cpu")
    assert len(logs) == len(ref_logs) == STEPS
    for step, (a, b) in enumerate(zip(logs, ref_logs)):
        for k in METRICS:
            assert k in a, (step, k)
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (name, step, k, a[k], b[k])
    moved = False
    # Both trainers' gradients agree to fp32 rounding (~1e-7 relative: see grad_norm), but AdamW divides
    # each update by the gradient's running RMS, so elements whose gradient is near zero turn such
    # rounding into visible update differences; the bound is a small fraction of one step (lr).
    lr = _args(tmp_path, "lr").learning_rate
    for n, p in ref_params.items():
        torch.testing.assert_close(params[n], p, rtol=1e-4, atol=1e-3 * lr, msg=n)
        moved |= not torch.equal(p, setup[2].get_parameter(n))
    assert moved, "training did not change the parameters"


def test_peft_reference_is_the_disabled_adapter(setup, tmp_path):
    """LoRA without a ref_model: the reference is the base model (adapter disabled), as in TRL."""
    peft = pytest.importorskip("peft")
    tok, data, model0 = setup
    runs = []
    for cls in (DPOTrainer, FastDPOTrainer):
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        trainer = cls(model=copy.deepcopy(model0), args=_args(tmp_path, cls.__name__), train_dataset=data,
                      processing_class=tok, peft_config=lora)
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
        runs.append((logs, params))
    (ref_logs, ref_params), (logs, params) = runs
    assert ref_params and ref_params.keys() == params.keys()
    for a, b in zip(logs, ref_logs):
        for k in METRICS:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
    assert any(abs(b["rewards/margins"]) > 0 for b in ref_logs[1:])  # the adapter moved away from the reference
    for n, p in ref_params.items():
        torch.testing.assert_close(params[n], p, rtol=1e-4, atol=1e-5, msg=n)


def test_trainer_uses_fastdpo_kernel(setup, tmp_path, monkeypatch):
    """The per-token work goes through fastdpo's fused linear kernel, not TRL's."""
    import fastdpo.integrations._linear as lin

    calls = []
    orig = lin.LinearLogprobsFunction.apply
    monkeypatch.setattr(lin.LinearLogprobsFunction, "apply", lambda *a: calls.append(1) or orig(*a))
    import trl.kernels.chunked_logprob as trl_k

    monkeypatch.setattr(trl_k.ChunkedLogProbFunction, "apply",
                        staticmethod(lambda *a: (_ for _ in ()).throw(AssertionError("TRL's kernel was called"))))
    args = dataclasses.replace(_args(tmp_path, "kernel"), max_steps=1)
    _train(FastDPOTrainer, setup, args)
    assert len(calls) >= 2  # policy and reference


@pytest.mark.parametrize("options,named", [
    (dict(loss_type="not_a_loss"), "loss_type"),
    (dict(loss_type="kto"), "unpaired"),
    (dict(loss_type="sigmoid", beta=0.0), "beta"),
    (dict(loss_type="robust", label_smoothing=1.5), "label_smoothing"),
])
def test_unsupported_options_raise_naming_them(options, named, setup, tmp_path):
    tok, data, model0 = setup
    with pytest.raises((ValueError, TypeError), match=named):
        FastDPOTrainer(model=copy.deepcopy(model0), ref_model=copy.deepcopy(model0),
                       args=_args(tmp_path, "bad", **options), train_dataset=data, processing_class=tok)


def test_unknown_config_option_raises_naming_it(setup, tmp_path):
    """A DPOConfig option fastdpo does not know (e.g. added by a newer TRL) is refused, not ignored."""

    @dataclasses.dataclass
    class NewerDPOConfig(DPOConfig):
        fancy_new_option: float = 0.0

    tok, data, model0 = setup
    args = NewerDPOConfig(**{f.name: getattr(_args(tmp_path, "x"), f.name)
                             for f in dataclasses.fields(DPOConfig) if f.init}, fancy_new_option=1.0)
    with pytest.raises(ValueError, match="fancy_new_option"):
        FastDPOTrainer(model=copy.deepcopy(model0), ref_model=copy.deepcopy(model0), args=args, train_dataset=data,
                       processing_class=tok)


def test_trl_version_range():
    """Releases older than the fused LM head raise; anything newer passes the version check (its internals are
    checked instead: test_trl_compat.py)."""
    import trl

    assert check_trl_version() == trl.__version__
    for bad in ["1.14.2", "0.29.1", "1.0.0"]:
        with pytest.raises(ImportError, match=r"trl>=1\.15"):
            check_trl_version(bad)
    assert SUPPORTED_TRL == ">=1.15.0" and TESTED_TRL == ("1.15.0", "1.16.0")
    for good in ["1.15.0", "1.16.3", "1.17.0", "2.0.0"]:
        check_trl_version(good)
    assert trl.__version__ in TESTED_TRL or _trl_compat.is_newer_than_tested(trl.__version__)


def test_import_fastdpo_does_not_import_trl():
    code = ("import sys, fastdpo, fastdpo.integrations; "
            "bad = [m for m in ('trl', 'transformers', 'peft', 'datasets') if m in sys.modules]; "
            "assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
