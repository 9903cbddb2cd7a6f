"""The ``fastirl-bench`` command: argument parsing and orchestration.

Each (variant, shape) runs in a fresh ``python -m fastirl.bench.worker``
process, one after another (never in parallel: timings would interfere).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fastirl._validate import CLI_DTYPES, dtype_arg

from . import report
from .worker import MARKER

GIB = float(1 << 30)

# Named configurations.  A preset sets defaults; explicit options still win.
PRESETS: dict[str, dict] = {
    "default": dict(
        help="quick look at the present device (CPU: < 3 min on 2 cores)",
        cpu=dict(batch=4, seq=256, hidden=256, vocab=8192, dtype="float32"),
        cuda=dict(batch=8, seq=1024, hidden=4096, vocab=128256, dtype="bfloat16"),
        variants="default", sweep="none"),
    "cpu-fp32": dict(
        help="CPU fp32, B=4 T=1024 H=512 V=32000: fastirl torch "
             "backend vs naive IQ vs torch F.linear_cross_entropy vs the matmul floor, "
             "and memory against tokens (N = 1024..16384)",
        cpu=dict(batch=4, seq=1024, hidden=512, vocab=32000, dtype="float32"),
        cuda=dict(batch=4, seq=1024, hidden=512, vocab=32000, dtype="float32"),
        variants="naive,fastirl-torch,fastirl-torch-ce,torch-lce,matmul-floor",
        sweep="tokens", sweep_tokens="1024,2048,4096,8192,16384",
        sweep_variants="naive,fastirl-torch,torch-lce"),
    "readme": dict(
        help="the README figures: default variants, token and vocabulary sweeps",
        cpu=dict(batch=4, seq=1024, hidden=512, vocab=32000, dtype="float32"),
        cuda=dict(batch=8, seq=1024, hidden=4096, vocab=128256, dtype="bfloat16"),
        variants="default", sweep="both"),
}

DEFAULT_SWEEP_TOKENS = "1024,2048,4096,8192,16384"
DEFAULT_SWEEP_VOCAB = "8192,16384,32768,65536,131072"
DTYPES = CLI_DTYPES


class UsageError(Exception):
    """An impossible request: message for the user, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastirl-bench",
        description="Benchmark the fused IQ-Learn loss against the naive loss, the CE anchors "
                    "and the matmul floor: forward and forward+backward time, peak extra "
                    "memory (each variant in a fresh process), CSV and PNG plots.",
        epilog="Presets: " + "; ".join(f"{k}: {v['help']}" for k, v in PRESETS.items()))
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="named configuration (shape, variants, sweeps); explicit options "
                        "override it (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--batch", type=int, help="sequences B")
    p.add_argument("--seq", type=int, help="positions per sequence T")
    p.add_argument("--hidden", type=int, help="hidden size H")
    p.add_argument("--vocab", type=int, help="vocabulary size V")
    p.add_argument("--dtype", type=dtype_arg, metavar="{" + ",".join(DTYPES) + "}",
                   help="input dtype (bf16, fp16, fp32 are accepted too)")
    p.add_argument("--variants",
                   help="comma-separated variant names or groups (default, all, iq, ce, "
                        "memory); a fastirl variant takes a memory setting or budget, "
                        "fastirl-cpu@compact, fastirl-cpu@512MiB, or a chunk size, "
                        "fastirl-cpu@4096 (docs/memory.md); see --list")
    p.add_argument("--repeats", type=int,
                   help="timed repeats of forward and of forward+backward (default 3 on CPU, "
                        "10 on CUDA); medians are reported")
    p.add_argument("--warmup", type=int,
                   help="untimed calls after the two memory calls, which already warm up "
                        "(default 0 on CPU, 2 on CUDA)")
    p.add_argument("--td-weight", type=float, default=0.1,
                   help="lambda of the IQ variants (default %(default)s)")
    p.add_argument("--loss-preset", default="default",
                   help="fastirl precision preset of the fastirl variants (default, fast, highest)")
    p.add_argument("--inputs", choices=("lm", "random"), default="lm",
                   help="logits' distribution: lm (a trained LM's statistics: entropy, "
                        "top-1 gap, tokens above CCE's filter threshold; default) or random "
                        "(N(0, 4) logits, uniform targets: CCE's gradient filter skips nothing)")
    p.add_argument("--ignore-frac", type=float, default=0.0,
                   help="fraction of each sequence marked ignore_index (a prompt); default 0")
    p.add_argument("--sweep", choices=("none", "tokens", "vocab", "both"),
                   help="also sweep tokens N and/or vocabulary V (for the plots)")
    p.add_argument("--sweep-tokens", help=f"token counts N = B*T (default {DEFAULT_SWEEP_TOKENS})")
    p.add_argument("--sweep-vocab", help=f"vocabulary sizes (default {DEFAULT_SWEEP_VOCAB})")
    p.add_argument("--sweep-variants",
                   help="variants of the sweeps (default: naive, every fastirl IQ variant, "
                        "torch-lce, matmul-floor)")
    p.add_argument("--out", default="bench-out",
                   help="output directory for results.csv, table.md and PNGs "
                        "(default %(default)s)")
    p.add_argument("--csv", help="also write the CSV to this file "
                                  "(e.g. benchmarks/results/issue2-cpu.csv)")
    p.add_argument("--threads", type=int,
                   help="torch threads (default: all cores available to the process)")
    p.add_argument("--compile-timeout", type=float,
                   help="seconds torch.compile may take before a compiled variant is skipped "
                        "(default 150 on CPU, 300 on CUDA)")
    p.add_argument("--job-timeout", type=float, default=1200,
                   help="seconds one (variant, shape) process may take (default %(default)s)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the correctness guard (not recommended)")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true",
                   help="list the variants and whether they can run here, then exit")
    p.add_argument("--dry-run", action="store_true",
                   help="print the planned runs and memory estimates, run nothing")
    return p


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise UsageError(f"{what} must be positive integers, got {text!r}")
    return vals


