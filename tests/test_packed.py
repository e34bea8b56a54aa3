"""Packed (padding-free) batches: every entry point gives on the N sequences' tokens laid end to end
(``cu_seqlens`` / ``position_ids``) what it gives on the padded ``[N, T]`` batch, for every registered
objective, with and without a reference, with the token-level KL, token weights, LD-DPO and WPO, in
both fused-linear strategies; plus the segment sums, their determinism and every bad-packing error."""

from __future__ import annotations

import pytest
import torch

import fastdpo
import fastdpo.losses as L
from fastdpo.losses.registry import LossConfig
from fastdpo.losses.sequences import PackedLayout, PaddedLayout, make_layout
from fastdpo.ops.segments import segment_sum

V = 11
BACKENDS = ["torch", "cpu"]

_TIES = torch.tensor([True, False, True])
_Q = torch.softmax(torch.arange(9.0).view(3, 3) / 3, -1)
# Options that make each objective runnable on a batch (the rest keep their defaults).
EXTRA = {
    "kto": dict(kl=0.3), "dpo_ties": dict(ties=_TIES), "plackett_luce": dict(num_responses=3),
    "adpo": dict(num_responses=3, targets=_Q), "exo_pair": dict(label_smoothing=0.1),
    "margin_dpo": dict(beta=torch.tensor([0.1, 0.2, 0.3]), margin=torch.tensor([0.0, 0.5, 1.0])),
}


def _num_seqs(name):
    spec = L.get_loss(name)
    return 6 if spec.unpaired else 3 * spec.blocks(LossConfig(**{**spec.defaults, **EXTRA.get(name, {})}))


def _padded(n, T=8, seed=0, dtype=torch.float32, H=None):
    """A padded batch with a prompt (ignored), a response and padding (ignored) of varying lengths per
    row; padding positions hold random values, which a packed batch never sees. Returns the tensors and
    each row's length (prompt + response)."""
    g = torch.Generator().manual_seed(seed)
    width = V if H is None else H
    x = torch.randn(n, T, width, generator=g) * 2
    r = x + torch.randn(n, T, width, generator=g)
    y = torch.randint(0, V, (n, T), generator=g)
    w = torch.rand(n, T, generator=g) + 0.5
    lengths = []
    for i in range(n):
        prompt, length = 1 + i % 3, min(T, 3 + (5 * i + seed) % (T - 2))
        y[i, :prompt] = -100
        y[i, length:] = -100
        lengths.append(length)
    return x.to(dtype), r.to(dtype), y, w, lengths


def _pack(t, lengths):
    return torch.cat([t[i, :n] for i, n in enumerate(lengths)])


def _cu(lengths):
    return torch.tensor([0, *lengths]).cumsum(0)


def _close(a, b, msg="", rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=msg)


def _compare(a, b, what):
    _close(b.loss, a.loss, what)
    for k in a.metrics:
        _close(b.metrics[k], a.metrics[k], f"{what} {k}")
    assert a.metrics.keys() == b.metrics.keys()
    for f in ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "policy_logps", "ref_logps"):
        if getattr(a, f) is None:
            assert getattr(b, f) is None, f
        else:
            _close(getattr(b, f), getattr(a, f), f"{what} {f}")


def _ref_modes(name):
    spec = L.get_loss(name)
    if spec.token_kl:
        return ["logits"]
    return {"required": ["logits", "logps"], "optional": ["logits", "none", "logps"], "unused": ["none"]}[
        spec.reference]


# token weights with the objective's first reference mode
CASES = [(name, mode, tw) for name in L.available_losses() for i, mode in enumerate(_ref_modes(name))
         for tw in ((False, True) if i == 0 else (False,))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, ref_mode, weighted", CASES,
                         ids=[f"{n}-{m}{'-tw' if w else ''}" for n, m, w in CASES])
