"""Fuzz harness over the public API (hypothesis).

Every entry point (iq_loss, iq_loss_from_logits, implicit_rewards, LinearIQLoss,
IQLoss), every backend that loads on the CPU here (torch, the native "cpu"
extension, Triton under the interpreter with tiny shapes), both call paths (the
eager engine and the torch.library op of the traced path), random shapes
(B = 0, T = 0, T = 1, V = 1, odd H), dtypes, layouts (non-contiguous, expanded,
transposed, storage-offset views), every option, valid and invalid values.

Property: a valid call returns what fastirl.reference computes in float64 (loss,
metrics, gradients with a random upstream gradient) within the dtype's
tolerance, and the same call on meta tensors returns the same shapes and dtypes;
an invalid call raises ValueError / TypeError whose message names the argument.

CI runs a few hundred examples (derandomised, well under a minute); set
FASTIRL_FUZZ_EXAMPLES=N for N examples per test with fresh random draws.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastirl
from fastirl import reference as ref
from _problems import use_op_path

_N = os.environ.get("FASTIRL_FUZZ_EXAMPLES")


def _settings(ci_examples: int):
    return settings(max_examples=int(_N) if _N else ci_examples, deadline=None,
                    derandomize=_N is None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


BACKENDS = fastirl.available_backends("cpu")
FAST_BACKENDS = [b for b in BACKENDS if b != "triton"]   # Triton runs interpreted: slow
# (device, backend) pairs of the main tests: the CPU's, and every CUDA backend
# where a CUDA device is present.
TARGETS = [("cpu", b) for b in FAST_BACKENDS]
if torch.cuda.is_available():
    TARGETS += [("cuda", b) for b in fastirl.available_backends("cuda")]
ENTRIES = ("iq_loss", "iq_loss_from_logits", "implicit_rewards", "LinearIQLoss", "IQLoss")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Tolerance relative to the largest reference value (low precision: the GEMMs and
# the results round to the input dtype).
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
LAYOUTS = ("contiguous", "strided", "offset", "expanded", "transposed")
METRICS = ("nll", "td_penalty", "reward", "value", "entropy", "accuracy", "z_loss")


# ------------------------------------------------------------------ cases


@st.composite
def cases(draw, targets=tuple(TARGETS), tiny=False):
    """A call as plain values; tensors are built from them by :func:`build`."""
    entry = draw(st.sampled_from(ENTRIES))
    top = 2 if tiny else 3
    device, backend = draw(st.sampled_from(targets))
    case = dict(
        entry=entry, device=device, backend=backend,
        path=draw(st.sampled_from(("eager", "op"))),
        B=draw(st.integers(0, top)), T=draw(st.integers(0, 3 if tiny else 7)),
        H=draw(st.integers(1, 6 if tiny else 11)), V=draw(st.integers(1, 9 if tiny else 17)),
        flat=draw(st.booleans()), dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2 ** 16)),
        ignore_frac=draw(st.sampled_from((0.0, 0.3, 0.6, 1.0))),
        ignore_index=draw(st.sampled_from((-100, -1, 0))),
        layout={k: draw(st.sampled_from(LAYOUTS))
                for k in ("main", "weight", "bias", "targets", "position_ids")},
        bias=draw(st.booleans()), packed=draw(st.booleans()), done=draw(st.booleans()),
        online=draw(st.booleans()),
        gamma=draw(st.sampled_from((1.0, 0.0, 0.9, 0.37))),
        td_weight=draw(st.sampled_from((0.1, 0.0, 1.3))),
        temperature=draw(st.sampled_from((1.0, 0.5, 2.5))),
        softcap=draw(st.sampled_from((None, None, 0.8, 5.0))),
        as_tensors=draw(st.booleans()),
        divergence=draw(st.sampled_from(fastirl.DIVERGENCES)),
        reduction=draw(st.sampled_from(("mean", "sum", "none"))),
        value_term=draw(st.sampled_from((None, "value_expert", "value", "v0"))),
        td_rows=draw(st.sampled_from(("expert", "all"))),
        detach_next_value=draw(st.booleans()),
        num_items=draw(st.sampled_from((None, None, 5, 2.5, "tensor"))),
        chunk_size=draw(st.sampled_from((None, 1, 2, 3, 64))),
        preset=draw(st.sampled_from(tuple(fastirl.PRESETS))),
        lse_square_scale=draw(st.sampled_from((0.0, 0.0, 0.3))),
        label_smoothing=draw(st.sampled_from((0.0, 0.0, 0.2))),
        token_scaling=draw(st.booleans()),
        ce_weight=draw(st.sampled_from((False, False, True))),
        metrics=draw(st.booleans()), predictions=draw(st.booleans()),
        upstream=draw(st.sampled_from((1.0, -1.7))),
        meta=draw(st.booleans()),
        # flat rows: say they are one sequence (position_ids = arange), or say nothing
        one_sequence=draw(st.booleans()),
    )
    if case["flat"]:
        case["B"] = 1
    if case["ce_weight"]:
        case["label_smoothing"] = 0.0        # not supported together (a clear error)
    if case["reduction"] != "mean":
        case["num_items"] = None             # replaces mean's normaliser only (else an error)
    low_precision = case["dtype"] in (torch.bfloat16, torch.float16)
    if low_precision and case["divergence"] in ("hellinger", "js"):
        # phi' of these has a pole (r = -1, r = -log 2): the rounding of low-precision
        # logits moves r across it, so no tolerance is meaningful there.
        case["divergence"] = "chi2"
    return case


def _layout(base: torch.Tensor, kind: str, grad: bool):
    """(leaf, view): ``view`` has base's shape and values in the given layout and is
    a differentiable function of ``leaf`` (gradients are compared on the leaf)."""
    shape = tuple(base.shape)
    if kind == "strided" and base.dim() >= 1:
        leaf = base.new_zeros(*shape[:-1], 2 * shape[-1])
        leaf[..., ::2] = base
        fn = lambda x: x[..., ::2]  # noqa: E731
    elif kind == "offset":
        leaf = torch.cat([base.new_zeros(3), base.reshape(-1)])
        fn = lambda x: x[3:].view(shape)  # noqa: E731
    elif kind == "expanded" and base.dim() >= 1 and shape[0] > 0:
        leaf = base[:1].clone()
        fn = lambda x: x.expand(shape)  # noqa: E731
    elif kind == "transposed" and base.dim() >= 2:
        leaf = base.transpose(-1, -2).contiguous()
        fn = lambda x: x.transpose(-1, -2)  # noqa: E731
    else:
        leaf, fn = base.clone(), (lambda x: x)
    if grad:
        leaf.requires_grad_()
    return leaf, fn


def build(case):
    """Tensors of a case: dict with the fastirl inputs, the float64 reference inputs
    and the leaves of both (for gradients)."""
    g = torch.Generator().manual_seed(case["seed"])
    B, T, H, V, dt = case["B"], case["T"], case["H"], case["V"], case["dtype"]
    lead = (T,) if case["flat"] else (B, T)
    entry = case["entry"]
    logits_entry = entry in ("iq_loss_from_logits", "IQLoss")
    grad = entry != "implicit_rewards"
    main = torch.randn(*lead, V if logits_entry else H, generator=g, dtype=torch.float64)
    if logits_entry:
        main = main * 2.0
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / math.sqrt(H)
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    targets = torch.randint(0, V, lead, generator=g)
    ignore = torch.rand(lead, generator=g) < case["ignore_frac"]
    targets[ignore] = case["ignore_index"]
    pos = None
    if case["packed"]:
        pos = torch.randint(0, 3, lead, generator=g)
    elif case["flat"] and case["one_sequence"]:
        pos = torch.arange(T)
    done = torch.rand(lead, generator=g) < 0.3 if case["done"] else None
    is_expert = None
    if case["online"]:
        is_expert = torch.rand(lead[:-1] if not case["flat"] else (1,), generator=g) < 0.6

    fast, refs, leaves = {}, {}, {"fast": [], "ref": []}

    def add(name, value, kind, differentiable):
        low = (value.to(dt) if value.is_floating_point() else value).to(case["device"])
        leaf, fn = _layout(low, kind, differentiable and grad)
        fast[name] = fn(leaf)
        if value.is_floating_point():
            rleaf = leaf.detach().double().requires_grad_(leaf.requires_grad)
            refs[name] = fn(rleaf)
            if leaf.requires_grad:
                leaves["fast"].append(leaf)
                leaves["ref"].append(rleaf)
        else:
            refs[name] = fast[name]

    lay = case["layout"]
    add("main", main, lay["main"], True)
    if not logits_entry:
        add("weight", weight, lay["weight"], True)
        if case["bias"]:
            add("bias", bias, lay["bias"], True)
    add("targets", targets, lay["targets"], False)
    if pos is not None:
        add("position_ids", pos, lay["position_ids"], False)
    for name, t in (("done", done), ("is_expert", is_expert)):
        if t is not None:
            fast[name] = refs[name] = t.to(case["device"])
    return fast, refs, leaves


def options(case):
    """Keyword options of the case for fastirl (hyper-parameters maybe as 0-d
    tensors) and for the reference (numbers)."""
    entry = case["entry"]
    hyper = dict(gamma=case["gamma"], temperature=case["temperature"], softcap=case["softcap"])
    common = dict(ignore_index=case["ignore_index"])
    if entry != "implicit_rewards":
        hyper["td_weight"] = case["td_weight"]
        common.update(divergence=case["divergence"], reduction=case["reduction"],
                      value_term=case["value_term"], td_rows=case["td_rows"],
                      detach_next_value=case["detach_next_value"],
                      lse_square_scale=case["lse_square_scale"],
                      label_smoothing=case["label_smoothing"],
                      token_scaling=case["token_scaling"])
        if case["ce_weight"]:
            g = torch.Generator().manual_seed(case["seed"] + 2)
            common["ce_weight"] = (torch.rand(case["V"], generator=g, dtype=torch.float64)
                                   + 0.25).to(case["device"])
        n = case["num_items"]
        if n is not None:
            common["num_items_in_batch"] = torch.tensor(7) if n == "tensor" else n
    ref_kw = dict(common, **hyper)
    fast_hyper = {k: (torch.tensor(v, dtype=torch.float64) if case["as_tensors"] and v is not None
                      else v) for k, v in hyper.items()}
    fast_kw = dict(common, **fast_hyper, backend=case["backend"], preset=case["preset"],
                   chunk_size=case["chunk_size"])
    if entry != "implicit_rewards":
        fast_kw["return_metrics"] = case["metrics"]
        fast_kw["return_predictions"] = case["predictions"]
    return fast_kw, ref_kw


def couples(case) -> bool:
    """Whether a row's result reads the next row's value (docs/objective.md): then
    flattened rows must say where sequences end."""
    if case["gamma"] == 0.0:
        return False
    if case["entry"] == "implicit_rewards":
        return True
    term = case["value_term"] or ("value" if case["online"] else "value_expert")
    return (case["td_weight"] != 0.0 or case["divergence"] not in ("chi2", "total_variation")
            or term == "v0" or (term == "value" and case["online"]))


def unstructured_flat(case) -> bool:
    """Flattened rows, more than one, with nothing saying where sequences end."""
    return (case["flat"] and case["T"] > 1 and not case["packed"] and not case["one_sequence"]
            and not case["done"])


_PER_BATCH = ("bias", "position_ids", "done", "is_expert", "num_items_in_batch")


def call_fastirl(entry, t, kw):
    kw = dict(kw)
    batch = {k: t[k] for k in ("bias", "position_ids", "done", "is_expert") if k in t}
    if entry == "implicit_rewards":
        batch.pop("is_expert", None)
        return fastirl.implicit_rewards(t["main"], t["weight"], t["targets"], **batch, **kw)
    if entry == "iq_loss":
        return fastirl.iq_loss(t["main"], t["weight"], t["targets"], **batch, **kw)
    if entry == "iq_loss_from_logits":
        return fastirl.iq_loss_from_logits(t["main"], t["targets"], **batch, **kw)
    per_batch = dict(batch, **{k: kw.pop(k) for k in _PER_BATCH if k in kw})
    if entry == "LinearIQLoss":
        return fastirl.LinearIQLoss(**kw)(t["main"], t["weight"], t["targets"], **per_batch)
    return fastirl.IQLoss(**kw)(t["main"], t["targets"], **per_batch)


def call_reference(case, t, kw):
    """fastirl.reference on (B, T) float64 inputs; flat inputs as one sequence."""
    entry = case["entry"]
    t = dict(t)
    if case["flat"]:
        for k in ("main", "targets", "position_ids", "done"):
            if k in t:
                t[k] = t[k].unsqueeze(0)
    batch = {k: t[k] for k in ("bias", "position_ids", "done", "is_expert") if k in t}
    if entry == "implicit_rewards":
        batch.pop("is_expert", None)
        out = ref.implicit_rewards(t["main"], t["weight"], t["targets"], **batch, **kw)
    elif entry in ("iq_loss", "LinearIQLoss"):
        out = ref.iq_loss(t["main"], t["weight"], t["targets"], **batch, **kw,
                          return_metrics=True)
    else:
        out = ref.iq_loss_from_logits(t["main"], t["targets"], **batch, **kw, return_metrics=True)
    loss, metrics = out if isinstance(out, tuple) else (out, None)
    if case["flat"] and loss.dim() == 2:
        loss = loss.squeeze(0)
    return loss, metrics


def close(got, want, dtype, what):
    tol = TOL[dtype]
    want = want.detach().double()
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.detach().double(), want, atol=tol * (1.0 + scale), rtol=tol,
                               equal_nan=False, msg=lambda m: f"{what}: {m}")


def check_valid(case):
    fast_t, ref_t, leaves = build(case)
    fast_kw, ref_kw = options(case)
    if unstructured_flat(case) and couples(case):
        # reading the rows as one sequence would be a guess: a clear error instead
        with pytest.raises(ValueError, match="flattened"):
            call_fastirl(case["entry"], fast_t, fast_kw)
        return
    out = call_fastirl(case["entry"], fast_t, fast_kw)
    loss, metrics = out if isinstance(out, tuple) else (out, None)
    want, want_metrics = call_reference(case, ref_t, ref_kw)
    dtype = case["dtype"]
    # every output in the accumulation dtype (float32; float64 for float64 inputs)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == loss_dtype and loss.shape == want.shape, (loss.dtype, loss.shape)
    close(loss, want, dtype, "loss")
    if metrics is not None:
        predicted = metrics.pop("predicted", None)
        assert (predicted is not None) == bool(case.get("predictions"))
        if predicted is not None:
            check_predictions(case, ref_t, predicted)
        assert set(metrics) == (set(METRICS) if case["metrics"] else set())
        for k in metrics:
            assert metrics[k].shape == () and not metrics[k].requires_grad
            # accuracy compares argmaxes: rounding may flip near-ties in low precision
            if k != "accuracy" or dtype in (torch.float64, torch.float32):
                close(metrics[k], want_metrics[k], dtype, f"metric {k}")
    if leaves["fast"]:
        up = torch.randn(want.shape, generator=torch.Generator().manual_seed(case["seed"] + 1),
                         dtype=torch.float64) if want.dim() else torch.tensor(case["upstream"],
                                                                              dtype=torch.float64)
        up = up.to(want.device)
        got_g = torch.autograd.grad(loss, leaves["fast"], up.to(loss.dtype), allow_unused=True)
        want_g = torch.autograd.grad(want, leaves["ref"], up, allow_unused=True)
        for i, (a, b) in enumerate(zip(got_g, want_g)):
            b = torch.zeros_like(leaves["ref"][i]) if b is None else b
            a = torch.zeros_like(leaves["fast"][i]) if a is None else a
            assert a.dtype == leaves["fast"][i].dtype
            close(a, b, dtype, f"gradient {i}")
    if case["meta"]:
        check_meta(case, fast_t, fast_kw, loss, metrics)


def check_predictions(case, ref_t, predicted):
    """argmax of the reference logits on action rows, ignore_index elsewhere."""
    main = ref_t["main"]
    if case["entry"] in ("iq_loss", "LinearIQLoss"):
        main = torch.nn.functional.linear(main, ref_t["weight"], ref_t.get("bias"))
    if case["softcap"] is not None:
        main = case["softcap"] * torch.tanh(main / case["softcap"])
    want = torch.where(ref_t["targets"] != case["ignore_index"], main.argmax(-1),
                       case["ignore_index"])
    assert predicted.shape == want.shape and predicted.dtype == torch.int64
    if case["dtype"] in (torch.float64, torch.float32):   # low precision may flip near-ties
        ok = (predicted == want) | (ref_t["targets"] == case["ignore_index"])
        assert bool(ok.all()), (predicted, want)


def check_meta(case, fast_t, fast_kw, loss, metrics):
    """The same call on meta tensors: same shapes and dtypes, no value read."""
    meta = {k: (v.detach().to("meta").requires_grad_(v.requires_grad) if v.is_floating_point()
                else v.to("meta")) for k, v in fast_t.items()}
    kw = dict(fast_kw)
    for k in ("num_items_in_batch", "ce_weight"):
        if isinstance(kw.get(k), torch.Tensor):
            kw[k] = kw[k].to("meta")
    out = call_fastirl(case["entry"], meta, kw)
    m_loss, m_metrics = out if isinstance(out, tuple) else (out, None)
    if m_metrics is not None and "predicted" in m_metrics:
        assert m_metrics.pop("predicted").shape == loss.shape[:0] + fast_t["targets"].shape
    assert m_loss.device.type == "meta"
    assert (m_loss.shape, m_loss.dtype) == (loss.shape, loss.dtype)
    if metrics is not None:
        assert {k: (v.shape, v.dtype) for k, v in m_metrics.items()} == \
            {k: (v.shape, v.dtype) for k, v in metrics.items()}
    if m_loss.requires_grad:
        m_loss.sum().backward()


# ------------------------------------------------------------------ invalid values

# (argument, exception, mutation of (case, fast tensors, fast kwargs)); the
# message of the exception must name the argument.
def _set(key, value):
    def mutate(case, t, kw):
        (t if key in ("main", "weight", "bias", "targets", "position_ids", "done",
                      "is_expert") else kw)[key] = value(case, t) if callable(value) else value
    return mutate


def _bad_target(case, t):
    bad = t["targets"].contiguous().clone()
    bad.view(-1)[0] = case["V"] if case["ignore_index"] != case["V"] else -7
    return bad


def _bad_position(case, t):
    lead = t["targets"].shape
    pos = torch.zeros(lead, dtype=torch.long, device=t["targets"].device)
    pos.view(-1)[-1] = -1
    return pos


MUTATIONS = [
    ("targets", ValueError, _set("targets", _bad_target), "data"),
    ("targets", TypeError, _set("targets", lambda c, t: t["targets"].double()), None),
    ("targets", ValueError, _set("targets", lambda c, t: t["targets"][..., :-1]), "T"),
    ("targets", ValueError, _set("targets", lambda c, t: t["targets"].to("meta")), None),
    ("position_ids", ValueError, _set("position_ids", _bad_position), "data"),
    ("position_ids", ValueError,
     _set("position_ids", lambda c, t: torch.zeros(t["targets"].numel() + 1, dtype=torch.long)),
     None),
    ("position_ids", TypeError, _set("position_ids", lambda c, t: t["targets"].float()), None),
    ("done", TypeError, _set("done", lambda c, t: t["targets"].long()), None),
    ("gamma", ValueError, _set("gamma", 1.5), None),
    ("gamma", ValueError, _set("gamma", math.nan), None),
    ("gamma", ValueError, _set("gamma", torch.tensor(-0.25)), None),
    ("gamma", ValueError, _set("gamma", torch.tensor([0.5])), None),
    ("gamma", TypeError, _set("gamma", "0.9"), None),
    ("temperature", ValueError, _set("temperature", 0.0), None),
    ("temperature", ValueError, _set("temperature", torch.tensor(-1.0)), None),
    ("softcap", ValueError, _set("softcap", -2.0), None),
    ("softcap", ValueError, _set("softcap", torch.tensor(math.inf)), None),
    ("ignore_index", TypeError, _set("ignore_index", 1.5), None),
    ("backend", ValueError, _set("backend", "tpu"), None),
    ("preset", ValueError, _set("preset", "turbo"), None),
    ("chunk_size", ValueError, _set("chunk_size", 0), None),
    ("chunk_size", TypeError, _set("chunk_size", 2.5), None),
    ("unknown_option", TypeError, _set("unknown_option", 1), None),
]
LOSS_MUTATIONS = [
    ("td_weight", ValueError, _set("td_weight", -0.5), None),
    ("td_weight", ValueError, _set("td_weight", torch.tensor(math.inf)), None),
    ("divergence", ValueError, _set("divergence", "wasserstein"), None),
    ("reduction", ValueError, _set("reduction", "avg"), None),
    ("value_term", ValueError, _set("value_term", "q"), None),
    ("td_rows", ValueError, _set("td_rows", "some"), None),
    ("num_items_in_batch", ValueError, _set("num_items_in_batch", 0), None),
    ("num_items_in_batch", ValueError, _set("num_items_in_batch", torch.tensor(-3.0)), None),
    ("num_items_in_batch", ValueError, _set("num_items_in_batch", torch.ones(2)), None),
    ("num_items_in_batch", TypeError, _set("num_items_in_batch", "7"), None),
    ("num_items_in_batch", ValueError, lambda c, t, kw: kw.update(num_items_in_batch=3,
                                                                  reduction="sum"), None),
    ("lse_square_scale", ValueError, _set("lse_square_scale", -1.0), None),
    ("label_smoothing", ValueError, _set("label_smoothing", 1.5), None),
    ("label_smoothing", ValueError, lambda c, t, kw: kw.update(
        label_smoothing=0.1, ce_weight=torch.ones(c["V"])), None),
    ("token_scaling", TypeError, _set("token_scaling", "yes"), None),
    ("ce_weight", ValueError, _set("ce_weight", lambda c, t: torch.ones(c["V"] + 1)), None),
    ("ce_weight", TypeError, _set("ce_weight", lambda c, t: torch.ones(c["V"], dtype=torch.long)),
     None),
    ("is_expert", ValueError,
     _set("is_expert", lambda c, t: torch.ones(t["targets"].shape[0] + 2, dtype=torch.bool)),
     None),
    ("is_expert", TypeError,
     _set("is_expert", lambda c, t: torch.ones(1 if t["targets"].dim() == 1
                                               else t["targets"].shape[0])), None),
]
LINEAR_MUTATIONS = [
    ("weight", TypeError, _set("weight", lambda c, t: t["weight"].detach().to(
        torch.float32 if c["dtype"] != torch.float32 else torch.float64)), None),
    ("weight", ValueError, _set("weight", lambda c, t: torch.zeros(c["V"], c["H"] + 1,
                                                                   dtype=c["dtype"])), None),
    ("hidden", ValueError, _set("main", lambda c, t: torch.zeros(c["H"], dtype=c["dtype"])),
     None),
    ("hidden", TypeError, _set("main", lambda c, t: torch.zeros(t["main"].shape, dtype=torch.long)),
     None),
    ("bias", ValueError, _set("bias", lambda c, t: torch.zeros(c["V"] + 1, dtype=c["dtype"])),
     None),
    ("hidden", TypeError, _set("main", lambda c, t: t["main"].tolist()), None),
]
LOGITS_MUTATIONS = [
    ("logits", TypeError, _set("main", lambda c, t: t["main"].detach().long()), None),
    ("logits", ValueError, _set("main", lambda c, t: torch.zeros(c["V"])), None),
]


def mutations(entry):
    out = list(MUTATIONS)
    if entry != "implicit_rewards":
        out += LOSS_MUTATIONS
    out += LOGITS_MUTATIONS if entry in ("iq_loss_from_logits", "IQLoss") else LINEAR_MUTATIONS
    if entry == "implicit_rewards":
        out = [m for m in out if m[0] not in ("is_expert",)]
    return out


def check_invalid(case, which: int):
    fast_t, _, _ = build(case)
    fast_kw, _ = options(case)
    todo = mutations(case["entry"])
    name, exc, mutate, needs = todo[which % len(todo)]
    if needs == "data":
        assume(case["B"] * case["T"] > 0)
    if needs == "T":
        assume(case["T"] > 0)
    mutate(case, fast_t, fast_kw)
    if case["entry"] in ("LinearIQLoss", "IQLoss") and name == "unknown_option":
        exc = TypeError
    with pytest.raises(exc) as info:
        call_fastirl(case["entry"], fast_t, fast_kw)
    assert name in str(info.value), f"{exc.__name__} does not name {name!r}: {info.value}"


# ------------------------------------------------------------------ the tests


@_settings(300)
@given(case=cases())
def test_fuzz_valid_calls_match_reference(case, monkeypatch):
    with monkeypatch.context() as m:
        if case["path"] == "op":
            use_op_path(m)
        check_valid(case)


@_settings(200)
@given(case=cases(), which=st.integers(0, 1000))
def test_fuzz_invalid_calls_name_the_argument(case, which, monkeypatch):
    with monkeypatch.context() as m:
        if case["path"] == "op":
            use_op_path(m)
        check_invalid(case, which)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton does not load here")
@_settings(60)
@given(case=cases(targets=(("cpu", "triton"),), tiny=True))
def test_fuzz_triton_interpreter(case, monkeypatch):
    with monkeypatch.context() as m:
        if case["path"] == "op":
            use_op_path(m)
        check_valid(case)


# ------------------------------------------------------------------ what the harness found

# Each case the harness found, fixed, kept as a regression test on every backend
# and both paths.  The case dicts are the shrunk examples hypothesis printed.
_BASE = dict(entry="iq_loss", device="cpu", backend="torch", path="eager", B=1, T=1, H=1, V=1,
             flat=False, dtype=torch.float32, seed=0, ignore_frac=0.0, ignore_index=-100,
             layout=dict.fromkeys(("main", "weight", "bias", "targets", "position_ids"),
                                  "contiguous"),
             bias=False, packed=False, done=False, online=False, gamma=1.0, td_weight=0.1,
             temperature=1.0, softcap=None, as_tensors=False, divergence="chi2",
             reduction="mean", value_term=None, td_rows="expert", detach_next_value=False,
             num_items=None, chunk_size=None, preset="default", metrics=False, upstream=1.0,
             meta=False, lse_square_scale=0.0, label_smoothing=0.0, token_scaling=False,
             ce_weight=False, predictions=False, one_sequence=True)


def _found(**kw):
    layout = dict(_BASE["layout"], **kw.pop("layout", {}))
    return dict(_BASE, layout=layout, **kw)


FOUND = {
    # The native backend refused expanded logits ("rows overlap (stride(0) = 0 <
    # vocab)"): the engine now hands backends distinct rows.
    "expanded_logits": _found(entry="iq_loss_from_logits", T=2, flat=True,
                              layout=dict(main="expanded")),
    # A (1, 1) logits view with stride(1) = 2 is "contiguous" to PyTorch, so the
    # backend's .contiguous() kept the stride and the native op refused it.
    "strided_single_logit": _found(entry="iq_loss_from_logits", flat=True,
                                   layout=dict(main="strided")),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["eager", "op"])
@pytest.mark.parametrize("name", sorted(FOUND))
@pytest.mark.parametrize("entry", ["iq_loss_from_logits", "IQLoss", "iq_loss"])
def test_found_by_the_harness(monkeypatch, name, backend, path, entry):
    case = dict(FOUND[name], backend=backend, path=path, entry=entry)
    if path == "op":
        use_op_path(monkeypatch)
    check_valid(case)
    check_valid(dict(case, V=5, T=4, H=3))          # the same layout at larger sizes
