"""Train a tiny random Llama with TRL's DPO recipe, fastdpo doing the per-token work and the loss.

Runs on CPU in a few seconds, with nothing downloaded: the tokenizer (one token per character), the model
(random weights from a config) and the preference data (synthetic) are all built here.

    python examples/train_dpo_trl.py

Switching an existing TRL script is one import: ``from fastdpo.integrations.trl import FastDPOTrainer`` and
``FastDPOTrainer(...)`` where it said ``DPOTrainer(...)``; the DPOConfig stays the same.
"""

from __future__ import annotations

import copy
import os
import random
import string
import tempfile

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Regex, Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DPOConfig  # noqa: E402

from fastdpo.integrations.trl import FastDPOTrainer  # noqa: E402


def char_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.ascii_lowercase + " .,!?"))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def preference_data(n: int, seed: int = 0) -> Dataset:
    """The preferred answer names the first word of the prompt; the rejected one is random letters."""
    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "red", "sky", "tea", "map", "owl"]
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        rows["prompt"].append(prompt + " ?")
        rows["chosen"].append(" " + prompt.split()[0] + "!")
        rows["rejected"].append(" " + "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 6))))
    return Dataset.from_dict(rows)


def tiny_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with random weights (seeded), sized for the tokenizer."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


def main():
    tokenizer = char_tokenizer()
    model = tiny_llama(tokenizer)
    ref_model = copy.deepcopy(model)  # a model built from a config has no hub id TRL could reload it from

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.1], beta=0.1,
            per_device_train_batch_size=8, max_steps=15, learning_rate=1e-2, logging_steps=5, max_length=32,
            report_to="none", save_strategy="no", use_cpu=True, bf16=False, gradient_checkpointing=False,
            dataloader_num_workers=0, disable_tqdm=True, seed=0,
        )
        trainer = FastDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=preference_data(64),
                                 processing_class=tokenizer)
        trainer.train()

    keys = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "entropy", "mean_token_accuracy"]
    print("step  " + "  ".join(f"{k:>18}" for k in keys))
    for log in trainer.state.log_history:
        if "loss" in log:
            print(f"{log['step']:>4}  " + "  ".join(f"{log[k]:>18.4f}" for k in keys))


if __name__ == "__main__":
    main()
