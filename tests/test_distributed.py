"""fastdpo under DistributedDataParallel: 2 gloo processes on CPU, each with half
of the preference pairs, end with the gradient of the whole batch."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastdpo

B, T, H, V = 4, 6, 16, 97  # 4 pairs: 2 per rank


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(H, H), torch.nn.Tanh(), torch.nn.Linear(H, V))


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * B, T, H, generator=g)
    y = torch.randint(0, V, (2 * B, T), generator=g)
    y[:, :2] = -100
    ref = torch.randn(2 * B, generator=g) - 30
    return x, y, ref


def _pairs(t, idx):
    """Rows of pairs ``idx`` in [chosen; rejected] layout."""
    return torch.cat([t[idx], t[B + idx]])


def _worker(rank, world, init_file, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    x, y, ref = _batch()
    idx = torch.arange(rank * B // world, (rank + 1) * B // world)
    out = fastdpo.dpo_loss(model(_pairs(x, idx)), _pairs(y, idx), ref_logps=_pairs(ref, idx), backend="cpu")
    out.loss.backward()
    if rank == 0:
        torch.save([p.grad for p in model.parameters()], os.path.join(out_dir, "grads.pt"))
    dist.destroy_process_group()


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ddp_grads = torch.load(tmp_path / "grads.pt")

    model = _model()
    x, y, ref = _batch()
    fastdpo.dpo_loss(model(x), y, ref_logps=ref, backend="cpu").loss.backward()
    for got, want in zip(ddp_grads, (p.grad for p in model.parameters())):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
