"""A stage's raw output as log lines: its own log records whole, tqdm's bars as a sparse progress line.

A stage writes its log records (`HH:MM:SS LEVEL logger: message`, rcg/cli.py) and tqdm bars to the
same stream. A bar redraws itself with a carriage return many times a second; forwarding each
redraw would flood the Prefect task log with thousands of lines, so only the latest bar state is
kept and sent at most once every `every` seconds (and once more when the stage ends). Log records
keep their level; the stage's own timestamp and level are dropped, since Prefect shows its own.
A bar cleared without a last line (tqdm's leave=False) shows only if it lived long enough to be
sent while it ran.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable

PROGRESS_EVERY = 5.0  # seconds between two progress lines of one stage

# A log record as rcg's logging.basicConfig formats it (an optional date first, for other tools).
LOG_RECORD = re.compile(
    r"(?:\d{4}[-/]\d\d[-/]\d\d[ T])?\d\d:\d\d:\d\d(?:[.,]\d+)? (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
)
DVC_LEVEL = re.compile(r"(ERROR|WARNING): ")  # DVC's own messages: `ERROR: failed to reproduce ...`
_SEPARATOR = re.compile(r"(\r\n|\r|\n)")


def line_level(text: str) -> tuple[int, str]:
    """(logging level, message) of one output line: a record's level and text, else INFO and the line."""
    m = LOG_RECORD.match(text)
    if m:
        return getattr(logging, m.group(1)), text[m.end():]
    m = DVC_LEVEL.match(text)
    return (getattr(logging, m.group(1)) if m else logging.INFO), text


class OutputRelay:
    """Feed it a process's output as it arrives; it calls `emit(level, message)` per line to show.

    Whole lines (ended by a newline) are emitted at once. A segment ended by a carriage return is a
    progress bar's state; the latest one is emitted at most every `every` seconds. A bar's final
    state (the line its `close()` ends with a newline) replaces the pending state, so a finished
    bar shows once. Text a log record wrote right after a bar, on the bar's line, is split off.
    """

    def __init__(self, emit: Callable[[int, str], None], every: float = PROGRESS_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._emit, self._every, self._clock = emit, every, clock
        self._buf = ""
        self._after_cr = False  # the segment being read began after a carriage return
        self._progress: str | None = None  # the latest bar state not emitted yet
        self._last_progress = -math.inf

    def feed(self, text: str) -> None:
        """Take the next piece of output (any split: lines may arrive in parts)."""
        self._buf += text
        # A trailing "\r" may be half of "\r\n": keep it until the next piece says which.
        keep = 1 if self._buf.endswith("\r") else 0
        parts = _SEPARATOR.split(self._buf[: len(self._buf) - keep])
        self._buf = parts[-1] + self._buf[len(self._buf) - keep:]
        for segment, sep in zip(parts[:-1:2], parts[1::2]):
            if sep == "\r":
                self._bar(segment)
                self._after_cr = True
            else:
                self._line(segment)
                self._after_cr = False
        self.tick()

    def tick(self) -> None:
        """Emit the pending bar state if the last progress line is `every` seconds old."""
        now = self._clock()
        if self._progress is not None and now - self._last_progress >= self._every:
            self._emit(logging.INFO, self._progress)
            self._progress, self._last_progress = None, now

    def close(self) -> None:
        """The process ended: emit an unfinished last line and the pending bar state."""
        rest, self._buf = self._buf.rstrip("\r"), ""
        if rest.strip():
            self._line(rest)
        if self._progress is not None:
            self._emit(logging.INFO, self._progress)
            self._progress = None

    def _bar(self, segment: str) -> None:
        # A blank redraw clears a bar that closes without leaving a line (tqdm's leave=False): its
        # last state may be long stale (tqdm redraws at most every 0.1 s), so it is not shown.
        self._progress = segment.strip() or None

    def _line(self, segment: str) -> None:
        m = LOG_RECORD.search(segment)
        if m and m.start() > 0:  # "<bar state><log record>": a record written after a live bar
            self._bar(segment[: m.start()])
            segment = segment[m.start():]
        elif not m and self._after_cr and segment.strip():
            self._progress = None  # a bar's final state: it supersedes the pending one
        if segment.strip():
            self._emit(*line_level(segment.rstrip()))
