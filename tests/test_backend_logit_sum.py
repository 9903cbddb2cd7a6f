"""The logit-sum statistic and the uniform gradient coefficient of the backend
contract (``LogitSpec.logit_sum`` / ``RowStats.logit_sum``, ``grad_sum`` of
``backward`` / ``logits_backward``), in every backend that runs here, against a
direct float64 PyTorch computation:

    S_t      = sum_v z_c[t, v]                      (capped, before the temperature)
    dL/dz[v] = (grad_value p[v] + grad_target [v == target] + grad_sum)
               * (1 - (z_c[v] / c)^2 with a soft cap)

Backends: ``torch``, ``cpu`` (the C++ extension), the ``cuda`` backend's Python
side (GEMM + epilogue base) on CPU tensors where the same ops dispatch to the
CPU kernels (the real one on a GPU), ``triton`` and ``triton-fused`` (both of
its backward modes) under TRITON_INTERPRET=1 on the CPU (see conftest.py), on
the GPU when there is one.  Tolerances are those of test_native.py's backend
checks (float32 2e-5, bfloat16 / float16 3e-2 of the gradient's scale); the
logit sum itself is held to float32 accumulation of the block as the backend
stores it (plus one rounding per logit where the block is kept in a 16-bit dtype).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from fastirl.backends import for_dtype
from fastirl.backends.base import LogitSpec
from fastirl.backends.torch_chunked import TorchChunkedBackend

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# two unit roundoffs of the dtype: one rounding of each logit when the backend
# keeps the logits block in the input dtype
ROUND = {torch.float32: 0.0, torch.float64: 0.0, torch.bfloat16: 2.0 ** -8,
         torch.float16: 2.0 ** -11}
BACKENDS = ["torch", "cpu", "cuda", "triton", "triton-fused", "triton-fused-fast"]


def _have_cxx() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "c++", "g++", "clang++"))


def make_backend(name: str, dtype: torch.dtype | None = None):
    """(backend, device, deterministic) for a backend name of BACKENDS; skips what
    cannot run here.  With ``dtype``, the backend that runs inputs of that dtype
    (the PyTorch one for float64, as the engine routes it: ``for_dtype``)."""
    be, device, det = _make_backend(name)
    return (be if dtype is None else for_dtype(be, dtype)), device, det


def _make_backend(name: str):
    if name == "torch":
        return TorchChunkedBackend(), DEVICE, True
    if name in ("cpu", "cuda"):
        if not _have_cxx():
            pytest.skip("no C++ compiler: the native extension cannot be built")
        from fastirl.backends import native
        native.load_cpu()
        if name == "cpu":
            return native.NativeCPUBackend(), torch.device("cpu"), True
        if GPU:
            return native.load_cuda(), DEVICE, True
        # the GEMM + epilogue Python side of "cuda" on CPU tensors (CPU kernels)
        return native.NativeCUDABackend(), torch.device("cpu"), True
    pytest.importorskip("triton")
    from fastirl.backends import triton_kernels as tk
    if not (GPU or tk.INTERPRET):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    if name == "triton":
        return tk.TritonBackend(fwd_splits=3), DEVICE, True
    fast = name == "triton-fused-fast"
    return tk.TritonFusedBackend(fwd_splits=3, bwd_splits=2 if fast else None), DEVICE, not fast


# ------------------------------------------------------------------ problems

def make(n, H, V, dtype, device, *, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=g)
    w = torch.randn(V, H, generator=g) / H ** 0.5 * 2.0
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    t = torch.randint(0, V, (n,), generator=g)
    t[::3] = -1                                          # rows without an action
    cast = lambda a: None if a is None else a.to(dtype).to(device)  # noqa: E731
    return cast(x), cast(w), cast(b), t.to(device)


def logits_block(n, V, dtype, device, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, V, generator=g) * scale + 0.5).to(dtype)
    t = torch.randint(0, V, (n,), generator=g)
    t[::3] = -1
    return z.to(device), t.to(device)


def coefficients(n, device, seed=1, sum_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    gv, gt, gs = (torch.randn(n, generator=g) for _ in range(3))
    return gv.to(device), gt.to(device), (gs * sum_scale).to(device)


def truth(z, t, spec: LogitSpec, gv=None, gt=None, gs=None):
    """Float64 statistics and dL/dz (CPU) of raw logits z (n, V)."""
    z, t = z.double().cpu(), t.cpu()
    zc = spec.softcap * torch.tanh(z / spec.softcap) if spec.softcap else z
    tau = spec.temperature
    has = t >= 0
    out = dict(value=tau * torch.logsumexp(zc / tau, 1),
               target_logit=torch.where(has, zc.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0),
               logit_sum=zc.sum(1))
    if gv is not None:
        dz = gv.double().cpu()[:, None] * torch.softmax(zc / tau, 1)
        rows = torch.nonzero(has)[:, 0]
        dz[rows, t[rows]] += gt.double().cpu()[rows]
        if gs is not None:
            dz += gs.double().cpu()[:, None]
        if spec.softcap:
            dz = dz * (1 - (zc / spec.softcap) ** 2)
        out["dz"] = dz
    return out


def check_sum(got, ref, scale, dtype, rounded: bool, what="logit_sum"):
    """|got - ref| per row within float32 accumulation error of the row's
    magnitude ``scale`` (+ one rounding per logit when the block was rounded)."""
    assert got is not None, f"{what}: missing"
    assert got.shape == ref.shape, (what, got.shape)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), got.dtype
    rtol = (1e-12 if dtype == torch.float64 else 1e-5) + (ROUND[dtype] if rounded else 0.0)
    err = (got.double().cpu() - ref).abs()
    bound = rtol * scale.clamp(min=1.0)
    assert torch.all(err <= bound), f"{what}: error {err.max():.3g} > bound {bound.min():.3g}"


def close(got, want, tol, what):
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=tol, atol=tol,
                               msg=lambda m: f"{what}: {m}")


def grad_tol(dtype, dz):
    base = {torch.float64: 1e-10, torch.float32: 2e-5}.get(dtype, 3e-2)
    return base * max(1.0, dz.abs().max().item())


# ------------------------------------------------------------- logits input

LOGITS_CASES = [  # (n, V, softcap, temperature)
    (5, 1, None, 1.0),
    (7, 7, 2.5, 1.0),
    (13, 33, None, 0.6),
    (9, 257, 4.0, 1.7),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LOGITS_CASES, ids=lambda c: "n{}-V{}-cap{}-tau{}".format(*c))
@pytest.mark.parametrize("name", BACKENDS[:5])
def test_logits_forward_logit_sum(name, case, dtype):
    be, device, _ = make_backend(name, dtype)
    n, V, cap, tau = case
    z, t = logits_block(n, V, dtype, device, seed=V)
    spec = LogitSpec(temperature=tau, softcap=cap, logit_sum=True, entropy=V > 7)
    st = be.logits_forward(z, t, spec)
    ref = truth(z, t, spec)
    check_sum(st.logit_sum, ref["logit_sum"], z.double().abs().sum(1).cpu(), dtype, False)
    close(st.value, ref["value"], 1e-10 if dtype == torch.float64 else 2e-5, "value")
    # the flag off: no sum, and the other statistics bit for bit the same
    off = be.logits_forward(z, t, LogitSpec(temperature=tau, softcap=cap, entropy=V > 7))
    assert off.logit_sum is None
    assert torch.equal(off.value, st.value) and torch.equal(off.target_logit, st.target_logit)
    if spec.entropy:
        assert torch.equal(off.entropy, st.entropy)


@pytest.mark.parametrize("name", BACKENDS[:5])
def test_logit_sum_nan_and_shards(name):
    """A row holding a NaN logit has a NaN sum (other rows are finite); sums of
    vocabulary shards add up to the row's sum."""
    be, device, _ = make_backend(name)
    z, t = logits_block(6, 300, torch.float32, device, seed=4)
    z[1, 17] = z[1, 250] = float("nan")
    z[4, 299] = float("nan")
    spec = LogitSpec(logit_sum=True, softcap=20.0, argmax=True)
    st = be.logits_forward(z, t, spec)
    assert torch.isnan(st.logit_sum[[1, 4]]).all() and torch.isnan(st.value[[1, 4]]).all()
    assert torch.isfinite(st.logit_sum[[0, 2, 3, 5]]).all()
    # argmax / max logit keep the NaN policy (torch.max's: the first NaN column)
    ref = TorchChunkedBackend().logits_forward(z, t, spec)
    assert torch.equal(st.argmax.cpu(), ref.argmax.cpu())
    assert st.argmax[1].item() == 17 and st.argmax[4].item() == 299
    assert torch.isnan(st.max_logit[[1, 4]]).all()
    assert torch.isfinite(st.max_logit[[0, 2, 3, 5]]).all()
    z = torch.nan_to_num(z, nan=0.0)
    full = be.logits_forward(z, t, spec).logit_sum
    parts = sum(be.logits_forward(z[:, a:b].contiguous(), torch.full_like(t, -1), spec).logit_sum
                for a, b in ((0, 101), (101, 229), (229, 300)))
    close(parts, full, 2e-5 * z.abs().sum(1).max().item(), "shard sums")


