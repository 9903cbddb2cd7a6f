"""Peak-memory measurement of one call, in the worker process.

CPU (Linux): the resident-set high-water mark.  ``/proc/self/status`` VmHWM is
reset to the current RSS by writing "5" to ``/proc/self/clear_refs``; so

    1. free what can be freed (``gc.collect()``, glibc ``malloc_trim(0)``, which
       returns freed heap pages to the kernel so that re-using them counts again),
    2. baseline = VmRSS, reset VmHWM,
    3. run the call,
    4. peak extra = VmHWM - baseline.

PyTorch's CPU allocator does not cache (tensors are malloc'd and freed), so
RSS follows the live tensors, up to glibc: by default it serves blocks of up to
32 MiB from its heap once such blocks have been freed, and a freed heap block
stays resident until trimmed, so the high-water mark would also count freed
memory that the next allocation happened not to fit into (seen here: the
fused torch backend at N = 1024 / 4096 / 8192 tokens measured 130 / 201 / 144
MiB with glibc's defaults, and 130 / 136 / 144 MiB as below).  While measuring,
the worker therefore fixes glibc's mmap threshold at 128 KiB (:func:`exact_malloc`):
every tensor larger than that is its own mapping, returned to the kernel when
freed, and the high-water mark is that of the live tensors.  For timing it
then sets the threshold back to 32 MiB, the value glibc's own adaptive
threshold reaches once large blocks have been freed (:func:`default_malloc`).

Where ``clear_refs`` cannot be written (not
Linux, or forbidden), a thread samples RSS every 0.2 ms instead (may miss very
short peaks; reported as a different method in the CSV).

CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``,
minus ``memory_allocated()`` before the call (the caching allocator's reserved
memory is not counted).
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time

_PROC_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB, or None where there is none."""
    try:
        with open(_PROC_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    kib = status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil
    return psutil.Process().memory_info().rss


def _reset_hwm() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return status_kib("VmHWM") is not None


_LIBC = None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3    # glibc mallopt parameters


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def release_free_memory() -> None:
    """gc, then hand freed malloc memory back to the kernel (glibc only)."""
    gc.collect()
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


def exact_malloc() -> bool:
    """glibc: every block above 128 KiB its own mapping (see the module doc)."""
    libc = _libc()
    if not libc:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 128 << 10)
                and libc.mallopt(_M_TRIM_THRESHOLD, 128 << 10))


def default_malloc() -> None:
    """glibc: the thresholds its adaptive mode settles at after large frees."""
    libc = _libc()
    if libc:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


class _Sampler:
    def __init__(self):
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.0002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


class PeakMeter:
    """``with meter.measure(): call()`` then ``meter.peak`` (bytes above the
    baseline taken at entry) and ``meter.baseline`` (absolute)."""

    def __init__(self, device):
        self.device = device
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        if self.cuda:
            self.method = "cuda max_memory_allocated - memory_allocated before"
        elif _reset_hwm():
            self.method = "VmHWM - VmRSS before (clear_refs reset, malloc_trim, mmap threshold 128 KiB)"
        else:
            self.method = "sampled RSS every 0.2 ms - RSS before"
        self.peak = 0
        self.baseline = 0

    def current(self) -> int:
        if self.cuda:
            import torch
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return rss_bytes()

    def measure(self):
        meter = self

        class _Ctx:
            def __enter__(self):
                release_free_memory()
                if meter.cuda:
                    import torch
                    torch.cuda.synchronize(meter.device)
                    torch.cuda.reset_peak_memory_stats(meter.device)
                    meter.baseline = torch.cuda.memory_allocated(meter.device)
                    self.sampler = None
                elif meter.method.startswith("VmHWM"):
                    meter.baseline = rss_bytes()
                    _reset_hwm()
                    self.sampler = None
                else:
                    meter.baseline = rss_bytes()
                    self.sampler = _Sampler().__enter__()
                return meter

            def __exit__(self, *exc):
                if meter.cuda:
                    import torch
                    torch.cuda.synchronize(meter.device)
                    top = torch.cuda.max_memory_allocated(meter.device)
                elif self.sampler is None:
                    top = (status_kib("VmHWM") or 0) * 1024
                else:
                    self.sampler.__exit__(*exc)
                    top = self.sampler.peak
                meter.peak = max(0, top - meter.baseline)
                return False

        return _Ctx()


def available_bytes(device) -> int:
    """Memory a run may use on ``device`` (bytes)."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
