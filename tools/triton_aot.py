"""Ahead-of-time compilation report of the Triton kernels (no GPU needed).

A developer tool (not part of the installed package).  Compiles every kernel
of :mod:`fastirl.backends.triton_linear` / :mod:`fastirl.backends.triton_logits`
in every configuration the backends can launch (the tile tables of
:mod:`fastirl.backends.triton_plan`), for
sm_80 and sm_90, with ``triton.compile(ASTSource(...), target=GPUTarget(...))``,
runs ``ptxas -v`` on the PTX for registers and spills, and reads shared memory
from the compiled kernel's metadata.

    python tools/triton_aot.py                  # summary table
    python tools/triton_aot.py --flags all      # every flag combination
    python tools/triton_aot.py --flags worst    # quick check (tests)
    python tools/triton_aot.py --json out.json

What "every launchable configuration" means here: every tile configuration of
``CONFIGS`` (the linear kernels' "sm80" configs for sm_80, "sm90" for sm_90,
the logits kernels' for both; interpreter configs excluded), every input
dtype, float32 dot precision (tf32x3 / tf32), every gradient mode
(deterministic / fast, which of dx / dW / db), each with feature flags
(bias, soft cap, entropy, argmax, logit sum, grad_sum) all on and all off (``--flags extremes``,
the default) or in every combination (``--flags all``).
Each is compiled with the two extreme divisibility specialisations a launch
can get (see ``_specs``): every pointer and integer a multiple of 16, or the
fewest the backend allows (linear kernels: aligned pointers, H and row strides
multiples of 16, as triton-fused launches them only on such operands; logits
kernels: nothing); launches with a mixture fall between the two.
Sizes that vary per call are ``do_not_specialize`` (never specialised).

Must run with TRITON_INTERPRET unset (under the interpreter ``triton.jit``
returns interpreted functions); the ``__main__`` entry and
:func:`compile_table` check for that.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Run as a script from a checkout: the package is the one beside this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Hardware limits used by the checks and the occupancy estimate.
ARCH = {
    80: dict(name="sm_80", smem_block=163 * 1024, smem_sm=164 * 1024, regs_sm=65536,
             warps_sm=64, blocks_sm=32),
    90: dict(name="sm_90", smem_block=227 * 1024, smem_sm=228 * 1024, regs_sm=65536,
             warps_sm=64, blocks_sm=32),
}

_DT = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class Variant:
    kernel: str                 # CONFIGS key (kernel family)
    config: tuple               # CONFIGS[kernel] key
    dtype: str                  # input dtype (fp32 / bf16 / fp16)
    mode: str                   # gradient mode or "-"
    flags: dict                 # feature constexprs
    constexprs: dict
    signature: dict
    num_warps: int
    num_stages: int
    spec: str                   # name of the divisibility specialisation
    divisible: tuple            # arguments specialised as divisible by 16
    archs: tuple                # compute capabilities this config is launched on

    def label(self) -> str:
        on = ",".join(k.lower() for k, v in self.flags.items() if v is True) or "-"
        return (f"{self.kernel}[{'/'.join(self.config)}] {self.dtype} {self.mode} "
                f"{on} {self.spec}")


@dataclass
class Result:
    variant: str
    kernel: str
    config: str
    dtype: str
    mode: str
    flags: str
    spec: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    stack: int = -1
    shared: int = -1
    blocks_per_sm: int = 0
    occupancy: float = 0.0
    seconds: float = 0.0
    error: str = ""
    problems: list = field(default_factory=list)


def _kernels():
    from fastirl.backends import triton_linear as K
    from fastirl.backends import triton_logits as L
    return {
        "linear_fwd": K.linear_fwd_kernel,
        "linear_bwd_rows": K.linear_bwd_rows_kernel,
        "logits_stats": L.logits_stats_kernel,
        "logits_grad": L.logits_grad_kernel,
        "merge": L.merge_kernel,
    }


def _arg_types(kernel: str, dt: str, flags: dict) -> dict:
    """Triton signature types of the runtime arguments, as the host passes them."""
    X = "*" + dt
    f32p, i64p, i32p = "*fp32", "*i64", "*i32"
    if kernel == "linear_fwd":
        return dict(x_ptr=X, w_ptr=X, b_ptr=X, tgt_ptr=i64p, pm_ptr=f32p, ps_ptr=f32p,
                    pw_ptr=f32p, pq_ptr=f32p, pi_ptr=i32p, pz_ptr=f32p, n="i32", V="i32",
                    H="i32", stride_x="i32", stride_w="i32", vb_per_split="i32", nsplit="i32",
                    group_m="i32", inv_tau="fp32", cap="fp32")
    if kernel == "linear_bwd_rows":
        return dict(x_ptr=X, w_ptr=X, b_ptr=X, tgt_ptr=i64p, value_ptr=f32p, gv_ptr=f32p,
                    gt_ptr=f32p, gs_ptr=f32p, dx_ptr=f32p, dw_ptr=f32p, db_ptr=f32p, n="i32",
                    V="i32", H="i32", stride_x="i32", stride_w="i32", stride_dw="i32",
                    vb_per_split="i32", nsplit="i32", group_m="i32", stagger="i32",
                    inv_tau="fp32", cap="fp32")
    if kernel == "logits_stats":
        return dict(z_ptr=X, tgt_ptr=i64p, pm_ptr=f32p, ps_ptr=f32p, pw_ptr=f32p,
                    pq_ptr=f32p, pi_ptr=i32p, pz_ptr=f32p, n="i32", V="i32", stride_z="i32",
                    vb_per_split="i32", inv_tau="fp32", cap="fp32")
    if kernel == "logits_grad":
        return dict(z_ptr=X, tgt_ptr=i64p, value_ptr=f32p, gv_ptr=f32p, gt_ptr=f32p,
                    gs_ptr=f32p, out_ptr=X, n="i32", V="i32", stride_z="i32", stride_o="i32",
                    inv_tau="fp32", cap="fp32")
    if kernel == "merge":
        return dict(pm_ptr=f32p, ps_ptr=f32p, pw_ptr=f32p, pq_ptr=f32p, pi_ptr=i32p,
                    pz_ptr=f32p, value_ptr=f32p, q_ptr=f32p, ent_ptr=f32p,
                    amax_ptr=i64p if flags["ARGMAX"] else i32p, maxl_ptr=f32p, sum_ptr=f32p,
                    n="i32", nsplit="i32", tau="fp32", inv_tau="fp32")
    raise KeyError(kernel)


# Arguments never specialised (do_not_specialize in the kernels).
NO_SPEC = ("n", "vb_per_split", "nsplit", "group_m", "stagger")


# The fused linear kernels are launched only on 16-byte aligned pointers with
# H and the row strides multiples of 16 (triton-fused hands other operands to
# the GEMM + epilogue path: unvectorised tile loads spill), so their worst case
# is "ptr+align"; the logits kernels take any pointer and stride ("none").
ALIGN_INTS = ("H", "stride_x", "stride_w", "stride_dw")


def _specs(kernel: str, key: tuple, sig: dict):
    """The two extreme divisibility specialisations a launch can get:
    (name, arguments specialised as divisible by 16), the worst last."""
    ptrs = tuple(a for a, t in sig.items() if t.startswith("*"))
    ints = tuple(a for a, t in sig.items() if t == "i32" and a not in NO_SPEC)
    if kernel.startswith("linear"):
        return [("all", ptrs + ints), ("ptr+align", ptrs + tuple(a for a in ints
                                                                 if a in ALIGN_INTS))]
    return [("all", ptrs + ints), ("none", ())]


WORST_MODES = ("-", "fast:dx+dw+db")


def _flag_sets(names: list[str], how: str):
    if how == "worst":
        yield dict.fromkeys(names, True)
        return
    if how == "all":
        for bits in itertools.product((False, True), repeat=len(names)):
            yield dict(zip(names, bits))
    else:
        yield dict.fromkeys(names, False)
        yield dict.fromkeys(names, True)


def _bwd_modes(has_bias: bool):
    """(mode name, constexprs) of linear_bwd_rows as the host launches it (fast
    mode only: the deterministic backward is GEMMs + logits_grad)."""
    for need_x, dw, db in itertools.product((False, True), repeat=3):
        if db and not has_bias or not (need_x or dw):
            continue            # db alone goes to the slab path
        name = "fast:" + "+".join(k for k, on in (("dx", need_x), ("dw", dw), ("db", db)) if on)
        yield name, dict(DX=need_x, DW=dw, DB=db)


def variants(flags: str = "extremes", kernels=None, dtypes=("fp32", "bf16", "fp16")):
    """Every (kernel, config, dtype, mode, flags, specialisation) the backend can
    launch.  flags: "all" (every combination), "extremes" (all off / all on) or
    "worst" (the quick check of the tests: every feature on, the gradient modes
    with the most GEMMs, the specialisation with fewer divisibility facts, the
    float32 variants with 3xTF32)."""
    from fastirl.backends.triton_plan import CONFIGS
    kernels = kernels or list(CONFIGS)
    for kernel in kernels:
        for key, cfg in CONFIGS[kernel].items():
            if key[0] == "interp":
                continue
            for dt in dtypes:
                if kernel in ("linear_fwd", "linear_bwd_rows"):
                    if (dt == "fp32") != (key[1] == "32"):
                        continue
                    precs = ("tf32x3", "tf32") if dt == "fp32" else ("ieee",)
                elif kernel == "merge":
                    if dt != "fp32":
                        continue        # float32 partials whatever the input dtype
                    precs = (None,)
                else:
                    if flags == "worst" and dt != "bf16":
                        continue        # quick check: 16-bit loads, the most elements
                    precs = (None,)
                yield from _kernel_variants(kernel, key, cfg, dt, precs, flags)


def _kernel_variants(kernel, key, cfg, dt, precs, flags):
    tiles = {
        "linear_fwd": dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k),
        "linear_bwd_rows": dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                BLOCK_K=cfg.block_k, BLOCK_H=cfg.block_h,
                                SCALE_DZ=dt == "fp16"),
        "logits_stats": dict(BLOCK_R=cfg.block_m, BLOCK_V=cfg.block_n),
        "logits_grad": dict(BLOCK_R=cfg.block_m, BLOCK_V=cfg.block_n, INTERP=False),
        "merge": dict(BLOCK=cfg.block_m),
    }[kernel]
    names = {
        "linear_fwd": ["HAS_BIAS", "SOFTCAP", "ENTROPY", "ARGMAX", "LOGIT_SUM"],
        "linear_bwd_rows": ["HAS_BIAS", "SOFTCAP", "GRAD_SUM"],
        "logits_stats": ["SOFTCAP", "ENTROPY", "ARGMAX", "LOGIT_SUM"],
        "logits_grad": ["SOFTCAP", "GRAD_SUM"],
        "merge": ["ENTROPY", "ARGMAX", "LOGIT_SUM"],
    }[kernel]
    for prec in precs[:1] if flags == "worst" else precs:
        for fl in _flag_sets(names, flags):
            if kernel == "linear_bwd_rows":
                modes = list(_bwd_modes(fl["HAS_BIAS"]))
            else:
                modes = [("-", {})]
            for mode, mflags in modes:
                if flags == "worst" and mode not in WORST_MODES:
                    continue
                ce = dict(fl, **mflags, **tiles)
                if prec is not None:
                    ce.update(DOT_F32=False, DOT_PREC=prec)
                shown = dict(fl, **({prec.upper(): True} if prec in ("tf32", "tf32x3") else {}))
                sig = _arg_types(kernel, dt, fl)
                archs = {"sm80": (80,), "sm90": (90,)}.get(key[0], tuple(ARCH))
                for spec, div in _specs(kernel, key, sig)[1 if flags == "worst" else 0:]:
                    yield Variant(kernel, key, dt, mode, shown, ce, sig, cfg.num_warps,
                                  cfg.num_stages, spec, div, archs)


def _ptxas() -> str:
    try:
        from triton.backends.nvidia import __file__ as nv
        cand = os.path.join(os.path.dirname(nv), "bin", "ptxas")
        if os.access(cand, os.X_OK):
            return cand
    except ImportError:
        pass
    for cand in ("/usr/local/cuda/bin/ptxas", shutil.which("ptxas")):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise RuntimeError("no ptxas found (triton's bundled one or /usr/local/cuda/bin)")


def _occupancy(regs: int, shared: int, warps: int, arch: int) -> tuple[int, float]:
    lim = ARCH[arch]
    warp_regs = -(-max(regs, 1) * 32 // 256) * 256          # 256-register allocation unit
    by_regs = (lim["regs_sm"] // warp_regs) // warps
    by_smem = lim["smem_sm"] // (shared + 1024) if shared else lim["blocks_sm"]
    by_warps = lim["warps_sm"] // warps
    blocks = min(by_regs, by_smem, by_warps, lim["blocks_sm"])
    return blocks, blocks * warps / lim["warps_sm"]


def compile_variant(v: Variant, arch: int, workdir: str) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernels()[v.kernel]
    sig = dict(v.signature)
    sig.update(dict.fromkeys(v.constexprs, "constexpr"))
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in v.divisible}
    res = Result(v.label(), v.kernel, "/".join(v.config), v.dtype, v.mode,
                 ",".join(k.lower() for k, on in v.flags.items() if on) or "-", v.spec,
                 arch, v.num_warps, v.num_stages)
    t0 = time.time()
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=v.constexprs, attrs=attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=v.num_warps, num_stages=v.num_stages))
        res.shared = int(ck.metadata.shared)
        ptx = ck.asm["ptx"]
        gpu = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
        path = os.path.join(workdir, f"k{os.getpid()}_{arch}.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        out = subprocess.run([_ptxas(), f"-arch={gpu}", "-v", "-o", os.devnull, path],
                             capture_output=True, text=True, check=True).stderr
        res.registers = int(re.search(r"Used (\d+) registers", out).group(1))
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      out)
        res.stack, res.spill_stores, res.spill_loads = map(int, m.groups())
        res.blocks_per_sm, res.occupancy = _occupancy(res.registers, res.shared, v.num_warps,
                                                      arch)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        res.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
    res.seconds = round(time.time() - t0, 2)
    res.problems = check(res)
    return res


def check(r: Result) -> list[str]:
    """What is wrong with one compiled variant (empty when fine)."""
    if r.error:
        return [r.error]
    lim = ARCH[r.arch]
    out = []
    if r.spill_stores or r.spill_loads:
        out.append(f"spills {r.spill_stores}/{r.spill_loads} bytes")
    if r.registers > 255:
        out.append(f"{r.registers} registers")
    if r.registers * 32 * r.num_warps > lim["regs_sm"]:
        out.append("register file exceeded")
    if r.shared > lim["smem_block"]:
        out.append(f"shared {r.shared} > {lim['smem_block']}")
    if r.blocks_per_sm < 1:
        out.append("does not fit on an SM")
    return out


def _work(args):
    v, arch, workdir = args
    return compile_variant(v, arch, workdir)


def compile_table(archs=(80, 90), flags: str = "extremes", kernels=None,
                  dtypes=("fp32", "bf16", "fp16"), jobs: int = 1,
                  progress=None) -> list[Result]:
    """Compile every variant for every arch; one Result per (variant, arch)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: AOT compilation needs real triton.jit kernels")
    work = [(v, a) for v in variants(flags, kernels, dtypes) for a in v.archs if a in archs]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        items = [(v, a, tmp) for v, a in work]
        if jobs > 1:
            import multiprocessing as mp
            with mp.get_context("spawn").Pool(jobs) as pool:
                for r in pool.imap(_work, items):
                    results.append(r)
                    if progress:
                        progress(r, len(results), len(items))
        else:
            for it in items:
                results.append(_work(it))
                if progress:
                    progress(results[-1], len(results), len(items))
    return results


