"""Every option of the loss, declared once.

Each option is one line below: its type (a ``Literal`` lists the choices), and
an :class:`Opt` with its default, its meaning and its allowed range.  Everything
else is derived from these lines: the keyword arguments of the public functions
(statically, as ``**options: Unpack[...]``, and at run time, as their
``__signature__`` and the options table of their docstrings), validation
(:func:`parse`, used by every entry point, module, patch and config), the
records the engine reads (:class:`IQOptions`, :class:`RunOptions`), the
flattening of the traced op (:func:`encode` / :func:`decode`) and the fields of
the Hugging Face ``IQConfig``.

The groups, each a ``TypedDict``:

* :class:`Values`: how soft values and rewards are read from the logits
  (every entry point);
* :class:`Loss`: the objective built on them (the loss functions);
* :class:`Run`: how it is computed (backend, precision, chunking, memory);
* :class:`Head`, :class:`Sequences`, :class:`Weighting`: per-call tensors.

Adding an option: one line here, its use in :mod:`fastirl.objective`, tests.
"""

from __future__ import annotations

import ast
import inspect
import math
from dataclasses import dataclass, fields, make_dataclass, replace
from typing import Annotated, Any, Literal, TypedDict, Union, get_args, get_origin

import torch
from typing_extensions import get_type_hints

from .backends.base import Backend

__all__ = ["Opt", "Values", "Loss", "Run", "Head", "Sequences", "Weighting",
           "LinearOptions", "LogitsOptions", "RewardOptions", "ModuleOptions",
           "IQOptions", "RunOptions", "OPTIONS", "parse", "parse_options", "signature",
           "options_table", "encode", "decode", "DIVERGENCES", "PRESETS_NAMES", "MEMORY_SETTINGS"]

Scalar = Union[float, torch.Tensor]    # a Python number or a 0-d CPU tensor (read without sync)
Divergence = Literal["chi2", "total_variation", "hellinger", "js", "kl", "kl_fix"]
Memory = Literal["fast", "balanced", "compact"]


@dataclass(frozen=True)
class Opt:
    """What the declaration says of one option.

    default: the value when the option is not given.
    doc: its meaning (one sentence or two; the docs table shows it).
    low / high: the allowed interval of a number (``low_open``: excluded).
    config: the name of the ``IQConfig`` field ("" = the option's own name,
        None = not a config field).
    """

    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    config: str | None = ""


class Values(TypedDict, total=False):
    gamma: Annotated[Scalar, Opt(1.0, "Discount gamma of the next state's value.", 0.0, 1.0)]
    temperature: Annotated[Scalar, Opt(
        1.0, "tau: V = tau logsumexp(z / tau) and the policy is softmax(z / tau).",
        0.0, math.inf, low_open=True)]
    softcap: Annotated[Scalar | None, Opt(
        None, "c: logits z <- c tanh(z / c) before everything (Gemma 2's final soft cap).",
        0.0, math.inf, low_open=True)]
    ignore_index: Annotated[int, Opt(-100, "Target value of rows that are not actions.")]


class Loss(TypedDict, total=False):
    td_weight: Annotated[Scalar, Opt(
        0.1, "lambda, weight of the TD regulariser r^2. 0 (with the defaults of the other "
             "options) is exactly the token cross-entropy.", 0.0, math.inf)]
    reduction: Annotated[Literal["mean", "sum", "none"], Opt(
        "mean", "'none' returns the per-token terms l_t (0 on non-action rows).")]
    divergence: Annotated[Divergence, Opt("chi2", "Divergence phi of the reward term.")]
    value_term: Annotated[Literal["value_expert", "value", "v0"] | None, Opt(
        None, "The value term: 'value_expert' (offline default), 'value' (online default: "
              "over expert and sampled rows) or 'v0' (initial-state form).")]
    td_rows: Annotated[Literal["expert", "all"], Opt(
        "expert", "Rows of the TD regulariser: expert rows (IQ-Learn 'chi') or all "
                  "('regularize').")]
    detach_next_value: Annotated[bool, Opt(
        False, "Stop the gradient through V_{t+1} (a target value).")]
    lse_square_scale: Annotated[float, Opt(
        0.0, "z-loss: adds this times V_t^2 per action row (logsumexp^2 at temperature 1).",
        0.0, math.inf)]
    label_smoothing: Annotated[float, Opt(
        0.0, "epsilon: the target logit q_t is replaced by (1 - eps) q_t + eps mean_v z_t[v]; "
             "with td_weight=0 this is label-smoothed cross-entropy.", 0.0, 1.0)]
    token_scaling: Annotated[bool, Opt(
        False, "Scale each row's loss by the detached probability of its target, "
               "exp((q_t - V_t) / tau) (dynamic fine-tuning, DFT).")]


