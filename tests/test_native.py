"""The native backends (csrc/, fastirl/backends/native.py) against float64 truth,
and the extension's build (fastirl/backends/native_build.py).

The CPU extension is built on first use (JIT, ninja) unless setup.py built it.
The helpers ``check_*`` take a device and are reused by test_native_gpu.py for
the CUDA kernels, so their logic is exercised here on the CPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import fastirl
from fastirl import reference
from fastirl.backends import LogitSpec, get_backend, native, native_build, resolve_backend
from fastirl.backends.torch_chunked import TorchChunkedBackend

from _problems import grads, make_batch

CSRC = native_build.csrc_dir()
ops = torch.ops.fastirl


def _have_cxx() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "c++", "g++", "clang++"))


@pytest.fixture(scope="module", autouse=True)
def cpu_ext():
    """The "cpu" backend; a build failure fails the tests (only a missing
    compiler skips them)."""
    if not _have_cxx():
        pytest.skip("no C++ compiler: the native extension cannot be built")
    return native.load_cpu()


# ------------------------------------------------------------- float64 truth

def truth_stats(z, targets, tau, cap):
    """Float64 statistics (on the CPU) of raw logits z (n, V)."""
    z, targets = z.double().cpu(), targets.cpu()
    zc = cap * torch.tanh(z / cap) if cap is not None else z
    value = tau * torch.logsumexp(zc / tau, dim=1)
    has = targets >= 0
    q = torch.where(has, zc.gather(1, targets.clamp(min=0)[:, None])[:, 0], torch.zeros_like(value))
    logp = torch.log_softmax(zc / tau, dim=1)
    ent = -torch.xlogy(logp.exp(), logp.exp()).sum(1)
    mx, am = zc.max(dim=1)
    return value, q, ent, am, mx


def truth_grad(z, targets, value, gv, gt, tau, cap, gs=None):
    """Float64 dL/dz (on the CPU) of raw logits z given V and the coefficients
    (gs: the uniform logit-sum coefficient, or None)."""
    z, targets, value, gv, gt = (a.cpu() for a in (z.double(), targets, value, gv, gt))
    zc = cap * torch.tanh(z / cap) if cap is not None else z
    d = gv.double()[:, None] * torch.exp((zc - value.double()[:, None]) / tau)
    rows = torch.nonzero(targets >= 0)[:, 0]
    d[rows, targets[rows]] += gt.double()[rows]
    if gs is not None:
        d += gs.double().cpu()[:, None]
    if cap is not None:
        d = d * (1 - (zc / cap) ** 2)
    return d


def random_block(n, V, device, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, V, generator=g) * scale).to(dtype)
    t = torch.randint(0, V, (n,), generator=g)
    t[::3] = -1
    return z.to(device), t.to(device)


def close(got, want, rtol, atol, what=""):
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------ shared check helpers

def check_row_stats(device, V, cap, tau, dtype=torch.float32, n=11, strided=False):
    z, t = random_block(n, V + (5 if strided else 0), device, dtype, seed=V)
    if strided:                       # row stride != V: a column slice of a wider block
        z = z[:, 2:2 + V]
        t = t.clamp(max=V - 1)
    v, q, e, a, m, s = ops.row_stats(z, t, tau, cap, True, True, True)
    tv, tq, te, ta, tm = truth_stats(z, t.cpu(), tau, cap)
    assert v.dtype == q.dtype == e.dtype == m.dtype == s.dtype == torch.float32
    assert a.dtype == torch.int64
    close(v, tv, 2e-6, 2e-6, "value")
    # the row sum of the capped logits: float32 accumulation over V elements
    zc64 = z.double().cpu()
    if cap is not None:
        zc64 = cap * torch.tanh(zc64 / cap)
    serr = (s.double().cpu() - zc64.sum(1)).abs()
    assert torch.all(serr <= 1e-6 * zc64.abs().sum(1).clamp(min=1.0)), ("logit_sum", serr.max())
    close(q, tq, 2e-6, 2e-6, "target_logit")
    close(e, te, 2e-6, 2e-6, "entropy")
    close(m, tm, 2e-6, 2e-6, "max_logit")
    # argmax: the exact one, or a near-tie within float32 rounding of the capped logits
    zc = z.double().cpu()
    if cap is not None:
        zc = cap * torch.tanh(zc / cap)
    at_argmax = zc.gather(1, a.cpu()[:, None])[:, 0]
    assert torch.all((a.cpu() == ta) | (tm - at_argmax < 1e-5)), "argmax"
    v2, q2, e2, a2, m2, s2 = ops.row_stats(z, t, tau, cap, False, False)
    assert e2.numel() == a2.numel() == m2.numel() == s2.numel() == 0
    assert torch.equal(v2, v) and torch.equal(q2, q)


def check_row_grad(device, V, cap, tau, dtype=torch.float32, out_dtype=None, n=9,
                   grad_sum=False):
    z, t = random_block(n, V, device, dtype, seed=V + 1)
    value = truth_stats(z, t.cpu(), tau, cap)[0].float().to(device)
    g = torch.Generator().manual_seed(1)
    gv = torch.randn(n, generator=g).to(device)
    gt = torch.randn(n, generator=g).to(device)
    gs = torch.randn(n, generator=g).to(device) if grad_sum else None
    want = truth_grad(z.cpu(), t.cpu(), value.cpu(), gv.cpu(), gt.cpu(), tau, cap, gs)
    tol = 2e-6 if dtype == torch.float32 and out_dtype in (None, torch.float32) else 1e-2
    if out_dtype is None:             # in place
        got = z.clone()
        ops.row_grad_(got, t, value, gv, gt, tau, cap, False, gs)
    else:
        got = torch.full((n, V), float("nan"), dtype=out_dtype, device=device)
        ops.row_grad(z, t, value, gv, gt, tau, cap, got, gs)
    close(got, want, tol, tol, "grad")


def check_backend(be, device, dtype, *, V=517, H=24, n=37, bias=True, keep=True,
                  spec=LogitSpec(), need_x=True):
    """forward / backward of one chunk against float64 math, with dW / db added
    into pre-filled accumulators."""
    g = torch.Generator().manual_seed(V + n)
    x = torch.randn(n, H, generator=g).to(dtype).to(device)
    w = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).to(device)
    b = (torch.randn(V, generator=g) * 0.3).to(dtype).to(device) if bias else None
    t = torch.randint(0, V, (n,), generator=g)
    t[::4] = -1
    t = t.to(device)
    z64 = x.double().cpu() @ w.double().cpu().t()
    if bias:
        z64 = z64 + b.double().cpu()
    stats, state = be.forward(x, w, b, t, spec, keep=keep)
    assert (state is not None) == keep
    tv, tq, te, ta, tm = truth_stats(z64, t.cpu(), spec.temperature, spec.softcap)
    lowp = dtype != torch.float32
    tol = 3e-2 if lowp else 2e-5
    close(stats.value, tv, tol, tol, "value")
    close(stats.target_logit, tq, tol, tol, "target_logit")
    if spec.entropy:
        close(stats.entropy, te, tol, tol, "entropy")
    else:
        assert stats.entropy is None
    if spec.argmax:
        close(stats.max_logit, tm, tol, tol, "max_logit")
        assert stats.argmax.dtype == torch.int64
        if not lowp:
            assert torch.equal(stats.argmax.cpu(), ta)
    gv = torch.randn(n, generator=g).to(device)
    gt = torch.randn(n, generator=g).to(device)
    dw0 = torch.randn(V, H, generator=g).to(device)
    db0 = torch.randn(V, generator=g).to(device)
    dw, db = dw0.clone(), db0.clone() if bias else None
    dx = be.backward(x, w, b, t, stats.value, gv, gt, spec, state, need_x=need_x,
                     dweight=dw, dbias=db)
    dz = truth_grad(z64, t.cpu(), tv, gv.cpu(), gt.cpu(), spec.temperature, spec.softcap)
    scale = dz.abs().max().item()
    gtol = (3e-2 if lowp else 2e-5) * max(1.0, scale)
    if need_x:
        assert dx.dtype == dtype and dx.shape == x.shape
        close(dx, dz @ w.double().cpu(), gtol, gtol, "dx")
    else:
        assert dx is None
    close(dw - dw0, dz.t() @ x.double().cpu(), gtol, gtol, "dW")
    if bias:
        close(db - db0, dz.sum(0), gtol, gtol, "db")


# ---------------------------------------------------------------- the ops

@pytest.mark.parametrize("V", [1, 3, 16, 17, 100, 2047, 2049, 5003])
@pytest.mark.parametrize("cap,tau", [(None, 1.0), (None, 0.6), (7.5, 1.0), (4.0, 1.7)])
def test_row_stats(V, cap, tau):
    check_row_stats("cpu", V, cap, tau)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cap", [None, 6.0])
def test_row_stats_low_precision_logits(dtype, cap):
    # exact float64 math on the same 16-bit values: float32 accuracy expected
    check_row_stats("cpu", 1031, cap, 0.8, dtype=dtype)


@pytest.mark.parametrize("cap", [None, 6.0])
def test_row_stats_strided_rows(cap):
    check_row_stats("cpu", 333, cap, 1.0, strided=True)


@pytest.mark.parametrize("grad_sum", [False, True], ids=["", "grad_sum"])
@pytest.mark.parametrize("V", [1, 17, 2049])
@pytest.mark.parametrize("cap,tau", [(None, 1.0), (5.0, 0.7)])
def test_row_grad_inplace(V, cap, tau, grad_sum):
    check_row_grad("cpu", V, cap, tau, grad_sum=grad_sum)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capped_in_place_path(dtype):
    """row_stats_capped_ leaves c tanh(z / c) in the block, and row_grad_(capped=True)
    on it gives the gradient of the raw path."""
    z, t = random_block(13, 2051, "cpu", dtype)
    raw = ops.row_stats(z, t, 0.7, 5.0, True, True)
    block = z.clone()
    capped = ops.row_stats_capped_(block, t, 0.7, 5.0, True, True)
    for a, b in zip(raw, capped):
        assert torch.equal(a, b)
    want_block = (5.0 * torch.tanh(z.double() / 5.0)).to(dtype)
    close(block, want_block, 1e-6 if dtype == torch.float32 else 8e-3, 1e-6, "capped block")
    gv, gt = torch.randn(13), torch.randn(13)
    g_raw = z.clone()
    ops.row_grad_(g_raw, t, raw[0], gv, gt, 0.7, 5.0)
    ops.row_grad_(block, t, raw[0], gv, gt, 0.7, 5.0, True)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    close(block, g_raw, tol, tol, "capped vs raw gradient")
    with pytest.raises(RuntimeError, match="needs a softcap"):
        ops.row_grad_(z.clone(), t, raw[0], gv, gt, 0.7, None, True)


@pytest.mark.parametrize("dtype,out_dtype", [
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16), (torch.float16, torch.float32)])
def test_row_grad_out(dtype, out_dtype):
    check_row_grad("cpu", 301, 5.0, 0.9, dtype=dtype, out_dtype=out_dtype)
    check_row_grad("cpu", 301, None, 1.0, dtype=dtype, out_dtype=out_dtype)
    check_row_grad("cpu", 301, 5.0, 0.9, dtype=dtype, out_dtype=out_dtype, grad_sum=True)


def test_extreme_logits():
    z = torch.tensor([[80.0, -80.0, 0.0, float("-inf")],       # wide range, a masked entry
                      [float("-inf")] * 4,                     # nothing allowed: V = -inf
                      [1e-3, 2e-3, float("nan"), 0.0],         # NaN poisons the row
                      [-87.0, -87.5, -88.0, -200.0]])          # every exp underflows but one
    t = torch.tensor([0, -1, 1, 3])
    v, q, e, a, m, s = ops.row_stats(z, t, 1.0, None, True, True, True)
    tv = truth_stats(z, t, 1.0, None)[0]
    assert v[0].item() == pytest.approx(tv[0].item(), rel=1e-6)
    assert v[1].item() == float("-inf") and q[1].item() == 0.0
    assert torch.isnan(v[2]) and torch.isnan(s[2])               # NaN policy: the sum too
    assert s[0].item() == float("-inf") and s[1].item() == float("-inf")
    assert s[3].item() == pytest.approx(-462.5, rel=1e-6)
    assert v[3].item() == pytest.approx(tv[3].item(), rel=1e-6)
    assert a[0].item() == 0 and a[1].item() == 0 and a[3].item() == 0
    # the masked entry of row 0 gets exactly zero gradient, the rest matches
    g = z[[0, 3]].clone()
    ops.row_grad_(g, t[[0, 3]], v[[0, 3]], torch.ones(2), -torch.ones(2), 1.0, None)
    want = truth_grad(z[[0, 3]], t[[0, 3]], tv[[0, 3]], torch.ones(2), -torch.ones(2), 1.0, None)
    assert g[0, 3].item() == 0.0
    close(g, want, 2e-5, 1e-7, "grad")   # V = -86.5 in float32: p good to ~1e-5


def test_threads_give_identical_epilogues():
    z, t = random_block(64, 4099, "cpu")
    old = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            st = ops.row_stats(z, t, 0.9, 5.0, True, True)
            g = z.clone()
            ops.row_grad_(g, t, st[0], torch.ones(64), torch.ones(64), 0.9, 5.0)
            outs.append((*st, g))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- the backend

@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("spec", [
    LogitSpec(),
    LogitSpec(temperature=0.7, entropy=True, argmax=True),
    LogitSpec(softcap=3.0, entropy=True, argmax=True),
    LogitSpec(softcap=2.0, temperature=1.5),
], ids=["plain", "tau+metrics", "softcap+metrics", "softcap+tau"])
def test_backend_chunk(keep, spec):
    be = get_backend("cpu")
    check_backend(be, "cpu", torch.float32, keep=keep, spec=spec)


@pytest.mark.parametrize("V,H,n", [(1, 8, 5), (33, 1, 3), (2049, 40, 17)])
def test_backend_odd_shapes(V, H, n):
    check_backend(get_backend("cpu"), "cpu", torch.float32, V=V, H=H, n=n, bias=False,
                  spec=LogitSpec(argmax=True))


def test_backend_without_dx():
    check_backend(get_backend("cpu"), "cpu", torch.float32, need_x=False, keep=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backend_low_precision(dtype):
    check_backend(get_backend("cpu"), "cpu", dtype, spec=LogitSpec(softcap=4.0, entropy=True,
                                                                    argmax=True))


def test_float64_runs_on_the_torch_backend():
    """float64 is not a dtype of the native backend: backend="cpu" resolves to
    the torch backend for it (one place, resolve_backend), and the loss is the
    torch backend's, bit for bit."""
    cpu = torch.device("cpu")
    assert torch.float64 not in get_backend("cpu").dtypes
    assert resolve_backend("cpu", cpu, torch.float64).name == "torch"
    assert resolve_backend("cpu", cpu, torch.float32).name == "cpu"
    p = make_batch(2, 9, 5, 13, dtype=torch.float64, seed=3)
    a = fastirl.iq_loss(p["hidden"], p["weight"], p["targets"], backend="cpu")
    b = fastirl.iq_loss(p["hidden"], p["weight"], p["targets"], backend="torch")
    assert a.dtype == torch.float64 and torch.equal(a, b)


