"""MemoryMonitor: the peak resident memory of this process and the peak device memory in use
during a measured run, sampled by a background thread."""

from __future__ import annotations

import os
import threading
from types import TracebackType
from typing import Any


class MemoryMonitor:
    """``with MemoryMonitor(backend) as mem: ...`` then ``mem.peak_rss`` and
    ``mem.peak_device_used`` (bytes). Device memory is what the backend's ``memory_info``
    reports as not free (for the CPU backend that is the host's memory in use, by every
    process); RSS is this process's own."""

    def __init__(self, backend: Any | None = None, interval: float = 0.02):
        self.backend = backend
        self.interval = interval
        self.peak_rss = 0
        self.peak_device_used = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, current_rss())
        if self.backend is not None:
            info = self.backend.memory_info()
            self.peak_device_used = max(self.peak_device_used, int(info.total - info.free))

    def __enter__(self) -> MemoryMonitor:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="bench-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


def current_rss() -> int:
    """Resident memory of this process in bytes (Linux; elsewhere the lifetime peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
