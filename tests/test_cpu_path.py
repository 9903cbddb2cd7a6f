"""The CPU backend at the shapes where the chunk policy and the low-precision dW
path matter: several chunks, several dW slabs, float32 accumulation."""

from __future__ import annotations

import pytest
import torch

import fastirl
from fastirl import reference
from fastirl.backends import chunking, gemm_epilogue

native = pytest.importorskip("fastirl.backends.native")


@pytest.fixture(scope="module")
def cpu_backend():
    try:
        return native.load_cpu()
    except ImportError as exc:      # no compiler here: the suite's native tests say why
        pytest.skip(f"native CPU extension unavailable: {exc}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_acc_add_matches_float32_add(cpu_backend, dtype):
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(37, 70, generator=g)
    src_full = torch.randn(37, 90, generator=g).to(dtype)
    src = src_full[:, 5:75]                       # row stride 90: a slab of a wider block
    want = acc + src.float()
    torch.ops.fastirl.acc_add_(acc, src)
    assert torch.equal(acc, want)
    view = torch.zeros(10, 70)[2:9]               # a row range of the accumulator
    torch.ops.fastirl.acc_add_(view, src[:7])
    assert torch.equal(view, src[:7].float())


def test_acc_add_rejects_bad_input(cpu_backend):
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.fastirl.acc_add_(torch.zeros(2, 3, dtype=torch.bfloat16),
                                   torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="one shape"):
        torch.ops.fastirl.acc_add_(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="unit column"):
        torch.ops.fastirl.acc_add_(torch.zeros(3, 3).t(), torch.zeros(3, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunks_and_slabs_match_the_reference(cpu_backend, monkeypatch, dtype):
    """Several chunks (explicit and from the policy) and dW in several slabs:
    loss and gradients as the float64 reference, within the dtype's rounding."""
    monkeypatch.setattr(gemm_epilogue, "_DW_SLAB_BYTES", 3 * 24 * 2)   # 3 vocabulary rows per slab
    B, T, H, V = 2, 21, 24, 50
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) / H ** 0.5 * 2
    t = torch.randint(0, V, (B, T), generator=g)
    t[0, :4] = -100
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = reference.iq_loss(x64, w64, t, td_weight=0.3)
    ref.backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-4      # fastirl-bench guard tolerances
    for chunk in (5, 16, None):
        xs = x.to(dtype, copy=True).requires_grad_()
        ws = w.to(dtype, copy=True).requires_grad_()
        loss = fastirl.iq_loss(xs, ws, t, td_weight=0.3, backend="cpu", chunk_size=chunk)
        loss.backward()
        scale = lambda a: a.abs().max().clamp(min=1e-12)  # noqa: E731
        assert abs(float(loss.detach()) - float(ref)) <= tol * abs(float(ref))
        assert float((xs.grad.double() - x64.grad).abs().max()) <= tol * float(scale(x64.grad))
        assert float((ws.grad.double() - w64.grad).abs().max()) <= tol * float(scale(w64.grad))


def test_cpu_backend_chunks_by_the_policy(cpu_backend):
    for args in [(8192, 128256, 2048, torch.bfloat16), (4096, 32000, 512, torch.float32)]:
        want = chunking.rows_per_chunk(*args, device="cpu",
                                       block_itemsize=4 if args[3] == torch.float32 else 2)
        assert cpu_backend.rows_per_chunk(*args, None) == want
    # the issue-11 shapes: the Llama-3-1B head in bf16 takes 2048-row chunks (0.5 GiB
    # blocks, half the float32 dW), not 261 rows of a fixed 64 MiB budget
    assert cpu_backend.rows_per_chunk(8192, 128256, 2048, torch.bfloat16, None) == 2048
    assert cpu_backend.rows_per_chunk(4096, 32000, 512, torch.bfloat16, None) == 1024
    assert cpu_backend.rows_per_chunk(100, 32000, 512, torch.bfloat16, 7) == 7