def test_chunk_budget_not_above_torch():
    be, tb = get_backend("cpu"), TorchChunkedBackend()
    for V in (1000, 32000, 128256):
        assert be.rows_per_chunk(10 ** 6, V, 512, torch.float32, None) <= \
            tb.rows_per_chunk(10 ** 6, V, 512, torch.float32, None)
    assert be.rows_per_chunk(100, 32000, 512, torch.float32, 7) == 7


def test_logits_forward_backward():
    be = get_backend("cpu")
    spec = LogitSpec(temperature=0.8, softcap=6.0, entropy=True, argmax=True)
    z, t = random_block(10, 257, "cpu")
    st = be.logits_forward(z, t, spec)
    tv, tq, te, _, _ = truth_stats(z, t, 0.8, 6.0)
    close(st.value, tv, 2e-6, 2e-6, "value")
    close(st.entropy, te, 2e-6, 2e-6, "entropy")
    gv, gt = torch.randn(10), torch.randn(10)
    want = truth_grad(z, t, tv, gv, gt, 0.8, 6.0)
    out = torch.empty_like(z)
    be.logits_backward(z, t, st.value, gv, gt, spec, out)
    close(out, want, 2e-6, 2e-6, "separate out")
    alias = z.clone()
    be.logits_backward(alias, t, st.value, gv, gt, spec, alias)
    close(alias, want, 2e-6, 2e-6, "aliased out")
    wide = torch.zeros(257, 10).t()                      # non-contiguous out
    be.logits_backward(z, t, st.value, gv, gt, spec, wide)
    close(wide, want, 2e-6, 2e-6, "strided out")


