"""Short TRL training runs on the tiny random Llama of ``_tiny_lm``: the arguments and the loop the TRL tests share."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("TQDM_DISABLE", "1")

STEPS = 3
DDP_PAIRS = 4  # the whole dataset is one global batch, whichever way it is split over processes


def setup(pairs=8):
    from _tiny_lm import char_tokenizer, preference_dataset, tiny_llama

    tok = char_tokenizer()
    return tok, preference_dataset(pairs), tiny_llama(len(tok))


def dpo_args(output_dir, *, config_cls=None, steps=STEPS, **options):
    """A quiet CPU ``DPOConfig`` (or ``config_cls``) for a few steps of 4 pairs; ``options`` override."""
    from trl import DPOConfig

    base = dict(output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=steps, learning_rate=5e-2,
                logging_steps=1, report_to="none", save_strategy="no", dataloader_num_workers=0, use_cpu=True,
                seed=0, max_length=24, bf16=False, gradient_checkpointing=False, disable_tqdm=True,
                log_level="error")
    return (config_cls or DPOConfig)(**{**base, **options})


def train(cls, setup, args, callbacks=None, keep=None, **kwargs):
    """Train a copy of the model (and of the reference unless precomputed); returns (logs with a loss, parameters).
    The trainer is appended to ``keep`` when given."""
    tok, data, model0 = setup
    model = copy.deepcopy(model0)
    ref = None if args.precompute_ref_log_probs else copy.deepcopy(model0)
    trainer = cls(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tok,
                  callbacks=callbacks, **kwargs)
    trainer.train()
    if keep is not None:
        keep.append(trainer)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
