"""What a user coming from F.cross_entropy, F.linear_cross_entropy, Liger's fused
linear cross-entropy or Cut Cross-Entropy relies on: autocast, float32-accurate
outputs, the peers' options, and errors never larger than the naive computation's.

Precision rule (the peers' own): for each dtype, fastirl's error against a
float64 truth is no larger than the naive computation's error in that dtype
(element by element for per-token losses, in norm for gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastirl
from fastirl import reference as ref
from _problems import grads, make_batch

BACKENDS = [b for b in fastirl.available_backends("cpu") if b != "triton"]
LOW = [torch.bfloat16, torch.float16]


def _err(a, b) -> float:
    return (a.double() - b.double()).norm().item()


# ------------------------------------------------------------------ autocast


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("opts", [dict(td_weight=0.0), dict(td_weight=0.3, gamma=0.9),
                                  dict(td_weight=0.3, softcap=5.0)], ids=["ce", "iq", "capped"])
@pytest.mark.parametrize("bias", [False, True])
def test_autocast_matches_the_naive_loss_under_the_same_autocast(backend, dtype, opts, bias):
    """float32 hidden and weight under autocast: the GEMMs run in the autocast
    dtype (as F.linear's), the loss comes back in float32, the gradients in
    float32, and all are as close to float64 truth as the naive loss under the
    same autocast."""
    if backend not in fastirl.available_backends("cpu"):
        pytest.skip(f"{backend} does not load here")
    small = backend == "triton"               # the interpreter is slow
    p = make_batch(2, 5 if small else 17, 16 if small else 48, 33 if small else 301,
                   dtype=torch.float32, bias=bias, seed=7)
    args = [p["hidden"], p["weight"], p.get("bias")]
    leaves = [t for t in args if t is not None]
    exact = [t.detach().double().requires_grad_() for t in leaves]
    truth = ref.iq_loss(exact[0], exact[1], p["targets"], bias=exact[2] if bias else None, **opts)
    with torch.autocast("cpu", dtype=dtype):
        naive = ref.iq_loss_from_logits(F.linear(*args).float(), p["targets"], **opts)
        ours = fastirl.iq_loss(*args[:2], p["targets"], bias=args[2], backend=backend,
                               chunk_size=16, **opts)
    assert ours.dtype == torch.float32
    og, ng, tg = grads(ours, leaves), grads(naive, leaves), grads(truth, exact)
    assert all(g.dtype == torch.float32 for g in og)
    eps = torch.finfo(dtype).eps
    assert _err(ours, truth) <= 1.1 * _err(naive, truth) + eps * abs(truth.item())
    # (the interpreter's tiny shape has ~10 rows: ulp-level noise decides there)
    margin = (1.0 if small else 0.05) * eps
    for name, o, n, t in zip(["hidden", "weight", "bias"], og, ng, tg):
        assert _err(o, t) <= 1.1 * _err(n, t) + margin * t.norm().item(), name


def test_autocast_mixed_dtypes_are_accepted_only_under_autocast():
    p = make_batch(2, 4, 8, 11, dtype=torch.float32)
    h = p["hidden"].detach().bfloat16().requires_grad_()
    with pytest.raises(TypeError, match="weight dtype"):
        fastirl.iq_loss(h, p["weight"], p["targets"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fastirl.iq_loss(h, p["weight"], p["targets"])
    loss.backward()
    assert h.grad.dtype == torch.bfloat16 and p["weight"].grad.dtype == torch.float32


def test_autocast_under_torch_compile():
    p = make_batch(2, 5, 8, 13, dtype=torch.float32)

    def step(h, w, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fastirl.iq_loss(h, w, t, td_weight=0.2)

    want = step(p["hidden"], p["weight"], p["targets"])
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(
        p["hidden"], p["weight"], p["targets"])
    torch.testing.assert_close(got, want)
    for a, b in zip(grads(got, [p["hidden"], p["weight"]]),
                    grads(want, [p["hidden"], p["weight"]])):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ outputs in float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
def test_per_token_losses_are_float32_accurate(backend, dtype):
    """reduction="none" in bf16 / fp16 inputs: every per-token loss is at most as
    far from the truth (float64 of the same low-precision inputs) as the
    naive float32 computation from the low-precision logits, element by element
    up to its own float32 rounding, and far better than rounding to the input dtype."""
    p = make_batch(3, 21, 64, 509, dtype=dtype, seed=11, requires_grad=False)
    h, w, t = p["hidden"], p["weight"], p["targets"]
    truth = ref.iq_loss(h.double(), w.double(), t, reduction="none", td_weight=0.2)
    naive32 = ref.iq_loss_from_logits(F.linear(h, w).float(), t, reduction="none", td_weight=0.2)
    ours = fastirl.iq_loss(h, w, t, reduction="none", td_weight=0.2, backend=backend,
                           preset="highest")
    assert ours.dtype == torch.float32
    err = (ours.double() - truth).abs()
    scale = truth.abs().max().item()
    assert (err <= 1e-5 * scale).all()           # float32-accurate
    rounded = (truth.to(dtype).double() - truth).abs()
    assert err.mean() < 0.1 * rounded[rounded > 0].mean()
    default = fastirl.iq_loss(h, w, t, reduction="none", td_weight=0.2, backend=backend)
    assert ((default.double() - truth).abs()
            <= 1.5 * (naive32.double() - truth).abs() + 1e-5 * scale).all()


def test_logged_loss_is_not_rounded():
    p = make_batch(2, 9, 32, 257, dtype=torch.bfloat16, seed=3, requires_grad=False)
    loss = fastirl.iq_loss(p["hidden"], p["weight"], p["targets"], td_weight=0.0)
    ce = F.cross_entropy(F.linear(p["hidden"], p["weight"]).float().flatten(0, 1),
                         p["targets"].flatten())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ce, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the peers' options


def _ce_case(dtype=torch.float64):
    p = make_batch(3, 13, 16, 41, dtype=dtype, seed=5)
    logits = F.linear(p["hidden"], p["weight"])
    return p, logits.flatten(0, 1), p["targets"].flatten()


def test_class_weights_are_cross_entropys():
    p, z, t = _ce_case()
    w = torch.rand(41, dtype=torch.float64) + 0.1
    want = F.cross_entropy(z, t, weight=w)
    got = fastirl.iq_loss(p["hidden"], p["weight"], p["targets"], td_weight=0.0, ce_weight=w)
    torch.testing.assert_close(got, want)
    for a, b in zip(grads(got, [p["hidden"], p["weight"]]), grads(want, [p["hidden"], p["weight"]])):
        torch.testing.assert_close(a, b)
    none = fastirl.iq_loss(p["hidden"], p["weight"], p["targets"], td_weight=0.0, ce_weight=w,
                           reduction="none")
    torch.testing.assert_close(none.flatten(), F.cross_entropy(z, t, weight=w, reduction="none"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_label_smoothing_is_cross_entropys(backend, reduction):
    """td_weight=0 with label_smoothing=eps is F.cross_entropy(label_smoothing=eps),
    loss and gradients, through the linear and the logits entries."""
    p, z, t = _ce_case()
    want = F.cross_entropy(z, t, label_smoothing=0.15, reduction=reduction)
    got = fastirl.iq_loss(p["hidden"], p["weight"], p["targets"], td_weight=0.0,
                          label_smoothing=0.15, reduction=reduction, backend=backend)
    torch.testing.assert_close(got.flatten(), want.flatten())
    up = torch.rand_like(want, dtype=torch.float64)          # non-scalar upstream gradient
    ins = [p["hidden"], p["weight"]]
    for a, b in zip(torch.autograd.grad((got.flatten() * up.flatten()).sum(), ins),
                    torch.autograd.grad((want.flatten() * up.flatten()).sum(), ins)):
        torch.testing.assert_close(a, b)
    zz = z.detach().requires_grad_()
    lg = fastirl.iq_loss_from_logits(zz.view(3, 13, 41), p["targets"], td_weight=0.0,
                                     label_smoothing=0.15, reduction=reduction)
    torch.testing.assert_close(lg.flatten(), want.flatten())


def test_z_loss_is_lse_squared():
    p, z, t = _ce_case()
    m = t != -100
    lse = torch.logsumexp(z, -1)
    want = F.cross_entropy(z, t) + 1e-3 * (lse[m] ** 2).mean()
    got, metrics = fastirl.iq_loss(p["hidden"], p["weight"], p["targets"], td_weight=0.0,
                                   lse_square_scale=1e-3, return_metrics=True)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(metrics["z_loss"], 1e-3 * (lse[m] ** 2).mean())
    for a, b in zip(grads(got, [p["hidden"], p["weight"]]), grads(want, [p["hidden"], p["weight"]])):
        torch.testing.assert_close(a, b)


def test_token_scaling_is_dft():
    """Dynamic fine-tuning: each token's loss times its detached target probability."""
    p, z, t = _ce_case()
    m = t != -100
    nll = F.cross_entropy(z, t, reduction="none")
    want = (nll * torch.exp(-nll).detach())[m].sum() / m.sum()
    got = fastirl.iq_loss(p["hidden"], p["weight"], p["targets"], td_weight=0.0,
                          token_scaling=True)
    torch.testing.assert_close(got, want)
    for a, b in zip(grads(got, [p["hidden"], p["weight"]]), grads(want, [p["hidden"], p["weight"]])):
        torch.testing.assert_close(a, b)


def test_predictions_are_the_argmax_tokens():
    p, z, t = _ce_case()
    _, out = fastirl.iq_loss(p["hidden"], p["weight"], p["targets"], return_predictions=True)
    want = torch.where(p["targets"] != -100, F.linear(p["hidden"], p["weight"]).argmax(-1), -100)
    assert torch.equal(out["predicted"], want)
    acc = (out["predicted"] == p["targets"])[p["targets"] != -100].double().mean()
    _, metrics = fastirl.iq_loss(p["hidden"], p["weight"], p["targets"], return_metrics=True)
    torch.testing.assert_close(metrics["accuracy"], acc)


def test_tied_embeddings_train_through_the_embedding():
    """Tied embeddings: pass the shared matrix; its gradient has both paths."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(29, 8).double()
    ids = torch.randint(0, 29, (2, 7))
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    h = emb(ids).tanh()
    fastirl.iq_loss(h, emb.weight, targets, td_weight=0.1).backward()
    got = emb.weight.grad.clone()
    emb.weight.grad = None
    ref.iq_loss(emb(ids).tanh(), emb.weight, targets, td_weight=0.1).backward()
    torch.testing.assert_close(got, emb.weight.grad)


def test_num_items_with_a_sum_is_an_error_not_silence():
    p, _, _ = _ce_case()
    with pytest.raises(ValueError, match="num_items_in_batch.*reduction='sum'"):
        fastirl.iq_loss(p["hidden"], p["weight"], p["targets"], reduction="sum",
                        num_items_in_batch=10)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("dtype", LOW)
def test_cuda_autocast_matches_the_naive_loss(backend, dtype):
    """The same rule on the GPU backends (pytest -m gpu)."""
    if backend not in fastirl.available_backends("cuda"):
        pytest.skip(f"{backend} does not load on this CUDA device")
    p = make_batch(4, 64, 256, 4099, dtype=torch.float32, bias=True, seed=2)
    args = [t.detach().cuda().requires_grad_() for t in (p["hidden"], p["weight"], p["bias"])]
    targets = p["targets"].cuda()
    exact = [t.detach().double().requires_grad_() for t in args]
    truth = ref.iq_loss(exact[0], exact[1], targets, bias=exact[2], td_weight=0.3)
    with torch.autocast("cuda", dtype=dtype):
        naive = ref.iq_loss_from_logits(F.linear(*args).float(), targets, td_weight=0.3)
        ours = fastirl.iq_loss(*args[:2], targets, bias=args[2], backend=backend, td_weight=0.3)
    assert ours.dtype == torch.float32
    eps = torch.finfo(dtype).eps
    assert _err(ours, truth) <= 1.1 * _err(naive, truth) + eps * abs(truth.item())
    for o, n, t in zip(grads(ours, args), grads(naive, args), grads(truth, exact)):
        assert o.dtype == torch.float32
        assert _err(o, t) <= 1.1 * _err(n, t) + 0.05 * eps * t.norm().item()