# ---------------------------------------------------------- end to end (iq_loss)

OPTIONS = [
    {},
    {"td_weight": 0.0},
    {"gamma": 0.9, "temperature": 0.7, "td_weight": 0.5},
    {"softcap": 5.0, "chunk_size": 5},
    {"divergence": "hellinger", "is_expert": True},
    {"divergence": "js", "is_expert": True, "td_rows": "all"},
    {"divergence": "kl", "value_term": "v0", "gamma": 0.8, "is_expert": True},
    {"divergence": "kl_fix", "detach_next_value": True},
    {"divergence": "total_variation", "reduction": "sum"},
    {"reduction": "none"},
    {"packed": True, "chunk_size": 4},
    {"done": True, "chunk_size": 7},
    {"bias": True, "softcap": 3.0, "temperature": 1.3},
    {"num_items_in_batch": 40},
    {"return_metrics": True, "softcap": 8.0, "chunk_size": 6},
]


def _problem(opt, dtype=torch.float32, **shape):
    opt = dict(opt)
    p = make_batch(dtype=dtype, bias=opt.pop("bias", False), packed=opt.pop("packed", False),
                   **shape)
    B, T = p["targets"].shape
    g = torch.Generator().manual_seed(3)
    if opt.pop("is_expert", False):
        opt["is_expert"] = torch.arange(B) % 2 == 0
    if opt.pop("done", False):
        opt["done"] = torch.rand(B, T, generator=g) < 0.2
    if "position_ids" in p:
        opt["position_ids"] = p.pop("position_ids")
    return p, opt