class Weighting(TypedDict, total=False):
    ce_weight: Annotated[torch.Tensor | None, Opt(
        None, "(V,) float class weights: row t weighs ce_weight[a_t] (and reduction='mean' "
              "divides by their sum), as F.cross_entropy's weight.", config=None)]


class Run(TypedDict, total=False):
    backend: Annotated[str | Backend, Opt(
        "auto", "'auto', 'torch', 'cpu', 'triton', 'cuda', 'triton-fused', or an object "
                "implementing fastirl.backends.base.Backend.", config="loss_backend")]
    preset: Annotated[Literal["default", "fast", "highest"], Opt(
        "default", "'default': GEMMs in the input dtype, float32 accumulation, deterministic; "
                   "'fast': atomics allowed; 'highest': GEMMs on float32 copies.",
        config="loss_preset")]
    chunk_size: Annotated[int | None, Opt(
        None, "Rows per chunk (default: the planner's choice for `memory`).", 1, math.inf,
        config="loss_chunk_size")]
    memory: Annotated[Memory | int, Opt(
        "fast", "Working memory beyond inputs and outputs: 'fast', 'balanced', 'compact' "
                "(docs/memory.md), or a budget in bytes the planner must meet.", 1, math.inf,
        config="loss_memory")]


class Head(TypedDict, total=False):
    bias: Annotated[torch.Tensor | None, Opt(None, "(V,) LM head bias.", config=None)]


class Sequences(TypedDict, total=False):
    position_ids: Annotated[torch.Tensor | None, Opt(
        None, "(B, T) int >= 0: packed sequences, a 0 starts a sequence.", config=None)]
    done: Annotated[torch.Tensor | None, Opt(
        None, "(B, T) bool: terminal actions; row t+1 of the same sequence is bootstrapped "
              "from whenever not done_t.", config=None)]


class Samples(TypedDict, total=False):
    is_expert: Annotated[torch.Tensor | None, Opt(
        None, "(B,) bool: online IQ-Learn, expert sequences vs policy samples.", config=None)]
    num_items_in_batch: Annotated[int | torch.Tensor | None, Opt(
        None, "Replaces the normalisers of reduction='mean' (e.g. the action tokens of a whole "
              "gradient-accumulation step).", config=None)]


# What each entry point takes (static types for ``**options: Unpack[...]``).
class LinearOptions(Head, Sequences, Samples, Values, Loss, Weighting, Run, total=False):
    process_group: Annotated[Any, Opt(
        None, "Vocabulary parallelism: weight (and bias) are this rank's shard, targets global "
              "ids (fastirl.distributed).", config=None)]


class LogitsOptions(Sequences, Samples, Values, Loss, Weighting, Run, total=False):
    pass


class RewardOptions(Head, Sequences, Values, Run, total=False):
    pass


class ModuleOptions(Values, Loss, Weighting, Run, total=False):
    """The options a loss module, ``apply_fastirl`` or ``IQConfig`` holds."""


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Option:
    """One declared option, as read from the ``TypedDict`` lines above."""

    name: str
    group: str                  # "Values", "Loss", "Weighting", "Run", "Head", ...
    type: Any                   # the annotation without Annotated
    spec: Opt

    @property
    def default(self) -> Any:
        return self.spec.default

    @property
    def choices(self) -> tuple:
        return tuple(a for a in _literal_args(self.type))

    @property
    def tensor(self) -> bool:
        """A per-call tensor (or a tensor-valued option such as ce_weight)."""
        return _allows(self.type, torch.Tensor) and not self.scalar

    @property
    def scalar(self) -> bool:
        """A number that may also be given as a 0-d CPU tensor."""
        return _allows(self.type, float) and _allows(self.type, torch.Tensor)


