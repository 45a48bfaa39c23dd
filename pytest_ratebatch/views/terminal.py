"""The progress line on pytest's terminal: in place on a TTY, paced lines in a log.

It uses the terminal reporter's writer by duck typing and imports nothing from pytest.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..limits.clock import MONOTONIC, Clock
from ..limits.policy import NANOS_PER_SECOND
from .forecast import format_span
from .progress import LinePace, with_time_left

if TYPE_CHECKING:
    from _pytest.terminal import TerminalReporter

__all__ = [
    "LOG_EVERY",
    "TERMINAL_REFRESH",
    "ProgressLine",
    "TerminalGuard",
    "write_between_progress",
]


def write_between_progress(terminal: TerminalReporter, text: str) -> None:
    """A line of ours between pytest's progress lines."""
    terminal.ensure_newline()
    writer = getattr(terminal, "_tw", None)
    if getattr(writer, "width_of_current_line", 0):
        terminal.write("\n")  # xdist prints progress letters without tracking the line
    terminal.write_line(text)


#: Seconds between updates of the status line on a terminal, and between lines in a log.
TERMINAL_REFRESH = 1.0
LOG_EVERY = 30.0


class ProgressLine:
    """While tests wait for the limiter: what for, and where the run stands.

    On a terminal, one line updated in place (every second while a wait lasts) below
    pytest's progress line, written past pytest's line bookkeeping and erased before pytest
    writes again (the cursor back at the end of pytest's line), so pytest's own output
    stays exactly as it would be. In a log (no TTY), a plain line,
    at most one every ``LOG_EVERY`` seconds. ``tick`` is what the refresher thread calls;
    ``status(now_ns)`` says where the run stands.
    """

    def __init__(
        self,
        terminal: TerminalReporter,
        lock: threading.RLock,
        status: Callable[[int], tuple[str, int | None]],
        tty: bool,
        clock: Clock = MONOTONIC,
    ) -> None:
        self.terminal = terminal
        self.lock = lock
        self.status = status
        self.tty = tty
        self.clock = clock
        self._pace = LinePace(int(LOG_EVERY * NANOS_PER_SECOND))
        self._wait: tuple[str, str, int] | None = None  # (worker, what, until_ns)
        # Where the run stood when the wait began: (then, text, ns left); the time left
        # then counts down, rather than the schedule being judged in the middle of a wait.
        self._status: tuple[int, str, int | None] = (0, "", None)
        self._showing = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def waiting(self, what: str, seconds: float, worker: str = "") -> None:
        """A wait of ``seconds`` begins (in this process or, under xdist, in ``worker``)."""
        now = self.clock.now_ns()
        with self.lock:
            self._wait = (worker, what, now + int(seconds * NANOS_PER_SECOND))
            self._status = (now, *self.status(now))
            self._show(now)

    def tick(self) -> None:
        """Refresh the line while a wait lasts."""
        now = self.clock.now_ns()
        with self.lock:
            if self._wait is not None and now < self._wait[2]:
                self._show(now)

    def text(self, now: int) -> str:
        assert self._wait is not None
        worker, what, until = self._wait
        who = f"[{worker}] " if worker else ""
        left = format_span(max(0, until - now) / NANOS_PER_SECOND)
        then, status, run_left = self._status
        if run_left is not None:  # the run ends no sooner than this wait
            run_left = max(run_left - (now - then), until - now)
        return f"ratebatch: {who}waiting {left} for {what}; {with_time_left(status, run_left)}"

    def _show(self, now: int) -> None:
        terminal = self.terminal
        if not self.tty:
            if self._pace.due(now):
                write_between_progress(terminal, self.text(now))
            return
        writer = terminal._tw
        text = self.text(now)[: max(20, writer.fullwidth - 1)]
        # On the line below pytest's, past the writer (its idea of its line stays true).
        move = "\r" if self._showing else "\n"
        file = writer._file
        file.write(f"{move}\x1b[K{text}")
        file.flush()
        self._showing = True

    def clear(self) -> None:
        """Erase the status line and return to the end of pytest's line (under the lock)."""
        if self._showing:
            self._showing = False
            writer = self.terminal._tw
            column = writer.width_of_current_line + 1
            writer._file.write(f"\r\x1b[K\x1b[A\x1b[{column}G")

    def start(self) -> None:
        """Refresh in a thread while waits last (on a terminal, or for long waits in a log)."""
        if self._thread is not None:
            return
        period = TERMINAL_REFRESH if self.tty else LOG_EVERY / 6

        def refresh() -> None:
            while not self._stop.wait(period):
                self.tick()

        self._thread = threading.Thread(target=refresh, name="ratebatch-progress", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        with self.lock:
            self._wait = None
            self.clear()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class TerminalGuard:
    """xdist controller: the terminal's writes and the announcer thread's lines take turns.

    One lock around the terminal writer's ``write``, through which all of pytest's output
    passes: cheaper than wrapping the hooks that print, which run several times per test.
    """

    def __init__(self, lock: threading.RLock, before: Callable[[], None] | None = None) -> None:
        self.lock = lock
        self.before = before  # called under the lock before each write (clears a status line)

    def install(self, terminal: TerminalReporter) -> None:
        writer = terminal._tw
        write = writer.write
        lock = self.lock
        before = self.before

        def locked_write(msg: str, *, flush: bool = False, **markup: bool) -> None:
            with lock:
                if before is not None:
                    before()
                write(msg, flush=flush, **markup)

        writer.write = locked_write  # type: ignore[method-assign]
