"""FastDPOTrainer with DPOConfig(padding_free=True): packed batches end to end.

The model runs on one packed row per batch (position_ids restarting per sequence, no attention mask)
and must train exactly as trl.DPOTrainer does on the padded batches (TRL itself falls back to padding),
on tiny random Llama and Qwen2 models. Plus: packed forwards equal padded forwards for the attention
implementations we accept, the collator keeps TRL's truncation, and what cannot be packed is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TQDM_DISABLE", "1")

from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _tiny_lm import char_tokenizer, preference_dataset, tiny_llama, tiny_qwen2  # noqa: E402

from fastdpo.integrations import _packing  # noqa: E402
from fastdpo.integrations.trl import FastDPOTrainer  # noqa: E402

STEPS = 3
METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy", "num_tokens"]
MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2}


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def data():
    return preference_dataset(8)


def _args(tmp_path, name, config=DPOConfig, **options):
    base = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=STEPS, learning_rate=5e-2,
                logging_steps=1, report_to="none", save_strategy="no", dataloader_num_workers=0, use_cpu=True, seed=0,
                max_length=24, bf16=False, gradient_checkpointing=False, disable_tqdm=True)
    return config(**{**base, **options})


def _train(cls, model0, tok, data, args, **kwargs):
    model = copy.deepcopy(model0)
    ref = None if args.precompute_ref_log_probs or kwargs.get("peft_config") else copy.deepcopy(model0)
    trainer = cls(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tok, **kwargs)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return trainer, logs, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _record_inputs(monkeypatch, model):
    """Record every backbone forward (input shape, whether an attention mask / position_ids came) and the
    number of token rows each fused-LM-head call scores."""
    import fastdpo.integrations._linear as lin

    seen, rows = [], []
    backbone = type(model.base_model)
    orig_forward = backbone.forward

    def spy(self, *a, **kw):
        seen.append((tuple(kw["input_ids"].shape), kw.get("attention_mask") is not None, "position_ids" in kw))
        return orig_forward(self, *a, **kw)

    monkeypatch.setattr(backbone, "forward", spy)
    orig = lin.LinearLogprobsFunction.apply
    monkeypatch.setattr(lin.LinearLogprobsFunction, "apply", lambda *a: rows.append(a[0].shape[0]) or orig(*a))
    return seen, rows


CONFIGS = {
    "sigmoid": dict(loss_type="sigmoid"),
    "ipo": dict(loss_type="ipo", beta=0.5),
    "multi": dict(loss_type=["sigmoid", "sft", "bco_pair"], loss_weights=[0.8, 0.2, 1.0], max_length=9),
    "ld_alpha": dict(loss_type="sigmoid", ld_alpha=0.5),
    "use_weighting": dict(loss_type="sigmoid", use_weighting=True),
    "precompute": dict(loss_type="sigmoid", precompute_ref_log_probs=True),
    "keep_end": dict(loss_type="robust", label_smoothing=0.1, max_length=9, truncation_mode="keep_end"),
}
CASES = [("llama", n) for n in CONFIGS] + [("qwen2", "sigmoid"), ("qwen2", "ipo")]


@pytest.mark.parametrize("arch, name", CASES, ids=[f"{a}-{n}" for a, n in CASES])
def test_packed_trainer_matches_padded_dpo_trainer(arch, name, tok, data, tmp_path, monkeypatch):
    model0 = MODELS[arch](len(tok))
    options = CONFIGS[name]
    _, ref_logs, ref_params = _train(DPOTrainer, model0, tok, data, _args(tmp_path, "trl", **options))
    with monkeypatch.context() as m:
        seen, rows = _record_inputs(m, model0)
        trainer, logs, params = _train(FastDPOTrainer, model0, tok, data,
                                       _args(tmp_path, "fast", padding_free=True, **options), fastdpo_backend="cpu")
    # training forwards saw packed rows only: one row, position_ids, no attention mask (the reference
    # precompute pass, with precompute_ref_log_probs, runs on TRL's padded batches)
    packed = [s for s in seen if s[0][0] == 1 and not s[1] and s[2]]
    assert len(packed) >= STEPS * (1 if options.get("precompute_ref_log_probs") else 2), seen
    assert all(s in packed or s[1] for s in seen), seen
    assert trainer.args.padding_free and isinstance(trainer.data_collator, _packing.DataCollatorForPackedPreference)
    assert len(logs) == len(ref_logs) == STEPS
    for step, (a, b) in enumerate(zip(logs, ref_logs)):
        for k in METRICS:
            if k == "rewards/accuracies" and abs(b["rewards/chosen"]) + abs(b["rewards/rejected"]) < 1e-6:
                # policy == reference (precomputed reference, step 0): every reward is a tie at 0 in the padded
                # run, and in the packed run rounding noise (~1e-7, the packed attention sums in another order)
                continue
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-5), (arch, name, step, k, a[k], b[k])
    lr = trainer.args.learning_rate
    moved = False
    for n, p in ref_params.items():  # the bound of test_integrations_trl's parity test
        torch.testing.assert_close(params[n], p, rtol=1e-4, atol=1e-3 * lr, msg=n)
        moved |= not torch.equal(p, model0.get_parameter(n))
    assert moved
    # the fused head scored the packed tokens (no padding): L rows per packed forward, L = the row length
    assert {s[0][1] for s in packed} <= set(rows)


def test_packed_trainer_with_lora(tok, data, tmp_path):
    peft = pytest.importorskip("peft")
    model0 = tiny_llama(len(tok))
    runs = []
    for cls, extra in ((DPOTrainer, {}), (FastDPOTrainer, dict(padding_free=True))):
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        _, logs, params = _train(cls, model0, tok, data, _args(tmp_path, cls.__name__, **extra), peft_config=lora)
        runs.append((logs, {n: p for n, p in params.items() if "lora_" in n}))
    (ref_logs, ref_params), (logs, params) = runs
    for a, b in zip(logs, ref_logs):
        for k in METRICS:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-5), k
    assert ref_params and ref_params.keys() == params.keys()
    for n, p in ref_params.items():
        torch.testing.assert_close(params[n], p, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("precompute", [False, True])
def test_packed_evaluate_matches_padded(precompute, tok, data, tmp_path):
    """evaluate() (prediction_step with the logits for compute_metrics) on a packed eval set; with
    precompute_ref_log_probs the reference pass of a dataset given to evaluate() keeps TRL's padded batches."""
    model0 = tiny_llama(len(tok))
    res = []
    for cls, extra in ((DPOTrainer, {}), (FastDPOTrainer, dict(padding_free=True))):
        args = _args(tmp_path, cls.__name__, per_device_eval_batch_size=4, precompute_ref_log_probs=precompute,
                     **extra)
        trainer = cls(model=copy.deepcopy(model0), ref_model=None if precompute else copy.deepcopy(model0),
                      args=args, train_dataset=data, processing_class=tok)
        res.append(trainer.evaluate(eval_dataset=preference_dataset(6, seed=1)))
    ref, got = res
    keys = [k for k in ref if k.startswith("eval_") and k.split("eval_", 1)[1] in METRICS + ["loss"]]
    assert "eval_loss" in keys and "eval_rewards/margins" in keys
    for k in keys:
        if k == "eval_rewards/accuracies" and precompute:
            continue  # policy == reference: ties at 0 (see test_packed_trainer_matches_padded_dpo_trainer)
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-5), (k, got[k], ref[k])


