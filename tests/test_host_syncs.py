"""Host synchronisations per call, counted on CPU for the code path GPU tensors take.

A host synchronisation stalls the CPU's run-ahead of the GPU and makes CUDA-graph capture
impossible. :class:`SyncCounter` records every op that would synchronise with a GPU: reading a
value on the host (``item``/``bool``/``int``/``float``: ``aten._local_scalar_dense``; ``tolist``,
``numpy``, ``cpu``), ops whose output shape depends on the data (``nonzero``, ``masked_select``,
``unique``, boolean-mask indexing, ``repeat_interleave`` without ``output_size``), and tensors
built from host data (``torch.tensor(list)``: a synchronous host-to-device copy on GPUs).

The tensors are on CPU, where host checks are free and therefore taken (``_validation.host_checks``);
the test turns them off, as for GPU tensors, so it measures the GPU code path. The ``cpu`` backend
stands in for ``cuda`` (both are the same ``fastdpo::`` ops called from the same Python code);
``torch`` and ``triton`` (interpreter) are measured as themselves. Kernel internals are not seen:
the mode sees each custom op as one call.

Budgets (docs/architecture.md, "GPU readiness"): zero for the logits path (``fused_logprobs``,
``token_logprobs``, ``dpo_loss`` forward + backward); one per call for the fused linear path
(the per-sequence counts of the tokens that count, read once: ignored-token compaction and
pair chunking are planned from them).
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastdpo
from fastdpo import _backends, _validation
from fastdpo.losses import registry

aten = torch.ops.aten
_SHAPE_FROM_DATA = {aten.nonzero, aten.masked_select, aten._unique2, aten.unique_dim, aten.unique_consecutive,
                    aten._unique, aten.masked_scatter}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self._patches = []

    def _record(self, what: str):
        here = [f for f in traceback.extract_stack() if "/fastdpo/" in f.filename and "/tests/" not in f.filename]
        where = f"{here[-1].filename.split('/fastdpo/')[-1]}:{here[-1].lineno}" if here else "?"
        self.syncs.append(f"{what} at {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        pkt = func.overloadpacket
        if pkt is aten._local_scalar_dense:
            self._record("a value read on the host (item/bool/int/float)")
        elif pkt in _SHAPE_FROM_DATA:
            self._record(f"{pkt.__name__} (output shape from the data)")
        elif pkt is aten.repeat_interleave and func is aten.repeat_interleave.Tensor and "output_size" not in kwargs:
            self._record("repeat_interleave without output_size")
        elif pkt in (aten.index, aten.index_put, aten.index_put_) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self._record(f"boolean-mask {pkt.__name__}")
        elif pkt is aten.lift_fresh:
            self._record("a tensor built from host data (host-to-device copy)")
        return func(*args, **kwargs)

    def __enter__(self):
        counter = self
        for name in ("tolist", "numpy", "cpu"):
            orig = getattr(torch.Tensor, name)

            def patched(t, *a, _orig=orig, _name=name, **k):
                counter._record(f"Tensor.{_name}()")
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, patched)
            self._patches.append((name, orig))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, orig in self._patches:
            setattr(torch.Tensor, name, orig)
        self._patches.clear()
        return super().__exit__(*exc)


@pytest.fixture
def gpu_path(monkeypatch):
    """Host checks off, as for GPU tensors."""
    monkeypatch.setattr(_validation, "host_checks", lambda t: False, raising=False)


def _backends_here():
    out = ["torch", "cpu"]
    if _backends.unavailable_reason(_backends.Backend.TRITON, torch.device("cpu")) is None:
        out.append("triton")
    return out


def _logits_case(n=4, t=6, v=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, v, generator=g)
    r = x + 0.5 * torch.randn(n, t, v, generator=g)
    y = torch.randint(0, v, (n, t), generator=g)
    y[:, :2] = -100
    y[1, 4:] = -100
    return x, r, y


def test_the_counter_sees_each_kind_of_sync():
    x = torch.arange(6.0)
    cases = [lambda: x.sum().item(), lambda: bool(x.any()), lambda: x.tolist(), lambda: torch.nonzero(x),
             lambda: x[x > 2], lambda: torch.tensor([1, 2]), lambda: x.cpu(), lambda: x.unique(),
             lambda: torch.repeat_interleave(torch.tensor([1, 2]))]
    for f in cases:
        with SyncCounter() as c:
            f()
        assert c.syncs, f
    with SyncCounter() as c:  # ops that do not synchronise
        torch.nonzero_static(x > 2, size=3)
        torch._assert_async(x.sum() > 0, "ok")
        torch.split(x, [2, 4])
        torch.where(x > 2, x, 0.0).sum()
    assert c.syncs == []


@pytest.mark.parametrize("backend", _backends_here())
@pytest.mark.parametrize("kw", [{}, {"stats": True, "ref": True}, {"stats": True, "ref": True, "kl": True}])
def test_fused_logprobs_forward_backward_has_no_host_sync(gpu_path, backend, kw):
    x, r, y = _logits_case()
    xl = x.clone().requires_grad_()
    with SyncCounter() as c:
        out = fastdpo.fused_logprobs(xl, y, ref_logits=r if kw.get("ref") else None, stats=kw.get("stats", False),
                                     kl=kw.get("kl", False), backend=backend)
        loss = out.logps.sum() + (out.kl.sum() if out.kl is not None else 0)
        loss.backward()
    assert c.syncs == [], c.syncs


# Options without a usable default.
_REQUIRED = {"exo_pair": {"label_smoothing": 1e-3}, "kto": {"kl": 0.0}}


def _loss_case(loss_type):
    from fastdpo.losses.plan import make_plan

    kw = _REQUIRED.get(loss_type, {})
    plan = make_plan(loss_type, None, 0.1, kw.get("label_smoothing", 0.0), "reverse_kl", 0.5, None, False, 0.05,
                     {k: v for k, v in kw.items() if k != "label_smoothing"})
    return _logits_case(n=2 * plan.num_blocks), kw


@pytest.mark.parametrize("loss_type", registry.available_losses())
def test_dpo_loss_forward_backward_has_no_host_sync(gpu_path, loss_type):
    (x, r, y), kw = _loss_case(loss_type)
    xl = x.clone().requires_grad_()
    with SyncCounter() as c:
        out = fastdpo.dpo_loss(xl, y, ref_logits=r, loss_type=loss_type, backend="cpu", **kw)
        out.loss.backward()
    assert c.syncs == [], c.syncs


@pytest.mark.parametrize("loss_type", sorted(n for n in registry.available_losses() if registry.get_loss(n).unpaired))
def test_unpaired_losses_read_the_number_of_desirable_sequences_once(gpu_path, loss_type):
    """With ``desirable=`` the per-sequence outputs' sizes depend on it: one host sync per call."""
    (x, r, y), kw = _loss_case(loss_type)
    desirable = torch.tensor([True, False, True, True])
    xl = x.clone().requires_grad_()
    with SyncCounter() as c:
        out = fastdpo.dpo_loss(xl, y, ref_logits=r, loss_type=loss_type, desirable=desirable, backend="cpu", **kw)
        out.loss.backward()
    assert len(c.syncs) == 1 and "losses/compute.py" in c.syncs[0], c.syncs
    assert out.chosen_rewards.shape == (3,) and out.rejected_rewards.shape == (1,)


