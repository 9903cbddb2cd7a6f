"""Native backends: C++ (``"cpu"``) and CUDA (``"cuda"``) epilogues around ATen GEMMs.

Per chunk of rows the logits block comes from one GEMM (``torch.mm`` /
``torch.addmm``: MKL / oneDNN on CPU, cuBLAS on CUDA); the extension's ops then
make one pass over it:

* ``torch.ops.fastirl.row_stats``: V, the target logit and optionally entropy,
  argmax, max logit and the logit sum, with an online max / sum-exp per row (no
  extra block);
* ``torch.ops.fastirl.row_grad_``: overwrites the block with
  ``dz = (grad_value * p + grad_target * onehot (+ grad_sum)) * softcap'``, so in single-pass
  mode (``forward(keep=True)`` then ``backward(state)``) a chunk costs exactly
  three GEMMs (logits, ``dx = dz @ W``, ``dW += dz.T @ x``) and two passes over
  the block, and holds one block (never a second, capped copy: on the CPU
  ``row_stats_capped_`` stores the capped logits in it, so the backward pass
  needs no second tanh).

The ops are registered with ``torch.library`` (namespace ``fastirl``) with fake
implementations, so ``torch.compile`` can trace them.  The extension comes from
``fastirl._C`` / ``fastirl._C_cuda`` when ``setup.py`` built them, else it is
compiled on first use from ``csrc/`` of a source checkout with
``torch.utils.cpp_extension.load`` (ninja) into a build directory per torch
version: ``$FASTIRL_BUILD_DIR`` or ``~/.cache/fastirl/torch-<version>``.

The kernels take float32 / bfloat16 / float16 blocks (the backends' ``dtypes``);
the engine runs float64 inputs on the PyTorch backend instead
(:func:`fastirl.backends.resolve_backend`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from .base import KERNEL_DTYPES, LogitSpec, RowStats
from . import chunking
from .gemm_epilogue import GemmEpilogueBackend, addmm_f32

__all__ = ["NativeCPUBackend", "NativeCUDABackend", "load_cpu", "load_cuda", "load_library",
           "csrc_dir", "build_dir"]

log = logging.getLogger("fastirl")

_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_CPU_SOURCES = ("iq_cpu.cpp",)
_CUDA_SOURCES = ("iq_cuda.cu",)
_HEADERS = ("iq_math.h", "iq_ops.h")
# -fno-trapping-math lets GCC if-convert (vectorise) the selects of the AVX2 and
# baseline clones; -ffp-contract=fast turns the a*b+c of iq_math.h into FMAs
# where the clone's ISA has them (-std=c++20 would otherwise forbid it).
CXX_FLAGS = ["-O3", "-fopenmp", "-Wall", "-Wextra", "-fno-math-errno", "-fno-trapping-math",
             "-ffp-contract=fast"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills", "-lineinfo"]

_lock = threading.Lock()
_loaded: dict[str, str] = {}
_failed: dict[str, str] = {}


def csrc_dir() -> Path:
    """The C++ / CUDA sources of a source checkout."""
    return _CSRC


def build_dir() -> Path:
    """Where the JIT build goes: one directory per torch version (a lock file
    left behind by another torch version's build never blocks this one)."""
    root = os.environ.get("FASTIRL_BUILD_DIR")
    if root:
        base = Path(root)
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = Path(cache) / "fastirl"
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    tag = f"torch-{torch.__version__.replace('+', '-')}-{py}"
    return base / tag


def _cpp_extension():
    # Importing it logs a warning when no CUDA runtime is found, which does not
    # matter for the CPU extension.
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)
    return cpp_extension