def _loss(p, backend, opt, upstream=None):
    opt = dict(opt)
    if backend is None:               # the float64 oracle
        opt.pop("chunk_size", None)
        f = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
        p = {k: (f(v) if v.is_floating_point() else v) for k, v in p.items()}
        out = reference.iq_loss(p["hidden"], p["weight"], p["targets"], bias=p.get("bias"), **opt)
    else:
        out = fastirl.iq_loss(p["hidden"], p["weight"], p["targets"], bias=p.get("bias"),
                              backend=backend, **opt)
    loss, metrics = out if opt.get("return_metrics") else (out, None)
    ins = [p["hidden"], p["weight"], p.get("bias")]
    up = None if upstream is None else upstream.to(loss.dtype)
    return loss, metrics, grads(loss, ins, up)


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
                         or "default")
def test_iq_loss_matches_reference(opt):
    p, opt = _problem(opt, V=301)
    upstream = None
    if opt.get("reduction") == "none":
        upstream = torch.randn(p["targets"].shape, generator=torch.Generator().manual_seed(5))
    loss, metrics, got = _loss(p, "cpu", opt, upstream)
    rloss, rmetrics, want = _loss(p, None, opt, upstream)
    close(loss, rloss, 1e-5, 1e-5, "loss")
    for name, a, b in zip(("hidden", "weight", "bias"), got, want):
        close(a, b, 1e-4, 1e-5, f"d{name}")
    if metrics is not None:
        for k in rmetrics:
            close(metrics[k], rmetrics[k], 1e-5, 1e-5, k)


