"""The CUDA epilogues' per-element math (csrc/iq_math.h, base-2 exponentials)
run on the CPU and checked against float64 truth.

iq_cuda.cu's kernels call ``math::row_accumulate`` / ``row_merge`` (with the
logit sum) / ``row_grad_elem`` (with and without the uniform ``grad_sum`` term)
with ``Base2`` (pre-scaled ``exp2``; ``ex2.approx`` on the GPU,
emulated by ``exp_(x ln 2)`` on the host).  A few lines of C++ here drive the
same functions the way the kernels do (each of ``lanes`` threads strides over a
row, then a butterfly merge of the threads' states), compiled with the host
compiler (no torch headers: seconds), through ctypes.  Only the hardware
``ex2.approx`` itself (relative error ~2^-22) is not what runs here.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"

HARNESS = r"""
#include "iq_math.h"
using namespace fastirl::math;

template <bool kCap>
static void stats(const float* z, long n, long V, const long* tg, float tau, float cap,
                  int lanes, float* value, float* q, float* ent, long* amax, float* maxl,
                  float* lsum) {
  const float k = Base2::scale(1.0f / tau), inv_cap = kCap ? 1.0f / cap : 0.0f;
  RowState st[64];
  for (long r = 0; r < n; ++r) {
    const float* row = z + r * V;
    for (int l = 0; l < lanes; ++l) {
      st[l] = row_empty();
      for (long i = l; i < V; i += lanes) {
        const float c = kCap ? cap * tanh_<Base2>(row[i] * inv_cap) : row[i];
        row_accumulate<Base2>(st[l], c, i, k, true, true, true);
      }
    }
    for (int off = lanes / 2; off > 0; off /= 2)      // butterfly, as the shuffles
      for (int l = 0; l < off; ++l) st[l] = row_merge<Base2>(st[l], st[l + off], k);
    const float log_s = __builtin_logf(st[0].lse.s);
    value[r] = lse_value(st[0].lse, tau, log_s);
    ent[r] = lse_entropy<Base2>(st[0].lse, log_s);
    amax[r] = st[0].best.i;
    maxl[r] = st[0].best.v;
    lsum[r] = st[0].sum;
    q[r] = tg[r] >= 0 ? (kCap ? cap * tanh_<Base2>(row[tg[r]] * inv_cap) : row[tg[r]]) : 0.0f;
  }
}

// gs == nullptr: the kSum = false elements (what the kernels run without grad_sum)
template <bool kCap, bool kSum>
static void grad(const float* z, long n, long V, const long* tg, const float* value,
                 const float* gv, const float* gt, const float* gs, float tau, float cap,
                 float* out) {
  const float k = Base2::scale(1.0f / tau), inv_cap = kCap ? 1.0f / cap : 0.0f;
  for (long r = 0; r < n; ++r)
    for (long i = 0; i < V; ++i)
      out[r * V + i] = row_grad_elem<Base2, kCap, kSum>(z[r * V + i], i, tg[r], value[r], k,
                                                         gv[r], gt[r], kSum ? gs[r] : 0.0f,
                                                         cap, inv_cap, false);
}

extern "C" void iq_stats(const float* z, long n, long V, const long* tg, float tau, float cap,
                         int lanes, float* value, float* q, float* ent, long* amax, float* maxl,
                         float* lsum) {
  if (cap > 0) stats<true>(z, n, V, tg, tau, cap, lanes, value, q, ent, amax, maxl, lsum);
  else stats<false>(z, n, V, tg, tau, cap, lanes, value, q, ent, amax, maxl, lsum);
}