def _param_distance(a, b):
    return torch.sqrt(sum(((a[n].double() - b[n].double()) ** 2).sum() for n in a)).item()


@pytest.mark.parametrize("arch", list(MODELS))
def test_packed_bf16_autocast_no_worse_than_stock_trl(arch, tok, data, tmp_path):
    """Under bf16 autocast (DPOConfig's default precision), the packed run's parameter distance to the fp32 run
    after 3 steps must be no worse than stock TRL's own bf16 distance.

    Plain SGD, as in tests/test_trl_bf16.py: AdamW's first steps are close to lr * sign(grad), so its
    distance counts sign flips of near-zero gradient elements rather than the gradient error (there the
    3-step AdamW ratio moved between 0.77 and 1.16 with the objective and the learning rate). Packing
    itself adds little bf16 error: the packed distance is close to fastdpo's padded bf16 run's (measured
    1.035x on llama and 0.977x on qwen2: the packed attention rounds in another order), and both are about
    0.3x stock TRL's."""
    model0 = MODELS[arch](len(tok))
    sgd = dict(optim="sgd", learning_rate=0.5)
    _, _, fp32 = _train(DPOTrainer, model0, tok, data, _args(tmp_path, "fp32", **sgd))
    _, _, trl_bf16 = _train(DPOTrainer, model0, tok, data, _args(tmp_path, "trl-bf16", bf16=True, **sgd))
    _, _, padded = _train(FastDPOTrainer, model0, tok, data, _args(tmp_path, "padded-bf16", bf16=True, **sgd),
                          fastdpo_backend="cpu")
    _, _, packed = _train(FastDPOTrainer, model0, tok, data,
                          _args(tmp_path, "packed-bf16", bf16=True, padding_free=True, **sgd), fastdpo_backend="cpu")
    d_trl, d_padded, d_packed = (_param_distance(p, fp32) for p in (trl_bf16, padded, packed))
    report = (f"{arch}: parameter distance to the fp32 run after {STEPS} steps: stock TRL bf16 {d_trl:.4e}, "
              f"fastdpo padded bf16 {d_padded:.4e}, fastdpo packed bf16 {d_packed:.4e}")
    print(report)
    p0 = dict(model0.named_parameters())
    assert _param_distance(fp32, p0) > 0.1, "the runs must move the parameters"
    assert d_trl > 0 and d_packed > 0, "bf16 autocast did not take effect"
    assert d_packed <= 1.1 * d_padded, report
    assert d_packed <= 1.0 * d_trl, report


