"""fastdpo.integrations.transformers against the logits-based computation of the same tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastdpo  # noqa: E402
from fastdpo.integrations.transformers import causal_lm_dpo_loss, causal_lm_logprobs, lm_head_transform  # noqa: E402

V = 53


def _model(kind, tie=False):
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tie)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **common, head_dim=8, final_logit_softcapping=1.5, attn_logit_softcapping=None))
    elif kind == "cohere":
        model = transformers.CohereForCausalLM(transformers.CohereConfig(**common, logit_scale=0.25))
    model = model.float()
    if kind == "llama" and not tie:
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)  # sharper distributions than the default init
    return model.eval()


def _batch(seed=0, n=4, t=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, t), generator=g)
    attn = torch.ones(n, t, dtype=torch.long)
    attn[1, -2:] = 0  # right padding
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :3] = -100  # prompt
    labels[3, :5] = -100
    return ids, attn, labels


def _naive_logps(model, ids, attn, labels, temperature=1.0):
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / temperature
    y = labels[:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp.masked_fill(y == -100, 0.0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind,tie", [("llama", False), ("llama", True), ("gemma2", False), ("cohere", True)])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_logprobs_match_logits(kind, tie, temperature):
    model = _model(kind, tie)
    ids, attn, labels = _batch()
    g = torch.Generator().manual_seed(1)
    w = torch.randn(ids.shape[0], ids.shape[1] - 1, generator=g)

    ref = _naive_logps(model, ids, attn, labels, temperature)
    (ref * w).sum().backward()
    ref_g = _grads(model)
    model.zero_grad()
    ours = causal_lm_logprobs(model, ids, attn, labels=labels, temperature=temperature, backend="cpu")
    (ours * w).sum().backward()
    ours_g = _grads(model)

    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ref_g.keys() == ours_g.keys()
    for n in ref_g:
        torch.testing.assert_close(ours_g[n], ref_g[n], rtol=1e-4, atol=1e-5, msg=n)


def test_config_transform():
    assert lm_head_transform(_model("gemma2")) == (1.5, 1.0)
    assert lm_head_transform(_model("cohere", True)) == (None, 0.25)
    assert lm_head_transform(_model("llama")) == (None, 1.0)
    granite = transformers.GraniteConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         logits_scaling=4.0)
    assert lm_head_transform(granite) == (None, 0.25)


def test_completion_mask_and_stats():
    model = _model("gemma2")
    ids, attn, labels = _batch(1)
    cmask = (labels != -100).long()
    a = causal_lm_logprobs(model, ids, attn, completion_mask=cmask, stats=True, backend="cpu")
    b = causal_lm_logprobs(model, ids, attn, labels=labels, backend="torch")
    torch.testing.assert_close(a.logps, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    st = fastdpo.token_logprobs(logits, labels[:, 1:], stats=True, backend="torch")
    for f in ("entropy", "argmax_hit", "mean_logit", "log_sum_p2"):
        torch.testing.assert_close(getattr(a, f), getattr(st, f), rtol=1e-5, atol=1e-5, msg=f)


@pytest.mark.parametrize("options", [dict(loss_type="sigmoid"), dict(loss_type="ipo", beta=0.5),
                                     dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], ld_alpha=0.5,
                                          use_weighting=True)])
def test_dpo_loss_matches_logits_path(options):
    """causal_lm_dpo_loss == fastdpo.dpo_loss on the model's logits (values, metrics, gradients)."""
    model = _model("gemma2")
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids, attn, labels = _batch(2)

    with torch.no_grad():
        ref_logits = ref_model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    a = fastdpo.dpo_loss(logits, labels[:, 1:], ref_logits=ref_logits, backend="torch", **options)
    a.loss.backward()
    ga = _grads(model)
    model.zero_grad()
    b = causal_lm_dpo_loss(model, {"input_ids": ids, "attention_mask": attn, "labels": labels}, ref_model=ref_model,
                           backend="cpu", **options)
    b.loss.backward()
    gb = _grads(model)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.chosen_rewards, a.chosen_rewards, rtol=1e-5, atol=1e-6)
    for k, v in a.metrics.items():
        torch.testing.assert_close(b.metrics[k], v, rtol=1e-5, atol=1e-5, msg=k)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6, msg=n)

    # precomputed reference sequence log-probs (LD-weighted when ld_alpha is set) give the same loss
    c = causal_lm_dpo_loss(model, {"input_ids": ids, "attention_mask": attn, "labels": labels},
                           ref_logps=b.ref_logps, backend="cpu", **options)
    torch.testing.assert_close(c.loss, b.loss)