@pytest.mark.parametrize("backend", _backends_here())
def test_dpo_loss_options_have_no_host_sync(gpu_path, backend):
    x, r, y = _logits_case()
    xl = x.clone().requires_grad_()
    with SyncCounter() as c:
        out = fastdpo.dpo_loss(xl, y, ref_logits=r, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
                               use_weighting=True, ld_alpha=0.5, token_weights=torch.rand(y.shape),
                               pair_weights=torch.rand(2), backend=backend)
        out.loss.backward()
    assert c.syncs == [], c.syncs


def _linear_case(n=4, t=7, h=8, v=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, t, h, generator=g, requires_grad=True)
    w = (torch.randn(v, h, generator=g) / h**0.5).requires_grad_()
    b = torch.zeros(v).requires_grad_()
    y = torch.randint(0, v, (n, t), generator=g)
    y[:, :3] = -100
    y[2, 5:] = -100
    return hid, w, b, y


@pytest.mark.parametrize("backend", _backends_here())
@pytest.mark.parametrize("strategy", ["recompute", "grad_in_forward"])
@pytest.mark.parametrize("budget_rows", [None, 9])  # 9 rows: several tiles, one pair (<= 8 tokens) per chunk
def test_linear_dpo_loss_makes_one_host_sync_per_call(gpu_path, backend, strategy, budget_rows):
    hid, w, b, y = _linear_case()
    budget = None if budget_rows is None else budget_rows * w.shape[0] * 4
    with SyncCounter() as c:
        out = fastdpo.linear_dpo_loss(hid, w, y, bias=b, ref_hidden=hid.detach() * 0.9, strategy=strategy,
                                      memory_budget=budget, backend=backend)
        out.loss.backward()
    assert len(c.syncs) <= 1 and all("ops/linear.py" in s for s in c.syncs), c.syncs


@pytest.mark.parametrize("backend", _backends_here())
def test_linear_token_logprobs_makes_one_host_sync_per_call(gpu_path, backend):
    hid, w, b, y = _linear_case()
    with SyncCounter() as c:
        out = fastdpo.linear_token_logprobs(hid, w, y, bias=b, ref_hidden=hid.detach(), stats=True, kl=True,
                                            memory_budget=5 * w.shape[0] * 4, backend=backend)
        (out.logps.sum() + out.kl.sum()).backward()
    assert len(c.syncs) <= 1 and all("ops/linear.py" in s for s in c.syncs), c.syncs