# ------------------------------------------------------------------------------------- packed forwards


def _packed_vs_padded_logits(model, seqs):
    pad = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (pad - len(s)) for s in seqs])
    attn = torch.tensor([[1] * len(s) + [0] * (pad - len(s)) for s in seqs])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=attn).logits
        row = torch.tensor([sum(seqs, [])])
        pos = torch.cat([torch.arange(len(s)) for s in seqs]).unsqueeze(0)
        # transformers detects packing only without an attention mask and without a cache
        packed = model(input_ids=row, position_ids=pos, use_cache=False).logits[0]
        mixed = model(input_ids=row, use_cache=False).logits[0]  # without position_ids: one long sequence
    return torch.cat([padded[i, : len(s)] for i, s in enumerate(seqs)]), packed, mixed


FORWARDS = [(a, m) for a in MODELS for m in ("sdpa", "eager")] + [("llama", "flex_attention")]  # flex: compiles


@pytest.mark.parametrize("arch, attn", FORWARDS, ids=[f"{a}-{m}" for a, m in FORWARDS])
def test_packed_forward_equals_padded_forward(arch, attn):
    """transformers builds a block-causal mask from position_ids for these implementations: each sequence of a
    packed row sees only itself, so its logits are those of its padded row."""
    if attn == "flex_attention":
        pytest.importorskip("torch.nn.attention.flex_attention")
    model = MODELS[arch](40, layers=2, attn_implementation=attn).eval()
    assert _packing.check_packing_support(model) == attn
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 40, (n,), generator=g).tolist() for n in (7, 3, 11, 5)]
    try:
        want, packed, mixed = _packed_vs_padded_logits(model, seqs)
    except Exception as e:  # flex_attention needs torch.compile support on this platform
        if attn == "flex_attention":
            pytest.skip(f"flex_attention does not run here: {type(e).__name__}: {e}")
        raise
    torch.testing.assert_close(packed, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed[7:], want[7:], atol=1e-3)  # without position_ids the sequences mix


# ------------------------------------------------------------------------------------------- collator


@pytest.mark.parametrize("max_length, mode", [(None, "keep_start"), (6, "keep_start"), (6, "keep_end")])
def test_collator_flattens_trl_padded_batch(max_length, mode):
    examples = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12, 13]},
                {"prompt_ids": [14], "chosen_ids": [15, 16, 17], "rejected_ids": [18]},
                {"prompt_ids": [19, 20], "chosen_ids": [21, 22, 23, 24, 25], "rejected_ids": [26, 27]}]
    for ex in examples:
        ex["ref_chosen_logps"], ex["ref_rejected_logps"] = -1.0, -2.0
    padded = DataCollatorForPreference(pad_token_id=0, max_length=max_length, truncation_mode=mode)(examples)
    packed = _packing.DataCollatorForPackedPreference(max_length=max_length, truncation_mode=mode,
                                                      flash_attention_kwargs=True)(examples)
    keep = padded["attention_mask"].bool()
    assert packed["input_ids"].tolist() == [padded["input_ids"][keep].tolist()]
    assert packed["completion_mask"].tolist() == [padded["completion_mask"][keep].tolist()]
    lengths = padded["attention_mask"].sum(1).tolist()
    assert packed["sequence_lengths"].tolist() == lengths
    assert packed["cu_seqlens"] == [0] + torch.tensor(lengths).cumsum(0).tolist()
    assert packed["position_ids"].tolist() == [sum((list(range(n)) for n in lengths), [])]
    assert "attention_mask" not in packed
    assert packed["cu_seq_lens_q"].tolist() == packed["cu_seqlens"] and packed["max_length_q"] == max(lengths)
    torch.testing.assert_close(packed["ref_rejected_logps"], padded["ref_rejected_logps"])
    # the next-token labels of the packed row are TRL's shifted labels of each padded row
    labels = _packing.next_token_labels(packed["input_ids"], packed["completion_mask"], packed["cu_seqlens"])[0]
    trl = padded["input_ids"].masked_fill(padded["completion_mask"] == 0, -100)[:, 1:]
    cu = packed["cu_seqlens"]
    for i, n in enumerate(lengths):
        assert labels[cu[i] : cu[i + 1] - 1].tolist() == trl[i, : n - 1].tolist()
        assert labels[cu[i + 1] - 1] == -100


