"""A small progress line on stderr for long work (chunks written, bytes downloaded, epochs)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Redraws ``label: done/total unit (pct) rate, ETA`` at most every ``interval`` seconds.

    On a terminal the line is redrawn in place; elsewhere (logs, Slurm output files) a new
    line is printed at most every ``log_interval`` seconds so logs stay readable.
    """

    def __init__(self, total: float | None, label: str, unit: str = "", *,
                 stream: TextIO | None = None, enabled: bool = True,
                 interval: float = 0.2, log_interval: float = 10.0, scale: float = 1.0) -> None:
        self.total = total
        self.label = label
        self.unit = unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else log_interval
        self.scale = scale
        self.done = 0.0
        self.start = time.monotonic()
        self._last = self.start if not self.tty else 0.0  # logs: the first line after an interval

    def update(self, amount: float = 1.0) -> None:
        self.done += amount
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        # A finished bar is drawn once, by close(): in a log a 100% line would come twice.
        if self.enabled and now - self._last >= self.interval and not (finished and not self.tty):
            self._last = now
            self._draw(final=False)

    def _fmt(self, value: float) -> str:
        v = value / self.scale
        return f"{v:,.0f}" if self.scale == 1.0 else f"{v:,.1f}"

    def _draw(self, final: bool) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        text = f"{self.label}: {self._fmt(self.done)}"
        if self.total:
            text += f"/{self._fmt(self.total)} {self.unit} ({100.0 * self.done / self.total:5.1f}%)"
            if not final and rate > 0:
                text += f", ETA {max(self.total - self.done, 0) / rate:,.0f} s"
        else:
            text += f" {self.unit}"
        text += f", {self._fmt(rate)} {self.unit}/s"
        if final:
            text += f", {elapsed:,.1f} s"
        end = "\n" if (final or not self.tty) else ""
        prefix = "\r\033[K" if self.tty else ""
        self.stream.write(prefix + text + end)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self.enabled and self.tty:
            self.stream.write("\n")
