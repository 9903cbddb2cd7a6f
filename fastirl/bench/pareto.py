"""The time-memory Pareto front of the memory settings, predicted.

``python -m fastirl.bench.roofline --pareto`` (docs/gpu-model.md, "Memory
settings"; docs/memory.md): at one head (default the Llama-3-8B head, H = 4096,
V = 128256, bf16) on H100 and H200 and for N = 1k ... 64k tokens, every
point of

* fastirl's cuBLAS + epilogue backend (``fastirl-triton``; ``fastirl-cuda``
  launches the same kernels with CUDA epilogues and is modelled identically)
  at each memory setting (``fast``, ``balanced``, ``compact``) and at a few
  byte budgets, each the plan :func:`fastirl.memory.plan` picks
  (:func:`fastirl.bench.model.engine_plan`);
* ``fastirl-triton-fused``, Liger-Kernel, Cut Cross-Entropy, the naive loss;

with its predicted forward+backward time (calibrated), its ratio to the
calibrated floor (the bare GEMMs), its modelled peak extra memory (outputs
included, the tensors each implementation holds) and whether it is on the
time-memory Pareto front of that (GPU, N): no other point is at most as slow
and at most as large, and strictly better in one.  The floor is a reference,
not a point (it is no loss).

:func:`worst_cases` reduces the sweep to the issue's rule for the default
setting: per setting and GPU, the worst over N of time / floor and of
memory / min(Liger, CCE).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from fastirl.backends.hardware import Hardware, gpu

from .launches import DEFAULT_OPTIONS, Options, Shape
from .predict import predict
from .report import markdown_table, text_table, write_rows
from .variants import budget_label, with_memory

__all__ = ["Point", "BUDGETS", "SETTINGS", "FASTIRL", "OTHERS", "points", "sweep",
           "worst_cases", "sweep_table", "detail_table", "worst_table", "plot", "write_csv",
           "TIME_LIMIT", "CSV_COLUMNS", "LLAMA3_8B", "report"]

GIB = float(1 << 30)
MIB = 1 << 20
LLAMA3_8B = Shape(8192, 4096, 128256, "bfloat16")
FASTIRL = "fastirl-triton"
SETTINGS = ("fast", "balanced", "compact")
BUDGETS = (256 * MIB, 512 * MIB, 1024 * MIB, 2048 * MIB)
OTHERS = ("fastirl-triton-fused", "liger", "cce", "naive")
FLOOR = "matmul-floor"
# The time half: predicted time within this factor of the calibrated floor.
TIME_LIMIT = 1.2
CSV_COLUMNS = ["gpu", "tokens", "hidden", "vocab", "dtype", "frozen_head", "variant", "setting",
               "plan", "predicted_ms", "vs_floor", "peak_extra_mib", "mem_vs_min_liger_cce",
               "on_front", "refused"]


@dataclass
class Point:
    """One (variant, setting) at one (GPU, N).  seconds / peak are None where
    the planner refuses the byte budget (``refused`` says why)."""

    gpu: str
    shape: Shape
    variant: str
    setting: str            # "fast", "balanced", "compact", "512MiB", or "" (not fastirl's)
    seconds: float | None
    vs_floor: float | None
    peak: float | None      # bytes
    note: str = ""
    refused: str = ""
    frozen: bool = False
    on_front: bool = False
    vs_peers: float | None = None   # peak / min(Liger's, CCE's) at the same (GPU, N)

    @property
    def label(self) -> str:
        return with_memory(self.variant, self.setting) if self.setting else self.variant


def _labels(budgets) -> list["str | int"]:
    return list(SETTINGS) + list(budgets)


def points(s: Shape, hw: Hardware, *, need_weight: bool = True, budgets=BUDGETS,
           options: Options | None = None) -> list[Point]:
    """Every point at one shape and device, the front marked."""
    opts = options or DEFAULT_OPTIONS
    floor = predict(FLOOR, s, hw, options=opts, need_weight=need_weight)
    out: list[Point] = []
    frozen = not need_weight

    def add(variant, setting, memory=None):
        try:
            p = predict(variant, s, hw, options=opts, memory=memory, need_weight=need_weight)
        except ValueError as exc:
            if "not modelled" in str(exc) or "modelled for" in str(exc):
                return
            out.append(Point(hw.name, s, variant, setting, None, None, None,
                             refused=_refusal(str(exc)), frozen=frozen))
            return
        out.append(Point(hw.name, s, variant, setting, p.seconds, p.seconds / floor.seconds,
                         p.peak_extra_bytes, p.note, frozen=frozen))

    for m in _labels(budgets):
        add(FASTIRL, m if isinstance(m, str) else budget_label(m), memory=m)
    for name in OTHERS:
        add(name, "")
    out.append(Point(hw.name, s, FLOOR, "", floor.seconds, 1.0, floor.peak_extra_bytes,
                     floor.note, frozen=frozen))
    _mark(out)
    return out


def _refusal(msg: str) -> str:
    """The planner's refusal, short: 'needs >= 1.07 GiB (slabs plan)'."""
    import re
    m = re.search(r"least working memory a plan needs here \((\d+) bytes: (\w+) plan", msg)
    if not m:
        return msg
    return f"refused: needs >= {int(m.group(1)) / GIB:.2f} GiB ({m.group(2)} plan)"


