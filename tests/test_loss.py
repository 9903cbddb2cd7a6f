"""The engine (backend="torch") against fastirl.reference in float64."""

import functools

import pytest
import torch
import torch.nn.functional as F

import fastirl
from fastirl import engine
from fastirl import reference as ref
from _problems import grads, make_batch, use_op_path

VARIANTS = {
    "default": {},
    "mle": dict(td_weight=0.0),
    "gamma_tau_lambda": dict(gamma=0.9, temperature=0.6, td_weight=0.7),
    "softcap": dict(softcap=2.5, td_weight=0.4),
    "hellinger": dict(divergence="hellinger", td_weight=0.2),
    "js": dict(divergence="js"),
    "kl": dict(divergence="kl"),
    "kl_fix": dict(divergence="kl_fix", gamma=0.95),
    "total_variation": dict(divergence="total_variation"),
    "online_value": dict(is_expert=[True, False, True]),
    "online_regularize": dict(is_expert=[False, True, True], td_rows="all", divergence="js"),
    "online_v0": dict(is_expert=[True, True, False], value_term="v0", gamma=0.8),
    "offline_v0": dict(value_term="v0", gamma=0.9),
    "value_all": dict(value_term="value", td_rows="all"),
    "detach_next": dict(detach_next_value=True, td_weight=1.0),
    "done": dict(done="random", td_weight=0.5),
    "num_items": dict(num_items_in_batch=17),
    "ignore_index": dict(ignore_index=-1),
}


def _options(name, B=3, T=9):
    opts = dict(VARIANTS[name])
    if "is_expert" in opts:
        opts["is_expert"] = torch.tensor(opts["is_expert"][:B])
    if opts.get("done") == "random":
        opts["done"] = torch.rand(B, T, generator=torch.Generator().manual_seed(1)) < 0.3
    return opts


def _problem(name, **kw):
    p = make_batch(**kw)
    opts = _options(name, *p["targets"].shape)
    if opts.get("ignore_index") == -1:
        p["targets"] = torch.where(p["targets"] == -100, -1, p["targets"])
    return p, opts


def _check(p, opts, reduction="mean", upstream=None, tol=1e-10, **engine_kw):
    inputs = [p["hidden"], p["weight"], p.get("bias")]
    kw = dict(opts, bias=p.get("bias"), position_ids=p.get("position_ids"), reduction=reduction)
    want = ref.iq_loss(p["hidden"], p["weight"], p["targets"], **kw)
    got = fastirl.iq_loss(p["hidden"], p["weight"], p["targets"], backend="torch", **kw,
                          **engine_kw)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    if upstream is None and reduction == "none":
        upstream = torch.randn(want.shape, dtype=want.dtype)
    for g, w in zip(grads(got, inputs, upstream), grads(want, inputs, upstream)):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


@pytest.mark.parametrize("name,reduction", [
    (name, reduction) for name in VARIANTS for reduction in ("mean", "sum", "none")
    if name != "num_items" or reduction == "mean"])     # num_items only enters "mean"
def test_variants_match_reference(name, reduction):
    p, opts = _problem(name, bias=True)
    _check(p, opts, reduction)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 64])
@pytest.mark.parametrize("name", ["default", "gamma_tau_lambda", "online_v0", "done", "softcap"])
@pytest.mark.parametrize("single_pass", [True, False])
def test_chunking_and_modes(monkeypatch, chunk_size, name, single_pass):
    """Chunk boundaries (look-ahead row, carried coefficient) in both engine modes."""
    monkeypatch.setattr(engine, "run_linear",
                        functools.partial(engine.run_linear, single_pass=single_pass))
    p, opts = _problem(name, B=2, T=11, V=29, packed=True, ignore_frac=0.1)
    _check(p, opts, chunk_size=chunk_size)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 5, 3, 2), (4, 3, 7, 101), (2, 17, 5, 3)])
def test_odd_shapes(shape):
    B, T, H, V = shape
    p = make_batch(B, T, H, V, prompt=0, pad_last=False)
    _check(p, {"td_weight": 0.5, "gamma": 0.9}, chunk_size=3)


