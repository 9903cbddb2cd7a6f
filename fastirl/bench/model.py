"""The cost model of fastirl's own variants: their launches and their memory,
built from the launch primitives of :mod:`fastirl.bench.launches` (what a
launch costs).

The fastirl launch lists come from the code's own planning: the chunk policy
of :mod:`fastirl.backends.chunking` and the pure planner
:mod:`fastirl.backends.triton_plan` (``plan_epilogue``, ``plan_fused_forward``,
``plan_fused_backward``) and the memory planner :func:`fastirl.memory.plan`
(:func:`engine_plan` asks it what the engine asks it; :func:`slab_ops` and
:func:`slabs_peak` / :func:`rows_peak` are the launches and the live memory of
its two plans, read from ``fastirl.engine``): the model follows the code.
Variants take the ``memory=`` setting as a name suffix (``fastirl-triton@compact``,
``@512MiB``; :mod:`fastirl.bench.variants`), and a frozen head
(``need_weight=False``: no dW).  The peers (Liger-Kernel, Cut Cross-Entropy, PyTorch eager and
compiled cross-entropy, TorchTune, TRL) are modelled from their published
code in :mod:`fastirl.bench.peers`.

What the default backend does beyond its planner's launches, each behind one
switch of :class:`~fastirl.bench.launches.Options` (so that a change of the engine is one flip):
``dw_zero_fill`` (the float32 dW accumulator is zero-filled, V·H·4 bytes, per
call), ``lookahead`` (each single-pass chunk but the last computes c + 1 rows:
GEMMs with M or K = c + 1), ``addmm_out_dtype`` (torch >= 2.8: cuBLAS
accumulates dW in float32; without it the dW GEMM goes through 64 MiB bf16
slabs added into the accumulator through a float32 temporary).  Host
synchronisations are not modelled (the engine is removing them).

On a CPU (``--device cpu``: the figures of
:func:`fastirl.bench.launches.calibrate_cpu`) the model is :func:`fastirl_cpu`
and :func:`torch_backend`.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from fastirl.backends import chunking, gemm_epilogue, triton_plan
from fastirl.backends.hardware import GPUS, Hardware
from fastirl.memory import MemoryPlan
from fastirl.memory import plan as memory_plan

from .launches import DEFAULT_OPTIONS, Op, Options, Shape, _epi, elementwise, gemm, small_launches

__all__ = ["fastirl_gpu", "fastirl_cpu", "torch_backend", "CUDA_FASTIRL", "variant_name",
           "engine_plan", "slab_ops", "rows_peak", "slabs_peak"]


# ------------------------------------------------------------------ fastirl variants

def _device_info(hw: Hardware) -> triton_plan.DeviceInfo:
    return triton_plan.DeviceInfo(hw.arch if hw.arch in ("sm80", "sm90") else "sm90",
                                  hw.sm_count or 132, hw.l2_bytes or (50 << 20))


def policy_hardware(hw: Hardware) -> Hardware:
    """The device figures the engine itself plans with on the device ``hw``
    models (:func:`fastirl.backends.hardware.hardware_for`): the GPU's entry of
    the table, and on a CPU the fixed :data:`~fastirl.backends.hardware.CPU`
    class (not this CPU's calibration: the chunk policy and the memory planner
    never measure)."""
    if hw.kind == "cpu":
        return chunking.CPU
    return GPUS.get(hw.name, hw)


def _engine_rows(backend: str, s: Shape, hw: Hardware, chunk_size: int | None = None) -> int:
    """Rows per engine chunk, as the backend picks them (its chunk policy, on
    the figures the engine uses: :func:`policy_hardware`)."""
    dt = s.torch_dtype
    if chunk_size is not None:
        return max(1, min(chunk_size, s.tokens))
    if backend == "triton-fused":
        return triton_plan.fused_rows_per_chunk(s.tokens, s.hidden)
    hw = policy_hardware(hw)
    if backend == "torch":
        return chunking.rows_per_chunk(s.tokens, s.vocab, s.hidden, dt, hardware=hw,
                                       block_itemsize=4 if dt != torch.float64 else 8)
    return chunking.rows_per_chunk(s.tokens, s.vocab, s.hidden, dt, hardware=hw,
                                   block_itemsize=block_itemsize(backend, s))


def block_itemsize(backend: str, s: Shape) -> int:
    """Bytes per element of the backend's logits block: the input dtype's for
    the cuBLAS + epilogue backends ("triton", "cuda") and "cpu" (float32 for
    float32 inputs), float32 for "torch".  The backends' own
    ``block_itemsize(dtype)``, restated so that the model runs without Triton
    or a GPU; tests/test_roofline.py checks the two agree."""
    if backend == "torch":
        return 8 if s.dtype == "float64" else 4
    return s.isz


# The backends whose memory plans (fastirl.memory) the model follows.
MEMORY_BACKENDS = ("triton", "cuda", "cpu")


def default_memory() -> "str | int":
    """The memory setting ``fastirl.iq_loss`` takes when none is given."""
    from fastirl.options import OPTIONS
    return OPTIONS["memory"].default


def engine_plan(backend: str, s: Shape, hw: Hardware, memory: "str | int | None" = None, *,
                need_x: bool = True, need_weight: bool = True, chunk_size: int | None = None,
                weight_itemsize: int | None = None) -> MemoryPlan:
    """The plan the engine runs (``fastirl.engine.run_linear``): an explicit
    chunk_size, or ``memory="fast"``, is the backend's own chunking (the planner
    is not asked); any other setting is :func:`fastirl.memory.plan` with the
    backend's chunk size as its fast plan, the backend's logits-block itemsize
    and the device figures the engine uses.  Raises the planner's ValueError
    for a byte budget below the least any plan needs."""
    memory = default_memory() if memory is None else memory
    rows = _engine_rows(backend, s, hw, chunk_size)
    if chunk_size is not None or memory == "fast":
        return MemoryPlan("rows", rows)
    return memory_plan(s.tokens, s.vocab, s.hidden, s.torch_dtype, memory=memory, need_x=need_x,
                       need_weight=need_weight, hardware=policy_hardware(hw),
                       block_itemsize=block_itemsize(backend, s),
                       weight_itemsize=weight_itemsize or s.isz, rows_fast=rows)


def _dw_gemm(m: int, n: int, k: int, s: Shape, opts: Options) -> list[Op]:
    """dW (m = V, n = H) += dzᵀ x over k rows, float32 accumulator."""
    if opts.addmm_out_dtype or s.dtype == "float32":
        return [gemm("gemm_dw", m, n, k, s.dtype, out_bytes=4, accumulate=True)]
    # torch < 2.8: row slabs of _DW_SLAB_BYTES in the input dtype, each added into
    # the float32 accumulator by a mixed-dtype add_ (which converts the slab to a
    # float32 temporary first): part written + read, temporary written + read,
    # accumulator read + written.
    isz = s.isz
    slab = max(1, min(m, gemm_epilogue._DW_SLAB_BYTES // (n * isz)))
    nslab = -(-m // slab)
    mm = gemm("gemm_dw", m, n, k, s.dtype, a_reads=1)
    mm = replace(mm, bytes=mm.bytes + (nslab - 1) * k * n * isz, launches=nslab)
    add = elementwise("dW_add_slabs", m * n, 2 * isz + 8 + 8, 1.0, launches=2 * nslab)
    return [mm, add]


def _from_launches(launches, s: Shape, hw: Hardware, opts: Options, *, epi: str,
                   softcap: bool, dx_f32: bool = False, dw_direct: int = 0) -> list[Op]:
    """Ops of the planner's launches (fastirl.backends.triton_plan.Launch);
    dw_direct: the dW GEMMs write their result in a dtype of that itemsize
    (Options.direct_dw)."""
    isz = s.isz
    ops: list[Op] = []
    for ln in launches:
        k = ln.kernel
        if k == "gemm_logits":
            m, n, kk = ln.grid
            ops.append(gemm("gemm_logits", m, n, kk, s.dtype))
        elif k == "gemm_dx":
            m, n, kk = ln.grid
            ops.append(gemm("gemm_dx", m, n, kk, s.dtype, out_bytes=4 if dx_f32 else isz,
                            accumulate=dx_f32))
        elif k == "gemm_dw":
            m, n, kk = ln.grid
            ops += ([gemm("gemm_dw", m, n, kk, s.dtype, out_bytes=dw_direct)] if dw_direct
                    else _dw_gemm(m, n, kk, s, opts))
        elif k == "logits_stats":
            rows, vocab = ln.rows, ln.vocab
            parts = ln.splits * rows * 4 * 4
            ops.append(elementwise("epilogue_stats", rows * vocab, isz,
                                   _epi(epi, "stats", softcap), parts))
        elif k == "merge":
            ops.append(elementwise("merge", ln.rows, ln.splits * 16 + 20, 4 * ln.splits))
        elif k == "logits_grad":
            ops.append(elementwise("epilogue_grad", ln.rows * ln.vocab, 2 * isz,
                                   _epi(epi, "grad", softcap)))
        elif k in ("linear_fwd", "linear_bwd_rows"):
            ops.append(_fused_tiles(ln, s, hw, epi=epi, softcap=softcap))
        else:
            raise ValueError(f"roofline: no cost model for launch {k!r}")
    return ops


def _fused_tiles(ln, s: Shape, hw: Hardware, *, epi: str, softcap: bool) -> Op:
    """A fused linear kernel over (row block, vocabulary split) programs.

    Programs resident at once: one per SM, ``group_m`` row blocks x SMs /
    group_m splits.  Per wave, each resident split streams its W slab from HBM
    once (the resident programs of a split walk it in step; with a staggered
    walk they are at different blocks, so the slab is read once per program
    unless the slabs of the resident splits fit in L2), and each x panel is
    read once (it stays in L2 when a step's working set does, else once per
    step).  Backward (linear_bwd_rows): three GEMM tiles per step, W and x
    tiles read twice, float32 atomics of dx (BM x H per program and step) and
    dW (BN x H): 8 bytes each of L2 traffic, and in HBM one read-modify-write
    of each dW tile per wave and split (per program when staggered) and of
    each dx panel per wave."""
    cfg = ln.config
    bm, bn = cfg.block_m, cfg.block_n
    n, V, H, isz = ln.rows, ln.vocab, ln.hidden, s.isz
    programs = ln.grid[0]
    P = max(1, hw.sm_count)
    G = max(1, min(ln.group_m, P))
    per = max(1, ln.blocks_per_split)
    waves = math.ceil(programs / P)
    slab = per * bn * H * isz
    step_set = (P // G) * bn * H * isz + G * bm * H * isz
    fits = step_set <= hw.l2_bytes
    spread = G if ln.stagger and (P // G) * slab > hw.l2_bytes else 1
    w_wave = (P // G) * slab * spread
    x_wave = G * bm * H * isz * (1 if fits else per)
    bwd = ln.kernel == "linear_bwd_rows"
    reads = 2 if bwd else 1
    flops = 2.0 * n * V * H * (3 if bwd else 1)
    flops_epi = n * V * _epi(epi, "grad" if bwd else "stats", softcap)
    l2 = 0.0
    rmw = 0.0
    if bwd:
        l2 = 8.0 * programs * per * (bm + bn) * H
        rmw = waves * ((P // G) * per * bn * H * 8 * spread + G * bm * H * 8)
    partials = 0 if bwd else ln.splits * n * 16
    bytes_ = waves * reads * (w_wave + x_wave) + rmw + partials
    # tensor-core FLOPs and the epilogue's vector FLOPs share the SMs: charge both
    t_flops = flops + flops_epi * hw.gemm_flops(s.dtype) / hw.vector_flops
    return Op(ln.kernel, flops, bytes_, f"fused:{s.dtype}", l2_bytes=l2, work=t_flops)


# Small launches of fastirl's engine and IQ objective around the backend's own
# (per-row vector ops of the objective and its autograd, slicing copies, the
# carry between chunks), counted with torch.profiler on the CPU (ATen ops that
# launch a kernel, views excluded): ~60 per chunk and ~30 per call.
ENGINE_CHUNK_LAUNCHES = 60
ENGINE_CALL_LAUNCHES = 30


def _engine_extras(s: Shape, hw: Hardware, opts: Options, chunks: int, *,
                   need_w: bool = True) -> list[Op]:
    """What the engine launches around the backend: the zero-fills of its
    gradient buffers, the small per-row launches, the dW cast."""
    N, V, H, isz = s.tokens, s.vocab, s.hidden, s.isz
    ops = [elementwise("dx_zero_fill", N * H, isz, 0.0),
           elementwise("dx_put", N * H, 2 * isz, 0.0, launches=chunks)]
    if need_w and opts.dw_zero_fill:
        ops.append(elementwise("dW_zero_fill", V * H, 4, 0.0))
    if opts.engine_launches:
        ops.append(small_launches("engine_small",
                                  ENGINE_CALL_LAUNCHES + ENGINE_CHUNK_LAUNCHES * chunks))
    return ops


# ------------------------------------------------------------------ memory of the plans

def rows_peak(s: Shape, rows: int, *, block_bytes: int, weight_itemsize: int,
              need_weight: bool = True, lookahead: bool = True, dw_temp: int = 0,
              direct_dw: bool = False) -> int:
    """Peak bytes above the inputs of the single-pass "rows" plan, outputs
    included (dx in the input dtype, dW in the weight's), from the tensors the
    engine holds (``fastirl.engine._SinglePass``):

        dx + A + max(block + max(dW temporary, dx chunk),  dW in the weight dtype)

    A = V·H·4 (the float32 dW accumulator; it is the output itself for a
    float32 weight, and absent for a frozen head), block = (c + 1)·V·b (a
    chunk's logits block with its look-ahead row, b = the block's itemsize),
    dx chunk = (c + 1)·H·itemsize (dz @ W before it is put into dx), dW
    temporary = the CPU's low-precision dW partial (at most 64 MiB); the last
    term is the cast of the accumulator into dW at the end, when the block
    is gone.  ``direct_dw`` (Options.direct_dw, one chunk): A = dW itself, no
    cast."""
    N, V, H, isz = s.tokens, s.vocab, s.hidden, s.isz
    c = min(rows, N) + (1 if lookahead and rows < N else 0)
    acc = (V * H * (weight_itemsize if direct_dw else 4)) if need_weight else 0
    cast = (V * H * weight_itemsize if need_weight and weight_itemsize < 4 and not direct_dw
            else 0)
    loop = c * V * block_bytes + max(dw_temp if need_weight else 0, c * H * isz)
    return N * H * isz + acc + max(loop, cast)


def slabs_peak(s: Shape, mp: MemoryPlan, *, block_bytes: int, weight_itemsize: int,
               cpu: bool = False, dw_temp: int = 0, dx_direct: bool = False,
               direct_dw: bool = False, reuse: bool = False) -> int:
    """Peak bytes above the inputs of the two-pass "slabs" plan, outputs
    included, from the tensors the engine holds in its backward
    (``fastirl.engine._slab_backward``; the statistics pass holds one block):

        dx + X + max(dW + Sb + r·S·b + 2·r·H·i,   dW + 2·Sb + r·H·i)

    dx = N·H·i and dW = V·H·(weight itemsize) (allocated first), X = N·H·4
    (the float32 dx accumulator; none for float32 inputs, which accumulate in
    dx itself), Sb = S·H·4 (the float32 dW slab buffer), r·S·b (the block),
    r·H·i twice (the block's dx from dz @ W[slab], in the input dtype, and the
    previous block's, still bound while the next is computed); at a slab
    change (without buffer reuse) the next slab's buffer is zero-filled while
    the last one is bound.
    CPU (resident memory, what ``fastirl-bench`` measures there): dW's pages
    count once written, so the loops hold all of dW but the last slab; a
    low-precision dW partial (``dw_temp``) instead of the new dx while dz is
    alive, and the mixed-dtype add into X makes an (r, H) float32 temporary.  Options.slab_dx_direct: no r·H·i temporaries;
    Options.direct_dw (one block of rows): no Sb; Options.slab_buffer_reuse:
    no slab change term."""
    N, V, H, isz = s.tokens, s.vocab, s.hidden, s.isz
    S, r = mp.slab, mp.slab_rows
    sb, xr = (0 if direct_dw else S * H * 4), (0 if dx_direct else r * H * isz)
    out = V * H * weight_itemsize
    loop = sb + r * S * block_bytes + xr + max(xr, dw_temp)
    if cpu and isz < 4:
        loop = max(loop, sb + xr + r * H * 4)
    change = 2 * sb + xr if S < V and not reuse else 0
    last_s = V - (-(-V // S) - 1) * S
    last_r = N - (-(-N // r) - 1) * r
    end = last_s * H * 4 * (not direct_dw) + last_r * H * isz * (not dx_direct)
    # On a CPU the peak is resident memory: dW (torch.empty) becomes resident slab
    # by slab as each is copied in, so the loop of the last slab holds all but it.
    held = (V - last_s) * H * weight_itemsize if cpu else out
    acc = N * H * 4 if isz < 4 else 0          # float32 inputs accumulate in dx itself
    return N * H * isz + acc + max(held + max(loop, change), out + end)


def _times(ops: list[Op], n: int) -> list[Op]:
    return [] if n <= 0 else [replace(o, count=o.count * n) for o in ops]


def _parts(total: int, size: int) -> list[tuple[int, int]]:
    """(size, how many) of the equal parts and the remainder of ``total``."""
    full, rest = divmod(total, size)
    return [(size, full)] + ([(rest, 1)] if rest else [])


# The engine's small launches of the "slabs" plan (counted with a dispatch mode at a
# small shape, the backend's own launches excluded): per call (the objective once
# over every row, its autograd, the buffers), per slab (the statistics of its blocks
# collected and combined into the running whole) and per block and slab over both
# passes (the slab's local targets, twice).
SLAB_CALL_LAUNCHES = 63
SLAB_SLAB_LAUNCHES = 21
SLAB_BLOCK_LAUNCHES = 12


def slab_ops(s: Shape, hw: Hardware, opts: Options, mp: MemoryPlan, *, epi: str,
             softcap: bool, cpu: bool = False, weight_itemsize: int | None = None) -> list[Op]:
    """The launches of the "slabs" plan (``fastirl.engine._slab_stats`` and
    ``_slab_backward`` over a cuBLAS + epilogue backend, or the CPU one):

    statistics pass, per slab of S columns and block of r rows: the (r, S)
    logits GEMM and the statistics epilogue (GPU: logits_stats + merge);
    backward: the float32 (N, H) dx accumulator zero-filled; per slab its
    float32 (S, H) dW buffer zero-filled, then per block the logits GEMM
    again, the gradient epilogue, dW[slab] += dzᵀ x (float32 accumulation),
    dx_block = dz W[slab] in the input dtype and its add into the
    accumulator (read-modify-write), and at the slab's end its copy into dW
    (weight dtype); at the end dx zero-filled and the accumulator put into
    it."""
    N, V, H, isz = s.tokens, s.vocab, s.hidden, s.isz
    dt = s.torch_dtype
    dev = _device_info(hw)
    lowp = s.dtype != "float32"
    wsz = weight_itemsize or s.isz
    ops: list[Op] = []
    slabs, blocks = _parts(V, mp.slab), _parts(N, mp.slab_rows)
    dx_direct = opts.slab_dx_direct and not cpu
    direct_dw = opts.direct_dw and not cpu and mp.slab_rows >= N

    def stats(c, w):
        if cpu:
            return [gemm("gemm_logits", c, w, H, s.dtype),
                    elementwise("epilogue_stats", c * w, isz, _epi(epi, "stats", softcap))]
        return ([gemm("gemm_logits", c, w, H, s.dtype)]
                + _from_launches(triton_plan.plan_logits_forward(c, w, dt, dev=dev), s, hw,
                                 opts, epi=epi, softcap=softcap))

    def grads(c, w):
        out = [gemm("gemm_logits", c, w, H, s.dtype)]
        if cpu:
            out.append(elementwise("epilogue_grad", c * w, 2 * isz, _epi(epi, "grad", softcap)))
            if lowp:
                out += _cpu_dw(w, H, c, s)
            else:
                out.append(gemm("gemm_dw", w, H, c, s.dtype, out_bytes=4, accumulate=True))
        else:
            out += _from_launches(triton_plan.plan_logits_backward(c, w, dt, dev=dev), s, hw,
                                  opts, epi=epi, softcap=softcap)
            out += ([gemm("gemm_dw", w, H, c, s.dtype, out_bytes=wsz)] if direct_dw
                    else _dw_gemm(w, H, c, s, opts))
        if dx_direct:
            out.append(gemm("gemm_dx", c, H, w, s.dtype, out_bytes=4, accumulate=True))
            return out
        out.append(gemm("gemm_dx", c, H, w, s.dtype))
        # dx_acc[rows] += dx_block: block read, accumulator read + written (the CPU's
        # mixed-dtype add_ goes through a float32 temporary: written + read)
        out.append(elementwise("dx_acc_add", c * H, isz + 8 + (8 if cpu and lowp else 0), 1.0))
        return out

    for w, nw in slabs:
        for c, nc in blocks:
            ops += _times(stats(c, w), nw * nc)
    ops.append(elementwise("dx_acc_zero_fill", N * H, 4, 0.0))
    for w, nw in slabs:
        if not direct_dw:
            ops += _times([elementwise("dW_slab_zero_fill", w * H, 4, 0.0)], nw)
        for c, nc in blocks:
            ops += _times(grads(c, w), nw * nc)
        if not direct_dw:
            ops += _times([elementwise("dW_slab_copy", w * H, 4 + wsz, 1.0)], nw)
    ops += [elementwise("dx_zero_fill", N * H, isz, 0.0),
            elementwise("dx_put", N * H, 4 + isz, 1.0)]
    if opts.engine_launches and not cpu:
        m, k = -(-V // mp.slab), -(-N // mp.slab_rows)
        ops.append(small_launches("engine_small", SLAB_CALL_LAUNCHES + SLAB_SLAB_LAUNCHES * m
                                  + SLAB_BLOCK_LAUNCHES * m * k))
    return ops


def _cpu_dw(m: int, n: int, k: int, s: Shape) -> list[Op]:
    """The CPU's low-precision dW += dzᵀ x of m weight rows over k rows: GEMMs
    per 64 MiB row slab of dW (each streams the (k, H) x panel again) into a
    low-precision temporary, added into the float32 accumulator
    (``fastirl::acc_add_``: the partial read, the accumulator read and written)."""
    isz = s.isz
    slab = max(1, min(m, gemm_epilogue._DW_SLAB_BYTES // (n * isz)))
    nslab = -(-m // slab)
    return [Op("gemm_dw", 2.0 * m * n * k, (m * k + nslab * k * n) * isz + m * n * isz,
               s.dtype),
            elementwise("dW_add", m * n, isz + 8, 1.0)]


def _cpu_dw_temp(m: int, s: Shape) -> int:
    """Bytes of the CPU's low-precision dW partial for m weight rows."""
    if s.dtype == "float32":
        return 0
    rows = max(1, min(m, gemm_epilogue._DW_SLAB_BYTES // (s.hidden * s.isz)))
    return rows * s.hidden * s.isz


def _plan_note(mp: MemoryPlan, s: Shape, memory) -> str:
    from .variants import budget_label
    label = memory if isinstance(memory, str) or memory is None else budget_label(memory)
    what = f"memory={label}: " if memory is not None else ""
    if mp.mode == "slabs":
        m, k = -(-s.vocab // mp.slab), -(-s.tokens // mp.slab_rows)
        return (f"{what}slabs: {m} slabs of {mp.slab} columns x {k} blocks of "
                f"{mp.slab_rows} rows")
    return f"{what}{math.ceil(s.tokens / mp.rows)} chunks of {mp.rows} rows"


def fastirl_gpu(backend: str, preset: str, s: Shape, hw: Hardware, opts: Options, *,
                softcap: bool, single_pass: bool, memory: "str | int | None" = None,
                need_weight: bool = True,
                chunk_size: int | None = None) -> tuple[list[Op], float, str]:
    """(ops, peak extra bytes, note) of fastirl backend ``backend`` on a GPU
    under the memory setting ``memory`` (default: the library's), for a
    trained head or, ``need_weight=False``, a frozen one (no dW)."""
    dev = _device_info(hw)
    wsz = s.isz                            # the weight's dtype (its gradient's)
    upcast = preset == "highest" and s.dtype != "float32"
    if upcast:
        s = replace(s, dtype="float32")    # upcast: float32 GEMMs (no TF32 by default)
    dt = s.torch_dtype
    N, V, H = s.tokens, s.vocab, s.hidden
    # "highest": the weight's float32 copy lives through the call
    copy = V * H * 4 if upcast else 0
    if backend in ("triton", "cuda"):
        mp = engine_plan(backend, s, hw, memory, need_weight=need_weight,
                         chunk_size=chunk_size, weight_itemsize=wsz)
        bsz = block_itemsize(backend, s)
        note = _plan_note(mp, s, memory)
        if mp.mode == "slabs":
            ops = slab_ops(s, hw, opts, mp, epi="exp2", softcap=softcap, weight_itemsize=wsz)
            peak = slabs_peak(s, mp, block_bytes=bsz, weight_itemsize=wsz,
                              dx_direct=opts.slab_dx_direct,
                              direct_dw=opts.direct_dw and mp.slab_rows >= N,
                              reuse=opts.slab_buffer_reuse)
            return ops, peak + copy, note
        rows = mp.rows
        chunks = math.ceil(N / rows)
        direct = opts.direct_dw and chunks == 1 and need_weight
        launches = triton_plan.plan_epilogue(N, V, H, dt, dev=dev, rows_per_chunk=rows,
                                             single_pass=single_pass, need_weight=need_weight,
                                             lookahead=opts.lookahead)
        ops = _from_launches(launches, s, hw, opts, epi="exp2", softcap=softcap,
                             dw_direct=wsz if direct else 0)
        ops += _engine_extras(s, hw, opts, chunks, need_w=need_weight and not direct)
        if need_weight and wsz < 4 and not direct:
            ops.append(elementwise("dW_cast", V * H, 4 + wsz, 1.0))
        peak = rows_peak(s, rows, block_bytes=bsz, weight_itemsize=wsz, need_weight=need_weight,
                         lookahead=opts.lookahead and single_pass, direct_dw=direct)
        return ops, peak + copy, note
    if (memory is not None and memory != "fast") or not need_weight or chunk_size is not None:
        raise ValueError(f"roofline: memory settings, chunk sizes and the frozen head are "
                         f"modelled for the {', '.join(MEMORY_BACKENDS)} backends, not "
                         f"{backend!r}")
    grads = V * H * 4 + N * H * wsz + V * H * wsz   # float32 dW, dx, dW cast
    if backend == "triton-fused":
        rows = _engine_rows(backend, s, hw)
        ops: list[Op] = []
        for r0 in range(0, N, rows):
            c = min(rows, N - r0)
            ops += _from_launches(triton_plan.plan_fused_forward(c, V, H, dt, dev=dev), s, hw,
                                  opts, epi="exp2", softcap=softcap)
            det = preset != "fast"
            bwd = triton_plan.plan_fused_backward(c, V, H, dt, dev=dev, deterministic=det)
            ops += _from_launches(bwd, s, hw, opts, epi="exp2", softcap=softcap, dx_f32=det)
        chunks = math.ceil(N / rows)
        ops += _engine_extras(s, hw, opts, chunks)
        ops.append(elementwise("dW_cast", V * H, 4 + s.isz, 1.0))
        cols = triton_plan.slab_columns(min(rows, N), V, dt)
        peak = grads + N * H * 4 + (0 if preset == "fast" else min(rows, N) * cols * s.isz)
        return ops, peak + copy, f"{chunks} engine chunks"
    if backend == "torch":
        return torch_backend(s, hw, opts, softcap=softcap, epi="exp2")
    raise ValueError(f"roofline: unknown fastirl backend {backend!r}")


def torch_backend(s: Shape, hw: Hardware, opts: Options, *, softcap: bool, epi: str,
                  chunk_size: int | None = None) -> tuple[list[Op], float, str]:
    """fastirl's pure-PyTorch backend: per chunk a GEMM, a float32 copy of the
    block, ~6 element-wise passes (max, sub, exp, sum, scale, one-hot), a
    float32 dW GEMM and a dx GEMM on a copy of dz in the input dtype."""
    N, V, H, isz = s.tokens, s.vocab, s.hidden, s.isz
    rows = _engine_rows("torch", s, hw, chunk_size)
    ops: list[Op] = []
    f32 = s.dtype == "float32"
    for c in _chunks(N, rows):
        e = c * V
        ops.append(gemm("gemm_logits", c, V, H, s.dtype))
        if not f32:
            ops.append(elementwise("to_float32", e, isz + 4, 1.0))
        ops.append(elementwise("stats_passes", e, 4 * 5, _epi(epi, "stats", softcap) / 2,
                               launches=5))
        ops.append(elementwise("grad_passes", e, 4 * 4, 4.0, launches=4))
        ops.append(gemm("gemm_dw", V, H, c, "float32", out_bytes=4, accumulate=True))
        if not f32:
            ops.append(elementwise("dz_cast", e, 4 + isz, 1.0))
        ops.append(gemm("gemm_dx", c, H, V, s.dtype))
    if not f32:
        ops.append(elementwise("dW_cast", V * H, 4 + isz, 1.0))
    if hw.kind == "cuda":
        ops += _engine_extras(s, hw, opts, math.ceil(N / rows))
    peak = V * H * 4 + N * H * isz + (0 if f32 else V * H * isz) + rows * V * 4
    return ops, peak, f"{math.ceil(N / rows)} chunks of {rows} rows"


def _chunks(n: int, rows: int) -> list[int]:
    """Rows each engine chunk computes in single-pass mode: its own plus one
    look-ahead row (the next chunk's first, for V of the TD term), except the
    last chunk."""
    out = []
    for r0 in range(0, n, max(1, rows)):
        c = min(rows, n - r0)
        out.append(c + 1 if r0 + c < n else c)
    return out


def fastirl_cpu(s: Shape, hw: Hardware, *, softcap: bool, chunk_size: int | None = None,
                memory: "str | int | None" = None, need_weight: bool = True,
                opts: Options = None) -> tuple[list[Op], float, str]:
    """fastirl's "cpu" backend: per chunk the logits GEMM (block in the input
    dtype), the statistics and gradient epilogues (one read; one read + write),
    dx = dz @ W and dW: a float32 addmm for float32 inputs, else low-precision
    GEMMs per vocabulary slab added into the float32 accumulator.  Under a
    memory setting whose plan is "slabs": :func:`slab_ops`."""
    N, V, H, isz = s.tokens, s.vocab, s.hidden, s.isz
    opts = opts or DEFAULT_OPTIONS
    mp = engine_plan("cpu", s, hw, memory, need_weight=need_weight, chunk_size=chunk_size)
    bsz = block_itemsize("cpu", s)
    note = _plan_note(mp, s, memory)
    if mp.mode == "slabs":
        ops = slab_ops(s, hw, opts, mp, epi="poly", softcap=softcap, cpu=True)
        peak = slabs_peak(s, mp, block_bytes=bsz, weight_itemsize=isz, cpu=True,
                          dw_temp=_cpu_dw_temp(mp.slab, s))
        return ops, peak, note
    rows = mp.rows
    ops: list[Op] = []
    lowp = s.dtype != "float32"
    for c in _chunks(N, rows):
        ops.append(gemm("gemm_logits", c, V, H, s.dtype))
        ops.append(elementwise("epilogue_stats", c * V, isz, _epi("poly", "stats", softcap)))
        ops.append(elementwise("epilogue_grad", c * V, 2 * isz, _epi("poly", "grad", softcap)))
        ops.append(gemm("gemm_dx", c, H, V, s.dtype))
        if not need_weight:
            continue
        if lowp:
            ops += _cpu_dw(V, H, c, s)
        else:
            ops.append(gemm("gemm_dw", V, H, c, s.dtype, out_bytes=4, accumulate=True))
    if lowp and need_weight:
        ops.append(elementwise("dW_cast", V * H, 4 + isz, 1.0))
    peak = rows_peak(s, rows, block_bytes=bsz, weight_itemsize=isz, need_weight=need_weight,
                     dw_temp=_cpu_dw_temp(V, s))
    return ops, peak, note


# ------------------------------------------------------------------ variants

# The fastirl CUDA backends x presets of the model ("fast" only where it
# changes the launches: the fused backward's atomics).
CUDA_FASTIRL = [("cuda", "default"), ("cuda", "highest"), ("triton", "default"),
                 ("triton", "highest"), ("triton-fused", "default"), ("triton-fused", "fast"),
                 ("torch", "default")]


def variant_name(backend: str, preset: str) -> str:
    return f"fastirl-{backend}" + ("" if preset == "default" else f"-{preset}")