def test_dpo_loss_packed_equals_padded(name, ref_mode, weighted, backend):
    n = _num_seqs(name)
    x, r, y, w, lengths = _padded(n, seed=sum(map(ord, name)) % 50)
    ref_logps = -torch.rand(n) * 5 if ref_mode == "logps" else None
    free = ref_mode == "none" and L.get_loss(name).reference == "optional"
    opts = dict(loss_type=name, backend=backend, ref_logps=ref_logps, reference_free=free, **EXTRA.get(name, {}))
    xa = x.clone().requires_grad_()
    a = L.dpo_loss(xa, y, ref_logits=r if ref_mode == "logits" else None, token_weights=w if weighted else None,
                   **opts)
    a.loss.backward()
    xb = _pack(x, lengths).requires_grad_()
    b = L.dpo_loss(xb, _pack(y, lengths), ref_logits=_pack(r, lengths) if ref_mode == "logits" else None,
                   token_weights=_pack(w, lengths) if weighted else None, cu_seqlens=_cu(lengths), **opts)
    b.loss.backward()
    _compare(a, b, name)
    _close(xb.grad, _pack(xa.grad, lengths), "grad")
    assert xa.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [dict(loss_type="sigmoid", ld_alpha=0.4), dict(loss_type="sigmoid", use_weighting=True),
                                  dict(loss_type="ipo", ld_alpha=0.0, use_weighting=True),
                                  dict(loss_type="tpo", ld_alpha=0.5),
                                  dict(loss_type=["sigmoid", "rrpo", "sft"], loss_weights=[1.0, 0.5, 0.2]),
                                  dict(loss_type="tdpo", tdpo_variant="tdpo2"),
                                  dict(loss_type="sigmoid", pair_weights=torch.tensor([0.5, 1.0, 2.0])),
                                  dict(loss_type="kto", kl=0.1,
                                       desirable=torch.tensor([True, False, False, True, True, False])),
                                  dict(loss_type="sigmoid", f_divergence_type="alpha_divergence")],
                         ids=["ld_alpha", "wpo", "ipo-ld-wpo", "tpo-ld", "multi-kl", "tdpo2", "pair_weights",
                              "kto-desirable", "f_div"])
def test_dpo_loss_packed_options(opts, backend):
    n = 9 if opts["loss_type"] == "tpo" else 6
    x, r, y, w, lengths = _padded(n, seed=3)
    xa = x.clone().requires_grad_()
    a = L.dpo_loss(xa, y, ref_logits=r, token_weights=w, backend=backend, **opts)
    a.loss.backward()
    xb = _pack(x, lengths).requires_grad_()
    b = L.dpo_loss(xb, _pack(y, lengths), ref_logits=_pack(r, lengths), token_weights=_pack(w, lengths),
                   cu_seqlens=_cu(lengths), backend=backend, **opts)
    b.loss.backward()
    _compare(a, b, str(opts))
    _close(xb.grad, _pack(xa.grad, lengths), "grad")
    assert xb.grad.abs().sum() > 0


def test_position_ids_and_row_forms_equal_cu_seqlens():
    x, r, y, _, lengths = _padded(6, seed=1)
    xp, rp, yp = (_pack(t, lengths) for t in (x, r, y))
    base = L.dpo_loss(xp, yp, ref_logits=rp, cu_seqlens=_cu(lengths), backend="cpu")
    pos = torch.cat([torch.arange(n) for n in lengths])
    for kw in (dict(position_ids=pos), dict(position_ids=pos.unsqueeze(0)), dict(cu_seqlens=_cu(lengths).tolist()),
               dict(cu_seqlens=_cu(lengths).int())):
        _compare(base, L.dpo_loss(xp, yp, ref_logits=rp, backend="cpu", **kw), str(kw))
    # a packed row [1, N_total, V] as a model returns it
    row = L.dpo_loss(xp.unsqueeze(0), yp.unsqueeze(0), ref_logits=rp.unsqueeze(0), position_ids=pos.unsqueeze(0),
                     backend="cpu")
    _compare(base, row, "row")
    # position_ids shifted with the labels (the first sequence then starts at position 1)
    shifted = L.dpo_loss(xp[1:], yp[1:], ref_logits=rp[1:], position_ids=pos[1:], backend="cpu")
    cu = _cu(lengths).tolist()
    ref = L.dpo_loss(xp[1:], yp[1:], ref_logits=rp[1:], cu_seqlens=[0] + [c - 1 for c in cu[1:]], backend="cpu")
    _compare(ref, shifted, "shifted")


# grad_in_forward for the objectives that allow it (separable, no token-level KL); the torch backend runs the
# Python tile loop of the recompute strategy (the cpu backend its C++ loop), grad_in_forward is one loop for both
LINEAR_CASES = [(n, s, b) for n in L.available_losses() for s in ("recompute", "grad_in_forward")
                for b in (BACKENDS if s == "recompute" else ["cpu"])
                if s == "recompute" or (L.get_loss(n).separable and not L.get_loss(n).token_kl)]


