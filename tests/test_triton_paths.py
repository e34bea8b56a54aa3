"""The Triton kernels' code paths against float64 truth, through the interpreter on CPU.

The kernels align each row from its address (a masked partial first block, 128-bit full blocks,
a masked last block), split few rows over the vocabulary (a combine kernel merges the parts),
use a fixed max for soft caps up to cap / T = 40 and a running max above, and read rows of two
tensors together on a fast path when their alignments agree (else a fallback). Each is run here
on odd shapes; ``gpu`` tests check the GPU-only pieces (``tanh.approx``, the SFU exponentials)
against the error model.
"""

from __future__ import annotations

import pytest
import torch

import fastdpo
from fastdpo import _backends

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"), pytest.mark.skipif(
    _backends.unavailable_reason(_backends.Backend.TRITON, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    is not None,
    reason="triton backend unavailable here",
)]

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from fastdpo.kernels import triton as tk  # noqa: E402
from fastdpo.kernels import triton_logprobs as tkl  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Soft caps: none, fixed max (cap / T = 7.1), running max (cap / T = 100).
CAPS = [(1.0, None), (0.7, 5.0), (0.05, 5.0)]
# each soft-cap mode once, on different dtypes (the interpreter is slow)
MODES = [(torch.float32, 1.0, None), (torch.bfloat16, 0.7, 5.0), (torch.float32, 0.05, 5.0)]


def truth(x, y, r, temperature=1.0, softcap=None, ignore_index=-100):
    """float64 (logp, lse, ref_logp, stats, kl, ref_lse) from full log-softmaxes."""
    def z(t):
        t = t.double()
        return (softcap * torch.tanh(t / softcap) if softcap else t) / temperature

    zp, zr = z(x), z(r)
    logp_all, logq_all = torch.log_softmax(zp, -1), torch.log_softmax(zr, -1)
    valid = y != ignore_index
    yy = torch.where(valid, y, 0).unsqueeze(-1)
    p, q = logp_all.exp(), logq_all.exp()
    st = torch.stack([-torch.where(p > 0, p * logp_all, 0.0).sum(-1), (zp.argmax(-1) == y).double(), zp.mean(-1),
                      torch.logsumexp(2 * logp_all, -1)], -1)
    kl = torch.where(q > 0, q * (logq_all - logp_all), 0.0).sum(-1)
    out = (logp_all.gather(-1, yy).squeeze(-1), torch.logsumexp(zp, -1), logq_all.gather(-1, yy).squeeze(-1), st, kl,
           torch.logsumexp(zr, -1))
    return tuple(torch.where(valid.unsqueeze(-1) if o.dim() == 3 else valid, o, 0.0) for o in out)


def fwd(backend, x, y, r, temperature=1.0, softcap=None, stats=True, kl=True):
    mod = _backends.kernel_module(_backends.Backend(backend))
    return mod.logprobs_fwd(x, y, r, -100, temperature, softcap or 0.0, stats, kl)


def err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_fwd_near_truth(x, y, r, temperature, softcap, stats=True, kl=True, k=2.0):
    """Each output's error against float64 is at most k times the torch reference's + a tolerance
    scaled by the output's size (fp32 math)."""
    got = fwd("triton", x, y, r, temperature, softcap, stats, kl)
    ref = fwd("torch", x, y, r, temperature, softcap, stats, kl)
    t = truth(x, y, r, temperature, softcap)
    names = ["logp", "lse", "ref_logp", "stats", "kl", "ref_lse"]
    for i, name in enumerate(names):
        if got[i].numel() == 0:
            continue
        tol = 2e-5 * (1 + t[i].abs().max().item())
        assert err(got[i], t[i]) <= k * err(ref[i], t[i]) + tol, (name, err(got[i], t[i]), err(ref[i], t[i]))
    return got


def case(shape, V, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, V, generator=g) * scale).to(dtype)
    r = (x.float() + torch.randn(*shape, V, generator=g) * scale).to(dtype)
    y = torch.randint(0, V, shape, generator=g)
    y[torch.rand(shape, generator=g) < 0.25] = -100
    y.view(-1)[0] = 1
    return x.to(DEV), y.to(DEV), r.to(DEV)


@pytest.fixture
def split_rows(monkeypatch):
    """The interpreter does not split rows over the vocabulary by default; give it 132 SMs' worth."""
    monkeypatch.setattr(tk, "_SM_INTERPRETED", 132)