# ------------------------------------------------------------------------------------------- refusals


def test_unsupported_attention_is_refused_naming_the_fix(tok, data, tmp_path):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("fastdpo_test_attention", sdpa_attention_forward)
    model = tiny_llama(len(tok))
    model.config._attn_implementation = "fastdpo_test_attention"
    with pytest.raises(ValueError, match=r"attention implementation 'fastdpo_test_attention' does not keep the "
                                         r"sequences of a packed row apart.*attn_implementation='sdpa'.*"
                                         r"padding_free=False"):
        FastDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=_args(tmp_path, "x", padding_free=True),
                       train_dataset=data, processing_class=tok)


def test_stateful_models_and_own_collators_are_refused(tok, data, tmp_path):
    from transformers import MambaConfig, MambaForCausalLM

    mamba = MambaForCausalLM(MambaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, state_size=4))
    with pytest.raises(ValueError, match=r"recurrent or linear-attention layers.*padding_free=False"):
        _packing.check_packing_support(mamba)
    hybrid = tiny_llama(40)
    hybrid.config.layer_types = ["linear_attention"]
    with pytest.raises(ValueError, match=r"recurrent or linear-attention layers"):
        _packing.check_packing_support(hybrid)
    model = tiny_llama(len(tok))
    with pytest.raises(ValueError, match=r"packs batches with its own collator; leave data_collator=None"):
        FastDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=_args(tmp_path, "x", padding_free=True),
                       train_dataset=data, processing_class=tok, data_collator=DataCollatorForPreference(0))


def test_prompt_learning_adapters_are_refused(tok, data, tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama(len(tok))
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    with pytest.raises(ValueError, match=r"prompt-learning adapters prepend virtual tokens"):
        FastDPOTrainer(model=model, args=_args(tmp_path, "x", padding_free=True), train_dataset=data,
                       processing_class=tok, peft_config=cfg)


def test_padding_free_false_still_pads(tok, data, tmp_path):
    model = tiny_llama(len(tok))
    trainer = FastDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=_args(tmp_path, "x"),
                             train_dataset=data, processing_class=tok)
    assert not trainer.padding_free and isinstance(trainer.data_collator, DataCollatorForPreference)
    args = dataclasses.replace(_args(tmp_path, "y"), padding_free=True)
    trainer = FastDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data,
                             processing_class=tok)
    assert trainer.padding_free and args.padding_free


@pytest.mark.parametrize("loss_type, options", [("rrpo", {}), ("simpo", dict(beta=2.0))], ids=["rrpo", "simpo"])
def test_packed_fastdpo_objectives_match_padded(loss_type, options, tok, data, tmp_path):
    """fastdpo's own objectives (FastDPOConfig's loss_type) train the same packed as padded: the token-KL
    rrpo folds the reference's packed hidden states into the policy's fused-head pass, simpo needs no
    reference. Plain SGD: its step is linear in the gradient, where AdamW's first steps (about
    lr * sign(grad)) turn the packed attention's other summation order into sign flips of near-zero
    gradient elements (measured with AdamW: one k_proj element 2.4x over the bound for simpo)."""
    from fastdpo.integrations.trl import FastDPOConfig

    model0 = tiny_llama(len(tok))
    runs = []
    for packed in (False, True):
        args = _args(tmp_path, f"{loss_type}-{packed}", FastDPOConfig, loss_type=loss_type, padding_free=packed,
                     optim="sgd", learning_rate=0.5, **options)
        runs.append(_train(FastDPOTrainer, model0, tok, data, args, fastdpo_backend="cpu"))
    (_, padded_logs, padded), (trainer, packed_logs, packed) = runs
    assert trainer.args.padding_free and len(packed_logs) == len(padded_logs) == STEPS
    keys = set(METRICS) | ({"kl/chosen", "kl/rejected"} if loss_type == "rrpo" else set())
    for a, b in zip(packed_logs, padded_logs):
        assert keys <= a.keys()
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-5), (loss_type, k, a[k], b[k])
    lr = trainer.args.learning_rate
    for n, p in padded.items():
        torch.testing.assert_close(packed[n], p, rtol=1e-4, atol=1e-3 * lr, msg=n)
    assert any(not torch.equal(p, model0.get_parameter(n)) for n, p in packed.items())