def _mark(pts: list[Point]) -> None:
    """on_front and vs_peers of the points of one (GPU, N)."""
    live = [p for p in pts if p.seconds is not None and p.variant != FLOOR]
    for p in live:
        p.on_front = not any(
            q.seconds <= p.seconds and q.peak <= p.peak
            and (q.seconds < p.seconds or q.peak < p.peak) for q in live if q is not p)
    peers = [p.peak for p in live if p.variant in ("liger", "cce")]
    ref = min(peers) if peers else None
    for p in pts:
        if ref and p.peak is not None:
            p.vs_peers = p.peak / ref


def sweep(base: Shape = LLAMA3_8B, gpus=("h100", "h200"),
          tokens=(1024, 2048, 4096, 8192, 16384, 32768, 65536), *, need_weight: bool = True,
          budgets=BUDGETS, options: Options | None = None) -> list[Point]:
    out = []
    for g in gpus:
        hw = gpu(g) if isinstance(g, str) else g
        for n in tokens:
            out += points(replace(base, tokens=n), hw, need_weight=need_weight,
                          budgets=budgets, options=options)
    return out


def worst_cases(pts: list[Point], limit: float = TIME_LIMIT) -> list[dict]:
    """Per fastirl setting (and budget) and GPU: the worst over N of
    time / floor and of memory / min(Liger, CCE), the N where each is worst,
    the N where each half of the rule holds (time within ``limit`` x the
    floor; memory at or below both peers'), and whether it holds at every N."""
    rows = []
    keys = list(dict.fromkeys((p.gpu, p.label) for p in pts if p.variant == FASTIRL))
    for g, label in keys:
        sel = [p for p in pts if p.gpu == g and p.label == label]
        ok = [p for p in sel if p.seconds is not None]
        refused = [p.shape.tokens for p in sel if p.seconds is None]
        t = max(ok, key=lambda p: p.vs_floor) if ok else None
        m = max(ok, key=lambda p: p.vs_peers) if ok else None
        time_ok = [p.shape.tokens for p in ok if p.vs_floor <= limit + 1e-9]
        mem_ok = [p.shape.tokens for p in ok if p.vs_peers <= 1.0 + 1e-9]
        rows.append(dict(gpu=g, setting=label.partition("@")[2], variant=label,
                         worst_time=t.vs_floor if t else None,
                         worst_time_n=t.shape.tokens if t else None,
                         worst_mem=m.vs_peers if m else None,
                         worst_mem_n=m.shape.tokens if m else None,
                         time_ok_n=time_ok, mem_ok_n=mem_ok, refused_n=refused,
                         meets_time=bool(ok) and not refused and len(time_ok) == len(ok),
                         meets_memory=bool(ok) and not refused and len(mem_ok) == len(ok),
                         front_n=[p.shape.tokens for p in ok if p.on_front]))
    return rows