def _flatten(tp) -> list:
    if get_origin(tp) is Union or type(tp).__name__ == "UnionType":
        return [a for arg in get_args(tp) for a in _flatten(arg)]
    return [tp]


def _literal_args(tp) -> list:
    return [a for part in _flatten(tp) if get_origin(part) is Literal for a in get_args(part)]


def _allows(tp, kind) -> bool:
    return any(part is kind for part in _flatten(tp))


def _read(group) -> dict[str, Option]:
    hints = get_type_hints(group, include_extras=True)
    out = {}
    for name in group.__annotations__:       # own lines only, in declaration order
        tp = hints[name]
        base, spec = get_args(tp)[0], get_args(tp)[1]
        out[name] = Option(name, group.__name__, base, spec)
    return out


GROUPS = (Values, Loss, Weighting, Run, Head, Sequences, Samples)
OPTIONS: dict[str, Option] = {k: v for g in GROUPS for k, v in _read(g).items()}
OPTIONS.update({k: v for k, v in _read(LinearOptions).items() if k not in OPTIONS})

# Names by role.
VALUE_NAMES = tuple(_read(Values))
LOSS_NAMES = tuple(_read(Loss)) + tuple(_read(Weighting))
OBJECTIVE_NAMES = VALUE_NAMES + LOSS_NAMES
RUN_NAMES = tuple(_read(Run))
# Per-call tensors (and the process group): checked with the tensors (fastirl._validate).
PER_CALL_NAMES = tuple(n for g in (Head, Sequences, Samples) for n in _read(g)) + ("process_group",)
TENSOR_OPTION_NAMES = tuple(n for n in OBJECTIVE_NAMES if OPTIONS[n].tensor)
SCALAR_NAMES = tuple(n for n in OBJECTIVE_NAMES if OPTIONS[n].scalar)
STATIC_NAMES = tuple(n for n in OBJECTIVE_NAMES
                     if n not in SCALAR_NAMES and n not in TENSOR_OPTION_NAMES)

DIVERGENCES: tuple[str, ...] = OPTIONS["divergence"].choices
PRESETS_NAMES: tuple[str, ...] = OPTIONS["preset"].choices
MEMORY_SETTINGS: tuple[str, ...] = OPTIONS["memory"].choices


# ----------------------------------------------------------------------------- checks


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _interval(o: Opt) -> str:
    return f"{'(' if o.low_open else '['}{o.low}, {o.high}]"


