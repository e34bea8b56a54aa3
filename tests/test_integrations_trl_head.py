"""fastdpo's kernel behind TRL's fused LM head gives TRL's per-token outputs and gradients."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from trl.kernels import ChunkedLogProbFunction  # noqa: E402

import trl.trainer.utils as trl_utils  # noqa: E402
from fastdpo.integrations.trl import FastChunkedLogProbFunction, is_fused_lm_head_patched, patch_fused_lm_head  # noqa: E402

ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _inputs(seed, n=23, h=12, v=37, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[3] = weight.mv(hidden[3]).argmax()  # at least one top-1 hit
    return hidden, weight, b, targets


def _run(fn, hidden, weight, bias, targets, temperature, softcap, scale, outputs, grad_entropy):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True) if bias is not None else None
    res = fn.apply(h, w, b, targets, temperature, 16, softcap, scale, outputs)
    g = torch.Generator().manual_seed(7)
    loss = (res[0] * torch.randn(res[0].shape, generator=g, dtype=res[0].dtype)).sum()
    if grad_entropy:
        loss = loss + (res[1] * torch.rand(res[1].shape, generator=g, dtype=res[1].dtype)).sum()
    loss.backward()
    grads = (h.grad, w.grad, b.grad if b is not None else None)
    return res, grads


@pytest.mark.parametrize("temperature,softcap,scale", [(1.0, None, 1.0), (0.7, None, 1.0), (1.0, 3.0, 1.0),
                                                       (1.3, 2.5, 0.5), (1.0, None, 0.0625), (1.0, 4.0, -0.5)])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_same_outputs_and_gradients_as_trl(temperature, softcap, scale, backend):
    hidden, weight, bias, targets = _inputs(0)
    outputs = ALL
    ref, ref_g = _run(ChunkedLogProbFunction, hidden, weight, bias, targets, temperature, softcap, scale, outputs, True)
    ours, ours_g = _run(FastChunkedLogProbFunction(backend, block_elements=37 * 5), hidden, weight, bias, targets,
                        temperature, softcap, scale, outputs, True)
    for name, a, b in zip(ALL, ours, ref):
        assert a.dtype == b.dtype, name
        if b.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    for name, a, b in zip(("hidden", "weight", "bias"), ours_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy", "mean_logits", "is_top1")])
def test_optional_outputs_are_none_like_trl(outputs):
    hidden, weight, _, targets = _inputs(1, bias=False)
    ref, ref_g = _run(ChunkedLogProbFunction, hidden.float(), weight.float(), None, targets, 1.0, None, 1.0, outputs,
                      False)
    ours, ours_g = _run(FastChunkedLogProbFunction("cpu"), hidden.float(), weight.float(), None, targets, 1.0, None,
                        1.0, outputs, False)
    for a, b in zip(ours, ref):
        assert (a is None) == (b is None)
        if b is not None and b.dtype != torch.bool:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_g[0], ref_g[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_g[1], ref_g[1], rtol=1e-5, atol=1e-5)


def test_patch_swaps_and_restores_trl_function():
    original = trl_utils._ChunkedLogProbFunction
    assert not is_fused_lm_head_patched()
    with patch_fused_lm_head(backend="cpu") as p:
        assert trl_utils._ChunkedLogProbFunction is p.function
        assert is_fused_lm_head_patched()
        with patch_fused_lm_head(backend="torch"):
            assert trl_utils._ChunkedLogProbFunction.backend == "torch"
        assert trl_utils._ChunkedLogProbFunction is p.function
    assert trl_utils._ChunkedLogProbFunction is original
    p = patch_fused_lm_head()
    assert is_fused_lm_head_patched()
    p.remove()
    assert trl_utils._ChunkedLogProbFunction is original


def test_patched_model_forward_matches_trl():
    """A tiny causal LM given TRL's fused LM head: per-token outputs and parameter gradients agree."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).float()
    trl_utils.add_fused_lm_head(model, temperature=0.9, outputs=ALL)
    ids = torch.randint(0, 61, (3, 9))
    labels = ids.clone()
    labels[:, :3] = -100
    labels[2, 7:] = -100

    def run():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + 0.1 * out.entropy.sum()).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    ref, ref_g = run()
    with patch_fused_lm_head(backend="cpu"):
        ours, ours_g = run()
    for f in ALL:
        a, b = getattr(ours, f), getattr(ref, f)
        if b.dtype == torch.bool:
            assert torch.equal(a, b), f
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f)
    for n in ref_g:
        torch.testing.assert_close(ours_g[n], ref_g[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("bias", [False, True])
def test_autocast_bf16_no_less_accurate_than_trl(bias):
    """Under bf16 autocast (fp32 parameters), each output and gradient is at least as close to the float64
    truth as TRL's own function's: only the recomputed logits are rounded to bf16, not the logits gradient
    nor the gradient GEMMs' outputs."""
    hidden, weight, b, targets = _inputs(2, n=211, h=24, v=53, bias=bias)
    hidden, weight = hidden.float(), weight.float()
    b = b.float() if b is not None else None
    g = torch.Generator().manual_seed(3)
    coef = torch.randn(hidden.shape[0], generator=g)

    def grads(fn, autocast, dtype=torch.float32):
        h = hidden.to(dtype, copy=True).requires_grad_(True)
        w = weight.to(dtype, copy=True).requires_grad_(True)
        bb = b.to(dtype, copy=True).requires_grad_(True) if b is not None else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            lp = fn.apply(h, w, bb, targets, 1.0, 16, None, 1.0, ALL)[0]
        (lp * coef.to(lp.dtype)).sum().backward()
        return [lp.detach().double(), h.grad.double(), w.grad.double()] + ([bb.grad.double()] if bb is not None else [])

    truth = grads(ChunkedLogProbFunction, False, torch.float64)
    ref = grads(ChunkedLogProbFunction, True)
    ours = grads(FastChunkedLogProbFunction("cpu"), True)
    for name, t, r, o in zip(("log_probs", "hidden", "weight", "bias"), truth, ref, ours):
        assert r.dtype == o.dtype
        err_ref, err_ours = (r - t).norm() / t.norm(), (o - t).norm() / t.norm()
        assert err_ref > 0, name  # autocast rounded something
        assert err_ours <= err_ref * 1.0 + 1e-7, (name, err_ours.item(), err_ref.item())
