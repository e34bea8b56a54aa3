"""A tiny random Llama, a character tokenizer and a synthetic preference dataset, all built locally."""

from __future__ import annotations

import random
import string


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.ascii_lowercase + " .,!?"))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_llama(vocab_size, seed=0, hidden=16, layers=1, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1, **overrides)
    return LlamaForCausalLM(cfg)


def preference_dataset(n=8, seed=0):
    """Prompts of random words; the chosen answer repeats the prompt's first word, the rejected one is random."""
    from datasets import Dataset

    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "red", "sky", "tea", "map", "owl"]
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        p = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        rows["prompt"].append(p + " ?")
        rows["chosen"].append(" " + p.split()[0] + "!" * rng.randint(0, 2))
        rows["rejected"].append(" " + "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 6))))
    return Dataset.from_dict(rows)


def tiny_qwen2(vocab_size, seed=0, hidden=16, layers=1, **overrides):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                      tie_word_embeddings=False, **overrides)
    return Qwen2ForCausalLM(cfg)