def test_flattened_rows_need_their_sequences_when_rows_couple():
    """(N, H) input cannot silently bootstrap across sequences: with a TD term it
    needs position_ids (or done); cross-entropy reads rows on their own."""
    p = make_batch(2, 10, 6, 13)
    h, t = p["hidden"].flatten(0, 1), p["targets"].flatten()
    with pytest.raises(ValueError, match=r"(?s)flattened \(N,\) targets with td_weight > 0.*"
                                         r"position_ids"):
        fastirl.iq_loss(h, p["weight"], t)
    for bad in (dict(divergence="kl", td_weight=0.0), dict(value_term="v0", td_weight=0.0)):
        with pytest.raises(ValueError, match="flattened"):
            fastirl.iq_loss(h, p["weight"], t, **bad)
    with pytest.raises(ValueError, match="implicit rewards"):
        fastirl.implicit_rewards(h, p["weight"], t)
    pos = torch.arange(10).repeat(2)
    flat = fastirl.iq_loss(h, p["weight"], t, position_ids=pos, reduction="none")
    batched = fastirl.iq_loss(p["hidden"], p["weight"], p["targets"], reduction="none")
    assert flat.shape == (20,)
    torch.testing.assert_close(flat, batched.flatten())
    one = fastirl.iq_loss(p["hidden"][0], p["weight"], p["targets"][0],
                          position_ids=torch.arange(10), reduction="none")
    torch.testing.assert_close(one, batched[0])
    ce = fastirl.iq_loss(h, p["weight"], t, td_weight=0.0)          # no coupling: no error
    torch.testing.assert_close(ce, fastirl.iq_loss(p["hidden"], p["weight"], p["targets"],
                                                   td_weight=0.0))
    assert fastirl.iq_loss(h, p["weight"], t, gamma=0.0).isfinite()  # gamma = 0: no coupling


def test_packed_sequences_do_not_bootstrap_across_boundaries():
    p = make_batch(2, 12, 6, 19, packed=True, ignore_frac=0.0, prompt=0, pad_last=False)
    _check(p, {"td_weight": 1.0})
    # The same rows unpacked into separate sequences give the same per-row losses.
    pos = p["position_ids"][0]
    cut = int((pos == 0).nonzero()[1])
    h, t = p["hidden"][:1].detach(), p["targets"][:1]
    packed = fastirl.iq_loss(h, p["weight"].detach(), t, reduction="none", td_weight=1.0,
                             position_ids=pos[None])
    first = fastirl.iq_loss(h[:, :cut], p["weight"].detach(), t[:, :cut], reduction="none",
                            td_weight=1.0)
    second = fastirl.iq_loss(h[:, cut:], p["weight"].detach(), t[:, cut:], reduction="none",
                             td_weight=1.0)
    torch.testing.assert_close(packed, torch.cat([first, second], 1))


def test_last_real_token_never_bootstraps_from_padding():
    """The public-code pitfall: V of a padding row must not enter the last action."""
    p = make_batch(1, 6, 4, 9, prompt=0, ignore_frac=0.0, pad_last=False, requires_grad=False)
    p["targets"][0, 4:] = -100
    r = fastirl.implicit_rewards(p["hidden"], p["weight"], p["targets"])
    z = p["hidden"][0] @ p["weight"].T
    assert torch.allclose(r[0, 3], z[3, p["targets"][0, 3]])     # terminal: r = q
    assert torch.all(r[0, 4:] == 0)


def test_mle_equals_cross_entropy_float32():
    p = make_batch(dtype=torch.float32, V=211, H=32)
    loss = fastirl.iq_loss(p["hidden"], p["weight"], p["targets"], td_weight=0.0)
    ce = F.cross_entropy(F.linear(p["hidden"], p["weight"]).flatten(0, 1),
                         p["targets"].flatten())
    torch.testing.assert_close(loss, ce, atol=1e-6, rtol=1e-6)
    for g, w in zip(grads(loss, [p["hidden"], p["weight"]]), grads(ce, [p["hidden"], p["weight"]])):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


