"""Train a tiny random Llama with DPO, log fastdpo's training-dynamics diagnostics, and draw them.

CPU only, about a minute, nothing downloaded (the tokenizer and model are built as in
``train_dpo_trl.py``). Each rejected answer repeats the chosen one and differs only in its last
character, the kind of near-identical pair under which DPO's chosen likelihood falls although the
margin grows (likelihood displacement). The trainer logs TRL's metrics plus ``diagnostics/...``
(displacement, the per-pair loss weights, the chosen / rejected logits-gradient norms, the margins;
see docs/diagnostics.md), saves its ``trainer_state.json``, and ``python -m fastdpo.diagnose`` draws
them against the step:

    python examples/train_dpo_diagnostics.py                      # -> ./dpo-diagnostics/diagnostics.png
    python examples/train_dpo_diagnostics.py --out docs/images/diagnostics.png

With your own model and data the switch is ``FastDPOTrainer(..., fastdpo_diagnostics=True)``, then
``python -m fastdpo.diagnose <output_dir>``.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import subprocess
import sys

os.environ.setdefault("TQDM_DISABLE", "1")

from datasets import Dataset  # noqa: E402
from trl import DPOConfig  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_dpo_trl import char_tokenizer, tiny_llama  # noqa: E402

from fastdpo.integrations.trl import FastDPOTrainer  # noqa: E402


def near_identical_pairs(n: int, seed: int = 0) -> Dataset:
    """The answer repeats the prompt's words; chosen ends with " !", rejected with " ?"."""
    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "red", "sky", "tea", "map", "owl"]
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        answer = " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        rows["prompt"].append(answer.strip() + " ?")
        rows["chosen"].append(answer + " !")
        rows["rejected"].append(answer + " ?")
    return Dataset.from_dict(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default="dpo-diagnostics", help="trainer output (trainer_state.json)")
    ap.add_argument("--out", default=None, help="PNG path (default: <output-dir>/diagnostics.png)")
    ap.add_argument("--steps", type=int, default=120)
    args = ap.parse_args(argv)

    tokenizer = char_tokenizer()
    model = tiny_llama(tokenizer)
    ref_model = copy.deepcopy(model)
    split = near_identical_pairs(288).train_test_split(test_size=32, seed=0)

    dpo = DPOConfig(
        output_dir=args.output_dir, loss_type="sigmoid", beta=0.1, per_device_train_batch_size=8,
        per_device_eval_batch_size=16, max_steps=args.steps, learning_rate=3e-3, lr_scheduler_type="constant",
        logging_steps=2, eval_strategy="steps", eval_steps=20, max_length=32, report_to="none", save_strategy="no",
        use_cpu=True, bf16=False, gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    trainer = FastDPOTrainer(model=model, ref_model=ref_model, args=dpo, train_dataset=split["train"],
                             eval_dataset=split["test"], processing_class=tokenizer, fastdpo_diagnostics=True)
    trainer.train()
    trainer.save_state()  # <output_dir>/trainer_state.json, with every logged metric

    cmd = [sys.executable, "-m", "fastdpo.diagnose", args.output_dir] + (["--out", args.out] if args.out else [])
    png = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    print(f"step {last['step']}: margin {last['rewards/margins']:.3f}, chosen log-ratio/token "
          f"{last['diagnostics/logratio_per_token/chosen']:.3f}, mean weight {last['diagnostics/weight/mean']:.4f}, "
          f"chosen/rejected gradient norm {last['diagnostics/grad_norm/ratio']:.2f}")
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