def _n(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB"


def _cell(p: Point) -> str:
    if p.seconds is None:
        return "refused"
    star = " **front**" if p.on_front else ""
    return f"{p.vs_floor:.2f}x, {_gib(p.peak)}{star}"


def sweep_table(pts: list[Point], gpu_name: str, markdown: bool = False) -> str:
    """variant x N: predicted time / floor, peak extra memory, front."""
    sel = [p for p in pts if p.gpu == gpu_name]
    ns = sorted({p.shape.tokens for p in sel})
    labels = list(dict.fromkeys(p.label for p in sel))
    head = ["variant"] + [f"N={_n(n)}" for n in ns]
    cells = []
    for label in labels:
        row = [label]
        for n in ns:
            hit = [p for p in sel if p.label == label and p.shape.tokens == n]
            cell = _cell(hit[0]) if hit else "-"
            if hit and hit[0].variant == FLOOR:
                cell = f"{_fmt_ms(hit[0].seconds)}, {_gib(hit[0].peak)}"
            row.append(cell if markdown else cell.replace(" **front**", " *"))
        cells.append(row)
    return markdown_table(head, cells) if markdown else text_table(head, cells)


def _fmt_ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"


def detail_table(pts: list[Point], gpu_name: str, tokens: int, markdown: bool = False) -> str:
    """One (GPU, N): every point with its plan."""
    sel = [p for p in pts if p.gpu == gpu_name and p.shape.tokens == tokens]
    head = ["variant", "predicted", "vs floor", "peak extra", "vs min(Liger, CCE)",
            "Pareto front", "plan"]
    cells = []
    for p in sel:
        if p.seconds is None:
            cells.append([p.label, "-", "-", "-", "-", "-", p.refused])
            continue
        cells.append([p.label, _fmt_ms(p.seconds), f"{p.vs_floor:.2f}x", _gib(p.peak),
                      f"{p.vs_peers:.2f}x" if p.vs_peers else "-",
                      "reference" if p.variant == FLOOR else ("yes" if p.on_front else ""),
                      p.note])
    return markdown_table(head, cells) if markdown else text_table(head, cells)


def worst_table(pts: list[Point], markdown: bool = False, limit: float = TIME_LIMIT) -> str:
    """The issue's rule per setting: worst over N of time / floor and memory /
    min(Liger, CCE), per GPU, and which half holds."""
    rows = worst_cases(pts, limit)
    gpus = list(dict.fromkeys(r["gpu"] for r in rows))
    head = ["setting"]
    for g in gpus:
        head += [f"{g.upper()} worst time / floor", f"{g.upper()} worst memory / min(Liger, CCE)"]
    head += [f"time <= {limit}x floor at", "memory <= min(Liger, CCE) at"]
    cells = []
    for label in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == label]
        row = [label.partition("@")[2]]
        for g in gpus:
            r = next(x for x in rs if x["gpu"] == g)
            row += [f"{r['worst_time']:.2f}x (N={_n(r['worst_time_n'])})" if r["worst_time"]
                    else "-",
                    f"{r['worst_mem']:.2f}x (N={_n(r['worst_mem_n'])})" if r["worst_mem"]
                    else "-"]
            if r["refused_n"]:
                row[-1] += f"; refused at N >= {_n(min(r['refused_n']))}"
        for key in ("time_ok_n", "mem_ok_n"):
            per = []
            for g in gpus:
                r = next(x for x in rs if x["gpu"] == g)
                ns = r[key]
                total = len([p for p in pts if p.gpu == g and p.label == label])
                what = ("every N" if len(ns) == total else "no N" if not ns
                        else "N = " + ", ".join(_n(n) for n in ns))
                per.append(f"{g.upper()}: {what}")
            row.append("; ".join(per))
        cells.append(row)
    return markdown_table(head, cells) if markdown else text_table(head, cells)


def csv_rows(pts: list[Point]) -> list[dict]:
    return [dict(gpu=p.gpu, tokens=p.shape.tokens, hidden=p.shape.hidden, vocab=p.shape.vocab,
                 dtype=p.shape.dtype, frozen_head=p.frozen, variant=p.variant,
                 setting=p.setting, plan=p.note,
                 predicted_ms=None if p.seconds is None else p.seconds * 1e3,
                 vs_floor=p.vs_floor, peak_extra_mib=None if p.peak is None else p.peak / MIB,
                 mem_vs_min_liger_cce=p.vs_peers, on_front=p.on_front, refused=p.refused)
            for p in pts]


