"""Vocabulary-parallel log-probs and DPO loss: 2 gloo processes on CPU, each holding a shard of the
vocabulary (uneven: V is odd), against the unsharded single-process result, forward and backward."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastdpo

N, T, V = 4, 6, 37  # shards of 19 and 18 columns
SPLIT = 19


def _data(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, T, V, generator=g) * 3).to(dtype)
    r = (x.float() + torch.randn(N, T, V, generator=g)).to(dtype)
    y = torch.randint(0, V, (N, T), generator=g)
    y[:, :2] = -100
    y[0, 3], y[1, 3] = 0, V - 1  # labels at both ends, on both shards
    gy = torch.randn(N, T, generator=g)
    return x, r, y, gy


PACKED_LENGTHS = [6, 4, 5, 3]
PACKED_CU = [0, 6, 10, 15, 18]


def _packed_data():
    """_data's sequences cut to PACKED_LENGTHS and laid end to end, and the padded batch they come from
    (labels ignored beyond each length)."""
    x, r, y, gy = _data(torch.float32)
    for i, n in enumerate(PACKED_LENGTHS):
        y[i, n:] = -100
    pack = lambda t: torch.cat([t[i, :n] for i, n in enumerate(PACKED_LENGTHS)])  # noqa: E731
    return pack(x), pack(r), pack(y), (x, r, y)


def _linear_data():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(N, T, 8, generator=g)
    w = torch.randn(V, 8, generator=g)
    return h, w, None, torch.randn(N, T, generator=g)


CASES = [
    ("fp32", torch.float32, {}),
    ("fp32-cap", torch.float32, {"temperature": 0.7, "softcap": 2.0}),
    ("bf16", torch.bfloat16, {}),
]


def _shard(t, rank):
    return (t[..., :SPLIT] if rank == 0 else t[..., SPLIT:]).contiguous()


def _worker(rank, world, init_file, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = dist.group.WORLD
    res = {}
    for name, dtype, kw in CASES:
        x, r, y, gy = _data(dtype)
        xs = _shard(x, rank).requires_grad_(True)
        out = fastdpo.vocab_parallel_logprobs(xs, y, process_group=group, ref_logits=_shard(r, rank), stats=True,
                                              backend="cpu", **kw)
        (out.logps * gy).sum().backward()
        res[name] = (out.logps.detach(), out.ref_logps, out.stats, xs.grad)
    x, r, y, _ = _data(torch.float32)
    xs = _shard(x, rank).requires_grad_(True)
    loss = fastdpo.dpo_loss(xs, y, ref_logits=_shard(r, rank), loss_type="ipo", process_group=group, backend="cpu")
    loss.loss.backward()
    res["dpo"] = (loss.loss.detach(), {k: v for k, v in loss.metrics.items()}, xs.grad)
    # The token-level KL to the reference (RRPO), both upstream gradients, with a soft cap.
    for name, dtype in (("kl-fp32", torch.float32), ("kl-bf16", torch.bfloat16)):
        x, r, y, gy = _data(dtype)
        xs = _shard(x, rank).requires_grad_(True)
        out = fastdpo.vocab_parallel_logprobs(xs, y, process_group=group, ref_logits=_shard(r, rank), kl=True,
                                              backend="cpu", softcap=4.0, temperature=0.8)
        ((out.logps * gy).sum() + (out.kl * gy.flip(0)).sum()).backward()
        res[name] = (out.logps.detach(), out.ref_logps, out.kl.detach(), xs.grad)
    x, r, y, _ = _data(torch.float32)
    xs = _shard(x, rank).requires_grad_(True)
    loss = fastdpo.dpo_loss(xs, y, ref_logits=_shard(r, rank), loss_type="rrpo", rrpo_alpha=0.5,
                            process_group=group, backend="cpu")
    loss.loss.backward()
    res["rrpo"] = (loss.loss.detach(), loss.metrics["kl/chosen"], xs.grad)
    # A packed (padding-free) batch of the same sequences, with the token-level KL.
    for name in ("ipo", "rrpo"):
        xp, rp, yp, _ = _packed_data()
        xps = _shard(xp, rank).requires_grad_(True)
        out = fastdpo.dpo_loss(xps, yp, ref_logits=_shard(rp, rank), loss_type=name, process_group=group,
                               backend="cpu", cu_seqlens=PACKED_CU)
        out.loss.backward()
        res["packed-" + name] = (out.loss.detach(), dict(out.metrics), xps.grad)
    h, w, _, gy = _linear_data()
    hl = h.clone().requires_grad_(True)
    ws = (w[:SPLIT] if rank == 0 else w[SPLIT:]).clone().requires_grad_(True)
    out = fastdpo.vocab_parallel_linear_logprobs(hl, ws, y, process_group=group, ref_hidden=h * 0.5, backend="cpu")
    (out.logps * gy).sum().backward()
    res["linear"] = (out.logps.detach(), out.ref_logps, hl.grad, ws.grad)
    errors = []
    for bad in (lambda: fastdpo.vocab_parallel_logprobs(xs, y, process_group=None),
                lambda: fastdpo.vocab_parallel_logprobs(xs, torch.full_like(y, V), process_group=group)):
        try:
            bad()
        except ValueError as e:
            errors.append(str(e))
    res["errors"] = errors
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("vp")
    mp.spawn(_worker, args=(2, str(d / "init"), str(d)), nprocs=2, join=True)
    return [torch.load(d / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("name, dtype, kw", CASES, ids=[c[0] for c in CASES])
def test_matches_unsharded(sharded, name, dtype, kw):
    x, r, y, gy = _data(dtype)
    xl = x.clone().requires_grad_(True)
    full = fastdpo.fused_logprobs(xl, y, ref_logits=r, stats=True, backend="cpu", **kw)
    (full.logps * gy).sum().backward()
    # bf16: same inputs in float64 give the truth; the sharded error is bounded by the unsharded one
    x64 = x.double().requires_grad_(True)
    truth = fastdpo.fused_logprobs(x64, y, ref_logits=r.double(), stats=True, backend="torch", **kw)
    (truth.logps * gy.double()).sum().backward()
    for rank in range(2):
        logps, ref, st, grad = sharded[rank][name]
        got_grad = torch.cat([sharded[0][name][3], sharded[1][name][3]], dim=-1)
        for got, base, want in ((logps, full.logps, truth.logps), (ref, full.ref_logps, truth.ref_logps),
                                (st, full.stats, truth.stats), (got_grad, xl.grad, x64.grad)):
            err = (got.double() - want).abs().max()
            base_err = (base.double() - want).abs().max()
            assert err <= 2 * base_err + 2e-5 * (1 + want.abs().max()), (name, rank, err, base_err)
        torch.testing.assert_close(st[..., 1], truth.stats[..., 1].float())  # argmax hits are exact


def test_dpo_loss_matches_unsharded(sharded):
    x, r, y, _ = _data(torch.float32)
    xl = x.clone().requires_grad_(True)
    ref = fastdpo.dpo_loss(xl, y, ref_logits=r, loss_type="ipo", backend="cpu")
    ref.loss.backward()
    for rank in range(2):
        loss, metrics, _ = sharded[rank]["dpo"]
        torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-6)
        for k, v in ref.metrics.items():
            torch.testing.assert_close(metrics[k], v, rtol=1e-4, atol=1e-5, msg=k)
    grad = torch.cat([sharded[0]["dpo"][2], sharded[1]["dpo"][2]], dim=-1)
    torch.testing.assert_close(grad, xl.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name, dtype", [("kl-fp32", torch.float32), ("kl-bf16", torch.bfloat16)])
def test_token_kl_matches_unsharded(sharded, name, dtype):
    x, r, y, gy = _data(dtype)
    kw = dict(softcap=4.0, temperature=0.8)
    xl = x.clone().requires_grad_(True)
    full = fastdpo.fused_logprobs(xl, y, ref_logits=r, kl=True, backend="cpu", **kw)
    ((full.logps * gy).sum() + (full.kl * gy.flip(0)).sum()).backward()
    x64 = x.double().requires_grad_(True)
    truth = fastdpo.fused_logprobs(x64, y, ref_logits=r.double(), kl=True, backend="torch", **kw)
    ((truth.logps * gy.double()).sum() + (truth.kl * gy.flip(0).double()).sum()).backward()
    got_grad = torch.cat([sharded[0][name][3], sharded[1][name][3]], dim=-1)
    assert got_grad.abs().sum() > 0
    for rank in range(2):
        logps, ref, kl, _ = sharded[rank][name]
        for got, base, want in ((logps, full.logps, truth.logps), (ref, full.ref_logps, truth.ref_logps),
                                (kl, full.kl, truth.kl), (got_grad, xl.grad, x64.grad)):
            err = (got.double() - want).abs().max()
            base_err = (base.double() - want).abs().max()
            assert err <= 2 * base_err + 2e-5 * (1 + want.abs().max()), (name, rank, err, base_err)
        assert (kl[y == -100] == 0).all()


def test_rrpo_loss_matches_unsharded(sharded):
    x, r, y, _ = _data(torch.float32)
    xl = x.clone().requires_grad_(True)
    ref = fastdpo.dpo_loss(xl, y, ref_logits=r, loss_type="rrpo", rrpo_alpha=0.5, backend="cpu")
    ref.loss.backward()
    for rank in range(2):
        loss, kl_chosen, _ = sharded[rank]["rrpo"]
        torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(kl_chosen, ref.metrics["kl/chosen"], rtol=1e-5, atol=1e-6)
    grad = torch.cat([sharded[0]["rrpo"][2], sharded[1]["rrpo"][2]], dim=-1)
    torch.testing.assert_close(grad, xl.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["ipo", "rrpo"])
def test_packed_dpo_loss_matches_unsharded_padded(sharded, name):
    _, _, _, (x, r, y) = _packed_data()
    xl = x.clone().requires_grad_(True)
    ref = fastdpo.dpo_loss(xl, y, ref_logits=r, loss_type=name, backend="cpu")
    ref.loss.backward()
    want = torch.cat([xl.grad[i, :n] for i, n in enumerate(PACKED_LENGTHS)])
    grad = torch.cat([sharded[0]["packed-" + name][2], sharded[1]["packed-" + name][2]], dim=-1)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
    for rank in range(2):
        loss, metrics, _ = sharded[rank]["packed-" + name]
        torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-6)
        assert metrics.keys() == ref.metrics.keys()
        for k, v in ref.metrics.items():
            torch.testing.assert_close(metrics[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_validation_errors(sharded):
    errors = sharded[0]["errors"]
    assert len(errors) == 2
    assert "process_group" in errors[0]
    assert "outside the vocabulary [0, 37)" in errors[1]


def test_needs_initialised_process_group():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(ValueError, match="not initialised"):
        fastdpo.vocab_parallel_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), process_group=object())


def test_weight_shards_match_unsharded(sharded):
    h, w, _, gy = _linear_data()
    _, _, y, _ = _data(torch.float32)
    hl, wl = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    full = fastdpo.fused_logprobs(hl @ wl.t(), y, ref_logits=(h * 0.5) @ w.t(), backend="cpu")
    (full.logps * gy).sum().backward()
    for rank in range(2):
        logps, ref, hgrad, _ = sharded[rank]["linear"]
        torch.testing.assert_close(logps, full.logps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ref, full.ref_logps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hgrad, hl.grad, rtol=1e-5, atol=1e-5)  # summed over the group
    wgrad = torch.cat([sharded[0]["linear"][3], sharded[1]["linear"][3]])
    torch.testing.assert_close(wgrad, wl.grad, rtol=1e-5, atol=1e-5)
