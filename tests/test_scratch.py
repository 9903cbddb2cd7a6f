"""Scratch buffers (fastirl.backends.scratch): one block per slot and call on the
CPU, nothing kept after the call, the same numbers as fresh tensors."""

import pytest
import torch

import fastirl
from fastirl.backends import scratch


def test_a_slot_is_reused_and_grown_within_a_scope(monkeypatch):
    monkeypatch.setattr(scratch, "MIN_BYTES", 0)
    cpu = torch.device("cpu")
    with scratch.scope():
        a = scratch.empty("block", (4, 8), torch.float32, cpu)
        b = scratch.empty("block", (2, 8), torch.float32, cpu)
        assert b.data_ptr() == a.data_ptr() and b.shape == (2, 8) and b.is_contiguous()
        other = scratch.empty("other", (4, 8), torch.float32, cpu)
        assert other.data_ptr() != a.data_ptr()
        big = scratch.empty("block", (64, 8), torch.float32, cpu)
        assert big.shape == (64, 8)
        again = scratch.empty("block", (64, 8), torch.float32, cpu)
        assert again.data_ptr() == big.data_ptr()
        half = scratch.empty("block", (4, 8), torch.bfloat16, cpu)      # another dtype
        assert half.dtype == torch.bfloat16
        with scratch.scope():                         # nested: its own slots
            assert scratch.empty("block", (4, 8), torch.bfloat16, cpu).data_ptr() != \
                half.data_ptr()
        assert scratch.empty("block", (4, 8), torch.bfloat16, cpu).data_ptr() == half.data_ptr()
    assert scratch._slots.get() is None


def test_outside_a_scope_off_the_cpu_or_below_min_bytes_every_request_is_new(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(scratch, "MIN_BYTES", 0)
    a = scratch.empty("block", (4, 8), torch.float32, cpu)
    b = scratch.empty("block", (4, 8), torch.float32, cpu)
    assert a.data_ptr() != b.data_ptr()
    with scratch.scope():
        m = scratch.empty("block", (4, 8), torch.float32, torch.device("meta"))
        assert m.device.type == "meta"
        assert scratch._slots.get() == {}
    monkeypatch.setattr(scratch, "MIN_BYTES", 4 * 32)          # 32 float32 elements
    with scratch.scope():
        small = scratch.empty("block", (4, 7), torch.float32, cpu)   # malloc reuses these
        assert scratch._slots.get() == {}
        big = scratch.empty("block", (4, 8), torch.float32, cpu)
        assert scratch._slots.get()["block"].data_ptr() == big.data_ptr() != small.data_ptr()
        # once the slot exists, a smaller request (a shorter last chunk) takes it too,
        # instead of holding a second block beside it
        assert scratch.empty("block", (2, 8), torch.float32, cpu).data_ptr() == big.data_ptr()


@pytest.mark.parametrize("memory", ["fast", 60_000])   # rows plan; vocabulary slabs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_engine_takes_each_chunks_block_from_one_buffer(monkeypatch, memory, dtype):
    """Several chunks (or slabs) per call: every block of a call lives in the
    same memory, the scope is closed when the call returns, and the loss and
    gradients are those of fresh blocks."""
    torch.manual_seed(0)
    B, T, H, V = 2, 48, 32, 1000
    x = torch.randn(B, T, H).to(dtype)
    w = (0.1 * torch.randn(V, H)).to(dtype)
    t = torch.randint(0, V, (B, T))
    t[0, 5] = -100

    def grads():
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fastirl.iq_loss(xx, ww, t, backend="cpu", chunk_size=None if memory != "fast"
                               else 16, memory=memory)
        loss.backward()
        return loss.detach(), xx.grad, ww.grad

    monkeypatch.setattr(scratch, "MIN_BYTES", 0)      # every block of this small head
    taken = []
    real = scratch.empty

    def spy(slot, shape, dt, device):
        out = real(slot, shape, dt, device)
        taken.append((slot, out.data_ptr(), scratch._slots.get() is not None))
        return out

    monkeypatch.setattr(scratch, "empty", spy)
    got = grads()
    blocks = [p for slot, p, scoped in taken if slot == "block"]
    assert len(blocks) > 2 and all(scoped for _, _, scoped in taken)
    assert len(set(blocks)) <= 2          # the forward's block, and the backward's (recompute)
    assert scratch._slots.get() is None
    monkeypatch.setattr(scratch, "empty",
                        lambda slot, shape, dt, device: torch.empty(shape, dtype=dt,
                                                                    device=device))
    fresh = grads()
    for a, b in zip(got, fresh):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