def _number(name: str, v, o: Opt, *, integer: bool = False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        what = "an int" if integer else "a real number"
        raise TypeError(f"{name} must be {what}, got {type(v).__name__}")
    if not -math.inf < v < math.inf:            # also False for NaN
        raise ValueError(f"{name} must be finite, got {v}")
    if o.low is not None and (v <= o.low if o.low_open else v < o.low) or \
            o.high is not None and v > o.high:
        raise ValueError(f"{name} must lie in {_interval(o)}, got {v}")
    return v


def scalar_tensor(name: str, value: torch.Tensor) -> torch.Tensor:
    """A hyper-parameter given as a tensor: 0-d, real, on the CPU (reading it is
    then no device sync)."""
    if value.dim() != 0:
        raise ValueError(f"{name} must be a number or a 0-d tensor, got {_describe(value)}")
    if value.dtype == torch.bool or value.dtype.is_complex:
        raise TypeError(f"{name} must be a real number, got a tensor of dtype {value.dtype}")
    if value.device.type != "cpu":
        raise ValueError(f"{name} must be a number or a 0-d CPU tensor (reading a {value.device} "
                         f"tensor would synchronise the device), got {_describe(value)}")
    return value.detach()


def check_value(name: str, value, *, read: bool = True):
    """The value of option ``name`` if it is allowed (a 0-d tensor of a scalar
    option is read when ``read``, kept otherwise); raises naming the option."""
    opt = OPTIONS[name]
    o, tp = opt.spec, opt.type
    if value is None:
        if _allows(tp, type(None)):
            return None
        raise TypeError(f"{name} must not be None")
    if name == "backend":
        from .backends import BACKENDS      # the registry: names only, nothing is loaded
        if isinstance(value, str):
            if value != "auto" and value not in BACKENDS:
                raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, "
                                 f"got {value!r}")
        elif not all(hasattr(value, a) for a in ("forward", "backward", "rows_per_chunk")):
            raise TypeError(f"backend must be a backend name or an object implementing "
                            f"fastirl.backends.base.Backend, got {type(value).__name__}")
        return value
    choices = opt.choices
    if choices and (not _allows(tp, int) or isinstance(value, str)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        return value
    if opt.scalar:
        if isinstance(value, torch.Tensor):
            value = scalar_tensor(name, value)
            if not read:
                return value
            value = value.item()
        return float(_number(name, value, o))
    if _allows(tp, bool):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        return value
    if _allows(tp, int):
        return _number(name, value, o, integer=True)
    if _allows(tp, float):
        return float(_number(name, value, o))
    if opt.tensor:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
        return value
    return value


# ----------------------------------------------------------------------------- records

def _post_init(self):
    for f in fields(self):
        object.__setattr__(self, f.name, check_value(f.name, getattr(self, f.name), read=False))


def _record(cls_name: str, names: tuple[str, ...], doc: str):
    cls = make_dataclass(cls_name, [(n, Any, OPTIONS[n].default) for n in names], frozen=True,
                         namespace={"__post_init__": _post_init, "__doc__": doc,
                                    "replace": lambda self, **kw: replace(self, **kw)})
    cls.__module__ = __name__
    return cls


IQOptions = _record("IQOptions", OBJECTIVE_NAMES, """The objective's options (validated on
construction).  Scalar hyper-parameters are Python numbers, except on the
traced path, where a 0-d CPU tensor stays a tensor (the op checks it).""")
RunOptions = _record("RunOptions", RUN_NAMES, "How the loss is computed (validated on "
                     "construction).")


def parse_options(options: dict, *, allowed: tuple[str, ...], where: str,
                  read: bool = True) -> tuple[dict, dict]:
    """Validates keyword options against the declaration: unknown names raise a
    ``TypeError`` (as Python does for an unexpected keyword), bad values a
    ``ValueError`` / ``TypeError`` naming the option.  Returns ``(values of the
    given options, defaults filled in for the rest of `allowed`)``."""
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise TypeError(f"{where} got unexpected keyword argument(s) {sorted(unknown)}; "
                        f"its options are {sorted(allowed)}")
    checked = {k: check_value(k, v, read=read) for k, v in options.items()
               if k not in PER_CALL_NAMES}
    full = {k: options.get(k, OPTIONS[k].default) for k in allowed}
    full.update(checked)
    return checked, full


def parse(options: dict, *, allowed: tuple[str, ...], where: str,
          read: bool = True) -> tuple[IQOptions, RunOptions, dict]:
    """``(IQOptions, RunOptions, per-call tensors)`` of one call.  Options of the
    objective that ``allowed`` does not list keep their defaults (e.g. rewards
    take no loss options)."""
    _, full = parse_options(options, allowed=allowed, where=where, read=read)
    iq = IQOptions(**{k: full.get(k, OPTIONS[k].default) for k in OBJECTIVE_NAMES})
    run = RunOptions(**{k: full.get(k, OPTIONS[k].default) for k in RUN_NAMES})
    tensors = {k: v for k, v in full.items() if k not in OBJECTIVE_NAMES and k not in RUN_NAMES}
    return iq, run, tensors


def module_options(options: dict, where: str) -> dict:
    """Validates the options a module / patch / config holds (no per-call tensors).
    A 0-d tensor hyper-parameter is kept (a schedule may change it between
    calls; each call reads it)."""
    checked = parse_options(options, allowed=names(ModuleOptions), where=where)[0]
    keep = {k: v for k, v in options.items() if isinstance(v, torch.Tensor) and OPTIONS[k].scalar}
    return {**checked, **keep}


# ----------------------------------------------------------------------------- derived views

def names(td) -> tuple[str, ...]:
    """The option names a ``TypedDict`` of this module covers."""
    return tuple(get_type_hints(td))


def signature(leading: list[inspect.Parameter], td, extra: list[inspect.Parameter] = (),
              returns=inspect.Signature.empty) -> inspect.Signature:
    """A public function's signature: its positional tensors, then every option
    of ``td`` keyword-only with its default."""
    params = list(leading) + list(extra) + [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=OPTIONS[n].default,
                          annotation=_annotation(OPTIONS[n].type)) for n in names(td)]
    return inspect.Signature(params, return_annotation=returns)


