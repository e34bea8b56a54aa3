"""``python -m fastdpo.bench.packed``: packed (padding-free) vs padded preference batches.

Lengths are drawn reproducibly (``--seed``): prompts about 150 +- 100 tokens, responses about
250 +- 150 (normal, at least 1), each sequence (prompt + response) capped at 1024. A pair's chosen
and rejected responses share its prompt.

- ``loss``: one loss step on a batch of ``--pairs`` pairs, V = 32000: the LM head projects the hidden
  states (policy and reference) and ``fastdpo.dpo_loss`` runs on the logits (``logits``), or
  ``fastdpo.linear_dpo_loss`` fuses the two (``linear``); forward + backward to the hidden states and
  the head. Padded: ``[2B, T_max]`` positions; packed: the sequences end to end.
- ``e2e``: a tiny Llama trained with ``FastDPOTrainer``, ``DPOConfig(padding_free=False)`` vs ``True``.

Each measurement runs in a fresh process; the table gives the tokens processed (positions the step
computes on; the real tokens are the same in both layouts), the median step time with its min-max
spread and the peak memory beyond the inputs (loss: resident high-water mark above the inputs;
e2e: above the built trainer). Results (``packed.json`` with every measurement, the command and the
machine; ``output.txt``, the printed output) go to a fresh ``bench/runs/<device>-<date>-<time>/`` (not
under version control), or with ``--out DIR`` to ``DIR/<device>/`` (how ``bench/results/packed/`` is made).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPT = (150, 100)
RESPONSE = (250, 150)
CAP = 1024


def draw_lengths(pairs: int, seed: int = 0, prompt=PROMPT, response=RESPONSE, cap: int = CAP):
    """``[(prompt, chosen, rejected)]`` token counts of ``pairs`` pairs, reproducible from ``seed``
    (``random.Random``: the same on every platform and Python version)."""
    rng = random.Random(seed)
    out = []
    for _ in range(pairs):
        p = min(cap - 1, max(1, round(rng.gauss(*prompt))))
        c, r = (min(cap - p, max(1, round(rng.gauss(*response)))) for _ in range(2))
        out.append((p, c, r))
    return out


def sequence_lengths(lengths):
    """The 2B sequence lengths in the batch order [chosen; rejected]."""
    return [p + c for p, c, _ in lengths] + [p + r for p, _, r in lengths]


# ------------------------------------------------------------------------------------------ loss level


def _loss_inputs(lengths, V, H, dtype, packed, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = sequence_lengths(lengths)
    prompts = [p for p, _, _ in lengths] * 2
    T = max(seqs)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    if packed:
        M = sum(seqs)
        hidden = torch.randn(M, H, generator=g).to(dtype)
        labels = torch.randint(0, V, (M,), generator=g)
        cu = [0]
        for n, p in zip(seqs, prompts):
            labels[cu[-1] : cu[-1] + p] = -100  # the prompt is not scored
            cu.append(cu[-1] + n)
        return dict(hidden=hidden, ref_hidden=hidden + 0.1, weight=weight, labels=labels, cu_seqlens=cu)
    hidden = torch.randn(len(seqs), T, H, generator=g).to(dtype)
    labels = torch.randint(0, V, (len(seqs), T), generator=g)
    for i, (n, p) in enumerate(zip(seqs, prompts)):
        labels[i, :p] = -100
        labels[i, n:] = -100  # padding
    return dict(hidden=hidden, ref_hidden=hidden + 0.1, weight=weight, labels=labels, cu_seqlens=None)


def _loss_step(method, inp):
    import fastdpo

    h = inp["hidden"].clone().requires_grad_()
    w = inp["weight"].clone().requires_grad_()

    def step():
        h.grad = w.grad = None
        if method == "linear":
            out = fastdpo.linear_dpo_loss(h, w, inp["labels"], ref_hidden=inp["ref_hidden"],
                                          cu_seqlens=inp["cu_seqlens"])
        else:
            logits = h @ w.t()
            with torch.no_grad():
                ref_logits = inp["ref_hidden"] @ w.t()
            out = fastdpo.dpo_loss(logits, inp["labels"], ref_logits=ref_logits, cu_seqlens=inp["cu_seqlens"])
        out.loss.backward()

    return step


# ------------------------------------------------------------------------------------------ end to end


def _word_tokenizer(V):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, V)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _dataset(lengths, V, seed):
    """Text whose word-level tokens have the drawn lengths (TRL adds an EOS token to each response, so
    responses get one word less)."""
    from datasets import Dataset

    rng = random.Random(seed + 1)

    def words(n):
        return " ".join(f"w{rng.randrange(3, V)}" for _ in range(n))

    rows = {"prompt": [], "chosen": [], "rejected": []}
    for p, c, r in lengths:
        rows["prompt"].append(words(p))
        rows["chosen"].append(" " + words(max(1, c - 1)))
        rows["rejected"].append(" " + words(max(1, r - 1)))
    return Dataset.from_dict(rows)


def _e2e_run(spec):
    os.environ.setdefault("TQDM_DISABLE", "1")
    import copy
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig

    from fastdpo.integrations.trl import FastDPOTrainer

    pairs, steps, warmup = spec["pairs"], spec["steps"], spec["warmup"]
    V, H = spec["vocab"], spec["hidden"]
    lengths = draw_lengths(pairs * (steps + warmup), spec["seed"])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=int(2.75 * H), num_hidden_layers=spec["layers"],
                      num_attention_heads=max(1, H // 64), num_key_value_heads=max(1, H // 128),
                      max_position_embeddings=CAP, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                      attn_implementation=spec["attn"])
    model = LlamaForCausalLM(cfg)
    tok = _word_tokenizer(V)
    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append((time.perf_counter() - self.t0) * 1e3)

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=pairs, max_steps=steps + warmup,
                         learning_rate=1e-5, logging_steps=1, report_to="none", save_strategy="no",
                         dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), seed=0, max_length=CAP,
                         bf16=spec["dtype"] == "bf16", gradient_checkpointing=False, disable_tqdm=True,
                         padding_free=spec["layout"] == "packed")
        trainer = FastDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                                 train_dataset=_dataset(lengths, V, spec["seed"]), processing_class=tok,
                                 callbacks=[Clock()])
        collate = trainer.data_collator

        def counting(examples):
            batch = collate(examples)
            tokens.append(batch["input_ids"].numel())  # positions the model computes on
            return batch

        trainer.data_collator = counting
        mem_ok, base_kb = _mem_start()
        trainer.train()
    timed = times[warmup:]
    return {"median_ms": statistics.median(timed), "min_ms": min(timed), "max_ms": max(timed), "times_ms": timed,
            "warmup_ms": times[:warmup], "tokens": statistics.mean(tokens[warmup:]),
            "real_tokens": sum(sequence_lengths(lengths)) / len(tokens), "extra_mb": _mem_extra(mem_ok, base_kb)}


# ---------------------------------------------------------------------------------------------- runner


def _mem_start():
    from fastdpo.bench._worker import _reset_hwm, _status_kb

    return _reset_hwm(), _status_kb("VmRSS")


def _mem_extra(mem_ok, base_kb):
    from fastdpo.bench._worker import _status_kb

    return (_status_kb("VmHWM") - base_kb) / 1024 if mem_ok else None


def _loss_run(spec):
    from fastdpo.bench.providers import DTYPES

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    lengths = draw_lengths(spec["pairs"], spec["seed"])
    inp = _loss_inputs(lengths, spec["vocab"], spec["hidden"], DTYPES[spec["dtype"]], spec["layout"] == "packed")
    step = _loss_step(spec["method"], inp)
    mem_ok, base_kb = _mem_start()
    times = []
    for i in range(spec["warmup"] + spec["reps"]):
        t0 = time.perf_counter()
        step()
        if i >= spec["warmup"]:
            times.append((time.perf_counter() - t0) * 1e3)
    seqs = sequence_lengths(lengths)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "times_ms": times,
            "tokens": inp["labels"].numel(), "real_tokens": sum(seqs), "extra_mb": _mem_extra(mem_ok, base_kb),
            "input_mb": sum(t.numel() * t.element_size() for t in (inp["hidden"], inp["ref_hidden"])) / 2**20}


def _run(spec) -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "fastdpo.bench.packed", "--worker", json.dumps(spec)],
                       capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"error": f"worker exited with {p.returncode}: {' | '.join(tail)}"}


def _table(rows) -> str:
    hdr = (f"{'case':<46}{'layout':<8}{'tokens':>9}{'median ms':>11}{'min-max ms':>17}{'extra MB':>10}"
           f"{'speed-up':>10}{'memory':>8}")
    lines = [hdr]
    by = {}
    for r in rows:
        by.setdefault(r["case"], {})[r["layout"]] = r
    for case, layouts in by.items():
        pad = layouts.get("padded", {})
        for layout in ("padded", "packed"):
            r = layouts.get(layout)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"{case:<46}{layout:<8}  error: {r['error'][:80]}")
                continue
            up = mem = "-"
            if layout == "packed" and "median_ms" in pad:
                # both layouts see the same batches in the same order: the median of the per-step ratios
                up = f"{statistics.median(p / q for p, q in zip(pad['times_ms'], r['times_ms'])):.2f}x"
                if pad.get("extra_mb") and r.get("extra_mb"):
                    mem = f"{r['extra_mb'] / pad['extra_mb']:.2f}"
            extra = "-" if r.get("extra_mb") is None else f"{r['extra_mb']:.0f}"
            spread = f"{r['min_ms']:.1f}-{r['max_ms']:.1f}"
            lines.append(f"{case:<46}{layout:<8}{r['tokens']:>9.0f}{r['median_ms']:>11.1f}{spread:>17}{extra:>10}"
                         f"{up:>10}{mem:>8}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastdpo.bench.packed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", default="loss,e2e", help="comma-separated: loss, e2e")
    ap.add_argument("--seed", type=int, default=0, help="seed of the drawn lengths")
    ap.add_argument("--pairs", type=int, default=4, help="pairs per batch")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the loss-level LM head")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--methods", default="logits,linear", help="loss level: logits (LM head + dpo_loss), linear")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3, help="timed loss steps / timed training steps")
    ap.add_argument("--e2e-hidden", type=int, default=256)
    ap.add_argument("--e2e-layers", type=int, default=2)
    ap.add_argument("--e2e-vocab", type=int, default=None, help="tiny Llama vocabulary (default: --vocab)")
    ap.add_argument("--attn", default="sdpa", help="attention implementation of the tiny Llama")
    ap.add_argument("--out", default=None, help="write into OUT/<device>/ (e.g. bench/results/packed); default: a "
                    "fresh bench/runs/<device>-<date>-<time>/, not under version control")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        spec = json.loads(args.worker)
        try:
            res = _e2e_run(spec) if spec["suite"] == "e2e" else _loss_run(spec)
        except Exception as e:  # reported in the table, never hidden
            res = {"error": f"{type(e).__name__}: {e}"}
        print("RESULT " + json.dumps(res))
        return 0

    from fastdpo.bench.__main__ import _output_folder, run_meta, teed_output

    argv = list(sys.argv[1:] if argv is None else argv)
    # The loss level runs on the CPU; the end-to-end trainer uses a GPU when there is one, so name it too.
    meta = run_meta("fastdpo.bench.packed", argv, "cpu", "cuda" if torch.cuda.is_available() else "cpu")
    out = _output_folder(args.out, meta["device"])
    with teed_output(out):
        rows = _measure(args, meta)
        meta = {**meta, "lengths": draw_lengths(args.pairs, args.seed), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        (out / "packed.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
        print(f"results: {out / 'packed.json'}")
    return 0 if not any("error" in r for r in rows) else 1


def _measure(args, meta: dict) -> list[dict]:
    lengths = draw_lengths(args.pairs, args.seed)
    seqs = sequence_lengths(lengths)
    print(f"fastdpo.bench.packed on {meta['device']}: {meta['machine']} (torch {meta['torch']}, {meta['threads']} "
          f"threads)\ncommand: {meta['command']}")
    print(f"{args.pairs} pairs per batch, lengths from seed {args.seed}: prompts ~{PROMPT[0]}+-{PROMPT[1]}, "
          f"responses ~{RESPONSE[0]}+-{RESPONSE[1]}, capped at {CAP}")
    print(f"first batch: {sum(seqs)} real tokens in {len(seqs)} sequences; padded to {len(seqs)} x {max(seqs)} = "
          f"{len(seqs) * max(seqs)} positions ({100 * (1 - sum(seqs) / (len(seqs) * max(seqs))):.0f}% padding)")
    suites = args.suites.split(",")
    jobs = []
    for method in args.methods.split(",") if "loss" in suites else []:
        case = f"loss {method} {args.dtype} V={args.vocab} H={args.hidden}"
        for layout in ("padded", "packed"):
            jobs.append((case, dict(suite="loss", method=method, layout=layout, pairs=args.pairs, seed=args.seed,
                                    vocab=args.vocab, hidden=args.hidden, dtype=args.dtype, warmup=args.warmup,
                                    reps=args.reps)))
    if "e2e" in suites:
        V = args.e2e_vocab or args.vocab
        case = f"e2e llama {args.dtype} V={V} H={args.e2e_hidden} L={args.e2e_layers} {args.attn}"
        for layout in ("padded", "packed"):
            jobs.append((case, dict(suite="e2e", layout=layout, pairs=args.pairs, seed=args.seed, vocab=V,
                                    hidden=args.e2e_hidden, layers=args.e2e_layers, dtype=args.dtype,
                                    attn=args.attn, warmup=args.warmup, steps=args.reps)))
    rows, t0 = [], time.monotonic()
    for i, (case, spec) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {case} {spec['layout']} ({time.monotonic() - t0:.0f}s)", flush=True)
        rows.append({"case": case, "layout": spec["layout"], "spec": spec, **_run(spec)})
    print()
    print(_table(rows))
    print("\ntokens: positions the step computes on per batch (padded: sequences x the longest; packed: the real "
          "tokens); speed-up: median over the timed steps of padded / packed step time (the same batches in the same "
          "order); memory: packed / padded peak extra memory.")
    return rows


if __name__ == "__main__":
    sys.exit(main())
