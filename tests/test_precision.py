"""Low-precision inputs: the error against float64 truth must be no worse than
the naive computation's own error in that dtype (plus a small margin)."""

import pytest
import torch

import fastirl
from fastirl import reference as ref
from _problems import grads, make_batch


def _errors(dtype, backend, preset, **opts):
    p = make_batch(4, 33, 64, 517, dtype=dtype, bias=True, seed=3)
    inputs = [p["hidden"], p["weight"], p["bias"]]
    exact = [t.detach().double().requires_grad_() for t in inputs]
    truth = ref.iq_loss(*exact[:2], p["targets"], bias=exact[2], **opts)
    truth_g = grads(truth, exact)
    naive = ref.iq_loss(*inputs[:2], p["targets"], bias=inputs[2], **opts)
    naive_g = grads(naive, inputs)
    ours = fastirl.iq_loss(*inputs[:2], p["targets"], bias=inputs[2], backend=backend,
                           preset=preset, chunk_size=16, **opts)
    ours_g = grads(ours, inputs)
    assert ours.dtype == torch.float32 and all(g.dtype == dtype for g in ours_g)

    def err(x, y):
        return (x.double() - y).norm().item()

    return ([err(ours, truth)] + [err(g, t) for g, t in zip(ours_g, truth_g)],
            [err(naive, truth)] + [err(g, t) for g, t in zip(naive_g, truth_g)],
            [truth.abs().item()] + [t.norm().item() for t in truth_g])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset", ["default", "highest"])
@pytest.mark.parametrize("opts", [{}, dict(td_weight=0.5, gamma=0.9, softcap=4.0)])
def test_low_precision_no_worse_than_naive(dtype, preset, opts):
    ours, naive, scale = _errors(dtype, "torch", preset, **opts)
    eps = torch.finfo(dtype).eps
    for name, o, n, s in zip(["loss", "dhidden", "dweight", "dbias"], ours, naive, scale):
        assert o <= 1.1 * n + 0.05 * eps * s, (name, o, n)


def test_highest_preset_gives_float32_accurate_rewards():
    """Rewards come back in float32: "highest" computes them from exact logits of
    the bf16 values, "default" from bf16-rounded logits (the naive error level)."""
    p = make_batch(2, 9, 64, 300, dtype=torch.bfloat16, requires_grad=False)
    args = (p["hidden"], p["weight"], p["targets"])
    truth = ref.implicit_rewards(*(t.double() for t in args[:2]), args[2])
    naive = ref.implicit_rewards(*args).double()
    highest = fastirl.implicit_rewards(*args, preset="highest")
    default = fastirl.implicit_rewards(*args, preset="default")
    assert highest.dtype == default.dtype == torch.float32
    assert (highest.double() - truth).abs().max() <= 1e-5 * truth.abs().max()
    assert (default.double() - truth).norm() <= 1.1 * (naive - truth).norm()