extern "C" void iq_grad(const float* z, long n, long V, const long* tg, const float* value,
                        const float* gv, const float* gt, const float* gs, float tau, float cap,
                        float* out) {
  if (cap > 0) {
    if (gs) grad<true, true>(z, n, V, tg, value, gv, gt, gs, tau, cap, out);
    else grad<true, false>(z, n, V, tg, value, gv, gt, gs, tau, cap, out);
  } else {
    if (gs) grad<false, true>(z, n, V, tg, value, gv, gt, gs, tau, cap, out);
    else grad<false, false>(z, n, V, tg, value, gv, gt, gs, tau, cap, out);
  }
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("iqmath")
    src, so = d / "harness.cpp", d / "harness.so"
    src.write_text(HARNESS)
    # the flags of the CPU extension (no -ffast-math: exp_ relies on exact rounding)
    subprocess.run([cxx, "-std=c++17", "-O2", "-fno-math-errno", "-fno-trapping-math",
                    "-ffp-contract=fast", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared",
                    "-I", str(CSRC), str(src), "-o", str(so)], check=True)
    return ctypes.CDLL(str(so))


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def run_stats(lib, z: np.ndarray, tg: np.ndarray, tau: float, cap: float | None, lanes=8):
    n, V = z.shape
    z = np.ascontiguousarray(z, dtype=np.float32)
    tg = np.ascontiguousarray(tg, dtype=np.int64)
    out = [np.empty(n, np.float32) for _ in range(4)]
    amax, maxl = np.empty(n, np.int64), np.empty(n, np.float32)
    lib.iq_stats(_ptr(z), ctypes.c_long(n), ctypes.c_long(V), _ptr(tg), ctypes.c_float(tau),
                 ctypes.c_float(cap or 0.0), ctypes.c_int(lanes), _ptr(out[0]), _ptr(out[1]),
                 _ptr(out[2]), _ptr(amax), _ptr(maxl), _ptr(out[3]))
    return dict(value=out[0], target_logit=out[1], entropy=out[2], argmax=amax, max_logit=maxl,
                logit_sum=out[3])


def run_grad(lib, z, tg, value, gv, gt, tau, cap, gs=None):
    n, V = z.shape
    arr = lambda a, t=np.float32: np.ascontiguousarray(a, dtype=t)  # noqa: E731
    z, tg, value, gv, gt = arr(z), arr(tg, np.int64), arr(value), arr(gv), arr(gt)
    gs = None if gs is None else arr(gs)
    out = np.empty((n, V), np.float32)
    lib.iq_grad(_ptr(z), ctypes.c_long(n), ctypes.c_long(V), _ptr(tg), _ptr(value), _ptr(gv),
                _ptr(gt), None if gs is None else _ptr(gs), ctypes.c_float(tau),
                ctypes.c_float(cap or 0.0), _ptr(out))
    return out


def truth(z, tg, tau, cap, gv=None, gt=None, gs=None):
    z = torch.as_tensor(z, dtype=torch.float64)
    zc = cap * torch.tanh(z / cap) if cap else z
    t = torch.as_tensor(tg)
    out = dict(value=tau * torch.logsumexp(zc / tau, 1), logit_sum=zc.sum(1))
    lp = torch.log_softmax(zc / tau, 1)
    out["entropy"] = -(lp.exp() * lp).nan_to_num(0.0).sum(1)
    out["max_logit"], out["argmax"] = zc.max(1)
    out["target_logit"] = torch.where(t >= 0, zc.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
    if gv is not None:
        p = torch.exp((zc - out["value"][:, None]) / tau)
        dz = torch.as_tensor(gv, dtype=torch.float64)[:, None] * p
        rows = torch.nonzero(t >= 0).flatten()
        dz[rows, t[rows]] += torch.as_tensor(gt, dtype=torch.float64)[rows]
        if gs is not None:
            dz += torch.as_tensor(gs, dtype=torch.float64)[:, None]
        if cap:
            dz = dz * (1 - (zc / cap) ** 2)
        out["dz"] = dz
    return out


CASES = [  # (tau, cap, scale)
    (1.0, None, 3.0),
    (0.7, None, 40.0),
    (1.9, 30.0, 25.0),
    (1.0, 2.5, 4.0),
    (0.05, None, 1.0),
]


@pytest.mark.parametrize("tau,cap,scale", CASES, ids=str)
def test_base2_stats_and_grad_match_float64(lib, tau, cap, scale):
    g = torch.Generator().manual_seed(0)
    n, V = 6, 300
    z = (torch.randn(n, V, generator=g) * scale).numpy()
    z[1, 17] = z[1].max() + 50 * scale            # one dominant logit
    z[2, :] = z[2, 0]                             # all equal: uniform policy, argmax 0
    tg = torch.randint(0, V, (n,), generator=g).numpy()
    tg[3] = -1
    st = run_stats(lib, z, tg, tau, cap, lanes=8)
    ref = truth(z, tg, tau, cap)
    for k in ("value", "target_logit", "max_logit"):
        r = ref[k].numpy()
        assert np.allclose(st[k], r, rtol=3e-6, atol=3e-6 * max(1.0, np.abs(r).max())), k
    assert np.abs(st["entropy"] - ref["entropy"].numpy()).max() < 2e-5 * max(1.0, np.log(V))
    assert np.array_equal(st["argmax"], ref["argmax"].numpy())
    # the logit sum: lanes' float32 sums merged by addition
    z64 = z.astype(np.float64)
    scale = np.abs(cap * np.tanh(z64 / cap) if cap else z64).sum(1)
    err = np.abs(st["logit_sum"] - ref["logit_sum"].numpy())
    assert np.all(err <= 1e-6 * np.maximum(scale, 1.0)), err.max()
    gv = torch.randn(n, generator=g).numpy()
    gt = torch.randn(n, generator=g).numpy()
    gs = torch.randn(n, generator=g).numpy()
    dz = run_grad(lib, z, tg, st["value"], gv, gt, tau, cap)
    full = truth(z, tg, tau, cap, gv, gt)["dz"].numpy()
    assert np.abs(dz - full).max() < 1e-5 * max(1.0, np.abs(full).max())
    # with the uniform grad_sum term (kSum), and bitwise the same without it as
    # with grad_sum = 0 (the term is an exact no-op then)
    dzs = run_grad(lib, z, tg, st["value"], gv, gt, tau, cap, gs)
    full = truth(z, tg, tau, cap, gv, gt, gs)["dz"].numpy()
    assert np.abs(dzs - full).max() < 1e-5 * max(1.0, np.abs(full).max())
    assert np.array_equal(run_grad(lib, z, tg, st["value"], gv, gt, tau, cap, np.zeros(n)), dz)


def test_base2_extreme_rows(lib):
    """-inf rows, +-1e30 logits, a single finite logit, float32-max logits."""
    inf = np.inf
    z = np.array([
        [-inf, -inf, -inf, -inf],
        [-inf, 3.0, -inf, -inf],
        [1e30, -1e30, 0.0, 5.0],
        [3.0e38, 3.0e38, -3.0e38, 0.0],
        [-80.0, -90.0, -100.0, -120.0],
    ], dtype=np.float32)
    tg = np.array([-1, 1, 0, 1, 2])
    st = run_stats(lib, z, tg, 1.0, None, lanes=2)
    ref = truth(z, tg, 1.0, None)
    assert st["value"][0] == -inf and st["argmax"][0] == 0 and st["max_logit"][0] == -inf
    assert st["logit_sum"][0] == -inf and st["logit_sum"][1] == -inf
    assert st["logit_sum"][4] == pytest.approx(-390.0)
    assert st["value"][1] == pytest.approx(3.0) and st["argmax"][1] == 1
    assert st["entropy"][1] == pytest.approx(0.0, abs=1e-6)
    assert st["value"][2] == pytest.approx(1e30, rel=1e-6) and st["argmax"][2] == 0
    assert st["value"][3] == pytest.approx(float(ref["value"][3]), rel=1e-6)
    assert st["argmax"][3] == 0
    assert st["value"][4] == pytest.approx(float(ref["value"][4]), abs=1e-5)
    gv, gt = np.ones(5), -np.ones(5)
    dz = run_grad(lib, z, tg, st["value"], gv, gt, 1.0, None)
    assert np.isfinite(dz[1:]).all()
    assert dz[1, 1] == pytest.approx(0.0, abs=1e-6)           # p = 1, minus the one-hot
    assert dz[4].sum() == pytest.approx(0.0, abs=1e-6)


def test_base2_nan_policy(lib):
    """A NaN logit: value NaN, max logit NaN, argmax the first NaN (torch.max)."""
    nan = np.nan
    z = np.array([[1.0, nan, 5.0, nan, 2.0, 7.0, 0.0, 1.0],
                  [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, nan, 0.0]], dtype=np.float32)
    for lanes in (1, 2, 4):
        st = run_stats(lib, z, np.array([0, 0]), 1.0, None, lanes=lanes)
        ref = torch.as_tensor(z).max(1)
        assert np.isnan(st["value"]).all() and np.isnan(st["max_logit"]).all()
        assert np.isnan(st["logit_sum"]).all()
        assert st["argmax"].tolist() == ref.indices.tolist() == [1, 6]