def _device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"device type {dev.type!r} is not supported (cpu or cuda)")
    return dev


def resolve_variants(spec: str, device) -> list[str]:
    """Expand groups and check names; raises UsageError for an unknown name."""
    from . import variants as V

    names = V.all_names()
    out: list[str] = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item == "all":
            out += names
        elif item == "default":
            out += [n for n in names if V.info(n).default and V.relevant(n, device)]
        elif item in ("iq", "ce"):
            out += [n for n in names if V.info(n).mode.lower() == item and V.relevant(n, device)]
        elif item == "memory":
            out += V.memory_group(device)
        elif item in names:
            out.append(item)
        elif V.AT in item:
            try:
                base = V.split_variant(item)[0]
            except ValueError as exc:
                raise UsageError(f"variant {item!r}: {exc}") from None
            if base not in names:
                raise UsageError(f"unknown variant {base!r} in {item!r}; known variants: "
                                 f"{', '.join(names)}")
            out.append(item)
        else:
            raise UsageError(f"unknown variant {item!r}; known variants: {', '.join(names)} "
                             f"(groups: default, all, iq, ce, memory; a fastirl variant "
                             f"takes @fast / @balanced / @compact / @<budget, e.g. 512MiB> / "
                             f"@<chunk size>)")
    if not out:
        raise UsageError("--variants selects no variant")
    return list(dict.fromkeys(out))


def _default_sweep_variants(device) -> str:
    from . import variants as V
    fast = [n for n in V.all_names() if V.fastirl_backend(n) and V.info(n).mode == "IQ"
            and V.relevant(n, device)]
    return ",".join(["naive", *fast, "torch-lce", "matmul-floor"])


