"""Loss options that would give a silent wrong answer are errors, at every entry point, with messages that
say what was wrong: non-finite numbers, a reference-anchored objective without a reference (unless
``reference_free=True``), misspelt options (what the fallback warning says is in test_build.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastdpo
from fastdpo.integrations import _losses, openrlhf, torchtune

V = 11
NAN, INF = float("nan"), float("inf")


def _batch(n=4, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, T, V, generator=g)
    ref = torch.randn(n, T, V, generator=g)
    labels = torch.randint(0, V, (n, T), generator=g)
    labels[:, :2] = -100
    return logits, ref, labels


def _linear_batch(n=4, T=5, H=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, rh = torch.randn(n, T, H, generator=g), torch.randn(n, T, H, generator=g)
    w = torch.randn(V, H, generator=g)
    _, _, labels = _batch(n, T, seed)
    return h, rh, w, labels


# ------------------------------------------------------------------------------------------ non-finite options

NON_FINITE = [
    (dict(beta=NAN), "beta"),
    (dict(beta=INF), "beta"),
    (dict(beta=torch.tensor([0.1, NAN])), "beta"),
    (dict(label_smoothing=NAN), "label_smoothing"),
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, NAN]), r"loss_weights\[1\]"),
    (dict(ld_alpha=NAN), "ld_alpha"),
    (dict(discopop_tau=INF, loss_type="discopop"), "discopop_tau"),
    (dict(f_alpha_divergence_coef=NAN, f_divergence_type="alpha_divergence"), "f_alpha_divergence_coef"),
    (dict(loss_type="margin_dpo", margin=NAN), "margin"),
    (dict(loss_type="margin_dpo", margin=torch.tensor([0.0, INF])), "margin"),
    (dict(loss_type="simpo", simpo_gamma=INF), "simpo_gamma"),
    (dict(loss_type="cpo", cpo_alpha=NAN), "cpo_alpha"),
    (dict(loss_type="bco", max_density_ratio=INF), "max_density_ratio"),
    (dict(loss_type="rrpo", rrpo_alpha=NAN), "rrpo_alpha"),
]


@pytest.mark.parametrize("opts, name", NON_FINITE, ids=[f"{n}-{i}" for i, (_, n) in enumerate(NON_FINITE)])
def test_non_finite_options_are_rejected_by_name(opts, name):
    logits, ref, labels = _batch()
    with pytest.raises(ValueError, match=rf"{name}.*finite.*(nan|inf)"):
        fastdpo.dpo_loss(logits, labels, ref_logits=ref, backend="torch", **opts)
    h, rh, w, labels = _linear_batch()
    with pytest.raises(ValueError, match=rf"{name}.*finite"):
        fastdpo.linear_dpo_loss(h, w, labels, ref_hidden=rh, backend="torch", **opts)
    with pytest.raises(ValueError, match=rf"{name}.*finite"):  # without a batch: what the trainer checks
        _losses.check_loss_options(**opts)


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_beta_everywhere(value):
    logits, ref, labels = _batch()
    lp = torch.randn(2)
    calls = {
        "DPOLoss": lambda: fastdpo.DPOLoss(beta=value, backend="torch")(logits, labels, ref_logits=ref),
        "token log-probs (trainer path)": lambda: _losses.loss_from_token_logprobs(
            torch.randn(4, 5), labels, ref_token_logps=torch.randn(4, 5), beta=value),
        "torchtune DPOLoss": lambda: torchtune.DPOLoss(beta=value)(lp, lp, lp, lp),
        "torchtune IPOLoss": lambda: torchtune.IPOLoss(tau=value)(lp, lp, lp, lp),
        "torchtune SimPOLoss": lambda: torchtune.SimPOLoss(beta=value)(lp, lp),
        "openrlhf DPOLoss": lambda: openrlhf.DPOLoss(beta=value)(lp, lp, lp, lp),
    }
    for where, call in calls.items():
        with pytest.raises(ValueError, match="beta must be a finite number"):
            call()
            pytest.fail(where)


@pytest.mark.parametrize("opts, name", [(dict(temperature=NAN), "temperature"), (dict(softcap=INF), "softcap"),
                                        (dict(logit_scale=NAN), "logit_scale")])
def test_non_finite_logit_transform_is_rejected(opts, name):
    h, rh, w, labels = _linear_batch()
    with pytest.raises(ValueError, match=rf"{name} must be a finite number"):
        fastdpo.linear_dpo_loss(h, w, labels, ref_hidden=rh, **opts)
    from fastdpo.integrations._linear import linear_token_logprobs

    with pytest.raises(ValueError, match="finite number"):
        linear_token_logprobs(h.reshape(-1, 6), w, labels.reshape(-1).clamp(min=0), **opts)


def test_trainer_rejects_nan_beta_at_construction(tmp_path):
    pytest.importorskip("trl")
    from trl import DPOConfig

    from fastdpo.integrations.trl import FastDPOTrainer

    args = DPOConfig(output_dir=str(tmp_path), beta=NAN, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="beta must be a finite number, got nan"):
        FastDPOTrainer(model=None, args=args)  # before any model or data is touched


# ------------------------------------------------------------------------------------------ the reference

ANCHORED = ["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "margin_dpo", "plackett_luce"]
WAYS = ("ref_logits", "ref_hidden", "ref_logps", "reference_free=True")


def _assert_names_loss_and_ways(excinfo, loss, ways=WAYS):
    msg = str(excinfo.value)
    assert loss in msg, msg
    for w in ways:
        assert w in msg, msg


@pytest.mark.parametrize("loss", ANCHORED)
def test_anchored_loss_without_reference_is_an_error_unless_reference_free(loss):
    n = 6 if loss == "plackett_luce" else 4
    logits, _, labels = _batch(n)
    with pytest.raises(ValueError) as e:
        fastdpo.dpo_loss(logits, labels, loss_type=loss, backend="torch")
    _assert_names_loss_and_ways(e, loss)
    with pytest.raises(ValueError) as e:
        fastdpo.DPOLoss(loss_type=loss, backend="torch")(logits, labels)
    _assert_names_loss_and_ways(e, loss)
    # asked for explicitly: the policy log-probs alone, i.e. a reference of log-prob 0 for every sequence
    free = fastdpo.dpo_loss(logits, labels, loss_type=loss, backend="torch", reference_free=True)
    zero = fastdpo.dpo_loss(logits, labels, loss_type=loss, backend="torch", ref_logps=torch.zeros(n))
    torch.testing.assert_close(free.loss, zero.loss)
    assert free.ref_logps is None


def test_anchored_loss_without_reference_linear_and_token_entry_points():
    h, _, w, labels = _linear_batch()
    with pytest.raises(ValueError) as e:
        fastdpo.linear_dpo_loss(h, w, labels, loss_type="ipo", backend="torch")
    _assert_names_loss_and_ways(e, "ipo")
    with pytest.raises(ValueError) as e:
        fastdpo.LinearDPOLoss(loss_type="ipo", backend="torch")(h, w, labels)
    _assert_names_loss_and_ways(e, "ipo")
    free = fastdpo.linear_dpo_loss(h, w, labels, loss_type="ipo", backend="torch", reference_free=True)
    assert torch.isfinite(free.loss)
    logps = torch.randn(4, 5).masked_fill(labels == -100, 0.0)
    with pytest.raises(ValueError) as e:  # the trainer's entry into the loss library
        _losses.loss_from_token_logprobs(logps, labels, loss_type="sigmoid")
    _assert_names_loss_and_ways(e, "sigmoid")
    out = _losses.loss_from_token_logprobs(logps, labels, loss_type="sigmoid", reference_free=True)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("make", [lambda: torchtune.DPOLoss(), lambda: torchtune.RSOLoss(), lambda: torchtune.IPOLoss(),
                                  lambda: openrlhf.DPOLoss(beta=0.1), lambda: openrlhf.DPOLoss(beta=0.1, ipo=True)],
                         ids=["torchtune-dpo", "torchtune-rso", "torchtune-ipo", "openrlhf-dpo", "openrlhf-ipo"])
def test_pair_loss_modules_need_the_reference_log_probs(make):
    lp = torch.randn(3)
    with pytest.raises(ValueError, match="reference_chosen_logps and reference_rejected_logps"):
        make()(lp, lp, None, None)


def test_causal_lm_dpo_loss_needs_a_reference_or_reference_free():
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.dirname(__file__))
    from _tiny_lm import tiny_llama

    from fastdpo.integrations.transformers import causal_lm_dpo_loss

    model = tiny_llama(V)
    ids = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with pytest.raises(ValueError) as e:
        causal_lm_dpo_loss(model, batch, loss_type="sigmoid")
    _assert_names_loss_and_ways(e, "sigmoid", ways=("ref_model", "ref_logps", "reference_free=True"))
    free = causal_lm_dpo_loss(model, batch, loss_type="sigmoid", reference_free=True)
    zero = causal_lm_dpo_loss(model, batch, loss_type="sigmoid", ref_logps=torch.zeros(4))
    torch.testing.assert_close(free.loss, zero.loss)
    assert torch.isfinite(causal_lm_dpo_loss(model, batch, loss_type="simpo").loss)


@pytest.mark.parametrize("loss", ["simpo", "cpo", "orpo", "alphapo", "asft", "tpo", "sft"])
def test_reference_free_objectives_need_no_flag(loss):
    n = 6 if loss == "tpo" else 4
    logits, _, labels = _batch(n)
    assert torch.isfinite(fastdpo.dpo_loss(logits, labels, loss_type=loss, backend="torch").loss)


def test_reference_free_contradictions():
    logits, ref, labels = _batch()
    with pytest.raises(ValueError, match="one or the other"):
        fastdpo.dpo_loss(logits, labels, ref_logits=ref, reference_free=True, backend="torch")
    with pytest.raises(ValueError, match="one or the other"):
        fastdpo.dpo_loss(logits, labels, ref_logps=torch.zeros(4), reference_free=True, backend="torch")
    with pytest.raises(ValueError, match="'apo_zero' needs a reference and cannot be reference-free"):
        fastdpo.dpo_loss(logits, labels, loss_type="apo_zero", reference_free=True, backend="torch")
    with pytest.raises(TypeError, match="reference_free must be True or False"):
        fastdpo.dpo_loss(logits, labels, reference_free="yes", backend="torch")


# ------------------------------------------------------------------------------------------ messages

def test_misspelt_option_lists_common_and_specific_options():
    logits, ref, labels = _batch()
    with pytest.raises(TypeError) as e:
        fastdpo.dpo_loss(logits, labels, ref_logits=ref, betta=0.2, backend="torch")
    msg = str(e.value)
    assert "'betta'" in msg and "did you mean 'beta'?" in msg
    for opt in ("beta", "label_smoothing", "loss_weights", "ld_alpha", "reference_free", "cdpo"):
        assert opt in msg, msg
    with pytest.raises(TypeError, match="did you mean 'ref_logits'"):
        fastdpo.dpo_loss(logits, labels, ref_logit=ref, backend="torch")
    with pytest.raises(TypeError, match="did you mean 'simpo_gamma'.*options of \\['simpo'\\]: .*simpo_gamma"):
        fastdpo.dpo_loss(logits, labels, loss_type="simpo", simpo_gama=1.0, backend="torch")


@pytest.mark.parametrize("opts, text", [
    (dict(beta=0.0), "beta must be > 0, got 0"),
    (dict(beta=-1), "beta must be > 0, got -1"),
    (dict(label_smoothing=2.0), "label_smoothing must be >= 0 and <= 1, got 2"),
    (dict(ld_alpha=-0.5), "ld_alpha must be >= 0 and <= 1, got -0.5"),
    (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau must be > 0, got 0"),
    (dict(beta="0.1"), "beta must be a number, got str"),
])
def test_range_messages_read_naturally(opts, text):
    logits, ref, labels = _batch()
    with pytest.raises((ValueError, TypeError)) as e:
        fastdpo.dpo_loss(logits, labels, ref_logits=ref, backend="torch", **opts)
    assert text in str(e.value)
    assert "lie in" not in str(e.value) and "None]" not in str(e.value)


# ------------------------------------------------------------------------------------------ version

def test_version_single_source_and_cli():
    import re
    from pathlib import Path

    from fastdpo import _version

    root = Path(fastdpo.__file__).resolve().parents[1]
    pyproject = (root / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M)  # no second copy of the number there
    assert 'version = { attr = "fastdpo._version.__version__" }' in pyproject
    assert fastdpo.__version__ == _version.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", fastdpo.__version__)
    p = subprocess.run([sys.executable, "-m", "fastdpo", "--version"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(root)))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"fastdpo {fastdpo.__version__}"
