"""The check of the TRL internals the integration relies on: what raises, what warns, and the fused-head
replacement's reading of TRL's arguments by name."""

from __future__ import annotations

import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

pytest.importorskip("trl")

import trl  # noqa: E402
import trl.models.utils as trl_models_utils  # noqa: E402
import trl.trainer.utils as trl_utils  # noqa: E402
from trl import DPOTrainer  # noqa: E402

from fastdpo.integrations import _trl_compat  # noqa: E402
from fastdpo.integrations._trl_compat import TRLCompatibilityWarning  # noqa: E402
from fastdpo.integrations.trl import FastChunkedLogProbFunction, patch_fused_lm_head  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _utils(**changes):
    mod = types.SimpleNamespace(**vars(trl_utils))
    for k, v in changes.items():
        if v is None:
            delattr(mod, k)
        else:
            setattr(mod, k, v)
    return mod


def _trainer(drop=(), **changes):
    attrs = {k: getattr(DPOTrainer, k) for k in ("__init__", "compute_loss", "_compute_loss", "compute_ref_log_probs",
                                                 "_precompute_ref_logps") if k not in drop}
    return type("DPOTrainer", (), {**attrs, **changes})


def _check(version=None, **objs):
    objs = {"dpo_trainer": _trainer(), "utils": _utils(), "models_utils": trl_models_utils, **objs}
    return _trl_compat.check(version or trl.__version__, **objs)


class _NewHead(torch.autograd.Function):
    """TRL's fused-head function with one more parameter, as a later release might have it."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                logit_scale=1.0, outputs=("entropy",), new_knob=0.0):  # pragma: no cover - never called
        raise AssertionError


def test_installed_trl_has_every_internal():
    missing, changed = _trl_compat.find_problems(DPOTrainer, trl_utils, trl_models_utils)
    assert missing == [] and changed == []


def test_newer_release_warns_and_runs():
    with pytest.warns(TRLCompatibilityWarning, match=r"tested with trl 1\.15\.0 and 1\.16\.0; found trl 1\.17\.2"):
        assert _check("1.17.2") == "1.17.2"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check("1.16.0")  # a tested release with the tested internals: silent


@pytest.mark.parametrize("objs,named", [
    (dict(dpo_trainer=_trainer(drop=("_compute_loss",))), r"DPOTrainer\._compute_loss"),
    (dict(dpo_trainer=_trainer(drop=("compute_ref_log_probs",))), r"DPOTrainer\.compute_ref_log_probs"),
    (dict(dpo_trainer=_trainer(compute_loss=lambda self, model, inputs, return_outputs=False: 0)),
     r"compute_loss calling self\._compute_loss"),
    (dict(dpo_trainer=_trainer(__init__=lambda self, *a, **k: None)), "__init__ calling add_fused_lm_head"),
    (dict(utils=_utils(_ChunkedLogProbFunction=None)), r"_ChunkedLogProbFunction"),
    (dict(utils=_utils(add_fused_lm_head=lambda model, **k: None)), "add_fused_lm_head calling"),
    (dict(utils=_utils(use_adapter=None)), "use_adapter"),
    (dict(utils=_utils(FusedCausalLMOutput=types.SimpleNamespace(__dataclass_fields__={"log_probs": 1}))),
     r"FusedCausalLMOutput field\(s\) \['entropy'"),
])
def test_missing_internal_raises_naming_it(objs, named):
    with pytest.raises(ImportError, match=named):
        _check("1.17.0", **objs)


def test_head_without_a_needed_parameter_raises():
    class Head(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, temperature):  # pragma: no cover
            raise AssertionError

    with pytest.raises(ImportError, match=r"parameter\(s\) \['targets'\]"):
        _check(utils=_utils(_ChunkedLogProbFunction=Head))


def test_changed_signatures_warn_naming_them():
    with pytest.warns(TRLCompatibilityWarning, match="new_knob"):
        _check("1.16.0", utils=_utils(_ChunkedLogProbFunction=_NewHead))
    with pytest.warns(TRLCompatibilityWarning, match=r"DPOTrainer\._compute_loss"):
        _check("1.16.0", dpo_trainer=_trainer(_compute_loss=lambda self, model, inputs, return_outputs, extra=0: 0))


def test_older_release_refused():
    with pytest.raises(ImportError, match=r"trl>=1\.15\.0"):
        _check("1.14.9")


def test_head_reads_trl_arguments_by_name():
    """The replacement of a head with a new parameter: that parameter at its default is accepted, another value
    raises naming it; arguments are read by name, whatever their position."""
    fn = FastChunkedLogProbFunction.replacing(_NewHead, backend="torch")
    assert fn.trl_params[-1] == "new_knob" and fn.unknown_defaults == {"new_knob": 0.0}
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(5, 4, generator=g), torch.randn(7, 4, generator=g)
    y = torch.randint(0, 7, (5,), generator=g)
    ref = FastChunkedLogProbFunction("torch").apply(h, w, None, y, 1.0, 16, None, 1.0, ("entropy",))
    got = fn.apply(h, w, None, y, 1.0, 16, None, 1.0, ("entropy",), 0.0)
    torch.testing.assert_close(got[0], ref[0])
    got = fn.apply(hidden=h, weight=w, bias=None, targets=y, temperature=1.0, chunk_size=16, outputs=("entropy",))
    torch.testing.assert_close(got[1], ref[1])
    with pytest.raises(TypeError, match=r"new_knob=1\.0"):
        fn.apply(h, w, None, y, 1.0, 16, None, 1.0, ("entropy",), 1.0)


def test_patch_takes_the_signature_of_the_function_it_replaces(monkeypatch):
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", _NewHead)
    with patch_fused_lm_head(backend="torch") as p:
        assert p.function.trl_params[-1] == "new_knob"
        with patch_fused_lm_head(backend="torch") as inner:  # nested: same signature
            assert inner.function.trl_params == p.function.trl_params
    assert trl_utils._ChunkedLogProbFunction is _NewHead


@pytest.mark.parametrize("version,expect", [("1.17.0", "warns"), ("1.14.0", "raises")])
def test_import_with_another_trl_version(version, expect):
    """``import fastdpo.integrations.trl`` under a TRL reporting another version: newer imports with a warning,
    older raises ImportError."""
    code = (f"import trl, warnings; trl.__version__ = {version!r}\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    try:\n"
            "        import fastdpo.integrations.trl\n"
            "    except ImportError as e:\n"
            "        print('ImportError', e); raise SystemExit(0)\n"
            "print('imported', [str(x.message) for x in w if x.category.__name__ == 'TRLCompatibilityWarning'])\n")
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    if expect == "warns":
        assert out.startswith("imported") and f"found trl {version}" in out, out
    else:
        assert out.startswith("ImportError") and "trl>=1.15.0" in out, out
