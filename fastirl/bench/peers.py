"""Cost models of the other implementations the benchmarks compare against.

Each model lists the launches the peer's published code makes at a shape
(N tokens, hidden H, vocabulary V), from the code itself:

* ``liger``: Liger-Kernel 0.8.5 (the wheel gpu_check carries): like
  ``liger-2026`` but dW accumulated by a bf16 ``addmm(out=grad_weight)``.
* ``liger-2026``: Liger-Kernel's fused linear cross-entropy as of Aug-Sep 2026
  (``src/liger_kernel/ops/fused_linear_cross_entropy.py``, what
  huggingface/trl#7244 measured): chunks of
  ``next_pow2(ceil(N / ceil(V / H)))`` rows (256 at the 8B head); per chunk the
  logits GEMM, the cross-entropy kernel in place on the bf16 block (two reads,
  one write), the dx GEMM (copied into ``grad_input``), and with a bf16
  weight (``accum_dtype=None``) ``grad_weight += mm(dzᵀ, x).float()``: the
  (V, H) product written in bf16, converted to a float32 temporary, added into
  the bf16 gradient; ``grad_weight``/``grad_input`` zero-filled first; one
  ``.item()`` and one ``torch.equal`` host sync per call.
* ``liger-2024``: the version of Oct-Nov 2024 that Cut Cross-Entropy's paper
  measured: the same chunks, each block converted to float32 before the
  cross-entropy kernel and back to bf16 after, scaled by ``alpha`` (one more
  pass), dW by a bf16 ``addmm``, and a ``.item()`` per chunk.
* ``cce``: Cut Cross-Entropy's ``impl="cce"``: a fused forward (128 x 128
  logits tiles reduced to the log-sum-exp, with the column means of the
  logits for the vocabulary sort) and the indexed dot of the targets; a
  backward that recomputes every tile and, for the tiles its gradient filter
  keeps, does the two gradient GEMM tiles and adds them into **bf16** dE / dC
  under spin locks (``tl_lock_add``: 2 x ceil(H / 64) lock-protected 128 x 64
  slices per kept tile), after zero-filling dE and dC.  The kept fraction comes
  from the inputs' logits (:func:`fastirl.bench.logits.cce_kept_fraction`);
  ``cce-2024`` is the paper's version (filter threshold 2^-10),
  ``cce-nosort-2024`` without the vocabulary sort, ``cce-nofilter`` with no
  filter (every tile kept).  Memory: dE, dC in the input dtype, the lse and
  the target logits (N float32 each), with the filter the column means of
  the logits (V float32) and their int32 order.
* a frozen head (``need_weight=False``; ``liger``, ``cce``, ``cce-nofilter``,
  ``naive``, ``matmul-floor``): no grad_weight / dC, no dW GEMM or tiles.
* ``naive-ce``: PyTorch eager cross-entropy on materialised logits (CCE's
  "Baseline", TRL's "full logits"): bf16 logits, ``.float()``,
  ``log_softmax`` (three reads and a write over float32) + ``nll_loss``, and
  autograd's backward of each.
* ``torch-compile-ce``: the same compiled (CCE's ``impl="torch_compile"``):
  the logits GEMM, one fused kernel that reads the bf16 logits twice
  (max, then sum of exponentials), a fused backward that reads them and
  writes the bf16 gradient, two GEMMs.
* ``torchtune-ce``: TorchTune's ``CEWithChunkedOutputLoss`` (8 chunks): the
  eager cross-entropy per chunk of the logits, every chunk's float32
  ``log_softmax`` kept for the backward, dW summed over the chunks.
  ``torchtune-ce-compiled``: the same as TorchTune's recipes run it with
  ``compile: True`` (``training.compile_loss`` compiles each chunk's upcast +
  cross-entropy, not the chunking): per chunk the fused reduction and fused
  backward of ``torch-compile-ce``.
* ``trl-chunked-nll``: TRL's ``loss_type="chunked_nll"`` as of Sept 2026
  (``sft_trainer._chunk`` after huggingface/trl#6863): chunks of 256 tokens
  under ``torch.utils.checkpoint``; per chunk ``(h @ Wᵀ).float()``,
  ``log_softmax``, ``nll_loss``, ``argmax`` and the entropy
  ``-(p * log p).sum()`` in eager PyTorch, recomputed in the backward, whose
  dW of every chunk is added into the accumulated gradient by autograd.
  ``trl-chunked-nll-kept``: the same chunks without the recomputation, every
  chunk's float32 ``log_p`` and ``exp(log_p)`` kept for the backward (8 bytes a
  logit): the reading that reproduces huggingface/trl#7244's figures (see
  docs/gpu-model.md).
* ``naive``: fastirl's own reference IQ loss (``fastirl.reference``), eager.
* micro-benchmarks: ``matmul-floor`` (the three GEMMs: X Wᵀ, G W, Gᵀ X),
  ``mm`` (one (N, H) x (H, V) GEMM), ``copy`` (a device-to-device copy of an
  (N, V) tensor), ``trl-selective-log-softmax`` / ``trl-entropy`` (TRL's
  per-row log-softmax + gather and its chunked entropy over stored (N, V)
  logits, sequences of 1024 tokens).
"""