def _jit(name: str, sources: tuple[str, ...], cuda: bool) -> str:
    cpp_extension = _cpp_extension()

    missing = [s for s in sources + _HEADERS if not (_CSRC / s).is_file()]
    if missing:
        raise ImportError(f"fastirl native extension is not built and its sources are missing "
                          f"({', '.join(missing)} under {_CSRC}); install from a source checkout "
                          f"with a C++ compiler")
    out = build_dir() / name
    out.mkdir(parents=True, exist_ok=True)
    # torch rebuilds when the sources or flags change, not the headers: a digest
    # of all of them in the flags makes a header edit rebuild too.
    digest = hashlib.sha1(b"".join((_CSRC / f).read_bytes()
                                   for f in sources + _HEADERS)).hexdigest()[:16]
    tag = [f"-DFASTIRL_SOURCE_DIGEST={digest}"]
    kwargs: dict[str, Any] = dict(
        name=name, sources=[str(_CSRC / s) for s in sources], build_directory=str(out),
        extra_cflags=CXX_FLAGS + tag, extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(_CSRC)], is_python_module=False,
        verbose=os.environ.get("FASTIRL_VERBOSE_BUILD") == "1")
    if cuda:
        kwargs["extra_cuda_cflags"] = NVCC_FLAGS + tag
        kwargs["with_cuda"] = True
    try:
        with build_lock(out):
            log.info("fastirl: building (or loading the cached build of) the %s extension in %s",
                     name, out)
            cpp_extension.load(**kwargs)
    except Exception as exc:  # compiler missing, build error: the reason, as an ImportError
        raise ImportError(f"fastirl: could not build the native extension {name!r}: {exc}") from exc
    return f"jit:{out}"