def test_iq_loss_from_logits_and_rewards():
    p, _ = _problem({}, V=211)
    logits = (p["hidden"].detach() @ p["weight"].detach().t()).requires_grad_()
    opt = {"softcap": 4.0, "temperature": 0.9, "gamma": 0.95}
    got = fastirl.iq_loss_from_logits(logits, p["targets"], backend="cpu", **opt)
    (g,) = grads(got, [logits])
    l64 = logits.detach().double().requires_grad_()
    want = reference.iq_loss_from_logits(l64, p["targets"], **opt)
    (gw,) = grads(want, [l64])
    close(got, want, 1e-5, 1e-6, "loss")
    close(g, gw, 1e-5, 1e-6, "dlogits")
    r = fastirl.implicit_rewards(p["hidden"], p["weight"], p["targets"], backend="cpu", gamma=0.9)
    rw = reference.implicit_rewards(p["hidden"].double(), p["weight"].double(), p["targets"],
                                    gamma=0.9)
    close(r, rw, 1e-5, 1e-5, "rewards")


@pytest.mark.parametrize("threads", [1, 2])
def test_iq_loss_threads(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        p, opt = _problem({"softcap": 6.0, "chunk_size": 16}, B=4, T=40, V=3001, H=32)
        loss, _, got = _loss(p, "cpu", opt)
        rloss, _, want = _loss(p, None, opt)
    finally:
        torch.set_num_threads(old)
    close(loss, rloss, 1e-5, 1e-5, "loss")
    for a, b in zip(got, want):
        close(a, b, 1e-4, 1e-5, "grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opt", [{}, {"softcap": 6.0, "temperature": 0.8, "chunk_size": 24}])
def test_iq_loss_low_precision_vs_naive(dtype, opt):
    """Error against float64 truth no worse than the naive computation in the same
    dtype (fastirl.reference on 16-bit tensors), up to a small margin."""
    p, opt = _problem(opt, dtype=dtype, B=2, T=64, V=1000, H=64)
    loss, _, got = _loss(p, "cpu", opt)
    tloss, _, truth = _loss(p, None, opt)
    h, w = (p[k].detach().clone().requires_grad_() for k in ("hidden", "weight"))
    nloss = reference.iq_loss(h, w, p["targets"],
                              **{k: v for k, v in opt.items() if k != "chunk_size"})
    ngot = grads(nloss, [h, w])

    def err(a, b):
        return (a.double() - b.double()).abs().max().item()

    def rel(a, b):
        return err(a, b) / max(b.double().abs().max().item(), 1e-30)

    assert err(loss, tloss) <= err(nloss, tloss) + 1e-3 * abs(tloss.item())
    for name, a, n, t in zip(("dhidden", "dweight"), got, ngot, truth):
        assert a.dtype == dtype
        assert rel(a, t) <= rel(n, t) + 1e-3, (name, rel(a, t), rel(n, t))


# ---------------------------------------------------------- errors, tracing

def test_bad_inputs_raise_python_errors():
    z, t = random_block(4, 10, "cpu")
    v, gv, gt = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    cases = [
        (lambda: ops.row_stats(z, torch.tensor([0, 1, 10, 2]), 1.0, None, False, False),
         "out of range"),
        (lambda: ops.row_stats(z, torch.tensor([0, -2, 1, 2]), 1.0, None, False, False),
         "out of range"),
        (lambda: ops.row_grad_(z.clone(), torch.tensor([0, 1, 2, 99]), v, gv, gt, 1.0, None),
         "out of range"),
        (lambda: ops.row_stats(z.double(), t, 1.0, None, False, False), "float32, bfloat16"),
        (lambda: ops.row_stats(z[0], t, 1.0, None, False, False), "2-D"),
        (lambda: ops.row_stats(z.t(), t, 1.0, None, False, False), "shape|contiguous"),
        (lambda: ops.row_stats(z[:, ::2], t, 1.0, None, False, False), "contiguous"),
        (lambda: ops.row_stats(z, t[:3], 1.0, None, False, False), "targets"),
        (lambda: ops.row_stats(z, t.int(), 1.0, None, False, False), "Long"),
        (lambda: ops.row_stats(z, t, 0.0, None, False, False), "temperature"),
        (lambda: ops.row_stats(z, t, float("nan"), None, False, False), "temperature"),
        (lambda: ops.row_stats(z, t, 1.0, -1.0, False, False), "softcap"),
        (lambda: ops.row_stats(z[:, :0], t, 1.0, None, False, False), "empty vocabulary"),
        (lambda: ops.row_grad_(z.clone(), t, v[:2], gv, gt, 1.0, None), "value"),
        (lambda: ops.row_grad_(z.clone(), t, v, gv.double(), gt, 1.0, None), "grad_value"),
        (lambda: ops.row_grad_(z.clone(), t, v, gv, gt, 1.0, None, False, gv[:3]), "grad_sum"),
        (lambda: ops.row_grad(z, t, v, gv, gt, 1.0, None, torch.empty(4, 10), gv.double()),
         "grad_sum"),
        (lambda: ops.row_grad(z, t, v, gv, gt, 1.0, None, z), "overlaps"),
        (lambda: ops.row_grad(z, t, v, gv, gt, 1.0, None, torch.empty(4, 9)), "shape"),
    ]
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()


def test_opcheck_and_compile():
    z, t = random_block(6, 37, "cpu")
    v = ops.row_stats(z, t, 1.0, None, False, False)[0]
    gv, gt = torch.randn(6), torch.randn(6)
    gs = torch.randn(6)
    for args, op in [((z, t, 0.9, 5.0, True, True), ops.row_stats.default),
                     ((z, t, 1.0, None, False, False), ops.row_stats.default),
                     ((z, t, 0.9, 5.0, False, True, True), ops.row_stats.default),
                     ((z.clone(), t, 0.9, 5.0, True, False), ops.row_stats_capped_.default),
                     ((z.clone(), t, 0.9, 5.0, True, False, True),
                      ops.row_stats_capped_.default),
                     ((z.clone(), t, v, gv, gt, 1.0, 5.0), ops.row_grad_.default),
                     ((z.clone(), t, v, gv, gt, 1.0, 5.0, True), ops.row_grad_.default),
                     ((z.clone(), t, v, gv, gt, 1.0, 5.0, True, gs), ops.row_grad_.default),
                     ((z, t, v, gv, gt, 1.0, None, torch.empty_like(z)), ops.row_grad.default),
                     ((z, t, v, gv, gt, 1.0, 5.0, torch.empty_like(z), gs),
                      ops.row_grad.default)]:
        torch.library.opcheck(op, args)

    def f(z, t, gv, gt, gs):
        v, q, e, a, m, s = ops.row_stats(z, t, 0.9, 5.0, True, True, True)
        d = z.clone()
        ops.row_grad_(d, t, v, gv, gt, 0.9, 5.0, grad_sum=gs)
        return v, q, e, a, s, d

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(z, t, gv, gt, gs), f(z, t, gv, gt, gs)):
        assert torch.equal(a, b)


