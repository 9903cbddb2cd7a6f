"""Engine properties: bounded chunks, skipped rows, and randomised agreement."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastirl
from fastirl import reference as ref
from fastirl.backends import get_backend
from _problems import grads


class Spy:
    """Wraps the torch backend and records the rows of every call."""

    name = "spy"

    def __init__(self):
        self.inner = get_backend("torch")
        self.rows = []

    def supports(self, device):
        return True

    @property
    def dtypes(self):
        return self.inner.dtypes

    def rows_per_chunk(self, *args):
        return self.inner.rows_per_chunk(*args)

    def block_itemsize(self, dtype):
        return self.inner.block_itemsize(dtype)

    def forward(self, x, *args, **kw):
        self.rows.append(("forward", x.shape[0]))
        return self.inner.forward(x, *args, **kw)

    def backward(self, x, *args, **kw):
        self.rows.append(("backward", x.shape[0]))
        return self.inner.backward(x, *args, **kw)


def test_chunks_are_bounded_and_inactive_rows_skipped():
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 4, 50, 8, 31
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (B, T), generator=g)
    t[:, :20] = -100                                  # long prompts
    t[2] = -100                                       # one sequence all padding
    spy = Spy()
    loss = fastirl.iq_loss(h, w, t, backend=spy, chunk_size=16)
    actions = int((t != -100).sum())
    fwd = [n for kind, n in spy.rows if kind == "forward"]
    assert max(fwd) <= 16 + 1                          # chunk + one look-ahead row
    assert sum(fwd) <= actions + len(fwd)              # only action rows are computed
    want = ref.iq_loss(h, w, t)
    torch.testing.assert_close(loss, want)
    for a, b in zip(grads(loss, [h, w]), grads(want, [h, w])):
        torch.testing.assert_close(a, b)


def test_default_chunk_budget_is_bounded():
    """The chunk policy (fastirl.backends.chunking): a chunk's float32 logits block
    is at most max(64 MiB, half the float32 dW accumulator) on the CPU."""
    be = get_backend("torch")
    V, H = 128256, 4096
    rows = be.rows_per_chunk(1 << 20, V, H, torch.float32, None)
    assert 1 <= rows * V * 4 <= max(64 << 20, V * H * 4 // 2)
    assert rows * V * 4 >= (64 << 20) // 2            # never the tiny chunks of a fixed budget
    assert be.rows_per_chunk(10, 32000, 512, torch.float32, None) == 10
    assert be.rows_per_chunk(100, 32000, 512, torch.float32, 7) == 7


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 9), H=st.integers(1, 6), V=st.integers(1, 19),
       gamma=st.floats(0, 1), lam=st.floats(0, 2), tau=st.floats(0.2, 3),
       chunk=st.integers(1, 8), seed=st.integers(0, 2 ** 16),
       divergence=st.sampled_from(fastirl.DIVERGENCES), packed=st.booleans(),
       online=st.booleans(), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_random_problems_match_reference(B, T, H, V, gamma, lam, tau, chunk, seed, divergence,
                                         packed, online, reduction):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (B, T), generator=g)
    t[torch.rand(B, T, generator=g) < 0.3] = -100
    kw = dict(gamma=gamma, td_weight=lam, temperature=tau, divergence=divergence,
              reduction=reduction)
    if packed:
        kw["position_ids"] = torch.randint(0, 3, (B, T), generator=g)
    if online:
        kw["is_expert"] = torch.rand(B, generator=g) < 0.5
    got = fastirl.iq_loss(h, w, t, chunk_size=chunk, **kw)
    want = ref.iq_loss(h, w, t, **kw)
    torch.testing.assert_close(got, want)
    up = torch.randn(want.shape, generator=g, dtype=want.dtype) if reduction == "none" else None
    for a, b in zip(grads(got, [h, w], up), grads(want, [h, w], up)):
        torch.testing.assert_close(a, b)


def test_auto_backend_on_cpu_is_not_triton():
    assert "torch" in fastirl.available_backends("cpu")
    from fastirl.backends import resolve_backend
    assert resolve_backend("auto", torch.device("cpu")).name in ("cpu", "torch")


@pytest.mark.parametrize("preset", ["default", "fast", "highest"])
def test_presets_agree_in_float32(preset):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    w = torch.randn(13, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 13, (2, 6), generator=g)
    got = fastirl.iq_loss(h, w, t, preset=preset)
    want = ref.iq_loss(h.double(), w.double(), t).float()
    torch.testing.assert_close(got, want)