@contextlib.contextmanager
def build_lock(directory: Path, stale_after: float | None = None):
    """Exclusive lock of a JIT build directory, held around the build and load.

    An ``fcntl`` lock: the OS releases it when its holder exits or is killed,
    so a crashed build never blocks later processes; concurrent processes
    (e.g. the ranks of one node) wait for the first one's build and then load
    it.  torch's own ``lock`` file (a FileBaton, on which torch waits forever
    when a killed build left it behind) is stale when the previous holder of
    this lock died (its ``.fastirl-build.owner`` file is still there): it is
    removed at once.  Otherwise it can only belong to a process that does not
    take this lock (an older fastirl): it is waited for while it is younger
    than ``stale_after`` seconds (``$FASTIRL_STALE_LOCK_S``, default 300:
    longer than any build of these sources), then removed.  With a torch whose
    own lock is an OS-level lock, its ``lock`` file is left alone."""
    directory.mkdir(parents=True, exist_ok=True)
    if stale_after is None:
        stale_after = float(os.environ.get("FASTIRL_STALE_LOCK_S", "300"))
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: torch's baton alone
        yield
        return
    with open(directory / ".fastirl-build.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        owner = directory / ".fastirl-build.owner"
        try:
            # a leftover owner file: the last holder died inside its build.  A
            # torch whose ``lock`` is an OS-level lock (not a baton) leaves that
            # file behind after every build: it is never waited on or removed.
            if _torch_uses_baton():
                _clear_stale_baton(directory / "lock", 0.0 if owner.exists() else stale_after)
            owner.write_text(str(os.getpid()))
            yield
        finally:
            owner.unlink(missing_ok=True)
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _torch_uses_baton() -> bool:
    """Whether torch's JIT build lock is a FileBaton (a file whose mere existence
    blocks, left behind by a killed build) rather than an OS-level FileLock,
    which the kernel releases when its holder dies (torch >= 2.14)."""
    return not hasattr(_cpp_extension(), "FileLock")


def _clear_stale_baton(path: Path, stale_after: float) -> None:
    while True:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return
        if age >= stale_after:
            log.warning("fastirl: removing the stale build lock %s (%.0f s old, left by a build "
                        "that did not finish)", path, age)
            path.unlink(missing_ok=True)
            return
        time.sleep(min(1.0, stale_after - age))


def build_info_path(origin: str) -> Path:
    """The JSON file setup.py writes beside a built extension module: the torch
    version and CUDA architectures it was built for."""
    return Path(origin + ".json")


def _arch_covered(archs: list[str], capability: tuple[int, int]) -> bool:
    """Whether code built for ``archs`` (TORCH_CUDA_ARCH_LIST entries such as
    "8.0", "9.0+PTX") runs on a device of ``capability``: a cubin on the same
    major version with a minor version at most the device's, PTX on any
    device at least as new (the driver compiles it)."""
    for a in archs:
        ptx = a.endswith("+PTX")
        try:
            major, minor = (int(v) for v in a.removesuffix("+PTX").split(".")[:2])
        except ValueError:
            continue
        if (major == capability[0] and minor <= capability[1]) or (
                ptx and (major, minor) <= capability):
            return True
    return False


def prebuilt_problem(module: str, kind: str) -> str | None:
    """Why the prebuilt ``module`` must not be imported (None when it may be):
    not built, built against another torch version (its ABI), or (CUDA) no
    kernel image for a visible device.  Checked before importing it: importing
    an extension built against another torch can crash the process."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return "not built"
    path = build_info_path(spec.origin)
    if not path.is_file():
        return None             # built before build info existed: trusted as before
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"unreadable build info {path}"
    built = info.get("torch")
    if built and built != torch.__version__:
        return f"built against torch {built}, running torch {torch.__version__}"
    archs = info.get("cuda_archs") or []
    if kind == "cuda" and archs and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            if not _arch_covered(archs, cap):
                return (f"built for {';'.join(archs)}, no kernel image for cuda:{i} "
                        f"(sm_{cap[0]}{cap[1]})")
    return None


def _load(kind: str) -> str:
    """Loads the extension's ops (once); returns where they came from.  A failed
    build is remembered, so that backend="auto" does not retry it on every call."""
    with _lock:
        if kind in _loaded:
            return _loaded[kind]
        if kind in _failed:
            raise ImportError(_failed[kind])
        try:
            if kind == "cuda":
                _load_unlocked("cpu")  # the schemas live in the CPU library
            _load_unlocked(kind)
        except ImportError as exc:
            _failed[kind] = str(exc)
            raise
        return _loaded[kind]


def _load_unlocked(kind: str) -> None:
    if kind in _loaded:
        return
    module = "fastirl._C" if kind == "cpu" else "fastirl._C_cuda"
    where = None
    if os.environ.get("FASTIRL_FORCE_JIT") != "1":
        problem = prebuilt_problem(module, kind)
        if problem is None:
            try:
                importlib.import_module(module)
                where = module
            except ImportError:
                where = None
        elif problem != "not built":
            log.warning("fastirl: not using the prebuilt %s (%s); compiling from source instead",
                        module, problem)
    if where is None:
        if kind == "cpu":
            where = _jit("fastirl_cpu", _CPU_SOURCES, cuda=False)
        else:
            where = _jit("fastirl_cuda", _CUDA_SOURCES, cuda=True)
    if kind == "cpu":
        _register_fakes()
    _loaded[kind] = where


def load_library(kind: str = "cpu") -> str:
    """Loads (building if needed) the ops of ``kind`` ("cpu" or "cuda")."""
    return _load(kind)


def _register_fakes() -> None:
    """Shapes of the ops' outputs for FakeTensor / torch.compile tracing."""

    def stats(logits, targets, temperature, softcap, entropy, argmax, logit_sum=False):
        n = logits.shape[0]
        f32 = dict(dtype=torch.float32, device=logits.device)
        return (logits.new_empty((n,), **f32), logits.new_empty((n,), **f32),
                logits.new_empty((n if entropy else 0,), **f32),
                logits.new_empty((n if argmax else 0,), dtype=torch.int64, device=logits.device),
                logits.new_empty((n if argmax else 0,), **f32),
                logits.new_empty((n if logit_sum else 0,), **f32))

    torch.library.register_fake("fastirl::acc_add_")(lambda acc, src: None)
    torch.library.register_fake("fastirl::row_stats")(stats)
    torch.library.register_fake("fastirl::row_stats_capped_")(stats)

    @torch.library.register_fake("fastirl::row_grad_")
    def _row_grad_(logits, targets, value, grad_value, grad_target, temperature, softcap,
                   capped=False, grad_sum=None):
        return None

    @torch.library.register_fake("fastirl::row_grad")
    def _row_grad(logits, targets, value, grad_value, grad_target, temperature, softcap, out,
                  grad_sum=None):
        return None


# ------------------------------------------------------------------ backends

def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _f32_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else _f32(t)


def _row_grad_op(z: torch.Tensor, targets: torch.Tensor, value: torch.Tensor,
                 grad_value: torch.Tensor, grad_target: torch.Tensor, spec: LogitSpec,
                 out: torch.Tensor, grad_sum: torch.Tensor | None) -> None:
    """dL/dz of the raw block z into out: ``row_grad_`` when out is z itself, else
    ``row_grad`` (through a unit-stride temporary when out's columns are strided)."""
    args = (targets, value, grad_value, grad_target, float(spec.temperature), spec.softcap)
    if out.data_ptr() == z.data_ptr() and out.dtype == z.dtype and out.stride() == z.stride():
        torch.ops.fastirl.row_grad_(out, *args, False, grad_sum)
        return
    if z.shape[1] > 1 and z.stride(1) != 1:
        z = z.contiguous()
    if out.shape[1] > 1 and out.stride(1) != 1:
        tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        torch.ops.fastirl.row_grad(z, *args, tmp, grad_sum)
        out.copy_(tmp)
        return
    torch.ops.fastirl.row_grad(z, *args, out, grad_sum)


def _stats(z: torch.Tensor, targets: torch.Tensor, spec: LogitSpec,
           cap_in_place: bool = False) -> RowStats:
    """Statistics of the raw logits block z; with cap_in_place (and a soft cap)
    z is left holding the capped logits."""
    if cap_in_place and spec.softcap is not None:
        out = torch.ops.fastirl.row_stats_capped_(z, targets, float(spec.temperature),
                                                  float(spec.softcap), spec.entropy, spec.argmax,
                                                  spec.logit_sum)
    else:
        out = torch.ops.fastirl.row_stats(z, targets, float(spec.temperature), spec.softcap,
                                          spec.entropy, spec.argmax, spec.logit_sum)
    value, q, ent, amax, maxl, zsum = out
    if spec.argmax and z.device.type == "cpu":
        _nan_argmax(z, value, amax, maxl)
    return RowStats(value, q, ent if spec.entropy else None, amax if spec.argmax else None,
                    maxl if spec.argmax else None, zsum if spec.logit_sum else None)


def _nan_argmax(z: torch.Tensor, value: torch.Tensor, amax: torch.Tensor,
                maxl: torch.Tensor) -> None:
    """The NaN policy of every backend (torch.max's): a row holding a NaN logit
    has max logit NaN and argmax its first NaN column.  The CPU kernel skips
    NaN in its max (its value is NaN all the same), so those rows, found by
    their NaN value, are redone here (rare; no device sync on the CPU)."""
    rows = torch.nonzero(torch.isnan(value)).flatten()
    if rows.numel():
        m, i = z[rows].float().max(dim=1)
        nan = torch.isnan(m)
        maxl[rows[nan]] = m[nan]
        amax[rows[nan]] = i[nan]


class NativeCPUBackend:
    """C++ epilogues (OpenMP over rows, vectorised along the vocabulary); GEMMs
    are ATen's.

    bfloat16 / float16 inputs: the GEMMs run in that dtype (oneDNN / AMX where
    the CPU has it, several times faster than float32 GEMMs) and the logits
    block stays in it, read by the epilogues in float32 arithmetic; dz is written
    back in the input dtype, dx = dz @ W runs in it, and dW += dz.T @ x is a
    low-precision GEMM per vocabulary slab added into the float32 accumulator.
    That is the precision of the naive bf16 computation (tests check it against
    it); preset="highest" upcasts instead.
    """

    name = "cpu"
    dtypes = KERNEL_DTYPES

    def supports(self, device: torch.device) -> bool:
        return torch.device(device).type == "cpu"

    def _block_bytes(self, dtype: torch.dtype) -> int:
        return 4 if dtype == torch.float32 else 2

    def rows_per_chunk(self, n: int, vocab: int, hidden: int, dtype: torch.dtype,
                       chunk_size: int | None) -> int:
        # The cost model's policy: W / dW traffic per chunk against the block's memory.
        return chunking.rows_per_chunk(n, vocab, hidden, dtype, device="cpu",
                                       chunk_size=chunk_size,
                                       block_itemsize=self._block_bytes(dtype))

    @staticmethod
    def _logits(x, weight, bias) -> torch.Tensor:
        """The logits block of a chunk: float32 for float32 inputs, the input
        dtype otherwise."""
        return torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())

    def forward(self, x, weight, bias, targets, spec: LogitSpec, *, keep: bool):
        z = self._logits(x, weight, bias)
        # forward(keep=True) stores the capped logits in the block (saves the
        # tanh of the backward pass); float32 blocks only: capped logits rounded
        # to 16 bits would shift p.
        capped = keep and spec.softcap is not None and z.dtype == torch.float32
        return _stats(z, targets, spec, cap_in_place=capped), ((z, capped) if keep else None)

    def backward(self, x, weight, bias, targets, value, grad_value, grad_target,
                 spec: LogitSpec, state: Any, *, need_x, dweight, dbias, grad_sum=None):
        z, capped = (self._logits(x, weight, bias), False) if state is None else state
        torch.ops.fastirl.row_grad_(z, targets, _f32(value), _f32(grad_value), _f32(grad_target),
                                    float(spec.temperature), spec.softcap, capped,
                                    _f32_or_none(grad_sum))
        # z holds dz now, in the input dtype
        if dbias is not None:
            dbias.add_(z.sum(dim=0, dtype=dbias.dtype))
        if dweight is not None:     # (a 16-bit dz: slabs added by the extension's acc_add_)
            addmm_f32(dweight, z.t(), x, add_into=torch.ops.fastirl.acc_add_)
        return torch.mm(z, weight) if need_x else None

    def logits_forward(self, logits, targets, spec: LogitSpec) -> RowStats:
        if logits.dim() == 2 and logits.shape[1] > 0 and logits.stride(1) != 1:
            logits = logits.contiguous()
        return _stats(logits, targets, spec)

    def logits_backward(self, logits, targets, value, grad_value, grad_target,
                        spec: LogitSpec, out: torch.Tensor, *, grad_sum=None) -> None:
        _row_grad_op(logits, targets, _f32(value), _f32(grad_value), _f32(grad_target), spec,
                     out, _f32_or_none(grad_sum))


