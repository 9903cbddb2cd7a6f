"""``python -m fastirl.bench.roofline``: the cost model's command line.

The model is :mod:`fastirl.bench.launches` (what a launch costs),
:mod:`fastirl.bench.model` (fastirl's launches from the backends' planners)
and :mod:`fastirl.bench.peers` (the other implementations); the published
measurements it is calibrated and checked against are
:mod:`fastirl.bench.calibration`.  This module prints the tables, writes the
CSV (with :func:`fastirl.bench.report.write_rows`) and the plot.

    python -m fastirl.bench.roofline                 # Llama-3-8B head, H100, N = 1k..64k
    python -m fastirl.bench.roofline --calibration   # every published figure vs the model
    python -m fastirl.bench.roofline --gpu h200 --breakdown
    python -m fastirl.bench.roofline --device cpu --batch 2 --seq 4096 --hidden 2048 \\
        --vocab 128256 --threads 2
    python -m fastirl.bench.roofline --pareto        # memory settings: the time-memory front
    python -m fastirl.bench.roofline --pareto --frozen-head
    python -m fastirl.bench.roofline --variants fastirl-triton@compact,liger,cce

The prediction functions of :mod:`fastirl.bench.predict` are re-exported
here (``roofline.predict``, ...) for the code that imported them from this
module.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from fastirl.backends.hardware import GPUS, gpu

from . import calibration as CAL
from .launches import DEFAULT_OPTIONS, Options, Prediction, Shape, calibrate_cpu
from .predict import (bench_hardware, cpu_variants, cuda_variants, predict,  # noqa: F401
                      predict_all, predict_ms, sweep)
from .report import markdown_table, text_table, write_rows

__all__ = ["cuda_variants", "cpu_variants", "predict", "predict_all", "predict_ms",
           "bench_hardware", "rows", "main", "CSV_COLUMNS", "table", "sweep_table",
           "calibration_table"]

CSV_COLUMNS = ["variant", "gpu", "launches", "flops", "hbm_bytes", "predicted_ms",
               "predicted_vs_floor", "mode", "tokens", "hidden", "vocab", "dtype",
               "peak_extra_mib", "datasheet_ms", "datasheet_vs_floor", "inputs", "options"]


def _fmt_ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms / 1e3:.2f} s" if ms >= 1e4 else f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"


def _datasheet(preds: list[Prediction]) -> tuple[list[float], float]:
    """Seconds of each prediction at data-sheet peaks, and the floor's."""
    secs = []
    for p in preds:
        q = replace(p, calibrated=False)
        secs.append(q.seconds)
    floor = predict("matmul-floor", preds[0].shape, preds[0].hw,
                    options=replace(DEFAULT_OPTIONS, calibrated=False)).seconds
    return secs, floor


def _options_label(o: Options) -> str:
    flags = ["no " + k for k in ("dw_zero_fill", "lookahead", "addmm_out_dtype")
             if not getattr(o, k)]
    flags += [k for k in ("slab_dx_direct", "direct_dw") if getattr(o, k)]
    flags += [] if o.slab_buffer_reuse else ["no_slab_buffer_reuse"]
    return "defaults" if not flags else ", ".join(flags)


def rows(preds: list[Prediction], options: Options = DEFAULT_OPTIONS) -> list[dict]:
    """CSV rows (CSV_COLUMNS) of predictions."""
    ds, ds_floor = _datasheet(preds)
    return [dict(variant=p.variant, gpu=p.hw.name, launches=p.launches, flops=p.flops,
                 hbm_bytes=p.hbm_bytes, predicted_ms=p.seconds * 1e3,
                 predicted_vs_floor=p.vs_floor, mode=p.mode, tokens=p.shape.tokens,
                 hidden=p.shape.hidden, vocab=p.shape.vocab, dtype=p.shape.dtype,
                 peak_extra_mib=p.peak_extra_bytes / 2**20, datasheet_ms=d * 1e3,
                 datasheet_vs_floor=d / ds_floor, inputs=options.inputs,
                 options=_options_label(options))
            for p, d in zip(preds, ds)]


def table(preds: list[Prediction], markdown: bool = False) -> str:
    ds, ds_floor = _datasheet(preds)
    head = ["variant", "launches", "TFLOP", "HBM GB", "predicted", "vs floor", "data-sheet",
            "vs floor (data-sheet)", "peak extra", "note"]
    cells = [[p.variant, str(p.launches), f"{p.flops / 1e12:.2f}", f"{p.hbm_bytes / 1e9:.1f}",
              _fmt_ms(p.seconds), f"{p.vs_floor:.2f}x", _fmt_ms(d), f"{d / ds_floor:.2f}x",
              f"{p.peak_extra_bytes / 2**30:.2f} GiB", p.note] for p, d in zip(preds, ds)]
    return markdown_table(head, cells) if markdown else text_table(head, cells)