# phi'(r) of the other divergences is a stop-gradient weight, so their analytic
# gradient is by definition not the numerical derivative of the loss value.
@pytest.mark.parametrize("name", ["default", "softcap", "online_v0", "done", "gamma_tau_lambda"])
def test_gradcheck(name):
    p, opts = _problem(name, B=3, T=4, H=3, V=5, bias=True)
    opts.setdefault("td_weight", 0.5)
    inputs = (p["hidden"], p["weight"], p["bias"])

    def f(h, w, b):
        return fastirl.iq_loss(h, w, p["targets"], bias=b, reduction="none", chunk_size=2, **opts)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("name", ["default", "gamma_tau_lambda", "softcap", "online_value"])
def test_metrics_match_reference(name):
    p, opts = _problem(name)
    got_loss, got = fastirl.iq_loss(p["hidden"], p["weight"], p["targets"], return_metrics=True,
                                    chunk_size=4, **opts)
    want_loss, want = ref.iq_loss(p["hidden"], p["weight"], p["targets"], return_metrics=True,
                                  **opts)
    torch.testing.assert_close(got_loss, want_loss)
    assert set(got) == {"nll", "td_penalty", "reward", "value", "entropy", "accuracy", "z_loss"}
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)
        assert not got[k].requires_grad


@pytest.mark.parametrize("kw", [{}, dict(gamma=0.8, temperature=0.5, softcap=3.0),
                                dict(done="random")])
def test_implicit_rewards(kw):
    p = make_batch(bias=True, packed=True, requires_grad=False)
    if kw.get("done") == "random":
        kw = dict(done=torch.rand(3, 9, generator=torch.Generator().manual_seed(2)) < 0.3)
    args = (p["hidden"], p["weight"], p["targets"])
    got = fastirl.implicit_rewards(*args, bias=p["bias"], position_ids=p["position_ids"],
                                   chunk_size=4, **kw)
    want = ref.implicit_rewards(*args, bias=p["bias"], position_ids=p["position_ids"], **kw)
    torch.testing.assert_close(got, want)


def test_all_ignored_batch_is_zero_with_zero_gradients():
    p = make_batch(dtype=torch.float32)
    t = torch.full_like(p["targets"], -100)
    for reduction in ("mean", "sum"):
        loss = fastirl.iq_loss(p["hidden"], p["weight"], t, reduction=reduction)
        assert loss.item() == 0.0
        for g in grads(loss, [p["hidden"], p["weight"]]):
            assert torch.count_nonzero(g) == 0
    loss, m = fastirl.iq_loss(p["hidden"], p["weight"], t, return_metrics=True)
    assert all(torch.isfinite(v) for v in m.values())


def test_nonfinite_hidden_gives_nan_not_crash():
    p = make_batch(dtype=torch.float32, prompt=0, ignore_frac=0.0)
    h = p["hidden"].detach().clone()
    h[0, 0, 0] = float("nan")
    loss = fastirl.iq_loss(h, p["weight"], p["targets"])
    assert torch.isnan(loss)
    h[0, 0, 0] = float("inf")
    assert not torch.isfinite(fastirl.iq_loss(h, p["weight"], p["targets"]))


def test_weight_frozen_and_hidden_frozen():
    p = make_batch()
    w = p["weight"].detach()
    loss = fastirl.iq_loss(p["hidden"], w, p["targets"])
    (dh,) = grads(loss, [p["hidden"]])
    want = ref.iq_loss(p["hidden"], w, p["targets"])
    torch.testing.assert_close(dh, grads(want, [p["hidden"]])[0])
    h = p["hidden"].detach()
    loss = fastirl.iq_loss(h, p["weight"], p["targets"])
    torch.testing.assert_close(grads(loss, [p["weight"]])[0],
                               grads(ref.iq_loss(h, p["weight"], p["targets"]), [p["weight"]])[0])


def test_scalar_upstream_gradient_scales_single_pass():
    p = make_batch()
    inputs = [p["hidden"], p["weight"]]
    loss = fastirl.iq_loss(p["hidden"], p["weight"], p["targets"])
    want = ref.iq_loss(p["hidden"], p["weight"], p["targets"])
    for g, w in zip(grads(3.5 * loss, inputs), grads(3.5 * want, inputs)):
        torch.testing.assert_close(g, w)


def test_no_grad_forward_matches():
    p = make_batch()
    with torch.no_grad():
        got = fastirl.iq_loss(p["hidden"], p["weight"], p["targets"])
    torch.testing.assert_close(got, ref.iq_loss(p["hidden"], p["weight"], p["targets"]).detach())