# Packed (padding-free) batches. ``host_to_device`` (ops/segments.py) moves host ints to a GPU through pinned
# memory with a non-blocking copy, which does not synchronise there; the counter sees the tensor built from
# host data, so those entries are set aside (the gpu-marked test below checks them with torch's own checker).
def _packed_case():
    x, r, y = _logits_case(n=4, t=8)
    lengths = [8, 5, 7, 6]
    pack = lambda t: torch.cat([t[i, :n] for i, n in enumerate(lengths)])  # noqa: E731
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return pack(x), pack(r), pack(y), cu, torch.cat([torch.arange(n) for n in lengths])


def _not_pinned_copies(syncs):
    return [s for s in syncs if not ("host data" in s and "ops/segments.py" in s)]


@pytest.mark.parametrize("backend", _backends_here())
def test_packed_dpo_loss_with_host_cu_seqlens_has_no_host_sync(gpu_path, backend):
    x, r, y, cu, _ = _packed_case()
    xl = x.clone().requires_grad_()
    with SyncCounter() as c:
        out = fastdpo.dpo_loss(xl, y, ref_logits=r, cu_seqlens=cu, loss_type=["sigmoid", "rrpo"], ld_alpha=0.5,
                               use_weighting=False, token_weights=torch.rand(y.shape), backend=backend)
        out.loss.backward()
    assert _not_pinned_copies(c.syncs) == [], c.syncs


def test_packed_index_on_the_device_is_read_once_by_the_layout(gpu_path):
    """position_ids (or a cu_seqlens tensor) on the device: read on the host once, by the packing check;
    everything after it works on the host copy or on the device without a sync."""
    x, r, y, _, pos = _packed_case()
    xl = x.clone().requires_grad_()
    with SyncCounter() as c:
        out = fastdpo.dpo_loss(xl, y, ref_logits=r, position_ids=pos, backend="cpu")
        out.loss.backward()
    syncs = _not_pinned_copies(c.syncs)
    assert syncs and syncs[0].startswith("Tensor.cpu()") and all("losses/sequences.py" in s for s in syncs), syncs


@pytest.mark.parametrize("strategy", ["recompute", "grad_in_forward"])
def test_packed_linear_dpo_loss_makes_one_host_sync_per_call(gpu_path, strategy):
    x, _, y, cu, _ = _packed_case()
    g = torch.Generator().manual_seed(1)
    hid = torch.randn(y.numel(), 8, generator=g, requires_grad=True)
    w = torch.randn(x.shape[-1], 8, generator=g, requires_grad=True)
    with SyncCounter() as c:
        out = fastdpo.linear_dpo_loss(hid, w, y, ref_hidden=hid.detach() * 0.9, cu_seqlens=cu, strategy=strategy,
                                      memory_budget=14 * w.shape[0] * 4, backend="cpu")
        out.loss.backward()
    syncs = _not_pinned_copies(c.syncs)
    assert len(syncs) == 1 and "ops/linear.py" in syncs[0], c.syncs  # the counts per packed sequence


@pytest.mark.gpu
def test_gpu_packed_dpo_loss_runs_with_synchronisation_errors_on():
    x, r, y, cu, _ = (t.cuda() if isinstance(t, torch.Tensor) else t for t in _packed_case())
    xl = x.clone().requires_grad_()
    fastdpo.dpo_loss(xl, y, ref_logits=r, cu_seqlens=cu).loss.backward()  # build / compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fastdpo.dpo_loss(xl, y, ref_logits=r, cu_seqlens=cu, ld_alpha=0.5)  # cu_seqlens: host ints
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_gpu_logits_path_runs_with_synchronisation_errors_on(backend):
    """On a GPU, torch's own sync checker (``set_sync_debug_mode("error")``) raises on any synchronising call."""
    x, r, y = (t.cuda() for t in _logits_case(v=1000))
    xl = x.clone().requires_grad_()
    fastdpo.dpo_loss(xl, y, ref_logits=r, backend=backend).loss.backward()  # build / compile / autotune first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fastdpo.dpo_loss(xl, y, ref_logits=r, backend=backend, use_weighting=True)
        out.loss.backward()
        fastdpo.fused_logprobs(xl, y, ref_logits=r, stats=True, kl=True, backend=backend).kl.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("strategy", ["recompute", "grad_in_forward"])
def test_gpu_linear_dpo_loss_synchronises_once(backend, strategy):
    import warnings

    hid, w, b, y = (t.cuda() if t is not None else None for t in _linear_case(v=1000))
    hid, w = hid.detach().requires_grad_(), w.detach().requires_grad_()
    fastdpo.linear_dpo_loss(hid, w, y, ref_hidden=hid.detach(), strategy=strategy, backend=backend).loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fastdpo.linear_dpo_loss(hid, w, y, ref_hidden=hid.detach(), strategy=strategy, backend=backend)
            out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(c.message) for c in caught if "synchroniz" in str(c.message)]
    assert len(syncs) <= 1, syncs
