"""Cost of one limiter call that is admitted at once, beside pyrate-limiter and limits.

What is measured: the time per call, in µs, of

* ours: ``RateLimiter(RateLimit(1e12, 1)).acquire()`` (interval 1 ns, so it never waits);
* pyrate-limiter 4.x: ``Limiter(InMemoryBucket([Rate(10**9, Duration.SECOND)]))
  .try_acquire("k")``;
* limits: ``MovingWindowRateLimiter`` and ``FixedWindowRateLimiter`` over ``MemoryStorage``,
  ``.hit(limits.parse("1000000000/second"), "k")``.

Each round times every candidate once (``timeit``, garbage collector off), in an order that
rotates between rounds, on a fresh limiter per round; the table quotes the median over the
rounds and each peer's ratio to ours. Peers are imported lazily: a missing one prints
"not installed". The log-based peers (pyrate's ``InMemoryBucket``, limits' moving window)
keep one entry per hit in the last second, so their cost per call grows with the number of
calls per round; the figures hold for the call counts printed.

Target: ours <= 2 µs per call.

Reproduce from the repository root (``python -m pip install -e ".[bench]"`` for the peers)::

    python benchmarks/acquire.py
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET_US = 2.0

Call = Callable[[], object]
Close = Callable[[], None]


class Candidate(NamedTuple):
    name: str
    calls: int
    make: Callable[[], tuple[Call, Close]]  # a fresh limiter: (the call to time, cleanup)


def _nothing() -> None:
    return None


def make_ours() -> tuple[Call, Close]:
    from pytest_ratebatch.engine.limiter import RateLimiter
    from pytest_ratebatch.limits.policy import RateLimit

    limiter = RateLimiter(RateLimit(1e12, 1))
    return limiter.acquire, _nothing


def make_pyrate() -> tuple[Call, Close]:
    from pyrate_limiter import Duration, InMemoryBucket, Limiter, Rate

    limiter = Limiter(InMemoryBucket([Rate(10**9, Duration.SECOND)]))
    return functools.partial(limiter.try_acquire, "k"), limiter.close


def make_limits(strategy: str) -> Callable[[], tuple[Call, Close]]:
    def make() -> tuple[Call, Close]:
        import limits
        import limits.storage
        import limits.strategies

        kind = getattr(limits.strategies, strategy)
        limiter = kind(limits.storage.MemoryStorage())
        item = limits.parse("1000000000/second")
        return functools.partial(limiter.hit, item, "k"), _nothing

    return make


def peer_available(module: str) -> str | None:
    """The peer's version, or ``None`` if it cannot be imported."""
    from importlib import import_module, metadata

    try:
        import_module(module)
    except ImportError:
        return None
    distribution = {"pyrate_limiter": "pyrate-limiter", "limits": "limits"}[module]
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "?"


def processor() -> str:
    name = platform.processor()
    if not name or name == platform.machine():
        try:
            for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
        except OSError:
            pass
    return name or platform.machine()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time one admitted limiter call: ours against pyrate-limiter and limits.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--calls", type=int, default=100_000, help="calls per round, ours")
    parser.add_argument("--peer-calls", type=int, default=20_000, help="calls per round, each peer")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    args = parser.parse_args(argv)
    if min(args.calls, args.peer_calls, args.repeats) < 1:
        parser.error("--calls, --peer-calls and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))  # measure this checkout's limiter

    import pytest_ratebatch

    print(f"python {platform.python_version()} ({platform.python_implementation()})")
    print(f"processor: {processor()}, os.cpu_count() = {os.cpu_count()}")
    print(f"ours: {Path(pytest_ratebatch.__file__).parent}")
    clock = time.get_clock_info("monotonic")
    print(f"monotonic clock resolution: {clock.resolution:g} s")

    candidates = [Candidate("ours RateLimiter.acquire", args.calls, make_ours)]
    missing: list[str] = []
    pyrate = peer_available("pyrate_limiter")
    if pyrate is None:
        missing.append("pyrate-limiter")
    else:
        candidates.append(
            Candidate(f"pyrate-limiter {pyrate} try_acquire", args.peer_calls, make_pyrate)
        )
    limits_version = peer_available("limits")
    if limits_version is None:
        missing.append("limits")
    else:
        for strategy, label in (
            ("MovingWindowRateLimiter", "moving window"),
            ("FixedWindowRateLimiter", "fixed window"),
        ):
            candidates.append(
                Candidate(
                    f"limits {limits_version} {label} hit",
                    args.peer_calls,
                    make_limits(strategy),
                )
            )

    per_call: dict[str, list[float]] = {c.name: [] for c in candidates}
    for round_ in range(args.repeats):
        shift = round_ % len(candidates)
        for candidate in candidates[shift:] + candidates[:shift]:
            call, close = candidate.make()
            try:
                call()  # first call outside the timing: lazy setup, imports
                (seconds,) = timeit.repeat(call, number=candidate.calls, repeat=1)
            finally:
                close()
            per_call[candidate.name].append(seconds / candidate.calls * 1e6)
        print(f"  round {round_ + 1} done", file=sys.stderr, flush=True)

    print(f"{args.repeats} interleaved rounds, fresh limiter per round\n")
    ours = statistics.median(per_call[candidates[0].name])
    name_width = max(len(c.name) for c in candidates)
    print(
        f"{'candidate':<{name_width}}  {'calls':>7}  {'median µs':>9}  {'min µs':>7}  {'/ ours':>7}"
    )
    for candidate in candidates:
        values = per_call[candidate.name]
        median = statistics.median(values)
        print(
            f"{candidate.name:<{name_width}}  {candidate.calls:>7}  {median:>9.3f}  "
            f"{min(values):>7.3f}  {median / ours:>7.2f}"
        )
    for name in missing:
        print(f"{name:<{name_width}}  not installed")
    print()
    verdict = "met" if ours <= TARGET_US else "MISSED"
    print(f"ours: {ours:.3f} µs per call -> {verdict} (target: <= {TARGET_US:g} µs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