def test_modules():
    p = make_batch(bias=True)
    mod = fastirl.LinearIQLoss(td_weight=0.3, gamma=0.9)
    got = mod(p["hidden"], p["weight"], p["targets"], bias=p["bias"])
    want = ref.iq_loss(p["hidden"], p["weight"], p["targets"], bias=p["bias"], td_weight=0.3,
                       gamma=0.9)
    torch.testing.assert_close(got, want)
    logits = F.linear(p["hidden"], p["weight"], p["bias"])
    torch.testing.assert_close(fastirl.IQLoss(td_weight=0.3, gamma=0.9)(logits, p["targets"]), want)
    assert "td_weight=0.3" in repr(mod)
    with pytest.raises(ValueError, match="gamma"):
        fastirl.LinearIQLoss(gamma=2.0)



# ------------------------------------------------------------------ backward twice

CPU_BACKENDS = fastirl.available_backends("cpu")


def _loss_fn(entry, reduction, backend):
    """(fastirl loss, reference loss, leaves): closures building a fresh graph."""
    p = make_batch(B=2, T=7, H=5, V=13, dtype=torch.float32, bias=True)
    up = torch.randn(2, 7, generator=torch.Generator().manual_seed(3))
    kw = dict(reduction=reduction, td_weight=0.4, gamma=0.9)
    reduce = (lambda loss: (loss * up).sum()) if reduction == "none" else (lambda loss: loss)
    if entry == "linear":
        args = (p["hidden"], p["weight"], p["targets"])
        return (lambda: reduce(fastirl.iq_loss(*args, bias=p["bias"], backend=backend, **kw)),
                lambda: reduce(ref.iq_loss(*args, bias=p["bias"], **kw)),
                [p["hidden"], p["weight"], p["bias"]])
    logits = F.linear(p["hidden"], p["weight"]).detach().requires_grad_()
    return (lambda: reduce(fastirl.iq_loss_from_logits(logits, p["targets"], backend=backend,
                                                       **kw)),
            lambda: reduce(ref.iq_loss_from_logits(logits, p["targets"], **kw)), [logits])


@pytest.fixture(params=["eager", "op"])
def path(request, monkeypatch):
    if request.param == "op":
        use_op_path(monkeypatch)
    return request.param


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("entry,reduction", [("linear", "mean"), ("linear", "none"),
                                             ("logits", "sum"), ("logits", "none")])
def test_backward_twice_with_retain_graph(path, backend, entry, reduction):
    """retain_graph=True keeps what backward needs: the second backward adds the
    same gradients again (combined losses, gradient penalties)."""
    loss_fn, ref_fn, leaves = _loss_fn(entry, reduction, backend)
    want = grads(ref_fn(), leaves)
    loss = loss_fn()
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    loss.backward()
    for t, g, w in zip(leaves, first, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(t.grad, 2 * w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("entry,reduction", [("linear", "mean"), ("linear", "none"),
                                             ("logits", "mean")])
def test_autograd_grad_then_backward(path, backend, entry, reduction):
    loss_fn, ref_fn, leaves = _loss_fn(entry, reduction, backend)
    want = grads(ref_fn(), leaves)
    # Retained: autograd.grad, then backward, both give the gradients.
    loss = loss_fn()
    got = torch.autograd.grad(loss, leaves, retain_graph=True)
    loss.backward()
    for g, t, w in zip(got, leaves, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(t.grad, w, atol=1e-5, rtol=1e-4)
    # Not retained: autograd's own error that says what to do, never an internal one.
    loss = loss_fn()
    torch.autograd.grad(loss, leaves)
    with pytest.raises(RuntimeError, match="backward through the graph a second time.*"
                                           "retain_graph=True"):
        loss.backward()


def test_two_losses_of_one_graph_combine(path):
    """A loss used twice in one objective: its upstream gradients add up."""
    loss_fn, ref_fn, leaves = _loss_fn("linear", "mean", "torch")
    loss = loss_fn()
    got = grads(loss + 2.0 * loss.square(), leaves)
    want_loss = ref_fn()
    want = grads(want_loss + 2.0 * want_loss.square(), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
