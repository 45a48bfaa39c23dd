"""The session's shared bookkeeping: batches, the barrier between them, failures, the stop.

``SessionState`` and the functions on it are pure; a ``Ledger`` (``stores``) applies them
atomically and lets a caller block until a batch has drained or been released.
"""

from __future__ import annotations

from typing import Literal

from .values import Value

__all__ = [
    "Entry",
    "SessionState",
    "StopRule",
    "check_stop",
    "enter",
    "finish",
    "leave",
    "release",
    "stop",
]


class SessionState:
    """What every process of a session must agree on; a few numbers, whatever the suite size."""

    __slots__ = (
        "batch",
        "drained_ns",
        "draining",
        "failures",
        "last_finish_ns",
        "members",
        "released",
        "running",
        "stop_reason",
    )

    def __init__(
        self,
        failures: int = 0,
        stop_reason: str = "",
        batch: int = 0,
        members: int = 0,
        running: int = 0,
        released: bool = True,
        draining: int = 0,
        drained_ns: int = 0,
        last_finish_ns: int = 0,
    ) -> None:
        self.failures = failures
        self.stop_reason = stop_reason
        self.batch = batch  # the newest batch (0: none yet)
        self.members = members  # tests that joined the newest batch
        self.running = running  # of those, not finished yet
        self.released = released  # the newest batch holds its tokens; its members may start
        self.draining = draining  # tests of the previous batch still running as the newest opens
        self.drained_ns = drained_ns  # when the previous batch's last test finished
        self.last_finish_ns = last_finish_ns  # when the newest batch's latest test finished

    def copy(self) -> SessionState:
        return SessionState(
            self.failures,
            self.stop_reason,
            self.batch,
            self.members,
            self.running,
            self.released,
            self.draining,
            self.drained_ns,
            self.last_finish_ns,
        )

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"SessionState({fields})"


Action = Literal["go", "open", "join", "wait", "cancel"]


class Entry:
    """What a test arriving at its start must do.

    ``go``: start (after taking its own tokens); ``open``: this test opens ``batch`` and
    must pass the barrier, the backoff and the batch's tokens first; ``join``: member of
    ``batch``, which is still opening; ``wait``: the newest batch is full and opening, wait
    for its release and try again; ``cancel``: the session stopped, ``reason`` says why.
    """

    __slots__ = ("action", "batch", "reason")

    def __init__(self, action: Action, batch: int = 0, reason: str = "") -> None:
        self.action = action
        self.batch = batch
        self.reason = reason

    def __repr__(self) -> str:
        return f"Entry({self.action!r}, {self.batch}, {self.reason!r})"


class StopRule(Value):
    """When the session stops: after ``max_failures``, or at ``deadline_ns``."""

    __slots__ = ("deadline_ns", "max_failures", "timeout_text")
    max_failures: int | None
    deadline_ns: int | None
    timeout_text: str

    def __init__(
        self, max_failures: int | None, deadline_ns: int | None, timeout_text: str
    ) -> None:
        self._set(max_failures=max_failures, deadline_ns=deadline_ns, timeout_text=timeout_text)


def check_stop(state: SessionState, now: int, rule: StopRule) -> str:
    """Record and return the stop reason if a stop condition holds (the first reason wins)."""
    if not state.stop_reason:
        if rule.max_failures is not None and state.failures >= rule.max_failures:
            state.stop_reason = f"max failures ({rule.max_failures}) reached"
        elif rule.deadline_ns is not None and now >= rule.deadline_ns:
            state.stop_reason = f"total timeout ({rule.timeout_text}) passed"
    return state.stop_reason


def enter(state: SessionState, now: int, rule: StopRule, batch_size: int | None) -> Entry:
    """A test arrives at its start: decide, and count it in if it belongs to a batch."""
    # Without a stop so far nor a rule that could stop now, spare the call (every test).
    if state.stop_reason or rule.max_failures is not None or rule.deadline_ns is not None:
        reason = check_stop(state, now, rule)
        if reason:
            return Entry("cancel", reason=reason)
    if batch_size is None:
        return Entry("go")
    if state.batch and state.members < batch_size:
        state.members += 1
        state.running += 1
        return Entry("go" if state.released else "join", state.batch)
    if not state.released:
        return Entry("wait", state.batch)
    state.draining = state.running
    if not state.draining:
        state.drained_ns = state.last_finish_ns
    state.batch += 1
    state.members = state.running = 1
    state.released = False
    state.last_finish_ns = 0
    return Entry("open", state.batch)


def release(state: SessionState, batch: int) -> None:
    if state.batch == batch:
        state.released = True


def leave(state: SessionState, batch: int) -> None:
    """A member of the opening batch that will not run after all (the session stopped)."""
    if batch and batch == state.batch:
        state.running -= 1


def finish(state: SessionState, batch: int, failed: bool, now: int) -> None:
    if failed:
        state.failures += 1
    if not batch:
        return
    if batch == state.batch:
        state.running -= 1
        if now > state.last_finish_ns:  # noqa: PLR1730  (a comparison costs less than max())
            state.last_finish_ns = now
    elif batch == state.batch - 1:
        state.draining -= 1
        if not state.draining:
            state.drained_ns = now


def stop(state: SessionState, reason: str) -> str:
    if not state.stop_reason:
        state.stop_reason = reason
    return state.stop_reason