def _annotation(tp) -> str:
    text = repr(tp).replace("typing.", "").replace("torch.", "")
    return text.replace("<class '", "").replace("'>", "")


def options_table(td, markdown: bool = False) -> str:
    """The options of ``td`` as a docstring section (or a markdown table)."""
    rows = [(n, _choices_text(OPTIONS[n]), repr(OPTIONS[n].default), OPTIONS[n].spec.doc)
            for n in names(td)]
    if markdown:
        lines = ["| option | values | default | meaning |", "|---|---|---|---|"]
        lines += [f"| `{n}` | {c} | `{d}` | {doc} |" for n, c, d, doc in rows]
        return "\n".join(lines)
    out = ["", "    Keyword options (fastirl.options declares them all):"]
    for n, c, d, doc in rows:
        out.append(f"        {n} ({c}, default {d}): {doc}")
    return "\n".join(out) + "\n"


def _choices_text(opt: Option) -> str:
    if opt.choices:
        text = " | ".join(repr(c) for c in opt.choices)
        return text + (" | bytes" if _allows(opt.type, int) else "")
    if opt.scalar:
        return f"number in {_interval(opt.spec)} or 0-d CPU tensor"
    if opt.tensor:
        return "number or scalar tensor" if _allows(opt.type, int) else "tensor"
    if _allows(opt.type, bool):
        return "bool"
    if opt.spec.low is not None:
        kind = "int" if _allows(opt.type, int) else "number"
        return f"{kind} in {_interval(opt.spec)}"
    return _annotation(opt.type)


# ----------------------------------------------------------------------------- the traced op

def encode(iq: IQOptions, run: RunOptions) -> tuple[str, torch.Tensor, list]:
    """``(static options as text, scalar hyper-parameters as one float64 CPU
    tensor, tensor options)`` for the traced op's fixed schema.  A scalar is
    stored as (value, given); 0-d tensors among them stay graph inputs."""
    # "name=repr;..." of plain constants (torch.compile traces f-strings, not json)
    static = ";".join([f"{n}={getattr(iq, n)!r}" for n in STATIC_NAMES] +
                      [f"{n}={getattr(run, n)!r}" for n in RUN_NAMES])
    values = []
    for n in SCALAR_NAMES:
        v = getattr(iq, n)
        values += [torch.as_tensor(1.0 if v is None else v, dtype=torch.float64).reshape(()),
                   torch.tensor(float(v is not None), dtype=torch.float64)]
    tensors = [getattr(iq, n) for n in TENSOR_OPTION_NAMES]
    return static, torch.stack(values), tensors


def decode(static: str, scalars: torch.Tensor, tensors: list) -> tuple[IQOptions, RunOptions]:
    """The inverse of :func:`encode`; validates the scalars' values."""
    kw = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in static.split(";"))}
    vals = scalars.tolist()
    for i, n in enumerate(SCALAR_NAMES):
        kw[n] = vals[2 * i] if vals[2 * i + 1] else None
        kw[n] = check_value(n, kw[n])
    kw.update(zip(TENSOR_OPTION_NAMES, tensors))
    return (IQOptions(**{n: kw[n] for n in OBJECTIVE_NAMES}),
            RunOptions(**{n: kw[n] for n in RUN_NAMES}))


def markdown() -> str:
    """docs/options.md: every option, by group (``python -m fastirl.options``)."""
    parts = ["# Options", "",
             "Generated from `fastirl/options.py` by `python -m fastirl.options > "
             "docs/options.md`; a test checks it is current.", ""]
    titles = {"Head": "Per-call tensors: the head", "Sequences": "Per-call tensors: sequences",
              "Samples": "Per-call tensors: online data and normalisation",
              "Values": "Values and rewards (every entry point)",
              "Loss": "The objective (loss functions)", "Weighting": "Class weights",
              "Run": "How it is computed"}
    for group in (Head, Sequences, Samples, Values, Loss, Weighting, Run):
        parts += [f"## {titles[group.__name__]}", "", options_table(group, markdown=True), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(markdown(), end="")