def write_csv(pts: list[Point], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_rows(path, csv_rows(pts), CSV_COLUMNS)
    return path


def plot(pts: list[Point], path, tokens=(1024, 8192, 65536)) -> Path | None:
    """Predicted time / floor against peak extra memory, one panel per (GPU, N)
    of ``tokens``; the front joined by a line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        return None
    gpus = list(dict.fromkeys(p.gpu for p in pts))
    tokens = [n for n in tokens if any(p.shape.tokens == n for p in pts)]
    fig, axes = plt.subplots(len(tokens), len(gpus), figsize=(6.2 * len(gpus), 4.6 * len(tokens)),
                             squeeze=False)
    colors = {"fastirl-triton": "tab:blue", "fastirl-triton-fused": "tab:cyan",
              "liger": "tab:orange", "cce": "tab:red", "naive": "tab:gray",
              FLOOR: "black"}
    for i, n in enumerate(tokens):
        for j, g in enumerate(gpus):
            ax = axes[i][j]
            sel = [p for p in pts if p.gpu == g and p.shape.tokens == n and p.seconds is not None]
            at: dict = {}                 # points of the same plan share one label
            for p in sel:
                at.setdefault((p.peak, p.seconds), []).append(p)
            for group in at.values():
                p = group[0]
                marker = "*" if p.variant == FLOOR else ("o" if p.on_front else "x")
                ax.scatter(p.peak / GIB, p.vs_floor, c=colors.get(p.variant, "tab:green"),
                           marker=marker, s=60 if p.on_front else 40, zorder=3)
                label = " = ".join(q.label.replace("fastirl-triton@", "@")
                                   .replace("fastirl-", "") for q in group)
                ax.annotate(label, (p.peak / GIB, p.vs_floor), fontsize=7, xytext=(4, 3),
                            textcoords="offset points")
            front = sorted((p.peak / GIB, p.vs_floor) for p in sel if p.on_front)
            if front:
                ax.plot(*zip(*front), color="tab:blue", alpha=0.4, zorder=2)
            ax.axhline(TIME_LIMIT, color="tab:green", linestyle=":", linewidth=1)
            peers = [p.peak / GIB for p in sel if p.variant in ("liger", "cce")]
            if peers:
                ax.axvline(min(peers), color="tab:red", linestyle=":", linewidth=1)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.set_yticks([t for t in (1, 1.2, 1.5, 2, 3, 4, 6, 8, 12)
                           if t <= 1.15 * max(p.vs_floor for p in sel)])
            ax.set_xlabel("modelled peak extra memory (GiB, outputs included)")
            ax.set_ylabel("predicted time / calibrated floor")
            frozen = " (frozen head)" if sel and sel[0].frozen else ""
            ax.set_title(f"{g.upper()}, N = {n}{frozen}", fontsize=9)
            ax.grid(which="both", alpha=0.3)
    s0 = pts[0].shape
    fig.suptitle(f"predicted time-memory front, H={s0.hidden} V={s0.vocab} {s0.dtype} "
                 f"(o: on the front, x: dominated; dotted: {TIME_LIMIT}x floor, "
                 f"min(Liger, CCE) memory)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(pts: list[Point], *, markdown: bool = False, detail_tokens: int = 8192) -> str:
    """The text --pareto prints: per GPU the sweep table and the detail at
    ``detail_tokens``, then the worst cases."""
    out = []
    frozen = " (frozen head: need_weight=False)" if pts and pts[0].frozen else ""
    s0 = pts[0].shape
    for g in dict.fromkeys(p.gpu for p in pts):
        out += [f"\n{g.upper()}: predicted time / calibrated floor, modelled peak extra memory "
                f"(outputs included), Pareto front{frozen}; H={s0.hidden} V={s0.vocab} "
                f"{s0.dtype}:", sweep_table(pts, g, markdown)]
        if any(p.shape.tokens == detail_tokens for p in pts):
            out += [f"\n{g.upper()}, N={detail_tokens}:", detail_table(pts, g, detail_tokens,
                                                                      markdown)]
    out += [f"\nWorst case over N per setting (time / calibrated floor; peak extra memory / "
            f"min(Liger, CCE)){frozen}:", worst_table(pts, markdown)]
    return "\n".join(out)