# ------------------------------------------------------------ build checks

def _torch_system_includes():
    from torch.utils.cpp_extension import include_paths
    return [f for p in include_paths() for f in ("-isystem", p)]


def test_cpu_source_is_warning_clean():
    """-Wall -Wextra -Werror: the kernels compiled with optimisation (warnings that
    need data-flow analysis), and the whole file, op glue included, parsed with
    torch's headers as system headers."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    base = [cxx, "-std=c++20", "-fopenmp", "-Wall", "-Wextra", "-Werror", "-I", str(CSRC)]
    for extra in (["-O3", *native_build.CXX_FLAGS, "-DFASTIRL_KERNELS_ONLY", "-DFASTIRL_NO_CLONES",
                   "-c", "-o", os.devnull],
                  ["-fsyntax-only", *_torch_system_includes()]):
        res = subprocess.run(base + extra + [str(CSRC / "iq_cpu.cpp")], capture_output=True,
                             text=True)
        assert res.returncode == 0, res.stderr[-4000:]


def _nvcc():
    homes = [os.environ.get(k) for k in ("CUDA_HOME", "CUDA_PATH")] + ["/usr/local/cuda"]
    for home in filter(None, homes):
        path = Path(home) / "bin" / "nvcc"
        if path.is_file():
            return str(path)
    return shutil.which("nvcc")


ARCHS = ("80", "90")
# row_stats: 3 dtypes x softcap x logit sum; row_grad: 3 x 3 dtypes x softcap x grad_sum
N_KERNELS = 48


def _ptxas_report(log: str):
    """{arch: [(kernel, spill line)]} from nvcc -Xptxas -v output."""
    out: dict[str, list] = {a: [] for a in ARCHS}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for 'sm_(\d+)'", line)
        if m:
            current = (m.group(1), m.group(2))
        elif "spill" in line and current is not None:
            out[current[1]].append((current[0], line.strip()))
            current = None
    return out


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
def test_cuda_kernels_compile_for_sm80_sm90_without_spills(tmp_path):
    """Every kernel iq_cuda.cu can launch, compiled for sm_80 and sm_90: no spills,
    no warnings.  (The kernels alone: -DFASTIRL_KERNELS_ONLY needs no torch headers.)"""
    cmd = [_nvcc(), "-std=c++17", "-O3", "-DFASTIRL_KERNELS_ONLY", "-I", str(CSRC),
           "-Xptxas", "-v", "-Xcompiler", "-Wall,-Wextra", "-c", str(CSRC / "iq_cuda.cu"),
           "-o", str(tmp_path / "k.o")]
    for a in ARCHS:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert "warning" not in log.lower(), log[-4000:]
    report = _ptxas_report(log)
    for arch in ARCHS:
        assert len(report[arch]) == N_KERNELS, (arch, len(report[arch]))
        for kernel, spill in report[arch]:
            assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", spill), (arch, kernel,
                                                                                      spill)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTIRL_TEST_CUDA_BUILD") != "1",
                    reason="the full CUDA extension build takes minutes; "
                           "set FASTIRL_TEST_CUDA_BUILD=1")
@pytest.mark.skipif(_nvcc() is None or torch.version.cuda is None,
                    reason="needs nvcc and a CUDA build of torch")
def test_cuda_extension_compiles_with_torch_headers(tmp_path):
    """The whole iq_cuda.cu (launchers, op registration) as the JIT / setup.py build
    compiles it, for sm_80 and sm_90, with -Wall -Wextra on the host side."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths
    inc = [f for p in include_paths(device_type="cuda") for f in ("-isystem", p)]
    cmd = [_nvcc(), "-std=c++20", "-O3", *COMMON_NVCC_FLAGS, *native_build.NVCC_FLAGS, "-I", str(CSRC),
           *inc, "-Xcompiler", "-fPIC,-Wall,-Wextra", "-Xptxas", "-v", "-c",
           str(CSRC / "iq_cuda.cu"), "-o", str(tmp_path / "full.o")]
    for a in ARCHS:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert "warning" not in log.lower(), log[-4000:]
    report = _ptxas_report(log)
    for arch in ARCHS:
        assert len(report[arch]) == N_KERNELS
        assert all("0 bytes spill stores, 0 bytes spill loads" in s for _, s in report[arch])


