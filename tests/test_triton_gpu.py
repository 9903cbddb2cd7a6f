"""Triton backends on a real GPU: compiled kernels (tensor cores, atomics, real
scheduling) at realistic sizes.  Skipped without CUDA (see conftest.py).
``TritonFusedBackend`` ("triton-fused") for the fused linear kernels,
``TritonBackend`` ("triton": cuBLAS + Triton epilogues) for stored logits.

Written without access to a GPU: run it on one before relying on it.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():   # the module imports kernels compiled for the device
    import fastirl
    from fastirl.backends import resolve_backend
    from fastirl.backends.base import LogitSpec
    from fastirl.backends.torch_chunked import TorchChunkedBackend
    from fastirl.backends.triton_kernels import TritonBackend, TritonFusedBackend

from test_triton import EPS, close_fp32, err, naive, no_worse, truth  # noqa: E402

DEV = torch.device("cuda")


def make(n, H, V, dtype, *, bias=True, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(n, H, device=DEV, generator=g).to(dtype)
    w = (torch.randn(V, H, device=DEV, generator=g) / H ** 0.5 * 2).to(dtype)
    b = torch.randn(V, device=DEV, generator=g).to(dtype) if bias else None
    t = torch.randint(0, V, (n,), device=DEV, generator=g)
    t[::7] = -1
    gv = torch.randn(n, device=DEV, generator=g)
    gt = torch.randn(n, device=DEV, generator=g)
    return x, w, b, t, gv, gt


def test_auto_picks_triton():
    assert resolve_backend("auto", DEV).name == "triton"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("deterministic", [True, False], ids=["det", "fast"])
@pytest.mark.parametrize("n", [40, 1000], ids=lambda n: f"n{n}")   # small / large configs
def test_linear_low_precision(dtype, deterministic, n):
    H, V = 1024, 32003
    x, w, b, t, gv, gt = make(n, H, V, dtype)
    spec = LogitSpec(softcap=30.0, temperature=0.9, entropy=True, argmax=True,
                     deterministic=deterministic)
    ref = truth(x, w, b, t, spec, gv, gt)
    low = naive(x, w, b, t, spec, gv, gt)
    be = TritonFusedBackend()
    st, _ = be.forward(x, w, b, t, spec, keep=False)
    no_worse(st.value, low["value"], ref["value"], dtype, "value")
    no_worse(st.target_logit, low["target_logit"], ref["target_logit"], dtype, "q")
    assert (st.max_logit - ref["max_logit"]).abs().max() < 0.05
    dw = torch.zeros(V, H, device=DEV)
    db = torch.zeros(V, device=DEV)
    dx = be.backward(x, w, b, t, st.value, gv, gt, spec, None, need_x=True, dweight=dw, dbias=db)
    no_worse(dx, low["dx"], ref["dx"], dtype, "dx")
    no_worse(dw, low["dw"], ref["dw"], dtype, "dW")
    no_worse(db, low["db"], ref["db"], dtype, "db")


@pytest.mark.parametrize("tf32", [False, True], ids=["3xtf32", "tf32"])
def test_linear_fp32(tf32):
    n, H, V = 300, 512, 5000
    x, w, b, t, gv, gt = make(n, H, V, torch.float32)
    spec = LogitSpec(softcap=20.0, entropy=True, argmax=True)
    ref = truth(x, w, b, t, spec, gv, gt)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        be = TritonFusedBackend()
        st, _ = be.forward(x, w, b, t, spec, keep=False)
        dw = torch.zeros(V, H, device=DEV)
        db = torch.zeros(V, device=DEV)
        dx = be.backward(x, w, b, t, st.value, gv, gt, spec, None, need_x=True, dweight=dw,
                         dbias=db)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    rtol = 2e-3 if tf32 else 5e-5
    close_fp32(st.value, ref["value"], "value", rtol)
    close_fp32(st.target_logit, ref["target_logit"], "q", rtol)
    close_fp32(st.entropy, ref["entropy"], "entropy", rtol)
    close_fp32(dx, ref["dx"], "dx", rtol)
    close_fp32(dw, ref["dw"], "dW", rtol)
    close_fp32(db, ref["db"], "db", rtol)


def test_deterministic_is_bitwise_reproducible():
    n, H, V = 777, 768, 20000
    x, w, b, t, gv, gt = make(n, H, V, torch.bfloat16, seed=3)
    spec = LogitSpec(softcap=15.0)
    be = TritonFusedBackend()
    st, _ = be.forward(x, w, b, t, spec, keep=False)
    outs = []
    for _ in range(3):
        dw = torch.zeros(V, H, device=DEV)
        db = torch.zeros(V, device=DEV)
        dx = be.backward(x, w, b, t, st.value, gv, gt, spec, None, need_x=True, dweight=dw,
                         dbias=db)
        outs.append((dx, dw, db))
    for other in outs[1:]:
        for a, c in zip(outs[0], other):
            assert torch.equal(a, c)


def test_fast_matches_deterministic():
    n, H, V = 513, 640, 9000
    x, w, b, t, gv, gt = make(n, H, V, torch.bfloat16, seed=4)
    be = TritonFusedBackend()
    res = []
    for det in (True, False):
        spec = LogitSpec(deterministic=det)
        st, _ = be.forward(x, w, b, t, spec, keep=False)
        dw = torch.zeros(V, H, device=DEV)
        db = torch.zeros(V, device=DEV)
        dx = be.backward(x, w, b, t, st.value, gv, gt, spec, None, need_x=True, dweight=dw,
                         dbias=db)
        res.append((dx.float(), dw, db))
    for a, c in zip(*res):
        assert err(a, c) <= 4 * EPS[torch.bfloat16] * max(c.abs().max().item(), 1e-3)


def test_logits_int64_offsets():
    """n * V > 2^31 elements: row offsets need 64 bits."""
    V = 131072
    n = (1 << 31) // V + 16
    try:
        logits = torch.empty(n, V, dtype=torch.bfloat16, device=DEV)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    g = torch.Generator(device=DEV).manual_seed(0)
    logits.normal_(generator=g)
    t = torch.randint(0, V, (n,), device=DEV, generator=g)
    spec = LogitSpec(entropy=True, argmax=True)
    st = TritonBackend().logits_forward(logits, t, spec)
    tail = slice(n - 40, n)
    ref = TorchChunkedBackend().logits_forward(logits[tail], t[tail], spec)
    for k in ("value", "target_logit", "entropy", "max_logit"):
        close_fp32(getattr(st, k)[tail], getattr(ref, k), k, rtol=1e-5)
    assert torch.equal(st.argmax[tail], ref.argmax)
    gv = torch.ones(n, device=DEV)
    gt = -torch.ones(n, device=DEV)
    TritonBackend().logits_backward(logits, t, st.value, gv, gt, spec, logits)   # in place
    out = logits[tail].float()
    assert torch.isfinite(out).all()
    assert (out.sum(1).abs() < 1e-2).all()      # softmax - onehot sums to 0 per row


@pytest.mark.parametrize("preset", ["default", "fast"])
def test_iq_loss_matches_torch_backend(preset):
    B, T, H, V = 4, 256, 1024, 32000
    g = torch.Generator(device=DEV).manual_seed(9)
    h = torch.randn(B, T, H, device=DEV, generator=g).bfloat16()
    w = (torch.randn(V, H, device=DEV, generator=g) / H ** 0.5).bfloat16()
    y = torch.randint(0, V, (B, T), device=DEV, generator=g)
    y[:, :32] = -100
    res = []
    for backend in ("triton", "triton-fused", "cuda", "torch"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fastirl.iq_loss(hh, ww, y, td_weight=0.2, softcap=30.0, backend=backend,
                               preset=preset)
        loss.backward()
        res.append((loss.float(), hh.grad.float(), ww.grad.float()))
    ref = fastirl.reference.iq_loss(h.double(), w.double(), y, td_weight=0.2,
                                    softcap=30.0)
    assert abs(res[0][0].item() - ref.item()) <= 2 * abs(res[1][0].item() - ref.item()) + 1e-3
    for r in res[:-1]:
        assert abs(r[0].item() - ref.item()) <= 2 * abs(res[-1][0].item() - ref.item()) + 1e-3
        for a, c in zip(r[1:], res[-1][1:]):
            assert err(a, c) <= 0.02 * max(c.abs().max().item(), 1e-6)