@pytest.mark.parametrize("name, strategy, backend", LINEAR_CASES, ids=[f"{n}-{s}-{b}" for n, s, b in LINEAR_CASES])
def test_linear_dpo_loss_packed_equals_padded(name, strategy, backend):
    spec = L.get_loss(name)
    n, H = _num_seqs(name), 6
    hid, ref_hid, y, w, lengths = _padded(n, seed=len(name), H=H)
    g = torch.Generator().manual_seed(7)
    weight, bias = torch.randn(V, H, generator=g) * 0.5, torch.randn(V, generator=g) * 0.1
    uses_ref = spec.reference != "unused"
    # recompute: tiles of 5 tokens; grad_in_forward: chunks of at most 24 tokens (a few whole groups)
    rows = 5 if strategy == "recompute" else 24
    opts = dict(loss_type=name, backend=backend, strategy=strategy, memory_budget=rows * V * 4, **EXTRA.get(name, {}))
    grads = []
    outs = []
    for packed in (False, True):
        def f(t):
            return _pack(t, lengths) if packed else t
        h, wt, b = hid.clone(), weight.clone(), bias.clone()
        h = f(h).requires_grad_()
        wt.requires_grad_()
        b.requires_grad_()
        out = L.linear_dpo_loss(h, wt, f(y), bias=b, ref_hidden=f(ref_hid) if uses_ref else None,
                                token_weights=f(w), cu_seqlens=_cu(lengths) if packed else None, **opts)
        out.loss.backward()
        outs.append(out)
        grads.append((h.grad if packed else _pack(h.grad, lengths), wt.grad, b.grad))
    _compare(*outs, name)
    for ga, gb, what in zip(*grads, ("hidden", "weight", "bias")):
        _close(gb, ga, what)
    assert grads[1][1].abs().sum() > 0


def test_linear_grad_in_forward_chunks_whole_pairs_of_a_packed_batch(monkeypatch):
    """The counted tokens per packed sequence (read once on the host) size the chunks; under a budget of
    the largest pair, every chunk is whole pairs, which in a packed [chosen; rejected] row are two
    separate token ranges."""
    from fastdpo.ops import linear

    hid, ref_hid, y, _, lengths = _padded(6, seed=2, H=5)
    weight = torch.randn(V, 5)
    seen = []
    orig = linear.linear_grad_in_forward
    monkeypatch.setattr(linear, "linear_grad_in_forward",
                        lambda *a, **k: seen.append((a[7].counts, a[9])) or orig(*a, **k))
    counted = [int((y[i] != -100).sum()) for i in range(6)]
    budget = max(counted[i] + counted[i + 3] for i in range(3)) * V * 4
    h = _pack(hid, lengths).requires_grad_()
    out = L.linear_dpo_loss(h, weight, _pack(y, lengths), ref_hidden=_pack(ref_hid, lengths), cu_seqlens=_cu(lengths),
                            strategy="grad_in_forward", memory_budget=budget, backend="cpu")
    out.loss.backward()
    [(counts, chunks)] = seen
    assert list(counts) == counted
    assert sum(chunks, []) == [s for i in range(3) for s in (i, i + 3)]  # whole pairs, in order
    assert len(chunks) >= 2 and all(len(c) % 2 == 0 for c in chunks)
    ref = L.linear_dpo_loss(hid.clone().requires_grad_(), weight, y, ref_hidden=ref_hid, strategy="recompute",
                            backend="cpu")
    _close(out.loss, ref.loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["sigmoid", "simpo", "ipo", "rrpo"])
def test_bf16_packed_within_the_padded_bounds(name, backend):
    """bf16: the packed loss and gradient are the padded ones (the same per-token kernel values, only the
    order of the fp32 sequence sums differs), so they meet the padded bf16 bounds against float64 truth."""
    x, r, y, w, lengths = _padded(6, seed=11, dtype=torch.bfloat16)
    uses_ref = name != "simpo"
    outs, grads = [], []
    for packed in (False, True):
        def f(t):
            return _pack(t, lengths) if packed else t
        xx = f(x).clone().requires_grad_()
        out = L.dpo_loss(xx, f(y), ref_logits=f(r) if uses_ref else None, loss_type=name, backend=backend,
                         cu_seqlens=_cu(lengths) if packed else None)
        out.loss.backward()
        outs.append(out)
        grads.append(xx.grad if packed else _pack(xx.grad, lengths))
    x64 = x.double().requires_grad_()
    truth = L.dpo_loss(x64, y, ref_logits=r.double() if uses_ref else None, loss_type=name, backend="torch")
    truth.loss.backward()
    t_loss, t_grad = truth.loss.detach(), _pack(x64.grad, lengths)
    pad_err = (outs[0].loss.double() - t_loss).abs().item()
    pad_gerr = (grads[0].double() - t_grad).abs().max().item()
    assert (outs[1].loss.double() - t_loss).abs().item() <= 1.01 * pad_err + 1e-6
    assert (grads[1].double() - t_grad).abs().max().item() <= 1.01 * pad_gerr + 1e-6
    _close(outs[1].loss, outs[0].loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)  # the same per-token coefficients