def sweep_table(sw: dict[int, list[Prediction]], what: str = "time",
                markdown: bool = False) -> str:
    ns = sorted(sw)
    names = [p.variant for p in sw[ns[0]]]
    head = ["variant"] + [f"N={n // 1024}k" if n % 1024 == 0 else f"N={n}" for n in ns]
    cells = []
    for i, name in enumerate(names):
        row = [name]
        for n in ns:
            p = sw[n][i]
            row.append(_fmt_ms(p.seconds) + f" ({p.vs_floor:.2f}x)" if what == "time"
                       else f"{p.peak_extra_bytes / 2**30:.2f} GiB")
        cells.append(row)
    return markdown_table(head, cells) if markdown else text_table(head, cells)


def calibration_table(markdown: bool = False) -> tuple[str, list[dict]]:
    """Every published figure beside the model's prediction (calibrated and at
    data-sheet peaks) and the ratio."""
    got = CAL.table()
    raw = CAL.table(calibrated=False)
    head = ["figure", "source", "GPU", "published", "predicted", "ratio", "data-sheet",
            "role"]

    def fmt(v, what):
        return f"{v:.0f} MiB" if what == "memory" else (f"{v:.2f} ms" if v < 10 else
                                                          f"{v:.1f} ms")
    cells = [[r["figure"], r["source"], r["gpu"].upper(), fmt(r["published"], r["what"]),
              fmt(r["predicted"], r["what"]),
              f"{r['ratio']:.2f}" + ("" if r["ok"] else " (outside ±25 %)"),
              fmt(q["predicted"], q["what"]), r["role"]] for r, q in zip(got, raw)]
    return (markdown_table(head, cells) if markdown else text_table(head, cells)), got


