"""The "cuda" native backend (csrc/iq_cuda.cu) against float64 truth on a GPU.

Skipped without a CUDA device (tests/conftest.py).  The checks are the ones
test_native.py runs on the CPU extension, on CUDA tensors; the extension is
compiled on first use (JIT) unless setup.py built fastirl._C_cuda.
"""

from __future__ import annotations


import pytest
import torch

import fastirl
from fastirl import reference
from fastirl.backends import LogitSpec, get_backend

from _problems import make_batch
from test_native import (OPTIONS, _loss, _problem, check_backend, check_row_grad,
                         check_row_stats, close, random_block)

pytestmark = pytest.mark.gpu
ops = torch.ops.fastirl


@pytest.fixture(scope="module", autouse=True)
def cuda_backend():
    return get_backend("cuda")


@pytest.mark.parametrize("V", [1, 3, 17, 1000, 4099, 32003])
@pytest.mark.parametrize("cap,tau", [(None, 1.0), (7.5, 0.6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_row_stats_cuda(V, cap, tau, dtype):
    check_row_stats("cuda", V, cap, tau, dtype=dtype)


@pytest.mark.parametrize("cap", [None, 6.0])
def test_row_stats_strided_rows_cuda(cap):
    check_row_stats("cuda", 333, cap, 1.0, strided=True)


@pytest.mark.parametrize("V", [1, 17, 4099])
@pytest.mark.parametrize("cap,tau", [(None, 1.0), (5.0, 0.7)])
def test_row_grad_inplace_cuda(V, cap, tau):
    check_row_grad("cuda", V, cap, tau)


@pytest.mark.parametrize("dtype,out_dtype", [
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16), (torch.float16, torch.float32)])
@pytest.mark.parametrize("V", [301, 4096])
def test_row_grad_out_cuda(dtype, out_dtype, V):
    check_row_grad("cuda", V, 5.0, 0.9, dtype=dtype, out_dtype=out_dtype)
    check_row_grad("cuda", V, None, 1.0, dtype=dtype, out_dtype=out_dtype)


def test_cuda_matches_cpu_extension():
    z, t = random_block(70, 5003, "cpu")
    for cap, tau in ((None, 1.0), (4.0, 0.8)):
        a = ops.row_stats(z, t, tau, cap, True, True)
        b = ops.row_stats(z.cuda(), t.cuda(), tau, cap, True, True)
        for x, y in zip(a, b):
            close(y, x, 2e-6, 2e-6, "cuda vs cpu")


def test_bad_targets_poison_rows_without_crashing():
    z, t = random_block(4, 10, "cuda")
    bad = torch.tensor([0, 10, -2, 3], device="cuda")
    v, q, *_ = ops.row_stats(z, bad, 1.0, None, False, False)
    torch.cuda.synchronize()
    assert torch.isnan(v[1]) and torch.isnan(v[2]) and torch.isfinite(v[0]) and torch.isfinite(v[3])
    with pytest.raises(RuntimeError, match="float32, bfloat16"):
        ops.row_stats(z.double(), t, 1.0, None, False, False)
    with pytest.raises(RuntimeError, match="device|cuda"):
        ops.row_stats(z, t.cpu(), 1.0, None, False, False)


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("spec", [LogitSpec(), LogitSpec(softcap=3.0, temperature=0.7,
                                                          entropy=True, argmax=True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_chunk_cuda(keep, spec, dtype):
    check_backend(get_backend("cuda"), "cuda", dtype, keep=keep, spec=spec)


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
                         or "default")
def test_iq_loss_cuda_matches_reference(opt):
    p, opt = _problem(opt, V=301)
    upstream = None
    if opt.get("reduction") == "none":
        upstream = torch.randn(p["targets"].shape, generator=torch.Generator().manual_seed(5))
    pc = {k: (v.detach().cuda().requires_grad_(v.requires_grad) if v.is_floating_point()
              else v.cuda()) for k, v in p.items()}
    oc = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in opt.items()}
    loss, metrics, got = _loss(pc, "cuda", oc, None if upstream is None else upstream.cuda())
    rloss, rmetrics, want = _loss(p, None, opt, upstream)
    close(loss, rloss, 1e-5, 1e-5, "loss")
    for a, b in zip(got, want):
        close(a, b, 1e-4, 1e-5, "grad")
    if metrics is not None:
        for k in rmetrics:
            close(metrics[k], rmetrics[k], 1e-5, 1e-5, k)


def test_iq_loss_cuda_bf16_vs_naive():
    p = make_batch(dtype=torch.bfloat16, B=2, T=128, V=4000, H=64)
    h, w, t = (p[k].detach().cuda() for k in ("hidden", "weight", "targets"))
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fastirl.iq_loss(hh, ww, t, backend="cuda", softcap=6.0)
    loss.backward()
    nh, nw = h.clone().requires_grad_(), w.clone().requires_grad_()
    nloss = reference.iq_loss(nh, nw, t, softcap=6.0)
    nloss.backward()
    th, tw = h.double().requires_grad_(), w.double().requires_grad_()
    tloss = reference.iq_loss(th, tw, t, softcap=6.0)
    tloss.backward()

    def rel(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    assert abs(loss.double() - tloss).item() <= (abs(nloss.double() - tloss).item()
                                                 + 1e-3 * abs(tloss.item()))
    assert rel(hh.grad, th.grad) <= rel(nh.grad, th.grad) + 1e-3
    assert rel(ww.grad, tw.grad) <= rel(nw.grad, tw.grad) + 1e-3