@pytest.mark.parametrize("strategy", ["recompute", "grad_in_forward"])
def test_linear_bf16_packed_within_the_padded_bounds(strategy):
    hid, ref_hid, y, _, lengths = _padded(6, seed=13, H=8, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    weight = (torch.randn(V, 8, generator=g) * 0.5).bfloat16()
    runs = []  # bf16 padded, bf16 packed, float64 truth on the same (bf16-rounded) inputs
    for dtype, packed in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float64, False)):
        def f(t):
            return _pack(t, lengths) if packed else t
        h, w = (t.detach().to(dtype).clone().requires_grad_() for t in (f(hid), weight))
        out = L.linear_dpo_loss(h, w, f(y), ref_hidden=f(ref_hid).to(dtype), loss_type="ipo", strategy=strategy,
                                backend="cpu" if dtype != torch.float64 else "torch", memory_budget=24 * V * 8,
                                cu_seqlens=_cu(lengths) if packed else None)
        out.loss.backward()
        runs.append((out.loss.double(), (h.grad if packed else _pack(h.grad, lengths)).double(), w.grad.double()))
    (pl, ph, pw), (kl, kh, kw), (tl, th, tw) = runs
    assert (pw - tw).abs().max() > 0  # bf16 rounding is there to bound
    assert (kl - tl).abs() <= 1.01 * (pl - tl).abs() + 1e-6
    for got, pad, truth in ((kh, ph, th), (kw, pw, tw)):
        assert (got - truth).abs().max() <= 1.05 * (pad - truth).abs().max() + 1e-6


