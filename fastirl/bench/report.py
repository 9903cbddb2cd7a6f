"""Results: the CSV format, the environment record, the tables and the plots.

Imports nothing heavy at import time (``benchmarks/make_table.py`` uses it on
CSV files alone).
"""

from __future__ import annotations

import csv
import os
import platform
import statistics
import subprocess
from pathlib import Path

# One row per (variant, shape).  Times in milliseconds, memory in MiB.
COLUMNS = [
    "run_id", "timestamp", "sweep", "variant", "mode", "status", "reason",
    "device", "device_name", "cpu_model", "threads", "torch_version", "triton_version",
    "fastirl_version", "python_version", "git_rev",
    "dtype", "batch", "seq", "tokens", "hidden", "vocab", "td_weight", "repeats",
    "fwd_ms_median", "fwd_ms_min", "fwd_ms_max", "fb_ms_median", "fb_ms_min", "fb_ms_max",
    "peak_mib", "peak_first_mib", "retained_mib", "estimate_mib", "compile_s",
    "time_vs_naive", "time_vs_floor", "mem_vs_naive",
    "check", "mem_method", "loadavg_1m", "fwd_ms_all", "fb_ms_all",
    "predicted_ms", "predicted_on", "inputs", "predicted_peak_mib",
]

MIB = float(1 << 20)


# --------------------------------------------------------------------------- environment

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return "not installed"


def git_revision() -> str:
    """Short commit of the checkout fastirl is imported from, "+dirty" when the
    tree has changes; "unknown" outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device) -> dict:
    import torch

    import fastirl

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_model()
    return {
        "device": device.type,
        "device_name": name,
        "cpu_model": cpu_model(),
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "fastirl_version": fastirl.__version__,
        "python_version": platform.python_version(),
        "git_rev": git_revision(),
    }


# --------------------------------------------------------------------------- rows

def _median(xs):
    return statistics.median(xs) if xs else None


def make_row(base: dict, job: dict, res: dict) -> dict:
    fwd, fb = res.get("fwd_ms") or [], res.get("fb_ms") or []
    mib = lambda b: None if b is None else b / MIB  # noqa: E731
    row = dict(base)
    row.update(
        sweep=job["sweep"], variant=job["variant"], mode=job["mode"],
        status=res.get("status", "failed"), reason=res.get("reason", ""),
        threads=res.get("threads", ""), dtype=job["dtype"], batch=job["batch"], seq=job["seq"],
        tokens=job["batch"] * job["seq"], hidden=job["hidden"], vocab=job["vocab"],
        td_weight=job["td_weight"] if job["mode"] == "IQ" else 0.0, repeats=job["repeats"],
        fwd_ms_median=_median(fwd), fwd_ms_min=min(fwd) if fwd else None,
        fwd_ms_max=max(fwd) if fwd else None,
        fb_ms_median=_median(fb), fb_ms_min=min(fb) if fb else None,
        fb_ms_max=max(fb) if fb else None,
        peak_mib=mib(res.get("peak_bytes")), peak_first_mib=mib(res.get("peak_first_bytes")),
        retained_mib=mib(res.get("retained_bytes")), estimate_mib=mib(job.get("estimate_bytes")),
        compile_s=res.get("compile_s"), check=res.get("check", ""),
        mem_method=res.get("mem_method", ""), loadavg_1m=res.get("loadavg"),
        fwd_ms_all=";".join(f"{v:.3f}" for v in fwd), fb_ms_all=";".join(f"{v:.3f}" for v in fb),
    )
    return row


def add_ratios(rows: list[dict]) -> None:
    """time_vs_naive / time_vs_floor (forward+backward medians) and mem_vs_naive,
    within each shape of each sweep."""
    def key(r):
        return (r["sweep"], r["dtype"], int(r["tokens"]), int(r["hidden"]), int(r["vocab"]))

    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    for group in groups.values():
        ok = {r["variant"]: r for r in group if r["status"] == "ok"}
        naive, floor = ok.get("naive"), ok.get("matmul-floor")
        for r in group:
            if r["status"] != "ok":
                continue
            t = _f(r["fb_ms_median"])
            if naive and t is not None and _f(naive["fb_ms_median"]):
                r["time_vs_naive"] = t / _f(naive["fb_ms_median"])
            if floor and t is not None and _f(floor["fb_ms_median"]):
                r["time_vs_floor"] = t / _f(floor["fb_ms_median"])
            m = _f(r["peak_mib"])
            if naive and m is not None and _f(naive["peak_mib"]):
                r["mem_vs_naive"] = m / _f(naive["peak_mib"])


def _f(v):
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def write_rows(path, rows: list[dict], columns: list[str]) -> None:
    """CSV of ``rows`` with exactly ``columns`` (missing values empty, floats
    to 6 significant digits): the one writer of fastirl-bench's results and
    the roofline model's predictions."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt_csv(r.get(k)) for k in columns})