# ------------------------------------------------------------- linear input

@pytest.mark.parametrize("name", BACKENDS[:5])
def test_forward_nan_weight_row(name):
    """A NaN row of W (columns 5 and 250, in different vocabulary splits): every
    row's value, max logit and logit sum are NaN and its argmax is 5."""
    be, device, _ = make_backend(name)
    x, w, _, t = make(4, 16, 300, torch.float32, device, seed=6)
    w[5] = float("nan")
    w[250] = float("nan")
    st, _ = be.forward(x, w, None, t, LogitSpec(logit_sum=True, argmax=True, softcap=10.0),
                       keep=False)
    assert st.argmax.tolist() == [5] * 4
    for k in ("value", "max_logit", "logit_sum"):
        assert torch.isnan(getattr(st, k)).all(), k


LINEAR_CASES = [  # (n, H, V, bias, softcap, temperature)
    (5, 16, 7, False, None, 1.0),
    (13, 32, 257, True, 3.0, 0.7),
    (7, 40, 33, True, None, 1.6),           # H % 16 != 0: triton-fused hands it to the epilogue
    (1, 16, 1, False, 2.0, 1.0),
]


@pytest.mark.parametrize("keep", [True, False], ids=["keep", "recompute"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LINEAR_CASES,
                         ids=lambda c: "n{}-H{}-V{}-b{}-cap{}-tau{}".format(*c))
@pytest.mark.parametrize("name", BACKENDS[:5])
def test_forward_logit_sum(name, case, dtype, keep):
    be, device, _ = make_backend(name, dtype)
    n, H, V, bias, cap, tau = case
    x, w, b, t = make(n, H, V, dtype, device, bias=bias, seed=V + n)
    spec = LogitSpec(temperature=tau, softcap=cap, logit_sum=True, argmax=True)
    st, _ = be.forward(x, w, b, t, spec, keep=keep)
    z64 = x.double().cpu() @ w.double().cpu().T + (b.double().cpu() if bias else 0)
    ref = truth(z64, t, spec)
    scale = (x.double().cpu().abs() @ w.double().cpu().abs().T
             + (b.double().cpu().abs() if bias else 0)).sum(1)
    # triton-fused keeps float32 logits tiles (no rounding to the input dtype)
    fused = name.startswith("triton-fused") and H % 16 == 0
    check_sum(st.logit_sum, ref["logit_sum"], scale, dtype, rounded=not fused)
    off, _ = be.forward(x, w, b, t, LogitSpec(temperature=tau, softcap=cap, argmax=True),
                        keep=False)
    assert off.logit_sum is None
    assert torch.equal(off.value, st.value) and torch.equal(off.argmax, st.argmax)


# --------------------------------------------------------------- gradients

GRAD_CASES = [  # (mode, n, H, V, bias, softcap, temperature)
    ("single-pass", 13, 32, 257, False, None, 1.0),
    ("single-pass", 9, 16, 33, True, 2.5, 0.7),
    ("recompute", 11, 32, 130, True, 3.0, 1.6),
    ("recompute", 5, 40, 7, False, None, 0.8),
]


@pytest.mark.parametrize("with_sum", [True, False], ids=["grad_sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GRAD_CASES,
                         ids=lambda c: "{}-n{}-H{}-V{}-b{}-cap{}-tau{}".format(*c))
@pytest.mark.parametrize("name", BACKENDS)
def test_backward_grad_sum(name, case, dtype, with_sum):
    """dx, dW and db (added into pre-filled float32 accumulators) of
    dL/dz = grad_value p + grad_target onehot (+ grad_sum), single-pass
    (forward(keep=True), then backward(state)) and recompute (state=None)."""
    be, device, det = make_backend(name, dtype)
    mode, n, H, V, bias, cap, tau = case
    x, w, b, t = make(n, H, V, dtype, device, bias=bias, seed=n * V)
    spec = LogitSpec(temperature=tau, softcap=cap, deterministic=det)
    st, state = be.forward(x, w, b, t, spec, keep=mode == "single-pass")
    if mode == "recompute":
        state = None
    gv, gt, gs = coefficients(n, device, seed=n)
    if not with_sum:
        gs = None
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(5)
    dw0 = torch.randn(V, H, generator=g).to(acc).to(device)
    db0 = torch.randn(V, generator=g).to(acc).to(device) if bias else None
    dw, db = dw0.clone(), None if db0 is None else db0.clone()
    kw = {} if gs is None else {"grad_sum": gs}
    dx = be.backward(x, w, b, t, st.value, gv, gt, spec, state, need_x=True, dweight=dw,
                     dbias=db, **kw)
    z64 = x.double().cpu() @ w.double().cpu().T + (b.double().cpu() if bias else 0)
    # float64 dL/dz at the V the backend is handed (its own statistic)
    dz = truth_grad_at(z64, t, spec, st.value, gv, gt, gs)
    tol = grad_tol(dtype, dz)
    assert dx.dtype == dtype and dx.shape == x.shape
    close(dx, dz @ w.double().cpu(), tol, "dx")
    close(dw - dw0, dz.T @ x.double().cpu(), tol, "dW")
    if bias:
        close(db - db0, dz.sum(0), tol, "db")


def truth_grad_at(z, t, spec: LogitSpec, value, gv, gt, gs):
    """Float64 dL/dz given the backend's own V (what backward is handed)."""
    z, t = z.double().cpu(), t.cpu()
    zc = spec.softcap * torch.tanh(z / spec.softcap) if spec.softcap else z
    dz = gv.double().cpu()[:, None] * torch.exp((zc - value.double().cpu()[:, None])
                                                / spec.temperature)
    rows = torch.nonzero(t >= 0)[:, 0]
    dz[rows, t[rows]] += gt.double().cpu()[rows]
    if gs is not None:
        dz += gs.double().cpu()[:, None]
    if spec.softcap:
        dz = dz * (1 - (zc / spec.softcap) ** 2)
    return dz


@pytest.mark.parametrize("with_sum", [True, False], ids=["grad_sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LOGITS_CASES, ids=lambda c: "n{}-V{}-cap{}-tau{}".format(*c))
@pytest.mark.parametrize("name", BACKENDS[:5])
def test_logits_backward_grad_sum(name, case, dtype, with_sum):
    """dL/dlogits out of place and in place (out aliasing the logits): the same."""
    be, device, _ = make_backend(name, dtype)
    n, V, cap, tau = case
    z, t = logits_block(n, V, dtype, device, seed=V + 1)
    spec = LogitSpec(temperature=tau, softcap=cap)
    st = be.logits_forward(z, t, spec)
    gv, gt, gs = coefficients(n, device, seed=V)
    kw = {"grad_sum": gs} if with_sum else {}
    want = truth_grad_at(z, t, spec, st.value, gv, gt, gs if with_sum else None)
    out = torch.full_like(z, float("nan"))
    be.logits_backward(z, t, st.value, gv, gt, spec, out, **kw)
    # one rounding of the float32 gradient to the output dtype
    tol = {torch.float64: 1e-10, torch.float32: 2e-5}.get(dtype, 2.0 * ROUND[dtype])
    close(out, want, tol * max(1.0, want.abs().max().item()), "dlogits")
    inplace = z.clone()
    be.logits_backward(inplace, t, st.value, gv, gt, spec, inplace, **kw)
    assert torch.equal(inplace, out)
    if dtype == torch.float32:                  # a float32 gradient of 16-bit-free logits
        wide = torch.zeros(V, n, device=device).T       # strided (column-major) out
        be.logits_backward(z, t, st.value, gv, gt, spec, wide, **kw)
        assert torch.equal(wide, out)


@pytest.mark.parametrize("name", BACKENDS[:5])
def test_grad_sum_on_vocabulary_slabs(name):
    """The uniform coefficient stays per column: the gradient of a column slab
    (targets outside it as -1, the full row's V) is that slab of the full one."""
    be, device, _ = make_backend(name)
    z, t = logits_block(7, 260, torch.float32, device, seed=9)
    spec = LogitSpec(temperature=0.9, softcap=6.0)
    st = be.logits_forward(z, t, spec)
    gv, gt, gs = coefficients(7, device, seed=3)
    full = torch.empty_like(z)
    be.logits_backward(z, t, st.value, gv, gt, spec, full, grad_sum=gs)
    for a, b in ((0, 90), (90, 260)):
        local = torch.where((t >= a) & (t < b), t - a, -1)
        part = torch.empty(7, b - a, device=device)
        be.logits_backward(z[:, a:b].contiguous(), local, st.value, gv, gt, spec, part,
                           grad_sum=gs)
        close(part, full[:, a:b], 1e-6, f"slab {a}:{b}")


@pytest.mark.parametrize("regime", ["tiny-sum", "sum-dominates"])
@pytest.mark.parametrize("name", ["cuda", "triton", "triton-fused", "triton-fused-fast"])
def test_fp16_dz_scale_includes_grad_sum(name, regime):
    """float16 dz: the coefficients are divided by a power of two from the
    largest of them before dz is rounded to float16, and grad_sum must count:
    alone and tiny (~1e-7, the uniform term of a smoothed target over many
    tokens) dz would be float16 subnormals; much larger than the others
    (1 against 1e-7) it would overflow float16 after their scale."""
    be, device, det = make_backend(name)
    n, H, V = 13, 32, 257
    x, w, b, t = make(n, H, V, torch.float16, device, seed=17)
    spec = LogitSpec(deterministic=det)
    gv, gt, gs = coefficients(n, device, seed=18)
    if regime == "tiny-sum":
        gv, gt, gs = gv * 0.0, gt * 0.0, gs * 1e-7
    else:
        gv, gt = gv * 1e-7, gt * 1e-7
    st, state = be.forward(x, w, b, t, spec, keep=True)
    dw = torch.zeros(V, H, device=device)
    dx = be.backward(x, w, b, t, st.value, gv, gt, spec, state, need_x=True, dweight=dw,
                     dbias=None, grad_sum=gs)
    z64 = x.double().cpu() @ w.double().cpu().T
    dz = truth_grad_at(z64, t, spec, st.value, gv, gt, gs)
    for what, got, ref in (("dW", dw, dz.T @ x.double().cpu()), ("dx", dx, dz @ w.double().cpu())):
        assert torch.isfinite(got).all(), what
        rel = (got.double().cpu() - ref).abs().max().item() / ref.abs().max().item()
        # dW: float32 accumulator; dx: itself float16 (its rounding, and subnormals
        # where the tiny coefficients make it ~1e-7)
        bound = 1e-2 if what == "dW" else 2 * (ref.to(torch.float16).double() - ref).abs().max() \
            .item() / ref.abs().max().item() + 1e-2
        assert rel < bound, f"{what}: relative error {rel:.3g}"


def test_triton_launches_no_extra_variant_without_the_new_terms(monkeypatch):
    """logit_sum off / grad_sum None: the Triton kernels are launched with their
    LOGIT_SUM / GRAD_SUM constexprs False (the variants that existed before)."""
    pytest.importorskip("triton")
    from fastirl.backends import triton_kernels as tk
    if not (GPU or tk.INTERPRET):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    seen = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kw):
                seen.append((self.name, {k: v for k, v in kw.items()
                                         if k in ("LOGIT_SUM", "GRAD_SUM")}))
                return launch(*args, **kw)
            return run

    for mod, names in ((tk.L, ("logits_stats_kernel", "merge_kernel", "logits_grad_kernel")),
                       (tk.K, ("linear_fwd_kernel", "linear_bwd_rows_kernel"))):
        for nm in names:
            monkeypatch.setattr(mod, nm, Spy(nm, getattr(mod, nm)))
    x, w, b, t = make(9, 32, 130, torch.float32, DEVICE, bias=True)
    gv, gt, gs = coefficients(9, DEVICE)
    for flag in (False, True):
        seen.clear()
        for be, det in ((tk.TritonBackend(), True), (tk.TritonFusedBackend(), True),
                        (tk.TritonFusedBackend(), False)):
            spec = LogitSpec(logit_sum=flag, deterministic=det)
            st, state = be.forward(x, w, b, t, spec, keep=True)
            assert (st.logit_sum is not None) == flag
            be.backward(x, w, b, t, st.value, gv, gt, spec, state, need_x=True,
                        dweight=torch.zeros(130, 32, device=DEVICE), dbias=None,
                        grad_sum=gs if flag else None)
        kernels = {k for k, _ in seen}
        assert kernels == {"logits_stats_kernel", "merge_kernel", "logits_grad_kernel",
                           "linear_fwd_kernel", "linear_bwd_rows_kernel"}, kernels
        assert all(v == flag for _, kw in seen for v in kw.values()) and all(kw for _, kw in seen)
