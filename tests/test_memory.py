"""The memory setting: the planner's plans and budgets, and every plan's
gradients against the float64 reference (and the naive low-precision error)."""

from __future__ import annotations

import pytest
import torch

import fastirl
from fastirl import engine
from fastirl import memory as M
from fastirl import reference as ref
from fastirl.backends.hardware import CPU, gpu
from _problems import grads, make_batch

GiB = 1 << 30
BACKENDS = [b for b in fastirl.available_backends("cpu") if b != "triton"]
LLAMA8B = dict(vocab=128256, hidden=4096, dtype=torch.bfloat16, weight_itemsize=2)


@pytest.fixture
def plans(monkeypatch):
    """The plans the engine used, in order."""
    seen = []
    real = engine.memory_plan

    def spy(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]

    monkeypatch.setattr(engine, "memory_plan", spy)
    return seen


@pytest.mark.parametrize("hw", [gpu("h100"), gpu("h200"), CPU], ids=lambda h: h.name)
@pytest.mark.parametrize("n", [1024, 8192, 65536])
def test_settings_order_memory_and_honour_their_budgets(hw, n):
    got = {m: M.plan(n, **LLAMA8B, memory=m, need_x=True, need_weight=True, hardware=hw)
           for m in M.SETTINGS}
    assert got["fast"].mode == "rows"
    assert got["fast"].work_bytes >= got["balanced"].work_bytes >= got["compact"].work_bytes
    assert got["fast"].seconds <= got["balanced"].seconds <= got["compact"].seconds
    full = LLAMA8B["vocab"] * LLAMA8B["hidden"] * 2
    if n * LLAMA8B["hidden"] * 4 < full:            # the dx accumulator leaves room
        assert got["balanced"].work_bytes <= full


def test_an_explicit_budget_is_met_or_refused():
    for budget in (256 << 20, 1 * GiB, 3 * GiB):
        p = M.plan(8192, **LLAMA8B, memory=budget, need_x=True, need_weight=True,
                   hardware=gpu("h100"))
        assert p.work_bytes <= budget
    with pytest.raises(ValueError, match=r"memory=1000 bytes is below the least"):
        M.plan(8192, **LLAMA8B, memory=1000, need_x=True, need_weight=True,
               hardware=gpu("h100"))


def test_a_frozen_head_has_no_weight_accumulator_and_smaller_blocks():
    """LoRA on the body: no dW, so no float32 accumulator and (the per-chunk
    traffic being only the weight's reads) smaller blocks for the same overhead."""
    frozen = M.plan(2048, vocab=128256, hidden=2048, dtype=torch.bfloat16, memory="fast",
                    need_x=True, need_weight=False, hardware=CPU)
    trained = M.plan(2048, vocab=128256, hidden=2048, dtype=torch.bfloat16, memory="fast",
                     need_x=True, need_weight=True, hardware=CPU)
    assert frozen.mode == "rows" and frozen.rows < trained.rows
    # the block and the chunk's dx (and its sum), no accumulator
    assert frozen.work_bytes == frozen.rows * (128256 + 2 * 2048) * 2 < trained.work_bytes


def test_vocabulary_shards_keep_to_rows():
    p = M.plan(8192, **LLAMA8B, memory="compact", need_x=True, need_weight=True,
               hardware=gpu("h100"), slabs_allowed=False)
    assert p.mode == "rows"


def _check(p, opts, backend, memory, plans, want_mode, tol=1e-10):
    args = [p["hidden"], p["weight"], p.get("bias")]
    want, wm = ref.iq_loss(*args[:2], p["targets"], bias=args[2], return_metrics=True,
                           **{k: v for k, v in opts.items() if k not in ("position_ids",)},
                           position_ids=opts.get("position_ids"))
    got, m = fastirl.iq_loss(*args[:2], p["targets"], bias=args[2], backend=backend,
                             memory=memory, return_metrics=True, **opts)
    # "fast" is the backend's own chunking: no plan to make
    assert (plans[-1].mode if plans else None) == want_mode, plans
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for k in wm:
        torch.testing.assert_close(m[k], wm[k], rtol=tol, atol=tol, msg=k)
    for a, b in zip(grads(got, args), grads(want, args)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [
    {}, dict(td_weight=0.7, gamma=0.9, softcap=3.0, temperature=0.6),
    dict(divergence="kl", value_term="v0", lse_square_scale=0.1, token_scaling=True),
    dict(ce_weight="random", detach_next_value=True),
    dict(label_smoothing=0.2, td_weight=0.3, softcap=4.0)],
    ids=["default", "capped", "kl", "weights", "smoothing"])
@pytest.mark.parametrize("budget,mode", [(24000, "slabs"), (70000, "slabs"), ("balanced", "rows"),
                                         ("fast", None)])
def test_every_plan_matches_the_reference(backend, opts, budget, mode, plans):
    p = make_batch(3, 11, 8, 700, dtype=torch.float64, bias=True, packed=True)
    opts = dict(opts, position_ids=p["position_ids"])
    if opts.get("ce_weight") == "random":
        opts["ce_weight"] = torch.rand(700, dtype=torch.float64) + 0.5
    _check(p, opts, backend, budget, plans, mode)


def test_slab_plan_low_precision_no_worse_than_naive(plans):
    """bf16: the slabs plan's dx sums one rounded partial per slab in float32;
    its error stays at the naive bf16 computation's."""
    p = make_batch(4, 33, 64, 2049, dtype=torch.bfloat16, seed=5)
    args = [p["hidden"], p["weight"]]
    exact = [t.detach().double().requires_grad_() for t in args]
    truth = ref.iq_loss(*exact, p["targets"], td_weight=0.3)
    naive = ref.iq_loss(*args, p["targets"], td_weight=0.3)
    ours = fastirl.iq_loss(*args, p["targets"], td_weight=0.3, memory=200_000)
    assert plans[-1].mode == "slabs" and plans[-1].slab < 2049
    err = lambda a, b: (a.double() - b).norm().item()  # noqa: E731
    for o, n, t in zip(grads(ours, args), grads(naive, args), grads(truth, exact)):
        assert err(o, t) <= 1.1 * err(n, t) + 1e-6 * t.norm().item()
    assert err(ours, truth) <= err(naive, truth)


def test_memory_option_is_validated():
    p = make_batch(2, 3, 4, 11)
    for bad, exc in (("huge", ValueError), (0, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="memory"):
            fastirl.iq_loss(p["hidden"], p["weight"], p["targets"], memory=bad)
