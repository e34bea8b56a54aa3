"""Hugging Face causal LMs: per-token log-probs and DPO-family losses from the final hidden states and the LM head.

The logits ``[B, T, V]`` are never built: the backbone's last hidden states at the
scored positions go through the LM head a block of rows at a time inside
fastdpo's fused kernel (forward and backward). The head's transform is read from
the model config as the model's own forward applies it: ``final_logit_softcapping``
(Gemma 2/3), ``logit_scale`` (Cohere), ``output_multiplier``,
``lm_head_multiplier`` (Falcon-H1) and ``logits_scaling`` (Granite, MiniCPM3
divide by it). Tied input/output embeddings need nothing special: the head's
weight is the embedding matrix, and its gradient accumulates from both uses.

::

    from fastdpo.integrations.transformers import causal_lm_logprobs, causal_lm_dpo_loss

    logps = causal_lm_logprobs(model, input_ids, attention_mask, labels=labels)   # [B, T-1]
    out = causal_lm_dpo_loss(model, batch, ref_model=ref_model, loss_type="sigmoid", beta=0.1)
    out.loss.backward()

Batches follow the Hugging Face convention: ``labels`` are unshifted copies of
``input_ids`` with ``-100`` on prompt and padding (or pass ``completion_mask``,
1 on completion tokens); position ``t`` is scored against token ``t + 1``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastdpo.integrations import _losses
from fastdpo.integrations._linear import DEFAULT_BLOCK_ELEMENTS, linear_token_logprobs
from fastdpo.losses.plan import check_reference

__all__ = ["LMHeadTransform", "lm_head_transform", "causal_lm_logprobs", "causal_lm_dpo_loss", "CausalLMLogprobs"]


class LMHeadTransform(NamedTuple):
    """``logits = softcap * tanh(logit_scale * (h @ W.T + b) / softcap)`` (no tanh when ``softcap`` is None)."""

    softcap: float | None
    logit_scale: float


def lm_head_transform(model_or_config) -> LMHeadTransform:
    """The soft cap and logit scale a causal LM's forward applies to its LM-head output, from its config."""
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None) or None
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if getattr(text, "model_type", "") == "hyperclovax" else 1 / text.logits_scaling
    return LMHeadTransform(None if softcap is None else float(softcap), 1.0 if scale is None else float(scale))


class CausalLMLogprobs(NamedTuple):
    """Per-token outputs for the shifted labels, each ``[B, T-1]``, 0 at ignored positions: ``logps``
    (differentiable), ``entropy``, ``argmax_hit``, ``mean_logit`` and ``log_sum_p2`` (no gradient)."""

    logps: torch.Tensor
    entropy: torch.Tensor | None = None
    argmax_hit: torch.Tensor | None = None
    mean_logit: torch.Tensor | None = None
    log_sum_p2: torch.Tensor | None = None


def _labels(input_ids, labels, completion_mask, attention_mask, ignore_index):
    if labels is None and completion_mask is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    elif labels is None:
        labels = input_ids.masked_fill(completion_mask == 0, ignore_index)
    elif completion_mask is not None:
        raise ValueError("fastdpo: pass labels or completion_mask, not both")
    if labels.shape != input_ids.shape:
        raise ValueError(f"fastdpo: labels must have the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(labels.shape)}")
    return labels


def _backbone(model):
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise TypeError(f"fastdpo: {type(model).__name__} has no separate backbone (model.base_model); pass a "
                        "*ForCausalLM model")
    return base