def _plan(args, device) -> tuple[list[dict], dict]:
    from . import memory
    from . import variants as V

    preset = PRESETS[args.preset]
    shape = dict(preset["cuda" if device.type == "cuda" else "cpu"])
    for k in ("batch", "seq", "hidden", "vocab", "dtype"):
        if getattr(args, k) is not None:
            shape[k] = getattr(args, k)
    for k in ("batch", "seq", "hidden", "vocab"):
        if shape[k] < 1:
            raise UsageError(f"--{k} must be >= 1, got {shape[k]}")
    if shape["vocab"] < 2:
        raise UsageError("--vocab must be >= 2")
    if shape["dtype"] != "float32" and device.type == "cpu":
        pass   # allowed: bf16 / fp16 GEMMs exist on CPU, but slow; the user asked
    repeats = args.repeats if args.repeats is not None else (10 if device.type == "cuda" else 3)
    if repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {repeats}")
    warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 0)
    if warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {warmup}")
    if not 0.0 <= args.ignore_frac < 1.0:
        raise UsageError(f"--ignore-frac must be in [0, 1), got {args.ignore_frac}")
    if args.td_weight < 0:
        raise UsageError(f"--td-weight must be >= 0, got {args.td_weight}")
    from fastirl import PRESETS as LOSS_PRESETS
    if args.loss_preset not in LOSS_PRESETS:
        raise UsageError(f"--loss-preset must be one of {sorted(LOSS_PRESETS)}, "
                         f"got {args.loss_preset!r}")
    sweep = args.sweep or preset.get("sweep", "none")
    tokens_points = vocab_points = []
    if sweep in ("tokens", "both"):
        tokens_points = _ints(args.sweep_tokens or preset.get("sweep_tokens")
                              or DEFAULT_SWEEP_TOKENS, "--sweep-tokens")
    if sweep in ("vocab", "both"):
        vocab_points = _ints(args.sweep_vocab or preset.get("sweep_vocab")
                             or DEFAULT_SWEEP_VOCAB, "--sweep-vocab")
        if min(vocab_points) < 2:
            raise UsageError("--sweep-vocab values must be >= 2")
    if args.compile_timeout is not None and args.compile_timeout <= 0:
        raise UsageError("--compile-timeout must be > 0")
    if args.job_timeout <= 0:
        raise UsageError("--job-timeout must be > 0")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    main_variants = resolve_variants(args.variants or preset["variants"], device)
    sweep_variants = resolve_variants(args.sweep_variants or preset.get("sweep_variants")
                                      or _default_sweep_variants(device),
                                      device) if sweep != "none" else []
    compile_timeout = args.compile_timeout or (300.0 if device.type == "cuda" else 150.0)

    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[shape["dtype"]]
    avail = memory.available_bytes(device)
    budget = 0.9 * avail

    common = dict(device=str(device), dtype=shape["dtype"], repeats=repeats, warmup=warmup,
                  td_weight=args.td_weight, loss_preset=args.loss_preset,
                  ignore_frac=args.ignore_frac, inputs=args.inputs,
                  check=not args.no_check, seed=args.seed,
                  threads=args.threads, compile_timeout=compile_timeout)

    def job(variant, sweep_name, batch, seq, vocab, forward=True):
        n, h = batch * seq, shape["hidden"]
        inputs = (n * h + vocab * h) * itemsize + n * 8
        est = inputs + V.estimate_extra_bytes(variant, tokens=n, hidden=h, vocab=vocab,
                                              itemsize=itemsize, device_type=device.type)
        if inputs > budget:
            raise UsageError(
                f"shape B={batch} T={seq} H={h} V={vocab} {shape['dtype']} needs "
                f"{inputs / GIB:.1f} GiB for its inputs alone; {avail / GIB:.1f} GiB of "
                f"{device.type} memory is available")
        return dict(common, variant=variant, mode=V.info(variant).mode, sweep=sweep_name,
                    batch=batch, seq=seq, hidden=h, vocab=vocab, estimate_bytes=est,
                    inputs_bytes=inputs, forward=forward)

    jobs = [job(v, "main", shape["batch"], shape["seq"], shape["vocab"]) for v in main_variants]
    for n in tokens_points:
        b = shape["batch"] if n % shape["batch"] == 0 else 1
        jobs += [job(v, "tokens", b, n // b, shape["vocab"], forward=False)
                 for v in sweep_variants]
    for vocab in vocab_points:
        jobs += [job(v, "vocab", shape["batch"], shape["seq"], vocab, forward=False)
                 for v in sweep_variants]

    # Only now the (possibly slow) availability checks: they load the backends.
    unavailable = {v: V.unavailable_reason(v, device) for v in dict.fromkeys(
        j["variant"] for j in jobs)}
    for j in jobs:
        if unavailable[j["variant"]]:
            j["skip"] = unavailable[j["variant"]]
        elif j["estimate_bytes"] > budget:
            j["skip"] = (f"needs ~{j['estimate_bytes'] / GIB:.1f} GiB (estimate), "
                         f"{avail / GIB:.1f} GiB available on {device.type}")
    main_jobs = [j for j in jobs if j["sweep"] == "main"]
    if all("skip" in j for j in main_jobs):
        raise UsageError("no requested variant can run at this shape here: "
                         + "; ".join(f"{j['variant']}: {j['skip']}" for j in main_jobs))
    seen = {}
    for i, j in enumerate(jobs):   # a sweep point equal to the main shape reuses its result
        key = (j["variant"], j["batch"], j["seq"], j["vocab"])
        if key in seen:
            j["same_as"] = seen[key]
        else:
            seen[key] = i
    return jobs, dict(shape, repeats=repeats, available=avail, sweep=sweep)


def _run_worker(job: dict, timeout: float) -> dict:
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    payload = {k: v for k, v in job.items() if k not in ("skip",)}
    proc = subprocess.Popen([sys.executable, "-m", "fastirl.bench.worker", json.dumps(payload)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # the worker and its compile helpers
        except ProcessLookupError:
            pass
        proc.communicate()
        return {"status": "failed", "reason": f"timed out after {timeout:g} s (--job-timeout)"}
    for line in reversed(out.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    tail = [ln for ln in err.splitlines() if ln.strip()]
    why = tail[-1] if tail else f"exit status {proc.returncode}"
    if proc.returncode and proc.returncode < 0:
        why = f"killed by signal {-proc.returncode} (out of memory?)"
    return {"status": "failed", "reason": f"worker died: {why}"}


def _list(device) -> int:
    from . import variants as V
    print(f"variants on {device}:")
    for n in V.all_names():
        inf = V.info(n)
        why = V.unavailable_reason(n, device)
        state = "available" if not why else f"unavailable: {why}"
        dflt = " [default]" if inf.default else ""
        print(f"  {n:<22} {inf.mode:<5} {inf.summary}{dflt}\n  {'':<22} {state}")
    print("a fastirl variant takes a memory setting, a budget or a chunk size: "
          "fastirl-cpu@compact, @balanced, @fast, @512MiB, @4096 (docs/memory.md); "
          "the group 'memory' is every default fastirl IQ variant at each setting")
    return 0


def _summary_line(job, res) -> str:
    shape = f"N={job['batch'] * job['seq']} V={job['vocab']}"
    if res.get("status") != "ok":
        return f"  {job['variant']:<20} {shape:<18} {res.get('status')}: {res.get('reason')}"
    fb = res.get("fb_ms") or []
    import statistics
    med = statistics.median(fb) if fb else None
    return (f"  {job['variant']:<20} {shape:<18} fwd+bwd {report.fmt_ms(med)}, "
            f"peak {report.fmt_mib(res.get('peak_bytes', 0) / report.MIB)}")


def run(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:       # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        import torch   # noqa: F401  (after argparse: --help stays fast)
        device = _device(args.device)
        if args.list:
            return _list(device)
        jobs, plan = _plan(args, device)
        out_dir = None if args.dry_run else report.ensure_dir(args.out)
    except (UsageError, PermissionError, OSError) as exc:
        print(f"fastirl-bench: error: {exc}", file=sys.stderr)
        return 2

    env = report.environment(device)
    print(f"fastirl-bench: {env['device']} ({env['device_name']}), torch "
          f"{env['torch_version']}, triton {env['triton_version']}, git {env['git_rev']}")
    print(f"shape B={plan['batch']} T={plan['seq']} H={plan['hidden']} V={plan['vocab']} "
          f"{plan['dtype']}, {plan['repeats']} repeats, sweep {plan['sweep']}, "
          f"{len(jobs)} runs, {plan['available'] / GIB:.1f} GiB available")
    if args.dry_run:
        for j in jobs:
            note = f"  SKIP: {j['skip']}" if "skip" in j else ""
            print(f"  {j['sweep']:<6} {j['variant']:<20} N={j['batch'] * j['seq']:<6} "
                  f"V={j['vocab']:<7} estimate {j['estimate_bytes'] / GIB:.2f} GiB{note}")
        return 0

    from . import roofline
    try:     # the cost model's figures for this device (CPU: a ~2 s calibration)
        model_hw = roofline.bench_hardware(device, args.threads)
    except Exception as exc:   # the model is an addition: never fail a run for it
        print(f"fastirl-bench: no predictions ({exc})", file=sys.stderr)
        model_hw = None
    run_id = time.strftime("%Y%m%d-%H%M%S")
    base = dict(env, run_id=run_id, timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
    rows = []
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), unit="run", file=sys.stderr, dynamic_ncols=True)
        write = tqdm.write
    except ImportError:   # the bench extra is not installed: plain lines
        bar, write = None, print
    t0 = time.perf_counter()
    results = []
    # Each row goes to the CSV(s) as soon as its run finishes (a run cut short
    # by a time limit keeps what it measured); rewritten whole at the end with
    # the ratios and predictions.
    stream_paths = [out_dir / "results.csv"] + ([Path(args.csv)] if args.csv else [])
    for path in stream_paths:
        report.ensure_dir(Path(path).resolve().parent)
        Path(path).write_text("")
    for j in jobs:
        if bar is not None:
            bar.set_description(f"{j['variant']} N={j['batch'] * j['seq']} V={j['vocab']}")
        if "skip" in j:
            res = {"status": "skipped", "reason": j["skip"]}
        elif "same_as" in j:
            res = results[j["same_as"]]
        else:
            res = _run_worker(j, args.job_timeout)
        results.append(res)
        rows.append(report.make_row(base, j, res))
        rows[-1]["inputs"] = args.inputs
        for path in stream_paths:
            report.append_row(path, rows[-1], report.COLUMNS)
        write(_summary_line(j, res))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    report.add_ratios(rows)
    if model_hw is not None:
        report.add_predictions(rows, model_hw, args.loss_preset, args.inputs)
    for r in rows:   # a shared, re-readable copy of the threads actually used
        r.setdefault("threads", "")

    csv_path = out_dir / "results.csv"
    report.write_csv(csv_path, rows)
    if args.csv:
        report.ensure_dir(Path(args.csv).resolve().parent)
        report.write_csv(Path(args.csv), rows)
    main_rows = [r for r in rows if r["sweep"] == "main"]
    cells, notes = report.table_rows(main_rows)
    print()
    print(f"{report.shape_label(main_rows[0])} on {env['device_name']}; times: median "
          f"±half-range of {plan['repeats']} repeats; memory: peak above the inputs, fresh "
          "process per variant")
    print(report.text_table(report.TABLE_HEAD, cells))
    if model_hw is not None:
        print(f"  predicted: roofline model (python -m fastirl.bench.roofline) on "
              f"{report.describe_hardware(model_hw)}")
    for n in notes:
        print("  " + n)
    md = [f"{report.shape_label(main_rows[0])}, {report.describe_env(main_rows[0])}", "",
          report.markdown_table(report.TABLE_HEAD, cells), ""]
    md += [f"- {n}" for n in notes]
    for sweep, axis in (("tokens", "tokens"), ("vocab", "vocab")):
        for what, title in (("peak_mib", "peak extra memory"),
                            ("fb_ms_median", "forward+backward time")):
            t = report.sweep_table(rows, sweep, axis, what)
            if t:
                md += ["", f"{title} against {axis}:", "", t]
                print(f"\n{title} against {axis}:")
                print(report.sweep_table(rows, sweep, axis, what, markdown=False))
    (out_dir / "table.md").write_text("\n".join(md) + "\n")
    pngs = [] if args.no_plots else report.plots(rows, out_dir)
    print(f"\nwrote {csv_path}, {out_dir / 'table.md'}" + (f", {args.csv}" if args.csv else "")
          + "".join(f", {p}" for p in pngs) + f" ({time.perf_counter() - t0:.0f} s)")
    bad = [r for r in rows if r["variant"].startswith("fastirl-")
           and r["status"] in ("wrong", "failed")]
    if bad:
        print("fastirl-bench: fastirl variants wrong or failed: "
              + ", ".join(r["variant"] for r in bad), file=sys.stderr)
        return 3
    return 0