def append_row(path, row: dict, columns: list[str]) -> None:
    """Append one row (header first when the file is new or empty): results
    stream to disk as each run finishes."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: _fmt_csv(row.get(k)) for k in columns})


def write_csv(path: Path, rows: list[dict]) -> None:
    write_rows(path, rows, COLUMNS)


def _fmt_csv(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- tables

def fmt_ms(v) -> str:
    v = _f(v)
    if v is None:
        return "-"
    if v >= 1000:
        return f"{v / 1000:.2f} s"
    if v >= 10:
        return f"{v:.0f} ms"
    return f"{v:.2f} ms"


def fmt_spread(r, prefix) -> str:
    med, lo, hi = (_f(r.get(f"{prefix}_median")), _f(r.get(f"{prefix}_min")),
                   _f(r.get(f"{prefix}_max")))
    if med is None:
        return "-"
    if lo is None or hi is None or med == 0:
        return fmt_ms(med)
    return f"{fmt_ms(med)} ±{100 * (hi - lo) / 2 / med:.0f}%"


def fmt_mib(v) -> str:
    v = _f(v)
    if v is None:
        return "-"
    if v >= 1024:
        return f"{v / 1024:.2f} GiB"
    return f"{v:.0f} MiB" if v >= 10 else f"{v:.1f} MiB"


def fmt_ratio(v) -> str:
    v = _f(v)
    return "-" if v is None else f"{v:.2f}x"


TABLE_HEAD = ["variant", "mode", "forward", "forward+backward", "peak extra memory",
              "time / naive", "time / floor", "memory / naive", "predicted (/ measured)",
              "predicted memory (/ measured)"]


def add_predictions(rows: list[dict], hw, loss_preset: str = "default",
                    inputs: str = "lm") -> None:
    """predicted_ms and predicted_peak_mib of the cost model
    (fastirl.bench.predict, calibrated) beside the measured forward+backward and
    peak extra memory, for the variants it models on this device."""
    from . import predict as model
    for r in rows:
        if r["status"] != "ok":
            continue
        p = model.predict_point(r["variant"], tokens=int(r["tokens"]), hidden=int(r["hidden"]),
                                vocab=int(r["vocab"]), dtype=r["dtype"], hw=hw,
                                loss_preset=loss_preset, inputs=inputs)
        if p is not None:
            r["predicted_ms"] = p.seconds * 1e3
            r["predicted_peak_mib"] = p.peak_extra_bytes / MIB
            r["predicted_on"] = hw.name


def describe_hardware(hw) -> str:
    return (f"{hw.name}: {hw.gemm_flops('bfloat16') / 1e12:.3g} TFLOP/s bf16 GEMM, "
            f"{hw.gemm_flops('float32') / 1e12:.3g} TFLOP/s fp32 GEMM, "
            f"{hw.bandwidth / 1e9:.0f} GB/s")


def fmt_predicted(r: dict) -> str:
    pred, meas = _f(r.get("predicted_ms")), _f(r.get("fb_ms_median"))
    if pred is None:
        return "-"
    return fmt_ms(pred) + (f" ({pred / meas:.2f}x)" if meas else "")


def fmt_predicted_memory(r: dict) -> str:
    pred, meas = _f(r.get("predicted_peak_mib")), _f(r.get("peak_mib"))
    if pred is None:
        return "-"
    return fmt_mib(pred) + (f" ({pred / meas:.2f}x)" if meas else "")


def table_rows(rows: list[dict]) -> tuple[list[list[str]], list[str]]:
    """Cells of the results table and the one-line notes of variants not measured."""
    cells, notes = [], []
    for r in rows:
        if r["status"] != "ok":
            notes.append(f"{r['variant']}: {r['status']} - {r['reason']}")
            continue
        cells.append([r["variant"], r["mode"], fmt_spread(r, "fwd_ms"), fmt_spread(r, "fb_ms"),
                      fmt_mib(r["peak_mib"]), fmt_ratio(r.get("time_vs_naive")),
                      fmt_ratio(r.get("time_vs_floor")), fmt_ratio(r.get("mem_vs_naive")),
                      fmt_predicted(r), fmt_predicted_memory(r)])
    return cells, notes


def text_table(head: list[str], cells: list[list[str]]) -> str:
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
              for i, h in enumerate(head)]
    line = lambda xs: "  ".join(x.ljust(w) for x, w in zip(xs, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])]
    out += [line(c) for c in cells]
    return "\n".join(out)


def markdown_table(head: list[str], cells: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(out)


def shape_label(r: dict) -> str:
    return (f"B={r['batch']} T={r['seq']} (N={r['tokens']}) H={r['hidden']} V={r['vocab']} "
            f"{r['dtype']}")


def sweep_table(rows: list[dict], sweep: str, axis: str, what: str, markdown=True) -> str:
    """variant x axis value table of ``what`` ("peak_mib" or "fb_ms_median")."""
    sel = [r for r in rows if r["sweep"] == sweep]
    if not sel:
        return ""
    xs = sorted({int(r[axis]) for r in sel})
    variants = list(dict.fromkeys(r["variant"] for r in sel))
    fmt = fmt_mib if what.endswith("mib") else fmt_ms
    head = ["variant"] + [f"{axis[0].upper()}={x}" if axis == "vocab" else f"N={x}" for x in xs]
    cells = []
    for v in variants:
        row = [v]
        for x in xs:
            hit = [r for r in sel if r["variant"] == v and int(r[axis]) == x]
            if hit and hit[0]["status"] == "ok":
                row.append(fmt(hit[0][what]))
            elif hit:
                row.append(hit[0]["status"])
            else:
                row.append("-")
        cells.append(row)
    return markdown_table(head, cells) if markdown else text_table(head, cells)


# --------------------------------------------------------------------------- plots

def plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """PNG plots: summary bars of the main shape; time and peak memory against
    tokens and against vocabulary size (log axes) for the sweeps."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    main = [r for r in rows if r["sweep"] == "main" and r["status"] == "ok"]
    if main:
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(main) + 1.8))
        names = [r["variant"] for r in main]
        for ax, key, label, fmt in (
                (axes[0], "fb_ms_median", "forward+backward time (ms, median)", fmt_ms),
                (axes[1], "peak_mib", "peak extra memory (MiB)", fmt_mib)):
            vals = [_f(r[key]) or 0 for r in main]
            colors = [_color(r["mode"]) for r in main]
            bars = ax.barh(names, vals, color=colors)
            for bar, v in zip(bars, vals):
                ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + fmt(v),
                        va="center", fontsize=8)
            ax.set_xlim(0, max(vals) * 1.25 if max(vals) > 0 else 1)
            ax.set_xlabel(label)
            ax.invert_yaxis()
            ax.grid(axis="x", alpha=0.3)
        from matplotlib.patches import Patch
        modes = list(dict.fromkeys(r["mode"] for r in main))
        axes[1].legend(handles=[Patch(color=_color(m), label=m) for m in modes], fontsize=8,
                       loc="lower right")
        fig.suptitle(shape_label(main[0]) + f" - {main[0]['device_name']}", fontsize=9)
        fig.tight_layout()
        path = out_dir / "summary.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    for sweep, axis, xlabel in (("tokens", "tokens", "tokens N = B*T"),
                                ("vocab", "vocab", "vocabulary size V")):
        sel = [r for r in rows if r["sweep"] == sweep and r["status"] == "ok"]
        if not sel:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for v in dict.fromkeys(r["variant"] for r in sel):
            pts = sorted((int(r[axis]), r) for r in sel if r["variant"] == v)
            xs = [p[0] for p in pts]
            mode = pts[0][1]["mode"]
            style = dict(marker="o", label=f"{v} ({mode})",
                         linestyle="--" if mode != "IQ" else "-")
            axes[0].plot(xs, [_f(p[1]["fb_ms_median"]) for p in pts], **style)
            if mode != "floor":
                axes[1].plot(xs, [_f(p[1]["peak_mib"]) for p in pts], **style)
        for ax, ylabel in ((axes[0], "forward+backward time (ms, median)"),
                           (axes[1], "peak extra memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fixed = (f"H={sel[0]['hidden']} V={sel[0]['vocab']}" if axis == "tokens"
                 else f"N={sel[0]['tokens']} H={sel[0]['hidden']}")
        fig.suptitle(f"{fixed} {sel[0]['dtype']} - {sel[0]['device_name']}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{sweep}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _color(mode: str) -> str:
    return {"IQ": "tab:blue", "CE": "tab:orange", "floor": "tab:gray"}.get(mode, "tab:green")


def describe_env(r: dict) -> str:
    return (f"{r['device']} ({r['device_name']}), {r['threads']} threads, torch "
            f"{r['torch_version']}, triton {r['triton_version']}, fastirl {r['fastirl_version']} "
            f"@ {r['git_rev']}")


def ensure_dir(path) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    if not os.access(p, os.W_OK):
        raise PermissionError(f"output directory {p} is not writable")
    return p