@pytest.mark.parametrize("dtype, temperature, softcap", MODES)
def test_split_rows_combine_to_the_unsplit_result(split_rows, dtype, temperature, softcap):
    # 3 rows of V = 9001 split into one program per block: the combine kernel merges the parts.
    x, y, r = case((1, 3), 9001, dtype)
    vec = tk._vec(dtype)
    blocks = -(-(9001 + vec - 1) // (2 * 32 * tk._warps(9001, vec) * vec))
    assert tk._split(3, blocks, tk._warps(9001, vec), x.device)[1] > 1  # really split
    got = assert_fwd_near_truth(x, y, r, temperature, softcap)
    again = fwd("triton", x, y, r, temperature, softcap)
    assert all(torch.equal(a, b) for a, b in zip(got, again))  # the combine order is fixed: deterministic


@pytest.mark.parametrize("dtype, temperature, softcap", MODES + [(torch.float16, 1.0, None)])
def test_odd_vocabulary_rows_at_every_alignment(dtype, temperature, softcap):
    # V = 1001: consecutive rows start at every offset from a 16-byte boundary; [:, 1:] also moves the base.
    full, y, rfull = case((2, 9), 1001, dtype, seed=1)
    x, r, yy = full[:, 1:], rfull[:, 1:], y[:, 1:].contiguous()  # labels: contiguous, as the op layer passes them
    assert len({(x[0, t].data_ptr() // x.element_size()) % tk._vec(dtype) for t in range(8)}) == tk._vec(dtype)
    assert_fwd_near_truth(x, yy, r, temperature, softcap)
    # the reference aligned differently from the policy: the KL's fallback path
    assert_fwd_near_truth(x, yy, rfull[:, :-1], temperature, softcap)


@pytest.mark.parametrize("rows", [1, 2])
def test_few_rows_of_a_large_vocabulary(split_rows, rows):
    x, y, r = case((1, rows), 60001, torch.bfloat16, seed=2)
    got = assert_fwd_near_truth(x, y, r, 1.0, None)
    assert got[0].shape == (1, rows)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype, temperature, softcap", MODES)
def test_backward_at_every_alignment_against_float64(dtype, temperature, softcap, inplace):
    full, y, rfull = case((2, 9), 1001, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    w, wk = torch.randn(2, 8, generator=g).to(DEV), torch.randn(2, 8, generator=g).to(DEV)
    wk[0, :3] = 0.0  # rows without the KL term (the reference row is not read there)
    for r in (rfull[:, 1:], rfull[:, :-1]):  # reference aligned like the policy, and not
        leaf = full.detach().clone().requires_grad_()
        x = leaf[:, 1:] * 1 if inplace else leaf[:, 1:]
        out = fastdpo.fused_logprobs(x, y[:, 1:], ref_logits=r, kl=True, temperature=temperature, softcap=softcap,
                                     inplace_backward=inplace, backend="triton")
        ((out.logps * w).sum() + (out.kl * wk).sum()).backward()
        xd = full[:, 1:].detach().double().requires_grad_()
        t = truth(xd, y[:, 1:], r, temperature, softcap)
        ((t[0] * w.double()).sum() + (t[4] * wk.double()).sum()).backward()
        gt = xd.grad
        scale = gt.abs().max().item()
        got = leaf.grad[:, 1:].double()
        assert err(got, gt) <= 1e-5 * (1 + scale) + torch.finfo(dtype).eps * scale, err(got, gt)
        assert (leaf.grad[:, 0] == 0).all()


@pytest.mark.parametrize("temperature, softcap", CAPS)
def test_edge_values_in_every_mode(split_rows, temperature, softcap):
    x, y, r = case((2, 3), 5003, torch.float32, seed=5)
    y[:] = 7
    x[0, 0, 100:2500] = float("-inf")  # masked vocabulary: q = 0 wherever p = 0
    r[0, 0, 100:3000] = float("-inf")
    x[0, 1, 4000] = float("-inf")  # the policy has no mass where the reference has some
    r[0, 2, 11] = float("nan")  # a NaN in the reference row
    x[1, 0, 12] = float("nan")  # a NaN in the policy row
    got = fwd("triton", x, y, r, temperature, softcap)
    ref = fwd("torch", x, y, r, temperature, softcap)
    if softcap is None:
        assert got[4][0, 1] == float("inf") and ref[4][0, 1] == float("inf")
    assert torch.isfinite(got[4][0, 0]) and torch.isfinite(got[3][0, 0, [0, 1, 3]]).all()  # the mean may be -inf
    if softcap is None:
        assert got[3][0, 0, 2] == float("-inf") and ref[3][0, 0, 2] == float("-inf")
    assert torch.isnan(got[4][0, 2]) and torch.isnan(got[5][0, 2]) and torch.isnan(got[2][0, 2])
    assert torch.isnan(got[1][1, 0]) and torch.isnan(got[3][1, 0]).all() and torch.isnan(got[4][1, 0])
    # rows without NaN inputs and with a finite KL (the torch reference's KL of a NaN reference row is 0)
    fine = torch.isfinite(ref[4]) & ~(x.isnan().any(-1) | r.isnan().any(-1))
    for a, b in zip(got, ref):
        ok = fine.unsqueeze(-1).expand_as(a) if a.dim() == 3 else fine
        assert torch.allclose(a[ok], b[ok], atol=5e-5, rtol=1e-5, equal_nan=True)


def test_first_argmax_across_tiles_programs_and_chunks(split_rows):
    # Ties of the row maximum in different lanes, tiles and programs: the first column wins.
    V = 9001
    x = torch.randn(1, 4, V) * 0.1
    for row, cols in enumerate([(5000, 20), (3, 9000), (2048, 2049), (4100, 8200)]):
        x[0, row, list(cols)] = 3.0
    first = torch.tensor([[min(c) for c in [(5000, 20), (3, 9000), (2048, 2049), (4100, 8200)]]])
    for y, hit in ((first, 1.0), (first + 1, 0.0)):
        for softcap in (None, 5.0):
            st = fwd("triton", x.to(DEV), y.to(DEV), x.to(DEV), 1.0, softcap, True, False)[3]
            assert (st[..., 1] == hit).all(), (softcap, st[..., 1])


@triton.jit
def _ex2_fma_kernel(v_ptr, out_ptr, n, DEG: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, tkl._ex2_fma(tl.load(v_ptr + i, mask=i < n, other=0.0), DEG), mask=i < n)


@pytest.mark.parametrize("deg, bound", [(5, 3e-7), (4, 3e-6)])
def test_fma_exp2_polynomial(deg, bound):
    # over the whole domain the kernels use (exponents in log2 units, at most 0)
    v = torch.linspace(-125.0, 0.0, 20001, device=DEV)
    out = torch.empty_like(v)
    _ex2_fma_kernel[(triton.cdiv(v.numel(), 4096),)](v, out, v.numel(), DEG=deg, BLOCK=4096)
    truth64 = torch.exp2(v.double())
    assert ((out.double() - truth64) / truth64).abs().max() <= bound


# ----------------------------------------------------------------------------- GPU-only pieces
# On the GPU, 16-bit inputs use tanh.approx.f32 in the soft cap's loops (the label's logit is
# transformed exactly). Its relative error is at most about 1.1e-5 (16 bits; measured over all
# float32 inputs), so each z = (c / T) tanh(x / c) is off by at most (c / T) 2^-16 |tanh|: lse
# and the reference lse (weighted means of those errors) by at most (c / T) 2^-16, the log-prob
# likewise, the KL = E_q[z_r - z] - lse_r + lse_p and the entropy by at most twice that. The SFU
# ex2 (2 ulp) and the degree-4 FMA exp2 (2.7e-6) add about 3e-6 relative to each sum.


def _gpu_error_bound(kz, truth_value):
    return 2 * kz * 2.0**-16 + 5e-6 * (1 + truth_value.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature, softcap", [(1.0, 30.0), (0.7, 5.0)])
def test_gpu_tanh_approx_soft_cap_within_its_error_model(dtype, temperature, softcap):
    x, y, r = case((4, 256), 32003, dtype, seed=6)
    got = fwd("triton", x, y, r, temperature, softcap)
    t = truth(x, y, r, temperature, softcap)
    kz = softcap / temperature
    for i, name in enumerate(["logp", "lse", "ref_logp", "stats", "kl", "ref_lse"]):
        g = got[i][..., [0, 2, 3]] if name == "stats" else got[i]  # the argmax hit is exact or not
        tt = t[i][..., [0, 2, 3]] if name == "stats" else t[i]
        assert err(g, tt) <= _gpu_error_bound(kz, tt), (name, err(g, tt))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_tanh_approx_against_the_exact_soft_cap(dtype, monkeypatch):
    # The same kernels with the exact tanh (as for fp32 inputs): the difference is the approximation's.
    x, y, r = case((2, 512), 50257, dtype, seed=7)
    approx = fwd("triton", x, y, r, 1.0, 30.0)
    exact_consts = tk._transform_consts

    def no_approx(temperature, softcap, dt, fast):
        kz, inv_cap, cap, _ = exact_consts(temperature, softcap, dt, fast)
        return kz, inv_cap, cap, False

    monkeypatch.setattr(tk, "_transform_consts", no_approx)
    exact = fwd("triton", x, y, r, 1.0, 30.0)
    for a, b in zip(approx, exact):
        assert err(a, b) <= _gpu_error_bound(30.0, b)