def test_missing_sources_are_an_import_error(tmp_path, monkeypatch):
    monkeypatch.setattr(native_build, "_CSRC", tmp_path)
    with pytest.raises(ImportError, match="sources are missing"):
        native_build._jit("fastirl_missing", ("iq_cpu.cpp",), cuda=False)


# ------------------------------------------------- robustness

def test_nan_policy_matches_torch():
    """One NaN policy for every backend (torch.max's): a NaN logit makes the
    value NaN, the max logit NaN and the argmax its first NaN column."""
    z = torch.randn(4, 300)
    z[0, 7] = z[0, 250] = float("nan")
    z[2, 299] = float("nan")
    t = torch.tensor([1, 2, 3, -1])
    spec = LogitSpec(entropy=True, argmax=True, softcap=20.0)
    ref = TorchChunkedBackend().logits_forward(z.clone(), t, spec)
    for be in (get_backend("cpu"), TorchChunkedBackend()):
        st = be.logits_forward(z.clone(), t, spec)
        assert st.argmax.tolist() == [7, ref.argmax[1].item(), 299, ref.argmax[3].item()]
        assert torch.isnan(st.max_logit[[0, 2]]).all() and torch.isnan(st.value[[0, 2]]).all()
        assert torch.isfinite(st.max_logit[[1, 3]]).all()
        assert torch.equal(st.argmax, ref.argmax)
    # the fused linear path (capped in place) too
    x, w = torch.randn(3, 8), torch.randn(40, 8)
    w[5] = float("nan")
    st, _ = get_backend("cpu").forward(x, w, None, torch.tensor([0, 1, 2]), spec, keep=True)
    assert st.argmax.tolist() == [5, 5, 5] and torch.isnan(st.max_logit).all()


def test_ops_accept_n_by_1_blocks_with_any_column_stride():
    """A (n, 1) block may carry any column stride (e.g. a transposed (1, n))."""
    z = torch.randn(1, 6).t()                                  # shape (6, 1), strides (1, 6)
    assert z.stride() == (1, 6)
    t = torch.zeros(6, dtype=torch.long)
    value, q, *_ = ops.row_stats(z, t, 1.0, None, False, False)
    assert torch.allclose(value, z[:, 0]) and torch.allclose(q, z[:, 0])
    out = torch.empty(1, 6).t()
    ops.row_grad(z, t, value, torch.ones(6), -torch.ones(6), 1.0, None, out)
    assert torch.allclose(out, torch.zeros(6, 1), atol=1e-6)     # p = 1 minus the one-hot