def summarize(results: list[Result]) -> list[dict]:
    """One row per (kernel, config, dtype class, arch): worst case over flags, modes
    and specialisations."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        dclass = "fp32" if r.dtype == "fp32" else "bf16/fp16"
        if r.kernel in ("logits_stats", "logits_grad", "merge"):
            dclass = "any"
        groups.setdefault((r.kernel, r.config, dclass, r.arch), []).append(r)
    rows = []
    for (kernel, config, dclass, arch), rs in groups.items():
        ok = [r for r in rs if not r.error]
        rows.append(dict(
            kernel=kernel, config=config, dtype=dclass, arch=f"sm_{arch}",
            warps=rs[0].num_warps, stages=rs[0].num_stages, variants=len(rs),
            regs_min=min((r.registers for r in ok), default=-1),
            regs_max=max((r.registers for r in ok), default=-1),
            spills=max((r.spill_stores + r.spill_loads for r in ok), default=-1),
            shared_kib=round(max((r.shared for r in ok), default=0) / 1024, 1),
            blocks_per_sm=min((r.blocks_per_sm for r in ok), default=0),
            occupancy=min((r.occupancy for r in ok), default=0.0),
            problems=sum(bool(r.problems) for r in rs)))
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("| kernel | config | dtype | arch | warps | stages | variants | registers | "
            "spills (B) | shared (KiB) | CTAs/SM | occupancy | problems |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        regs = (f"{r['regs_min']}-{r['regs_max']}" if r["regs_min"] != r["regs_max"]
                else str(r["regs_max"]))
        lines.append(f"| {r['kernel']} | {r['config']} | {r['dtype']} | {r['arch']} | "
                     f"{r['warps']} | {r['stages']} | {r['variants']} | {regs} | {r['spills']} | "
                     f"{r['shared_kib']} | {r['blocks_per_sm']} | {r['occupancy']:.0%} | "
                     f"{r['problems']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from fastirl._validate import CLI_DTYPES, dtype_arg, positive_int

    from fastirl.backends.triton_plan import CONFIGS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(ARCH))
    ap.add_argument("--flags", choices=("worst", "extremes", "all"), default="extremes")
    ap.add_argument("--kernel", nargs="+", default=None, choices=sorted(CONFIGS))
    ap.add_argument("--dtype", type=dtype_arg, nargs="+", default=list(CLI_DTYPES),
                    help=f"input dtypes: {', '.join(CLI_DTYPES)} (or bf16, fp16, fp32)")
    ap.add_argument("--jobs", type=positive_int, default=1)
    ap.add_argument("--json", help="write every result to this file")
    ap.add_argument("--verbose", action="store_true", help="print every variant")
    a = ap.parse_args(argv)
    a.dtype = [{"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[d] for d in a.dtype]

    def progress(r, i, total):
        if a.verbose or r.problems:
            print(f"[{i}/{total}] sm_{r.arch} {r.variant}: regs {r.registers} spills "
                  f"{r.spill_stores}/{r.spill_loads} shared {r.shared} ({r.seconds}s) "
                  f"{'; '.join(r.problems)}", file=sys.stderr, flush=True)

    t0 = time.time()
    results = compile_table(tuple(a.arch), a.flags, a.kernel, tuple(a.dtype), a.jobs,
                            progress)
    print(format_table(summarize(results)))
    bad = [r for r in results if r.problems]
    print(f"\n{len(results)} compilations in {time.time() - t0:.0f}s, {len(bad)} with problems")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump([asdict(r) for r in results], fh, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