class NativeCUDABackend(GemmEpilogueBackend):
    """``backend="cuda"``: cuBLAS GEMMs + the CUDA epilogue kernels per chunk
    (see :mod:`fastirl.backends.gemm_epilogue`): logits blocks in the input
    dtype, dz written in place in it, dW accumulated in float32 by cuBLAS."""

    name = "cuda"

    def supports(self, device: torch.device) -> bool:
        return torch.device(device).type == "cuda" and torch.cuda.is_available()

    def _row_stats(self, z, targets, spec: LogitSpec) -> RowStats:
        if z.dim() == 2 and z.shape[1] > 1 and z.stride(1) != 1:
            z = z.contiguous()
        return _stats(z, targets, spec)

    def _row_grad(self, z, targets, value, grad_value, grad_target, spec, out,
                  grad_sum=None) -> None:
        _row_grad_op(z, targets, value, grad_value, grad_target, spec, out, grad_sum)


def load_cpu() -> NativeCPUBackend:
    """The "cpu" backend; ImportError (with the reason) when the extension can
    neither be imported nor built."""
    where = _load("cpu")
    _notice("cpu", where)
    return NativeCPUBackend()


def load_cuda() -> NativeCUDABackend:
    """The "cuda" backend; RuntimeError without a CUDA device, ImportError when
    the extension can neither be imported nor built."""
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is available")
    if torch.version.cuda is None:
        raise RuntimeError("this torch build has no CUDA support")
    where = _load("cuda")
    _notice("cuda", where)
    return NativeCUDABackend()


_noticed: set[str] = set()


def _notice(kind: str, where: str) -> None:
    if kind not in _noticed:
        _noticed.add(kind)
        log.info("fastirl: native %s backend from %s", kind, where)