def test_build_lock_leaves_torchs_os_level_lock_alone(tmp_path, monkeypatch):
    """torch >= 2.14 locks builds with an OS-level FileLock whose file stays on
    disk after every build: a later process must neither wait for it nor delete it."""
    import time
    monkeypatch.setattr(native_build, "_torch_uses_baton", lambda: False)
    lock = tmp_path / "lock"
    lock.write_text("")                                      # left by a finished build
    t0 = time.time()
    with native_build.build_lock(tmp_path, stale_after=300):
        assert lock.exists()
    assert time.time() - t0 < 2


def test_build_lock_removes_a_stale_torch_lock(tmp_path, monkeypatch):
    import threading
    import time
    monkeypatch.setattr(native_build, "_torch_uses_baton", lambda: True)   # torch < 2.14's FileBaton
    lock = tmp_path / "lock"
    lock.write_text("")                                      # left by a killed build
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with native_build.build_lock(tmp_path, stale_after=300):
        assert not lock.exists()
    # a fresh one (an older fastirl building without the fcntl lock) is waited for
    lock.write_text("")
    threading.Timer(0.5, lock.unlink).start()
    t0 = time.time()
    with native_build.build_lock(tmp_path, stale_after=300):
        assert not lock.exists()
    assert 0.4 < time.time() - t0 < 5
    # ... but never forever
    lock.write_text("")
    t0 = time.time()
    with native_build.build_lock(tmp_path, stale_after=1.0):
        assert not lock.exists()
    assert time.time() - t0 < 5
    # a fastirl builder killed inside its build left its owner file: no wait at all
    (tmp_path / ".fastirl-build.owner").write_text("12345")
    lock.write_text("")
    t0 = time.time()
    with native_build.build_lock(tmp_path, stale_after=300):
        assert not lock.exists()
    assert time.time() - t0 < 2
    assert not (tmp_path / ".fastirl-build.owner").exists()


def test_build_lock_waits_for_a_live_builder_not_a_dead_one(tmp_path):
    import sys
    import threading
    import time
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time\n"
         f"f = open({str(tmp_path / '.fastirl-build.lock')!r}, 'a+')\n"
         "fcntl.flock(f.fileno(), fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        got = threading.Event()

        def take():
            with native_build.build_lock(tmp_path):
                got.set()
        th = threading.Thread(target=take, daemon=True)
        th.start()
        assert not got.wait(0.5)                 # a live builder holds it
        holder.kill()                            # the builder dies mid-build
        holder.wait()
        t0 = time.time()
        assert got.wait(10), "the lock of a dead process must not block"
        assert time.time() - t0 < 10
        th.join(5)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_prebuilt_extension_checks(tmp_path, monkeypatch):
    """A prebuilt module built against another torch, or without a kernel image
    for the GPU, is not imported (the JIT build is used instead)."""
    import json
    pkg = tmp_path / "fakeext"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    mod = pkg / "_C.py"
    mod.write_text("raise AssertionError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert native_build.prebuilt_problem("fakeext._C", "cpu") is None          # no build info: as before
    native_build.build_info_path(str(mod)).write_text(json.dumps({"torch": "0.0.1", "cuda_archs": []}))
    assert "built against torch 0.0.1" in native_build.prebuilt_problem("fakeext._C", "cpu")
    native_build.build_info_path(str(mod)).write_text(json.dumps({"torch": torch.__version__}))
    assert native_build.prebuilt_problem("fakeext._C", "cpu") is None
    assert native_build.prebuilt_problem("fakeext._nope", "cpu") == "not built"
    cov = native_build._arch_covered
    assert cov(["8.0", "9.0+PTX"], (8, 6)) and cov(["8.0", "9.0+PTX"], (9, 0))
    assert cov(["8.0", "9.0+PTX"], (10, 0)) and cov(["8.0", "9.0+PTX"], (12, 0))
    assert not cov(["8.0", "9.0"], (10, 0)) and not cov(["9.0"], (8, 0))
    assert not cov(["8.6"], (8, 0))


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("spec", [LogitSpec(), LogitSpec(softcap=3.0, temperature=0.7,
                                                          entropy=True, argmax=True)])
def test_cuda_backend_python_path_on_cpu_tensors(keep, dtype, spec):
    """The "cuda" backend's Python side (GEMM + epilogue base: blocks in the input
    dtype, dz in place, float32 dW, float16 scaling) run on CPU tensors, where
    the same ops dispatch to the CPU kernels."""
    check_backend(native.NativeCUDABackend(), "cpu", dtype, keep=keep, spec=spec)


def test_setup_py_builds_with_the_jit_flags(monkeypatch):
    """setup.py's extension flags are the JIT build's (declared once, in
    native_build.py)."""
    import runpy
    import sys
    import types

    monkeypatch.setenv("FASTIRL_BUILD_EXT", "0")
    monkeypatch.setitem(sys.modules, "setuptools", types.SimpleNamespace(setup=lambda **kw: None))
    got = runpy.run_path(str(CSRC.parent / "setup.py"))
    assert got["CXX_FLAGS"] == native_build.CXX_FLAGS
    assert got["NVCC_FLAGS"] == native_build.NVCC_FLAGS