def plot(sw: dict[int, list[Prediction]], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ns = sorted(sw)
    names = [p.variant for p in sw[ns[0]]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, name in enumerate(names):
        style = dict(marker="o", label=name, linestyle="--" if not name.startswith("fastirl")
                     else "-")
        axes[0].plot(ns, [sw[n][i].seconds * 1e3 for n in ns], **style)
        if name != "matmul-floor":
            axes[1].plot(ns, [sw[n][i].peak_extra_bytes / 2**30 for n in ns], **style)
    for ax, label in ((axes[0], "predicted forward+backward (ms)"),
                      (axes[1], "modelled peak extra memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens N = B*T")
        ax.set_ylabel(label)
        ax.grid(which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    s0 = sw[ns[0]][0]
    fig.suptitle(f"roofline model (calibrated): H={s0.shape.hidden} V={s0.shape.vocab} "
                 f"{s0.shape.dtype} on {s0.hw.name}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastirl.bench.roofline",
        description="Roofline cost model of the fused IQ loss and its anchors: per launch "
                    "FLOPs, HBM bytes and launches, charged at the GPU's achievable "
                    "fractions of its peaks (calibrated on published measurements).")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)} (default h100)")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="gpu: the --gpu figures; cpu: this CPU, calibrated (a few seconds)")
    p.add_argument("--threads", type=int, help="torch threads of the CPU calibration")
    p.add_argument("--variants", help="comma-separated variant names (default: all of the device)")
    p.add_argument("--softcap", action="store_true", help="model a logit soft cap")
    p.add_argument("--inputs", choices=("lm", "random"), default="lm",
                   help="logits' distribution (decides CCE's gradient filtering; default lm)")
    p.add_argument("--uncalibrated", action="store_true",
                   help="charge every launch at data-sheet peaks")
    p.add_argument("--no-dw-zero-fill", action="store_true",
                   help="model the engine without the float32 dW zero-fill")
    p.add_argument("--no-lookahead", action="store_true",
                   help="model chunks without the look-ahead row")
    p.add_argument("--torch-before-2.8", dest="old_torch", action="store_true",
                   help="model the dW fallback of a torch without addmm(out_dtype=)")
    p.add_argument("--slab-dx-direct", action="store_true",
                   help="model the proposed engine change: the slabs plan's dx GEMM "
                        "accumulates straight into its float32 buffer")
    p.add_argument("--direct-dw", action="store_true",
                   help="model the proposed engine change: a dW made by one GEMM (one chunk, "
                        "or one block of rows per slab) written in the weight's dtype")
    p.add_argument("--no-slab-buffer-reuse", action="store_true",
                   help="model the earlier engine: a new float32 dW slab buffer per slab "
                        "while the last one is still referenced")
    p.add_argument("--frozen-head", action="store_true",
                   help="a frozen head (no dW: LoRA on the body) for fastirl, Liger, CCE, "
                        "the naive loss and the floor")
    p.add_argument("--pareto", action="store_true",
                   help="every memory setting of fastirl-triton (and a few byte budgets), "
                        "fastirl-triton-fused, Liger, CCE and the naive loss against tokens on "
                        "--gpus: predicted time / floor, peak extra memory, the Pareto front, "
                        "and the worst case per setting over N")
    p.add_argument("--gpus", default="h100,h200",
                   help="GPUs of --pareto (default %(default)s)")
    p.add_argument("--calibration", action="store_true",
                   help="print every published figure beside its prediction, then exit")
    p.add_argument("--sweep-tokens", default="1024,2048,4096,8192,16384,32768,65536",
                   help="token counts of the sweep table / plot ('' for none)")
    p.add_argument("--csv", help="write the main shape's predictions (and the sweep) to this CSV")
    p.add_argument("--png", help="plot predicted time and memory against tokens to this PNG")
    p.add_argument("--markdown", action="store_true", help="markdown tables")
    p.add_argument("--breakdown", action="store_true", help="per-launch-kind times per variant")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.calibration:
        text, got = calibration_table(args.markdown)
        print(text)
        bad = [r for r in got if not r["ok"]]
        print(f"\n{len(got)} published figures, {len(got) - len(bad)} within ±25 % of the "
              f"prediction" + (": outside: " + "; ".join(
                  f"{r['figure']} ({r['ratio']:.2f})" for r in bad) if bad else ""))
        return 0
    for k in ("batch", "seq", "hidden", "vocab"):
        if getattr(args, k) < 1:
            print(f"roofline: --{k} must be >= 1", file=sys.stderr)
            return 2
    try:
        hw = calibrate_cpu(threads=args.threads) if args.device == "cpu" else gpu(args.gpu)
    except ValueError as exc:
        print(f"roofline: {exc}", file=sys.stderr)
        return 2
    opts = Options(dw_zero_fill=not args.no_dw_zero_fill, lookahead=not args.no_lookahead,
                   addmm_out_dtype=not args.old_torch, calibrated=not args.uncalibrated,
                   inputs=args.inputs, slab_dx_direct=args.slab_dx_direct,
                   direct_dw=args.direct_dw,
                   slab_buffer_reuse=not args.no_slab_buffer_reuse)
    s = Shape(args.batch * args.seq, args.hidden, args.vocab, args.dtype)
    if args.pareto:
        return _pareto(args, s, opts)
    names = [v.strip() for v in args.variants.split(",")] if args.variants else None
    if names is None and args.frozen_head:
        names = [v for v in (cuda_variants() if hw.kind == "cuda" else cpu_variants())
                 if v in ("fastirl-triton", "fastirl-cuda", "fastirl-cpu", "liger", "cce",
                          "naive", "matmul-floor")]
    try:
        preds = predict_all(s, hw, names, softcap=args.softcap, options=opts,
                            need_weight=not args.frozen_head)
    except ValueError as exc:
        print(f"roofline: {exc}", file=sys.stderr)
        return 2
    if hw.kind == "cpu":
        print(f"calibrated CPU: {hw.gemm_flops('bfloat16') / 1e12:.2f} TFLOP/s bf16, "
              f"{hw.gemm_flops('float32') / 1e12:.3f} TFLOP/s fp32 GEMM, "
              f"{hw.bandwidth / 1e9:.1f} GB/s ({torch.get_num_threads()} threads)")
    cal = hw.calibration
    print(f"N={s.tokens} H={s.hidden} V={s.vocab} {s.dtype} on {hw.name} "
          f"({'data-sheet peaks' if args.uncalibrated else cal.source}; inputs {args.inputs}; "
          f"engine: {_options_label(opts)}):")
    print(table(preds, args.markdown))
    if args.breakdown:
        for p in preds:
            parts = ", ".join(f"{k} {_fmt_ms(v)}" for k, v in p.by_kind().items())
            print(f"  {p.variant}: {parts}")
    all_rows = rows(preds, opts)
    tokens = [int(t) for t in args.sweep_tokens.split(",") if t.strip()]
    if tokens:
        sw = sweep(s, hw, tokens, names, softcap=args.softcap, options=opts,
                   need_weight=not args.frozen_head)
        print("\npredicted forward+backward against tokens (x the floor):")
        print(sweep_table(sw, "time", args.markdown))
        print("\nmodelled peak extra memory against tokens:")
        print(sweep_table(sw, "memory", args.markdown))
        for n in sorted(sw):
            if n != s.tokens:
                all_rows += rows(sw[n], opts)
        if args.png:
            out = plot(sw, Path(args.png))
            print(f"wrote {out}" if out else "matplotlib not installed: no plot")
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        write_rows(args.csv, all_rows, CSV_COLUMNS)
        print(f"wrote {args.csv}")
    return 0


def _pareto(args, s: Shape, opts: Options) -> int:
    from . import pareto as PA
    tokens = [int(t) for t in args.sweep_tokens.split(",") if t.strip()] or [s.tokens]
    try:
        gpus = [gpu(g.strip()) for g in args.gpus.split(",") if g.strip()]
    except ValueError as exc:
        print(f"roofline: {exc}", file=sys.stderr)
        return 2
    pts = PA.sweep(s, gpus, tokens, need_weight=not args.frozen_head, options=opts)
    print(f"H={s.hidden} V={s.vocab} {s.dtype}; inputs {args.inputs}; engine: "
          f"{_options_label(opts)}; {'data-sheet peaks' if args.uncalibrated else 'calibrated'}"
          f"; fastirl-cuda: the same launches and memory as fastirl-triton")
    print(PA.report(pts, markdown=args.markdown,
                    detail_tokens=s.tokens if s.tokens in tokens else tokens[0]))
    if args.csv:
        print(f"wrote {PA.write_csv(pts, args.csv)}")
    if args.png:
        out = PA.plot(pts, Path(args.png))
        print(f"wrote {out}" if out else "matplotlib not installed: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