def causal_lm_logprobs(model, input_ids, attention_mask=None, labels=None, *, completion_mask=None,
                       temperature: float = 1.0, stats: bool = False, ignore_index: int = -100,
                       backend: str = "auto", block_elements: int = DEFAULT_BLOCK_ELEMENTS, **model_kwargs):
    """Per-token log-probs of a causal LM for the next-token labels, ``[B, T-1]`` float32.

    Equals ``log_softmax(model(input_ids, attention_mask).logits[:, :-1] / temperature)`` gathered at
    ``labels[:, 1:]`` (0 where the label is ``ignore_index``), with gradients to every parameter, computed from
    the backbone's last hidden state and the LM head without the ``[B, T, V]`` logits. Only the scored
    positions go through the head. With ``stats`` returns :class:`CausalLMLogprobs`.
    ``model_kwargs`` go to the backbone (e.g. ``position_ids``).
    """
    labels = _labels(input_ids, labels, completion_mask, attention_mask, ignore_index)
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"fastdpo: {type(model).__name__} has no linear LM head (get_output_embeddings())")
    transform = lm_head_transform(model)
    model_kwargs.setdefault("use_cache", False)
    hidden = _backbone(model)(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).last_hidden_state
    hidden = hidden[:, :-1]
    y = labels[:, 1:].to(hidden.device)
    mask = y != ignore_index
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1") if stats else ("log_probs",)
    weight, bias = head.weight, getattr(head, "bias", None)
    res = linear_token_logprobs(hidden[mask].to(weight.device), weight, y[mask].to(weight.device), bias=bias,
                                temperature=temperature, softcap=transform.softcap, logit_scale=transform.logit_scale,
                                outputs=outputs, ignore_index=ignore_index, backend=backend,
                                block_elements=block_elements)
    logp, entropy, lssp, mean_logits, is_top1 = (
        None if x is None else x.to(hidden.device) for x in res)

    def scatter(x):
        # masked_scatter keeps the output connected to the model even when no label is valid
        return None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x)

    logps = scatter(logp)
    if not stats:
        return logps
    return CausalLMLogprobs(logps, scatter(entropy), scatter(is_top1.float()), scatter(mean_logits), scatter(lssp))


def causal_lm_dpo_loss(model, batch: dict, *, ref_model=None, ref_logps: torch.Tensor | None = None,
                       temperature: float = 1.0, ignore_index: int = -100, backend: str = "auto",
                       block_elements: int = DEFAULT_BLOCK_ELEMENTS, token_weights=None, pair_weights=None,
                       desirable=None, **loss_options):
    """DPO-family loss of a causal LM on a preference batch, from hidden states and the LM head.

    ``batch``: ``input_ids`` ``[2B, T]`` laid out ``[chosen; rejected]``, ``attention_mask``, and ``labels``
    (``-100`` on prompt and padding) or ``completion_mask``; other keys go to the backbone. The reference is
    ``ref_model`` (run without gradient on the same batch; a PEFT model's base is ``model`` with its adapter
    disabled, e.g. ``with model.disable_adapter(): ...``), ``ref_logps`` (``[2B]`` precomputed sequence
    log-probs) or absent: reference-free, which a reference-anchored loss needs asked for with
    ``reference_free=True``. ``loss_options`` are those of :func:`fastdpo.dpo_loss`
    (``loss_type``, ``beta``, ``label_smoothing``, ``loss_weights``, ``ld_alpha``, ``use_weighting``, ...);
    ``token_weights`` are shaped like the shifted labels ``[2B, T-1]``.

    Returns :class:`fastdpo.DPOOutput` (loss, per-pair log-probs and rewards, TRL's metric names).
    """
    batch = dict(batch)
    input_ids = batch.pop("input_ids")
    attention_mask = batch.pop("attention_mask", None)
    labels = _labels(input_ids, batch.pop("labels", None), batch.pop("completion_mask", None), attention_mask,
                     ignore_index)
    if ref_model is not None and ref_logps is not None:
        raise ValueError("fastdpo: pass ref_model or ref_logps, not both")
    # before running the model: a reference-anchored loss needs a reference (or reference_free=True)
    check_reference(_losses.check_loss_options(**loss_options), ref_model is not None or ref_logps is not None,
                    ways="ref_model (the reference model) or ref_logps (precomputed [2B] sequence log-probs)")
    common = dict(temperature=temperature, ignore_index=ignore_index, backend=backend,
                  block_elements=block_elements, **batch)
    pol = causal_lm_logprobs(model, input_ids, attention_mask, labels, stats=True, **common)
    ref_tok = None
    if ref_model is not None:
        with torch.no_grad():
            ref_tok = causal_lm_logprobs(ref_model, input_ids, attention_mask, labels, **common).detach()
    shift = labels[:, 1:].to(pol.logps.device)
    stats = _losses.stats_from_fields(shift.shape, entropy=pol.entropy, is_top1=pol.argmax_hit,
                                      mean_logits=pol.mean_logit, log_sum_sq_probs=pol.log_sum_p2,
                                      device=pol.logps.device)
    return _losses.loss_from_token_logprobs(pol.logps, shift, ref_token_logps=ref_tok, ref_logps=ref_logps,
                                            stats=stats, ignore_index=ignore_index, token_weights=token_weights,
                                            pair_weights=pair_weights, desirable=desirable, **loss_options)