from __future__ import annotations

import math

from .launches import Op, Options, Shape, elementwise, gemm, small_launches

__all__ = ["PEERS", "LIGER_CHUNK_ROWS"]


def _f32_log_softmax(e: float, launches: int = 1) -> Op:
    # PyTorch's softmax kernel for rows too long for shared memory: max pass,
    # sum-of-exponentials pass, then read again and write.
    return elementwise("log_softmax", e, 16, 6.0, launches=launches)


def _f32_log_softmax_bwd(e: float, launches: int = 1) -> Op:
    # grad - exp(out) * sum(grad): grad read for the sum, grad and out read
    # again, the result written
    return elementwise("log_softmax_bwd", e, 16, 4.0, launches=launches)


# --------------------------------------------------------------------- floor, micro

def floor(s: Shape, hw, opts: Options, *, softcap: bool = False, need_weight: bool = True):
    """The GEMMs of forward+backward: X Wᵀ, G W and (a trained head) Gᵀ X."""
    N, V, H = s.tokens, s.vocab, s.hidden
    ops = [gemm("gemm_logits", N, V, H, s.dtype), gemm("gemm_dx", N, H, V, s.dtype)]
    if need_weight:
        ops.append(gemm("gemm_dw", V, H, N, s.dtype))
    peak = N * V * s.isz + (V * H * need_weight + N * H) * s.isz
    return ops, peak, "three bare GEMMs" if need_weight else "two bare GEMMs (no dW)", "floor"


def mm(s: Shape, hw, opts: Options, *, softcap: bool = False):
    N, V, H = s.tokens, s.vocab, s.hidden
    return [gemm("mm", N, V, H, s.dtype)], N * V * s.isz, "one GEMM", "micro"


def copy(s: Shape, hw, opts: Options, *, softcap: bool = False):
    e = s.tokens * s.vocab
    return [elementwise("copy", e, 2 * s.isz, 0.0)], e * s.isz, "device-to-device copy", "micro"


