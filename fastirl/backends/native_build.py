"""Building and loading the native extension (one job: its ops in ``torch.ops.fastirl``).

The ops come from ``fastirl._C`` / ``fastirl._C_cuda`` when ``setup.py`` built
them (and their build info says they fit this torch and the visible GPUs,
:func:`prebuilt_problem`), else they are compiled on first use from ``csrc/``
of a source checkout with ``torch.utils.cpp_extension.load`` (ninja) into a
build directory per torch version (:func:`build_dir`: ``$FASTIRL_BUILD_DIR`` or
``~/.cache/fastirl/torch-<version>``), under an OS-level lock of that directory
(:func:`build_lock`).  Loading registers the ops' fake implementations, so
``torch.compile`` can trace them.  A load is done once per process; a failed
build is remembered.  The backends using the ops are :mod:`.native`.
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

__all__ = ["load_library", "csrc_dir", "build_dir", "build_lock", "build_info_path",
           "prebuilt_problem", "CXX_FLAGS", "NVCC_FLAGS"]

log = logging.getLogger("fastirl")

_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_CPU_SOURCES = ("iq_cpu.cpp",)
_CUDA_SOURCES = ("iq_cuda.cu",)
_HEADERS = ("iq_math.h", "iq_ops.h")
# -fno-trapping-math lets GCC if-convert (vectorise) the selects of the AVX2 and
# baseline clones; -ffp-contract=fast turns the a*b+c of iq_math.h into FMAs
# where the clone's ISA has them (-std=c++20 would otherwise forbid it).
# setup.py reads both lists from here (with ast): keep them literals.
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
    """Loads (building if needed) the ops of ``kind`` ("cpu" or "cuda") once;
    returns where they came from (a module name or ``jit:<build directory>``).
    ImportError with the reason when they can neither be imported nor built."""
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