def test_packed_is_deterministic_and_fused_logprobs_are_per_token():
    x, r, y, _, lengths = _padded(6, T=40, seed=4)
    xp, rp, yp = (_pack(t, lengths) for t in (x, r, y))
    runs = []
    for _ in range(2):
        xx = xp.clone().requires_grad_()
        out = L.dpo_loss(xx, yp, ref_logits=rp, cu_seqlens=_cu(lengths), loss_type="ipo", backend="cpu")
        out.loss.backward()
        runs.append((out.loss, out.policy_logps, xx.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    # fused_logprobs works per token: packed outputs are the padded ones at the same tokens
    pk = fastdpo.fused_logprobs(xp, yp, ref_logits=rp, stats=True, kl=True, backend="cpu")
    pd = fastdpo.fused_logprobs(x, y, ref_logits=r, stats=True, kl=True, backend="cpu")
    for a, b in zip(pk, pd):
        torch.testing.assert_close(a, _pack(b, lengths), rtol=0, atol=0)
    sums = fastdpo.sequence_sums(pk.logps, cu_seqlens=_cu(lengths))
    _close(sums, fastdpo.sequence_sums(pd.logps), rtol=1e-6, atol=1e-6)
    _close(sums, out.policy_logps.detach())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_segment_sum_against_float64_truth(backend, dtype):
    g = torch.Generator().manual_seed(0)
    lengths = [3, 0, 2500, 1, 7, 0]
    cu = _cu(lengths)
    values = (torch.randn(int(sum(lengths)), generator=g) * 3).to(dtype).requires_grad_()

    seq_index = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    got = segment_sum(values, cu, seq_index, backend)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    truth = torch.stack([values.detach()[a:b].double().sum() for a, b in zip(cu[:-1], cu[1:])])
    # float32 accumulation over 2500 terms vs plain torch's own float32 sums
    torch_err = (torch.stack([values.detach()[a:b].float().sum() for a, b in zip(cu[:-1], cu[1:])]).double()
                 - truth).abs().max().item()
    assert (got.double() - truth).abs().max().item() <= 2 * torch_err + 1e-12
    assert torch.equal(got, segment_sum(values, cu, seq_index, backend))
    (got * torch.arange(1.0, 7.0, dtype=got.dtype)).sum().backward()
    torch.testing.assert_close(values.grad, (seq_index + 1).to(dtype))


def test_native_segment_sum_is_bitwise_independent_of_threads():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 300, (200,), generator=g)
    cu = _cu(lengths.tolist())
    values = torch.randn(int(lengths.sum()), generator=g)
    fastdpo._backends.resolve("cpu", torch.device("cpu"))  # loads the extension
    torch.library.opcheck(torch.ops.fastdpo.segment_sum.default, (values, cu))
    n = torch.get_num_threads()
    outs = []
    for threads in (1, max(2, n)):
        torch.set_num_threads(threads)
        outs.append(torch.ops.fastdpo.segment_sum(values, cu))
    torch.set_num_threads(n)
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(RuntimeError, match="non-decreasing"):
        torch.ops.fastdpo.segment_sum(values, cu.flip(0))
    with pytest.raises(RuntimeError, match="must lie in"):
        torch.ops.fastdpo.segment_sum(values, cu + 1)


def test_layouts_have_the_same_methods():
    x, _, y, _, lengths = _padded(4, seed=5)
    padded = make_layout(y, -100)
    packed = make_layout(_pack(y, lengths), -100, cu_seqlens=_cu(lengths), backend="cpu")
    assert isinstance(padded, PaddedLayout) and isinstance(packed, PackedLayout)
    assert padded.num_seqs == packed.num_seqs == 4
    vals = x[..., 0] * padded.mask
    _close(packed.seq_sum(_pack(vals, lengths)), padded.seq_sum(vals))
    seq = torch.arange(4.0)
    torch.testing.assert_close(packed.per_token(seq), _pack(padded.per_token(seq), lengths))
    m = padded.mask
    torch.testing.assert_close(packed.positions() * packed.mask, _pack(padded.positions() * m, lengths))
    torch.testing.assert_close(packed.mask, _pack(m, lengths))
    assert packed.offsets().tolist() == _cu(lengths).tolist()
    assert padded.offsets().tolist() == [0, 8, 16, 24, 32]
    assert packed.tokens(torch.zeros(1, packed.shape[0])).shape == packed.shape


# --------------------------------------------------------------------------------------- bad packing


def _packed_batch():
    x, r, y, _, lengths = _padded(4, seed=6)
    return _pack(x, lengths), _pack(r, lengths), _pack(y, lengths), lengths


M = 24  # _packed_batch(): lengths [3, 8, 7, 6], cu_seqlens [0, 3, 11, 18, 24]


@pytest.mark.parametrize("index, match", [
    (dict(cu_seqlens=[0, 11, 3, 18, M]), r"cu_seqlens must be non-decreasing .* cu_seqlens\[2\] = 3 < cu_seqlens\[1\] = 11"),
    (dict(cu_seqlens=[1, 3, 11, 18, M]), r"cu_seqlens must be the offsets \[0, \.\.\., N_total\]"),
    (dict(cu_seqlens=[0]), r"cu_seqlens must be the offsets"),
    (dict(cu_seqlens=[0, 3, 3, 18, M]), r"packed sequence 1 is empty \(cu_seqlens\[1\] = cu_seqlens\[2\] = 3\)"),
    (dict(cu_seqlens=[0, 3, 11, 18, M + 1]), r"cu_seqlens ends at 25 but the packed batch has 24 tokens .* lengths do "
                                             r"not match"),
    (dict(cu_seqlens=torch.tensor([0.0, 3.0])), r"cu_seqlens must be a 1-D integer tensor"),
    (dict(cu_seqlens=[0, 2.5]), r"cu_seqlens must be an integer tensor or a sequence of ints"),
    (dict(position_ids=torch.tensor([0, 1, 2, 1, *range(4, M)])),
     r"position_ids must count up by 1 within a sequence and restart at 0 .* position_ids\[3\] = 1 after 2"),
    (dict(position_ids=torch.arange(M + 1)), r"position_ids must be \[N_total\] or \[1, N_total\] with one entry per "
                                             r"packed token \(N_total = 24"),
    (dict(position_ids=torch.arange(M) - 1), r"position_ids must be >= 0"),
    (dict(position_ids=torch.zeros(M)), r"position_ids must be an integer tensor"),
    (dict(cu_seqlens=[0, M], position_ids=torch.zeros(M, dtype=torch.long)),
     r"cu_seqlens or as position_ids \(one of them\), got both"),
])
def test_bad_packing_raises_a_clear_error(index, match):
    xp, rp, yp, lengths = _packed_batch()
    assert yp.numel() == M and lengths == [3, 8, 7, 6]
    with pytest.raises((ValueError, TypeError), match=match):
        L.dpo_loss(xp, yp, ref_logits=rp, backend="cpu", **index)
    # the same validation guards the linear form and the sequence sums
    with pytest.raises((ValueError, TypeError), match=match):
        L.linear_dpo_loss(xp, torch.randn(V, V), yp, backend="cpu", **index)
    with pytest.raises((ValueError, TypeError), match=match):
        fastdpo.sequence_sums(xp[:, 0], **index)


def test_bad_packed_shapes_and_sequence_counts_raise():
    xp, rp, yp, lengths = _packed_batch()
    cu = _cu(lengths)
    with pytest.raises(ValueError, match=r"packed logits must be \[N_total, V\] or \[1, N_total, V\]"):
        L.dpo_loss(xp.view(3, -1, V), yp.view(3, -1), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"logits must be \[N, T, V\] .* or \[N_total, V\] with cu_seqlens"):
        L.dpo_loss(xp, yp)
    with pytest.raises(ValueError, match=r"packed hidden must be \[N_total, H\]"):
        L.linear_dpo_loss(xp.view(3, -1, V), torch.randn(V, V), yp.view(3, -1), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"labels must have shape logits.shape\[:-1\]"):
        L.dpo_loss(xp, yp[:-1], cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"ref_logits must have the shape of logits"):
        L.dpo_loss(xp, yp, ref_logits=rp[:-1], cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"token_weights must have the shape of labels"):
        L.dpo_loss(xp, yp, token_weights=torch.ones(yp.numel() - 1), cu_seqlens=cu, reference_free=True)
    # sequence counts: the packing holds 3 sequences, a pair loss needs [chosen; rejected]
    three = [0, cu[1].item(), cu[2].item(), yp.numel()]
    with pytest.raises(ValueError, match=r"must hold \[chosen; rejected\] .* got 3 sequences"):
        L.dpo_loss(xp, yp, cu_seqlens=three, reference_free=True)
    with pytest.raises(ValueError, match=r"ref_logps must be the \[4\] sequence-level reference log-probs"):
        L.dpo_loss(xp, yp, ref_logps=torch.zeros(6), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"pair_weights must have shape \(2,\)"):
        L.dpo_loss(xp, yp, pair_weights=torch.ones(3), cu_seqlens=cu, reference_free=True)
    with pytest.raises(ValueError, match=r"desirable must be a bool tensor of shape \(4,\)"):
        L.dpo_loss(xp, yp, loss_type="kto", kl=0.0, desirable=torch.ones(3, dtype=torch.bool), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"padded values must be \[N, T\]"):
        fastdpo.sequence_sums(xp[:, 0])


def test_triton_backend_segment_sum_in_the_loss():
    from fastdpo import _backends

    if _backends.unavailable_reason(_backends.Backend.TRITON, torch.device("cpu")) is not None:
        pytest.skip("triton backend unavailable here")
    x, r, y, _, lengths = _padded(4, seed=8)
    a = L.dpo_loss(x, y, ref_logits=r, loss_type="ipo", backend="torch")
    b = L.dpo_loss(_pack(x, lengths), _pack(y, lengths), ref_logits=_pack(r, lengths), cu_seqlens=_cu(lengths),
                   loss_type="ipo", backend="triton")
    _compare(a, b, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_gpu_packed_equals_padded(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from fastdpo import _backends

    reason = _backends.unavailable_reason(_backends.Backend(backend), torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    x, r, y, w, lengths = _padded(6, T=64, seed=12)
    x, r, y, w = (t.cuda() for t in (x, r, y, w))
    for name in ("sigmoid", "ipo", "rrpo"):
        xa = x.clone().requires_grad_()
        a = L.dpo_loss(xa, y, ref_logits=r, token_weights=w, loss_type=name, backend=backend)
        a.loss.backward()
        xb = _pack(x, lengths).requires_grad_()
        runs = []
        for _ in range(2):
            xb.grad = None
            b = L.dpo_loss(xb, _pack(y, lengths), ref_logits=_pack(r, lengths), token_weights=_pack(w, lengths),
                           cu_seqlens=_cu(lengths), loss_type=name, backend=backend)  # cu_seqlens on the host
            b.loss.backward()
            runs.append((b.loss.detach(), b.policy_logps.detach(), xb.grad.clone()))
        _compare(a, b, name)
        _close(xb.grad, _pack(xa.grad, lengths), name)
        for p, q in zip(*runs):
            assert torch.equal(p, q)  # deterministic