def trl_selective_log_softmax(s: Shape, hw, opts: Options, *, softcap: bool = False,
                              seq: int = 1024):
    """Per sequence row (``seq`` tokens): log_softmax in the logits' dtype
    (three reads, one write), then a gather."""
    e = s.tokens * s.vocab
    rows = max(1, s.tokens // seq)
    ops = [elementwise("log_softmax", e, 4 * s.isz, 6.0, launches=rows),
           small_launches("gather_stack", 2 * rows + 1)]
    return ops, seq * s.vocab * s.isz, f"{rows} rows of {seq} tokens", "micro"


def trl_entropy(s: Shape, hw, opts: Options, *, softcap: bool = False, chunk: int = 128):
    """Chunks of 128 rows: log_softmax (bf16), exp, multiply, sum."""
    e = s.tokens * s.vocab
    n = math.ceil(s.tokens / chunk)
    isz = s.isz
    ops = [elementwise("log_softmax", e, 4 * isz, 6.0, launches=n),
           elementwise("exp", e, 2 * isz, 2.0, launches=n),
           elementwise("mul", e, 3 * isz, 1.0, launches=n),
           elementwise("sum", e, isz, 1.0, launches=n),
           small_launches("neg_cat", n + 1)]
    return ops, 3 * chunk * s.vocab * isz, f"{n} chunks of {chunk} rows", "micro"


# --------------------------------------------------------------------- eager / compiled CE

def _softcap_fwd(e: float, isz: int) -> list[Op]:
    # logits / c, tanh, * c in the logits' dtype
    return [elementwise("softcap", e, 6 * isz, 20.0, launches=3)]


def _softcap_bwd(e: float, isz: int) -> list[Op]:
    # mul backward, tanh backward (grad, out), div backward
    return [elementwise("softcap_bwd", e, 7 * isz, 6.0, launches=3)]


def naive_ce(s: Shape, hw, opts: Options, *, softcap: bool = False, phase: str = "both"):
    """Eager ``F.cross_entropy(logits.float(), t)`` on ``x @ Wᵀ``; ``phase``:
    "loss" (forward), "grad" (backward only) or "both"."""
    N, V, H, isz = s.tokens, s.vocab, s.hidden, s.isz
    e = N * V
    fwd = [gemm("gemm_logits", N, V, H, s.dtype)]
    if softcap:
        fwd += _softcap_fwd(e, isz)
    fwd += [elementwise("to_float32", e, isz + 4, 1.0), _f32_log_softmax(e),
            small_launches("nll_loss", 3)]
    bwd = [elementwise("nll_backward_zeros", e, 4, 0.0, launches=2), _f32_log_softmax_bwd(e),
           elementwise("to_bf16", e, 4 + isz, 1.0)]
    if softcap:
        bwd += _softcap_bwd(e, isz)
    bwd += [gemm("gemm_dx", N, H, V, s.dtype), gemm("gemm_dw", V, H, N, s.dtype)]
    # peak: logits (+ capped copies), float32 logits, float32 log-softmax kept for
    # the backward, then its float32 gradient and the bf16 gradient
    loss_peak = e * (isz + (2 * isz if softcap else 0) + 4 + 4)
    grad_peak = e * (4 + 4 + isz) + (V * H + N * H) * isz
    ops = {"loss": fwd, "grad": bwd, "both": fwd + bwd}[phase]
    peak = {"loss": loss_peak, "grad": grad_peak, "both": max(loss_peak, grad_peak)}[phase]
    return ops, peak, "(N, V) logits, eager", "CE"


def torch_compile_ce(s: Shape, hw, opts: Options, *, softcap: bool = False, phase: str = "both"):
    """``torch.compile`` of the same: Inductor fuses the soft cap, the upcast
    and the log-sum-exp into one reduction over the bf16 logits (read twice)
    and the backward into one kernel that writes the bf16 gradient."""
    N, V, H, isz = s.tokens, s.vocab, s.hidden, s.isz
    e = N * V
    cap = 20.0 if softcap else 0.0
    fwd = [gemm("gemm_logits", N, V, H, s.dtype),
           elementwise("fused_lse", e, 2 * isz, 8.0 + 2 * cap, launches=2)]
    bwd = [elementwise("fused_ce_bwd", e, 2 * isz, 8.0 + cap, launches=2),
           gemm("gemm_dx", N, H, V, s.dtype), gemm("gemm_dw", V, H, N, s.dtype)]
    ops = {"loss": fwd, "grad": bwd, "both": fwd + bwd}[phase]
    peak = e * isz * (1 if phase == "loss" else 3) + (V * H + N * H) * isz * (phase != "loss")
    return ops, peak, "(N, V) logits, torch.compile", "CE"


def torchtune_ce(s: Shape, hw, opts: Options, *, softcap: bool = False, phase: str = "both",
                 chunks: int = 8, compiled: bool = False):
    """TorchTune's chunked-output cross-entropy: the logits in ``chunks`` GEMMs,
    a cross-entropy per chunk (eager, or compiled as TorchTune's
    ``compile_loss`` does it); autograd sums the chunks' dW (bf16)."""
    N, V, H, isz = s.tokens, s.vocab, s.hidden, s.isz
    c = math.ceil(N / chunks)
    e = c * V
    if compiled:        # the torch-compile-ce kernels on each chunk
        ce_fwd = [elementwise("fused_lse", e, 2 * isz, 8.0, launches=2)]
        ce_bwd = [elementwise("fused_ce_bwd", e, 2 * isz, 8.0, launches=2)]
    else:
        ce_fwd = [elementwise("to_float32", e, isz + 4, 1.0), _f32_log_softmax(e),
                  small_launches("nll_loss", 3)]
        ce_bwd = [elementwise("nll_backward_zeros", e, 4, 0.0, launches=2),
                  _f32_log_softmax_bwd(e), elementwise("to_bf16", e, 4 + isz, 1.0)]
    fwd, bwd = [], []
    for _ in range(chunks):
        fwd += [gemm("gemm_logits", c, V, H, s.dtype), *ce_fwd]
        bwd += [*ce_bwd, gemm("gemm_dx", c, H, V, s.dtype), gemm("gemm_dw", V, H, c, s.dtype),
                elementwise("dW_sum", V * H, 3 * isz, 1.0)]
    ops = {"loss": fwd, "grad": bwd, "both": fwd + bwd}[phase]
    if compiled:        # bf16 logits of every chunk kept; one chunk's gradient at a time
        loss_peak = N * V * isz
        grad_peak = V * H * isz * 2 + N * V * isz + e * isz
    else:
        loss_peak = N * V * 4 + e * (isz + 4)
        grad_peak = V * H * isz * 2 + e * (4 + 4 + isz)
    peak = {"loss": loss_peak, "grad": grad_peak, "both": max(loss_peak, grad_peak)}[phase]
    how = "compiled" if compiled else "eager"
    return ops, peak, f"{chunks} chunks of {c} rows, {how}", "CE"


def torchtune_ce_compiled(s: Shape, hw, opts: Options, *, softcap: bool = False,
                          phase: str = "both", chunks: int = 8):
    return torchtune_ce(s, hw, opts, softcap=softcap, phase=phase, chunks=chunks, compiled=True)


def trl_chunked_nll(s: Shape, hw, opts: Options, *, softcap: bool = False, chunk: int = 256,
                    checkpoint: bool = True):
    """TRL ``chunked_nll`` (Sept 2026): see the module doc.  checkpoint=False:
    the chunks' activations kept instead of recomputed."""
    N, V, H, isz = s.tokens, s.vocab, s.hidden, s.isz
    n = math.ceil(N / chunk)
    e = chunk * V
    fwd_ew = [elementwise("to_float32", e, isz + 4, 1.0), _f32_log_softmax(e),
              elementwise("argmax", e, 4, 1.0), elementwise("exp", e, 8, 2.0),
              elementwise("p_log_p", e, 12, 1.0), elementwise("sum", e, 4, 1.0),
              small_launches("nll_valid_sums", 10)]
    bwd_ew = [elementwise("entropy_bwd", e, 4 * 8, 3.0, launches=4),      # mul / exp backward
              elementwise("nll_backward_zeros", e, 4, 0.0, launches=2),
              elementwise("grad_sum", e, 12, 1.0), _f32_log_softmax_bwd(e),
              elementwise("to_bf16", e, 4 + isz, 1.0)]
    ops: list[Op] = [small_launches("argsort_gather", 8)]
    for i in range(n):
        # the forward (without grad under the checkpoint), its recomputation, the backward
        ops += [gemm("gemm_logits", chunk, V, H, s.dtype), *fwd_ew]
        if checkpoint:
            ops += [gemm("gemm_logits", chunk, V, H, s.dtype), *fwd_ew]
        ops += [*bwd_ew, gemm("gemm_dx", chunk, H, V, s.dtype),
                gemm("gemm_dw", V, H, chunk, s.dtype)]
        if i:
            ops.append(elementwise("dW_accumulate", V * H, 3 * isz, 1.0))
    peak = 2 * V * H * isz + e * (isz + 6 * 4)
    if not checkpoint:              # log_p and exp(log_p) of every chunk, float32
        peak += (n - 1) * e * 8
    how = "checkpointed" if checkpoint else "kept (no recomputation)"
    return ops, peak, f"{n} chunks of {chunk} rows, {how}", "CE"


def trl_chunked_nll_kept(s: Shape, hw, opts: Options, *, softcap: bool = False,
                         chunk: int = 256):
    return trl_chunked_nll(s, hw, opts, softcap=softcap, chunk=chunk, checkpoint=False)


def naive_iq(s: Shape, hw, opts: Options, *, softcap: bool = False, need_weight: bool = True):
    """``fastirl.reference.iq_loss`` eagerly: the (N, V) logits, log-sum-exp,
    gather and their autograd: about 12 element-wise passes over (N, V)
    elements (division by tau, logsumexp's max / exp / sum, the backward's
    softmax, the gather's scatter, sums) and five (N, V) tensors at the peak."""
    N, V, H, isz = s.tokens, s.vocab, s.hidden, s.isz
    e = N * V
    ops = [gemm("gemm_logits", N, V, H, s.dtype),
           elementwise("elementwise_passes", e, 12 * isz, 30.0, launches=12),
           small_launches("objective", 60), gemm("gemm_dx", N, H, V, s.dtype)]
    if need_weight:
        ops.append(gemm("gemm_dw", V, H, N, s.dtype))
    peak = 5.0 * e * max(isz, 2) + V * H * isz * need_weight + N * H * isz
    return ops, peak, "(N, V) logits", "IQ"


# --------------------------------------------------------------------- Liger

def LIGER_CHUNK_ROWS(tokens: int, vocab: int, hidden: int) -> int:
    """Liger's chunk rows: next_pow2(ceil(N / ceil(V / H)))."""
    inc = -(-vocab // hidden)
    return 1 << max(0, math.ceil(math.log2(max(1, -(-tokens // inc)))))


def liger(s: Shape, hw, opts: Options, *, softcap: bool = False, need_weight: bool = True):
    """Liger-Kernel 0.8.5: as ``liger-2026`` but dW accumulated by a bf16
    ``addmm(out=grad_weight)`` (no float32 temporary) and dx written by
    ``mm(out=)`` into ``grad_input``.  A frozen head (``weight.requires_grad``
    False): no ``grad_weight`` (not allocated, no dW GEMM)."""
    N, V, H, isz = s.tokens, s.vocab, s.hidden, s.isz
    rows = LIGER_CHUNK_ROWS(N, V, H)
    fill = V * H * need_weight + N * H
    ops: list[Op] = [elementwise("zero_fill", fill, isz, 0.0, launches=2 + need_weight)]
    for r0 in range(0, N, rows):
        c = min(rows, N - r0)
        ops += [gemm("gemm_logits", c, V, H, s.dtype),
                elementwise("ce_kernel", c * V, 3 * isz, 24.0 + (16 if softcap else 0)),
                gemm("gemm_dx", c, H, V, s.dtype)]
        if need_weight:
            ops.append(gemm("gemm_dw", V, H, c, s.dtype, accumulate=True))  # bf16 addmm into dW
        ops.append(small_launches("loss_slices", 3))
    # the block, grad_weight (bf16), grad_input, the float32 per-row losses
    peak = rows * V * isz + V * H * isz * need_weight + N * H * isz + N * 4
    what = f"dW in {s.dtype}" if need_weight else "frozen head"
    return ops, peak, f"{math.ceil(N / rows)} chunks of {rows} rows ({what})", "CE"


def liger_2026(s: Shape, hw, opts: Options, *, softcap: bool = False):
    N, V, H, isz = s.tokens, s.vocab, s.hidden, s.isz
    rows = LIGER_CHUNK_ROWS(N, V, H)
    ops: list[Op] = [elementwise("zero_fill", V * H + N * H, isz, 0.0, launches=3)]
    for r0 in range(0, N, rows):
        c = min(rows, N - r0)
        ops += [gemm("gemm_logits", c, V, H, s.dtype),
                elementwise("ce_kernel", c * V, 3 * isz, 24.0 + (16 if softcap else 0)),
                gemm("gemm_dx", c, H, V, s.dtype), elementwise("grad_input_copy", c * H, 2 * isz,
                                                                0.0),
                gemm("gemm_dw", V, H, c, s.dtype),                   # mm(dzᵀ, x), bf16 out
                elementwise("dW_to_float32", V * H, isz + 4, 1.0),
                elementwise("dW_add", V * H, isz + 4 + isz, 1.0),
                small_launches("loss_slices", 3)]
    peak = rows * V * isz + 2 * V * H * isz + V * H * (isz + 4) + N * H * isz
    return ops, peak, f"{math.ceil(N / rows)} chunks of {rows} rows (dW in {s.dtype})", "CE"


def liger_2024(s: Shape, hw, opts: Options, *, softcap: bool = False):
    N, V, H, isz = s.tokens, s.vocab, s.hidden, s.isz
    rows = LIGER_CHUNK_ROWS(N, V, H)
    ops: list[Op] = [elementwise("zero_fill", V * H + N * H, isz, 0.0, launches=3)]
    for r0 in range(0, N, rows):
        c = min(rows, N - r0)
        e = c * V
        ops += [gemm("gemm_logits", c, V, H, s.dtype),
                elementwise("to_float32", e, isz + 4, 1.0),
                elementwise("ce_kernel", e, 12, 24.0),               # float32, in place
                elementwise("to_bf16", e, 4 + isz, 1.0),
                elementwise("scale_alpha", e, 2 * isz, 1.0),
                gemm("gemm_dx", c, H, V, s.dtype), elementwise("grad_input_copy", c * H,
                                                                2 * isz, 0.0),
                gemm("gemm_dw", V, H, c, s.dtype, accumulate=True),  # bf16 addmm into dW
                small_launches("loss_slices", 4)]
    peak = rows * V * (4 + isz) + V * H * isz + N * H * isz
    return ops, peak, f"{math.ceil(N / rows)} chunks of {rows} rows (2024)", "CE"


# --------------------------------------------------------------------- Cut Cross-Entropy

def _cce(s: Shape, hw, opts: Options, *, softcap: bool, eps: float | None, sort: bool,
         kept: float | None, phase: str, need_weight: bool = True):
    from . import logits as LG

    N, V, H, isz = s.tokens, s.vocab, s.hidden, s.isz
    bm = bn = 128
    rb, vb = -(-N // bm), -(-V // bn)
    tiles = rb * vb
    if eps is None:
        f = 1.0
    elif kept is not None:
        f = kept
    else:
        f = LG.cce_kept_fraction(opts.inputs, V, eps=eps, sort=sort,
                                 softcap=30.0 if softcap else None)
    P = max(1, hw.sm_count)
    waves = math.ceil(tiles / P)
    side = max(1, int(math.sqrt(P)))
    per_wave = side * (bm + bn) * H * isz          # a square-ish block of tiles per wave
    cap = (20.0 if softcap else 0.0)
    epi = 12.0 + cap                                # exp, max/sum, (tanh)
    vec_as_gemm = hw.gemm_flops(s.dtype) / hw.vector_flops
    fwd_flops = 2.0 * N * V * H
    fwd = Op("cce_lse_forward", fwd_flops, waves * per_wave + N * 8 + V * 4 * (eps is not None),
             f"fused:{s.dtype}", work=fwd_flops + N * V * epi * vec_as_gemm)
    fwd_ops = [fwd, elementwise("indexed_dot", N * H, 2 * isz, 2.0),
               small_launches("valids_nll_mean", 6)]
    # backward: recompute every tile; the kept ones: two GEMM tiles (one for a
    # frozen head: no dC) + locked bf16 adds
    grads = 1 + need_weight
    rec = 2.0 * N * V * H
    grad = grads * 2.0 * N * V * H * f
    locks = tiles * f * grads * math.ceil(H / 64)
    bwd = Op("cce_backward", rec + grad,
             waves * per_wave * (1 + grads * f) + locks * 2 * 128 * 64 * isz,
             f"fused:{s.dtype}", lock_adds=locks,
             work=rec + grad + N * V * (epi + 4) * vec_as_gemm)
    bwd_ops = [elementwise("zero_fill_dE_dC", (N + V * need_weight) * H, isz, 0.0,
                           launches=2 + need_weight)]
    if sort and eps is not None:
        bwd_ops.append(elementwise("sort_logit_avg", V, 64, 10.0, launches=4))
    bwd_ops.append(bwd)
    ops = {"loss": fwd_ops, "grad": bwd_ops, "both": fwd_ops + bwd_ops}[phase]
    # dE, dC in the input dtype; lse and the target logits (N float32 each); with the
    # filter, the column means of the logits (V float32) and their int32 sort order
    sorted_ = sort and eps is not None
    peak = ((V * H * need_weight + N * H) * isz + (N * 8 if phase != "grad" else 0)
            + (V * 8 if sorted_ else 0))
    what = ("no gradient filter" if eps is None else
            f"filter 2^{round(math.log2(eps))}, {'sorted' if sort else 'unsorted'}, "
            f"{f:.0%} of tiles kept ({'given' if kept is not None else opts.inputs + ' inputs'})")
    return ops, peak, what, "CE"


def cce(s, hw, opts, *, softcap=False, phase="both", kept=None, need_weight=True):
    from .logits import CCE_EPS
    return _cce(s, hw, opts, softcap=softcap, eps=CCE_EPS, sort=True, kept=kept, phase=phase,
                need_weight=need_weight)


def cce_2024(s, hw, opts, *, softcap=False, phase="both", kept=None):
    from .logits import CCE_EPS_2024
    return _cce(s, hw, opts, softcap=softcap, eps=CCE_EPS_2024, sort=True, kept=kept,
                phase=phase)


def cce_nosort_2024(s, hw, opts, *, softcap=False, phase="both", kept=None):
    from .logits import CCE_EPS_2024
    return _cce(s, hw, opts, softcap=softcap, eps=CCE_EPS_2024, sort=False, kept=kept,
                phase=phase)


def cce_nofilter(s, hw, opts, *, softcap=False, phase="both", kept=None, need_weight=True):
    return _cce(s, hw, opts, softcap=softcap, eps=None, sort=False, kept=None, phase=phase,
                need_weight=need_weight)


def _lenient(fn):
    """Accept the keyword arguments the calibration passes (phase, kept) even
    where they do not apply (a fused loss has no separate loss phase); a
    frozen head (need_weight=False) only where the peer models it."""
    import inspect
    names = set(inspect.signature(fn).parameters)

    def call(s, hw, opts, **kw):
        if not kw.get("need_weight", True) and "need_weight" not in names:
            raise ValueError(f"roofline: the frozen head is not modelled for {fn.__name__}")
        return fn(s, hw, opts, **{k: v for k, v in kw.items() if k in names})
    call.__doc__ = fn.__doc__
    call.frozen_head = "need_weight" in names
    return call


PEERS = {
    "matmul-floor": floor, "mm": mm, "copy": copy,
    "naive": naive_iq, "naive-ce": naive_ce, "torch-compile-ce": torch_compile_ce,
    "torchtune-ce": torchtune_ce, "torchtune-ce-compiled": torchtune_ce_compiled,
    "trl-chunked-nll": trl_chunked_nll, "trl-chunked-nll-kept": trl_chunked_nll_kept,
    "trl-selective-log-softmax": trl_selective_log_softmax, "trl-entropy": trl_entropy,
    "liger": liger, "liger-2026": liger_2026, "liger-2024": liger_2024,
    "cce": cce, "cce-2024": cce_2024, "cce-nosort-2024": cce_nosort_2024,
    "cce-nofilter": cce_nofilter,
}
PEERS = {k: _lenient(v) for k, v in PEERS.items()}
