"""The GPU checks (run by benchmarks/gpu_check.sh with ``pytest -m gpu``):
every CUDA backend against the float64 reference, a head on a non-current
device, N*V > 2^31 logits, more than 65,535 rows, bf16 in-place epilogues,
extreme logits, float16 coefficients that would underflow.  Skipped without
CUDA (tests/conftest.py); written without a GPU.
"""

from __future__ import annotations

import pytest
import torch

import fastirl
from fastirl.backends import get_backend
from fastirl.backends.base import LogitSpec

pytestmark = pytest.mark.gpu

CUDA_BACKENDS = ["triton", "triton-fused", "cuda"]


def _batch(B, T, H, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) / H ** 0.5 * 2
    b = torch.randn(V, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :5] = -100
    return h.to(device, dtype), w.to(device, dtype), b.to(device, dtype), y.to(device)


def _grads(backend, h, w, b, y, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (h, w, b)]
    loss = fastirl.iq_loss(leaves[0], leaves[1], y, bias=leaves[2], backend=backend, **kw)
    gout = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3)).to(loss)
    (loss * gout).sum().backward()
    return loss.detach(), [t.grad for t in leaves]


def _ref(h, w, b, y, **kw):
    kw.pop("preset", None)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (h, w, b)]
    loss = fastirl.reference.iq_loss(leaves[0], leaves[1], y.cpu(), bias=leaves[2], **kw)
    gout = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3)).double()
    (loss * gout).sum().backward()
    return loss.detach(), [t.grad for t in leaves]


def _rel(a, b):
    return ((a.double().cpu() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


OPTS = [dict(), dict(td_weight=0.3, gamma=0.9, temperature=0.8, softcap=20.0),
        dict(reduction="none", td_weight=0.1), dict(preset="fast", softcap=10.0)]


@pytest.mark.parametrize("backend", CUDA_BACKENDS + ["torch"])
@pytest.mark.parametrize("opt", OPTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
                         or "default")
def test_every_backend_against_reference_fp32(backend, opt):
    h, w, b, y = _batch(3, 37, 72, 1000, torch.float32, "cuda")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        loss, grads = _grads(backend, h, w, b, y, **opt)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    rloss, rgrads = _ref(h, w, b, y, **opt)
    assert _rel(loss, rloss) < 1e-4
    for g, r in zip(grads, rgrads):
        assert _rel(g, r) < 1e-3


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_single_pass_no_worse_than_naive(backend, dtype):
    """bf16 / fp16 inputs: blocks and dz in the input dtype, written in place."""
    h, w, b, y = _batch(4, 256, 512, 32003, dtype, "cuda", seed=1)
    kw = dict(td_weight=0.2, softcap=30.0)
    loss, grads = _grads(backend, h, w, b, y, **kw)
    nloss, ngrads = _naive(h, w, b, y, **kw)        # the reference in the input dtype
    rloss, rgrads = _ref(h, w, b, y, **kw)
    assert abs(loss.double().cpu() - rloss).max() <= abs(nloss.double().cpu() - rloss).max() \
        + 1e-3 * rloss.abs().max()
    for g, n_, r in zip(grads, ngrads, rgrads):
        assert _rel(g, r) <= _rel(n_, r) + 2e-3


def _naive(h, w, b, y, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (h, w, b)]
    loss = fastirl.reference.iq_loss(leaves[0], leaves[1], y, bias=leaves[2], **kw)
    gout = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3)).to(loss)
    (loss * gout).sum().backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_head_on_a_non_current_device(backend):
    """The head on cuda:1 while cuda:0 is current (HF device_map="auto")."""
    torch.cuda.set_device(0)
    h, w, b, y = _batch(2, 40, 64, 3000, torch.float32, "cuda:1", seed=2)
    loss, grads = _grads(backend, h, w, b, y, td_weight=0.1)
    assert loss.device == torch.device("cuda", 1) and all(g.device == loss.device for g in grads)
    rloss, rgrads = _ref(h, w, b, y, td_weight=0.1)
    assert _rel(loss, rloss) < 1e-3
    for g, r in zip(grads, rgrads):
        assert _rel(g, r) < 1e-2


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_more_than_65535_rows(backend):
    n, V = 70_001, 96
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(n, V, device="cuda", generator=g) * 3
    t = torch.randint(0, V, (n,), device="cuda", generator=g)
    be = get_backend(backend)
    spec = LogitSpec(entropy=True, argmax=True)
    st = be.logits_forward(z, t, spec)
    ref = get_backend("torch").logits_forward(z, t, spec)
    assert torch.allclose(st.value, ref.value, rtol=1e-5, atol=1e-5)
    assert torch.equal(st.argmax, ref.argmax)
    out = torch.empty_like(z)
    be.logits_backward(z, t, st.value, torch.ones(n, device="cuda"), -torch.ones(n, device="cuda"),
                       spec, out)
    assert out[-5:].sum(1).abs().max() < 1e-4 and out[:5].sum(1).abs().max() < 1e-4


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_logits_with_more_than_2_31_elements(backend):
    V = 131072
    n = (1 << 31) // V + 16
    try:
        z = torch.empty(n, V, dtype=torch.bfloat16, device="cuda")
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    z.normal_(generator=torch.Generator(device="cuda").manual_seed(1))
    t = torch.randint(0, V, (n,), device="cuda")
    be = get_backend(backend)
    spec = LogitSpec(argmax=True)
    st = be.logits_forward(z, t, spec)
    tail = slice(n - 20, n)
    ref = get_backend("torch").logits_forward(z[tail], t[tail], spec)
    assert torch.allclose(st.value[tail], ref.value, rtol=1e-5, atol=1e-4)
    assert torch.equal(st.argmax[tail], ref.argmax)
    be.logits_backward(z, t, st.value, torch.ones(n, device="cuda"),
                       -torch.ones(n, device="cuda"), spec, z)            # in place, bf16
    assert z[tail].float().sum(1).abs().max() < 1e-2


@pytest.mark.parametrize("backend", CUDA_BACKENDS + ["torch"])
def test_extreme_logits(backend):
    """Logits of magnitude 1e4 (bf16), a NaN column, all -inf rows via stored logits."""
    h, w, b, y = _batch(2, 16, 64, 5000, torch.bfloat16, "cuda", seed=4)
    loss, grads = _grads(backend, h * 300, w, b, y)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)
    z = torch.randn(3, 5000, device="cuda") * 1e4
    z[1] = float("-inf")
    z[2, 17] = float("nan")
    st = get_backend(backend).logits_forward(z, torch.tensor([0, -1, 3], device="cuda"),
                                             LogitSpec(argmax=True))
    assert torch.isfinite(st.value[0]) and st.value[1] == float("-inf")
    assert torch.isnan(st.value[2]) and torch.isnan(st.max_logit[2]) and st.argmax[2] == 17


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_fp16_mean_over_many_tokens_does_not_underflow(backend):
    """num_items_in_batch = 2^20 tokens: dz ~ 1e-6 * p must not flush to zero."""
    h, w, b, y = _batch(2, 64, 256, 8000, torch.float16, "cuda", seed=5)
    kw = dict(num_items_in_batch=1 << 20)
    _, grads = _grads(backend, h, w, b, y, **kw)
    _, rgrads = _ref(h, w, b, y, **kw)
    assert _rel(grads[1], rgrads[1]) < 2e-2          # dW: float32 accumulator
