"""One progress and status convention for every long command.

Stage lines ("loading model ...", "compiling for 448x448 ...") go to stderr as whole lines,
never into a progress bar's line (they are written through the bar when one is shown). On
a terminal long loops show a tqdm bar; off a terminal they write a log line every so many
items (and at the end) in the same form for every command. ``quiet`` silences both.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (a scheduler's pre-emption, ``timeout``, ``kill``): long work stops as on
    Ctrl-C, keeping what is finished."""


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Status lines and progress bars of one command run.

    Args:
      name: the command, the prefix of every line (``"segment"``, ``"batch"``).
      quiet: print nothing.
      stream: where lines go (stderr).
      log_every: off a terminal, a progress line every this many items (and at least
        every :attr:`log_seconds`).
    """

    log_seconds = 30.0

    def __init__(self, name: str, *, quiet: bool = False, stream: TextIO | None = None, log_every: int = 1000):
        self.name, self.quiet, self.log_every = name, quiet, max(1, int(log_every))
        self.stream = stream or sys.stderr
        self._bar = None

    @property
    def interactive(self) -> bool:
        """Whether the stream is a terminal (bars) or not (log lines)."""
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def say(self, message: str) -> None:
        """One status line, prefixed with the command's name."""
        if self.quiet:
            return
        line = f"{self.name}: {message}"
        if self._bar is not None:
            from tqdm.auto import tqdm

            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def note(self, message: str) -> None:
        """A line that is shown even when quiet (a warning the user must see)."""
        quiet, self.quiet = self.quiet, False
        try:
            self.say(f"note: {message}")
        finally:
            self.quiet = quiet

    def bar(self, total: int, unit: str = "image", initial: int = 0) -> "_Bar":
        """A progress counter for ``total`` items (a bar on a terminal, log lines elsewhere)."""
        return _Bar(self, total, unit, initial)


class _Bar:
    def __init__(self, progress: Progress, total: int, unit: str, initial: int):
        self.p, self.total, self.unit = progress, total, unit
        self.done = initial
        self.start = time.perf_counter()
        self.first = initial
        self.next_log = initial + progress.log_every
        self.last_log = self.start
        self.tqdm = None
        self.extra = ""
        if not progress.quiet and progress.interactive:
            from tqdm.auto import tqdm

            self.tqdm = tqdm(total=total, initial=initial, desc=progress.name, unit=unit, file=progress.stream,
                             dynamic_ncols=True, smoothing=0.05)
            progress._bar = self.tqdm

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.tqdm is not None:
            self.tqdm.update(n)
            return
        now = time.perf_counter()
        due = self.done >= self.next_log or now - self.last_log >= self.p.log_seconds or self.done >= self.total
        if not self.p.quiet and due and self.done > self.first:
            while self.next_log <= self.done:
                self.next_log += self.p.log_every
            self.last_log = now
            elapsed = now - self.start
            rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            extra = f", {self.extra}" if self.extra else ""
            self.p.say(f"{self.done}/{self.total} {self.unit}s, {rate:.1f} {self.unit}s/s, ETA {_duration(eta)}{extra}")

    def postfix(self, text: str) -> None:
        """Figures shown after the count (a loss, a rate): at the bar's end on a terminal, at the
        end of each log line elsewhere. Set it before :meth:`update`."""
        self.extra = text
        if self.tqdm is not None:
            self.tqdm.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
            self.p._bar = None
            self.tqdm = None
