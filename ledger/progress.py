"""Progress of the long commands (replay, verify, export, seal, projections rebuild, audit
verify), on stderr only: stdout is their data (JSON, CSV) and stays exactly that.

- stderr is a terminal: one bar redrawn in place (at most every ``progress_redraw_s``) with the
  count, the rate and the time left, and a last line when done;
- otherwise (a pipe, a file, a service's journal): a log line ``progress`` every 10 % of the
  total or every ``progress_log_interval_s``, whichever comes first, and one when done.

The long loops take a plain callback, ``progress(done)`` with how many units they have done so
far, called every so often (every 1,000 events, say): they know nothing of terminals.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

import structlog

from ledger import limits

Callback = Callable[[int], None]
"""``progress(done)``: how many units (events, bytes) the loop has done so far."""

EVERY = 1_000
"""How often the loops of this code base report (in units): cheap enough, often enough."""

_BAR_WIDTH = 24


def render(
    label: str, done: int, total: int | None, elapsed_s: float, unit: str = "events"
) -> str:
    """One line: ``label [#####.....] 45% 12,345/27,000 events 3,456/s ETA 0:04``."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    if total:
        fraction = min(done / total, 1.0)
        filled = int(fraction * _BAR_WIDTH)
        bar = "#" * filled + "." * (_BAR_WIDTH - filled)
        eta = _clock((total - done) / rate) if rate > 0 and done < total else "0:00"
        return (
            f"{label} [{bar}] {fraction:4.0%} {done:,}/{total:,} {unit}"
            f" {rate:,.0f}/s ETA {eta}"
        )
    return f"{label} {done:,} {unit} {rate:,.0f}/s {_clock(elapsed_s)}"


def _clock(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Reports one loop's progress; use as a context manager and pass it as the callback."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        unit: str = "events",
        *,
        stream: TextIO | None = None,
        terminal: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        columns: int | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = _is_terminal(self.stream) if terminal is None else terminal
        self.columns = columns or (_columns(self.stream) if self.terminal else 80)
        """A longer line would wrap, and ``\r`` would redraw only its last part."""
        self.clock = clock
        self.started = clock()
        self.done = 0
        self._next_at = self.started  # the next time worth a look
        self._next_done = 0  # or the next 10 % step (logs)
        self._drawn = False
        self.lines = 0
        """Lines written or logged (for tests)."""

    def __call__(self, done: int) -> None:
        self.done = done
        if self.terminal:
            now = self.clock()
            if now >= self._next_at:
                self._next_at = now + limits.progress_redraw_s
                self._draw(now)
        elif done >= self._next_done or self.clock() >= self._next_at:
            self._log(self.clock())

    def close(self, done: int | None = None) -> None:
        """The last line: the total done, the rate over the whole run."""
        if done is not None:
            self.done = done
        now = self.clock()
        if self.terminal:
            self._draw(now)
            self.stream.write("\n")
            self.stream.flush()
        else:
            self._log(now, finished=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        elif self.terminal and self._drawn:
            self.stream.write("\n")  # the error's line starts on a line of its own

    def _draw(self, now: float) -> None:
        line = render(self.label, self.done, self.total, now - self.started, self.unit)
        line = line[: self.columns - 1]
        self.stream.write("\r" + line + "\x1b[K")  # \x1b[K: erase what a longer line left
        self.stream.flush()
        self._drawn = True
        self.lines += 1

    def _log(self, now: float, finished: bool = False) -> None:
        self._next_at = now + limits.progress_log_interval_s
        if self.total:
            step = max(self.total // 10, 1)
            self._next_done = (self.done // step + 1) * step
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        fields: dict[str, object] = {
            "task": self.label,
            "done": self.done,
            "unit": self.unit,
            "rate_per_s": round(rate),
            "elapsed_s": round(elapsed, 1),
        }
        if self.total:
            fields["total"] = self.total
            fields["percent"] = round(100 * min(self.done / self.total, 1.0))
            if not finished and rate > 0:
                fields["eta_s"] = round(max(self.total - self.done, 0) / rate, 1)
        event = "finished" if finished else "progress"
        if structlog.is_configured():
            structlog.get_logger("ledger.progress").info(event, **fields)
        else:  # never structlog's default, which prints to stdout
            text = " ".join(f"{k}={v}" for k, v in fields.items())
            logging.getLogger("ledger.progress").info("%s %s", event, text)
        self.lines += 1


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


def every(callback: Callback | None, done: int) -> None:
    """Calls ``callback(done)`` every ``EVERY`` units: the one line a loop needs."""
    if callback is not None and done % EVERY == 0:
        callback(done)
