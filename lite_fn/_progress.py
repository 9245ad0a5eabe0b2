"""A dependency-free progress bar on stderr (redrawn in place on a terminal, sparse lines otherwise)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, desc: str, total: int | None = None, enabled: bool = True, stream=None):
        self.desc, self.total, self.n = desc, total, 0
        self.enabled, self.stream = enabled, stream or sys.stderr
        self.t0 = self._last = time.perf_counter()
        self._drawn_at = -1  # self.n at the last draw, so close() never repeats a finished line
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, n: int = 1, **info) -> None:
        self.n += n
        now = time.perf_counter()
        if not self.enabled or (now - self._last < (0.1 if self.tty else 5.0) and self.n != self.total):
            return
        self._last = now
        self._draw(info, end="\r" if self.tty else "\n")

    def close(self, **info) -> None:
        if self.enabled and (self.tty or self._drawn_at != self.n):
            self._draw(info, end="\n")

    def _draw(self, info, end):
        self._drawn_at = self.n
        el = time.perf_counter() - self.t0
        extra = " ".join(f"{k}={v}" for k, v in info.items())
        if self.total:
            frac = min(self.n / self.total, 1.0)
            bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
            line = f"{self.desc} [{bar}] {self.n}/{self.total} {el:.1f}s {extra}"
        else:
            line = f"{self.desc} {self.n} it {el:.1f}s {extra}"
        self.stream.write(line.ljust(78) + end)
        self.stream.flush()
