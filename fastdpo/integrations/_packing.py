"""Packed (padding-free) preference batches for ``FastDPOTrainer(args=DPOConfig(padding_free=True))``.

- :class:`DataCollatorForPackedPreference` lays a batch's B chosen sequences (prompt + chosen response)
  and then its B rejected ones end to end in one row, as transformers' ``DataCollatorWithFlattening``
  does for language modelling: ``input_ids [1, L]``, ``position_ids [1, L]`` restarting at 0 at each
  sequence, no attention mask. The sequences keep the order of TRL's padded batch,
  ``[chosen; rejected]``, and TRL's truncation (``max_length``, ``truncation_mode``).
- :func:`next_token_labels`: each token's next-token label inside its own sequence (what the fused LM
  head scores), so every packed position is scored and no prediction crosses a sequence boundary.
- :func:`check_packing_support`: the model must keep the packed sequences apart. transformers builds a
  block-causal mask from ``position_ids`` (no attention mask, no cache) for ``sdpa``, ``eager`` and
  ``flex_attention`` (``masking_utils.find_packed_sequence_indices``), and the flash-attention
  implementations run varlen kernels on the sequences ``position_ids`` (or the collator's
  ``cu_seq_lens_*``) delimit. Any other implementation, and models with recurrent state (Mamba-style,
  linear-attention layers), would let one sequence see another, so they are refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fastdpo.ops.segments import host_to_device

# Attention implementations that honour packed position_ids in transformers (see the module docstring).
MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
PACKED_ATTENTION = MASKED_ATTENTION + FLASH_ATTENTION
# Per-layer kinds (config.layer_types) that attend only within the mask; anything else carries state.
_ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention"}

# Collator outputs that are not model inputs.
NON_MODEL_KEYS = {"sequence_lengths", "cu_seqlens", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


def _truncate(ids: list, mask: list, max_length: int | None, mode: str):
    if max_length is None:
        return ids, mask
    if mode == "keep_start":
        return ids[:max_length], mask[:max_length]
    if mode == "keep_end":
        return ids[-max_length:], mask[-max_length:]
    raise ValueError(f"Unsupported truncation mode: {mode}, expected 'keep_start' or 'keep_end'")


@dataclasses.dataclass
class DataCollatorForPackedPreference:
    """Collate ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` examples into one packed row.

    Returns ``sequence_lengths [2B]`` (first, so the trainer's batch size is 2B as for TRL's padded
    batch), ``input_ids``, ``position_ids`` and ``completion_mask`` ``[1, L]`` (L = the total length),
    ``cu_seqlens`` (a list of the 2B + 1 offsets: host ints, so reading it costs no device sync),
    ``ref_chosen_logps`` / ``ref_rejected_logps`` when the examples carry them, and with
    ``flash_attention_kwargs`` transformers' ``cu_seq_lens_q/k`` and ``max_length_q/k`` (which spare the
    flash-attention layers recovering them from ``position_ids``).
    """

    max_length: int | None = None
    truncation_mode: str = "keep_start"
    flash_attention_kwargs: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids, mask, lengths = [], [], []
        for key in ("chosen_ids", "rejected_ids"):
            for ex in examples:
                p, c = list(ex["prompt_ids"]), list(ex[key])
                s, m = _truncate(p + c, [0] * len(p) + [1] * len(c), self.max_length, self.truncation_mode)
                ids += s
                mask += m
                lengths.append(len(s))
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        out = {
            "sequence_lengths": torch.tensor(lengths),
            "input_ids": torch.tensor(ids, dtype=torch.long).unsqueeze(0),
            "position_ids": torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0),
            "completion_mask": torch.tensor(mask, dtype=torch.long).unsqueeze(0),
            "cu_seqlens": cu,
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                out[key] = torch.tensor([ex[key] for ex in examples])
        if self.flash_attention_kwargs:
            cu_t = torch.tensor(cu, dtype=torch.int32)
            out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu_t
            out["max_length_q"] = out["max_length_k"] = max(lengths)
        return out


def next_token_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
    """``[1, L]``: at each position the next token of the same sequence when it is a completion token,
    else -100 (prompt targets, and the last position of every sequence, whose next token belongs to
    the next sequence). The packed equivalent of TRL's ``labels[:, 1:]``, kept at full length so the
    per-token outputs line up with ``cu_seqlens``."""
    nxt = torch.roll(input_ids, -1, dims=-1)
    labels = torch.where(torch.roll(completion_mask, -1, dims=-1) != 0, nxt, -100)
    last = host_to_device([c - 1 for c in cu_seqlens[1:]], labels.device)
    return labels.index_fill(-1, last, -100)


def check_packing_support(model) -> str:
    """Raise ValueError unless ``model`` keeps packed sequences apart; returns its attention implementation."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    impl = getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)
    fix = ("Load the model with attn_implementation='sdpa' (or 'eager', 'flex_attention', or "
           "'flash_attention_2' on a GPU), or set DPOConfig(padding_free=False)")
    if getattr(model, "_is_stateful", False) or any(
            t not in _ATTENTION_LAYERS for t in (getattr(text, "layer_types", None) or ())):
        raise ValueError(
            f"FastDPOTrainer(padding_free=True): {type(model).__name__} has recurrent or linear-attention layers, "
            "whose state would flow from one packed sequence into the next; set DPOConfig(padding_free=False)")
    if impl not in PACKED_ATTENTION:
        raise ValueError(
            f"FastDPOTrainer(padding_free=True): the model's attention implementation {impl!r} does not keep the "
            f"sequences of a packed row apart (transformers honours packed position_ids with {list(PACKED_ATTENTION)})."
            f" {fix}.")
    if impl in MASKED_ATTENTION:
        try:
            from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
        except ImportError:
            import transformers

            raise ValueError(
                f"FastDPOTrainer(padding_free=True): transformers {transformers.__version__} builds no block-causal "
                f"mask from packed position_ids for attn_implementation={impl!r}; upgrade transformers, use "
                "'flash_attention_2' on a GPU, or set DPOConfig(padding_free=False)") from None
    return impl
