"""The forecast: a greedy schedule of the policy's limits, checked by hand and against the
scheduler itself on a fake clock."""

from __future__ import annotations

import pytest

from pytest_ratebatch.engine.scheduler import TaskScheduler
from pytest_ratebatch.limits.policy import ExecutionPolicy, RateLimit
from pytest_ratebatch.views.forecast import (
    describe_forecast,
    forecast_policy,
    format_span,
    simulate,
)
from tests.fakes import FakeClock

SECOND = 1_000_000_000


def test_the_issue_example_300_tests_at_60_per_minute_burst_5() -> None:
    forecast = simulate([1] * 300, interval_ns=SECOND, burst=5)
    assert forecast.span_ns == 295 * SECOND
    assert describe_forecast(forecast) == (
        "300 tests take at least 4m55s by the policy (test durations add to it)"
    )


def test_costs_and_exempt_tests() -> None:
    forecast = simulate([3, 0, 1, 0, 2], interval_ns=SECOND, burst=3)
    # 3 at 0 empties the bucket; 1 needs a token (1 s); 2 need two more (3 s).
    assert forecast.starts_ns == (0, 0, SECOND, SECOND, 3 * SECOND)
    assert forecast.exempt == 2
    assert forecast.cost == 6
    assert describe_forecast(forecast).startswith("5 tests (2 exempt), cost 6, take at least 3s")


def test_batches_wait_for_the_batch_tokens_and_the_backoff() -> None:
    # Batches of 2, burst 2, 1 token per second, backoff 10 s.
    forecast = simulate([1] * 6, interval_ns=SECOND, burst=2, batch_size=2, backoff_ns=10 * SECOND)
    assert [start / SECOND for start in forecast.starts_ns] == [0, 0, 10, 10, 20, 20]
    # Without backoff the bucket sets the pace: 2 tokens every 2 s.
    forecast = simulate([1] * 6, interval_ns=SECOND, burst=2, batch_size=2)
    assert [start / SECOND for start in forecast.starts_ns] == [0, 0, 2, 2, 4, 4]


def test_windows_hold_with_the_bucket() -> None:
    # 10 per minute as a window, with a bucket of 60/min and burst 5.
    forecast = simulate([1] * 25, interval_ns=SECOND, burst=5, windows=[(10, 60 * SECOND)])
    starts = [start / SECOND for start in forecast.starts_ns]
    assert starts[:10] == [0, 0, 0, 0, 0, 1, 2, 3, 4, 5]
    assert starts[10:20] == [60, 60, 60, 60, 60, 61, 62, 63, 64, 65]
    assert starts[20:] == [120] * 5  # the bucket refilled meanwhile
    for index, start in enumerate(starts):  # every sliding window holds
        assert sum(1 for other in starts[: index + 1] if other > start - 60) <= 10


def test_windows_alone_and_several_windows() -> None:
    forecast = simulate([1] * 7, interval_ns=None, burst=1, windows=[(3, SECOND), (5, 10 * SECOND)])
    assert [start / SECOND for start in forecast.starts_ns] == [0, 0, 0, 1, 1, 10, 10]


def test_a_cost_above_a_window_count_does_not_hang() -> None:
    forecast = simulate([5, 1], interval_ns=None, burst=1, windows=[(2, SECOND)])
    assert forecast.tests == 2


def test_a_total_timeout_counts_the_tests_it_cancels() -> None:
    forecast = simulate([1] * 300, interval_ns=SECOND, burst=5, deadline_ns=120 * SECOND)
    # Starts at 0 (x5), then 1 s apart: the 120th second admits test 125 (index 124).
    assert forecast.cancelled == 300 - 124
    text = describe_forecast(forecast, total_timeout=120)
    assert text.endswith("; the total timeout (2m) passes first: about 176 tests will be cancelled")


def test_left_after_follows_the_schedule() -> None:
    forecast = simulate([1] * 10, interval_ns=SECOND, burst=5)
    assert forecast.left_after(0) == 5 * SECOND
    assert forecast.left_after(5) == 5 * SECOND
    assert forecast.left_after(8) == 2 * SECOND
    assert forecast.left_after(10) == 0


def test_no_rate_and_no_windows_means_no_forecast() -> None:
    assert forecast_policy(ExecutionPolicy(batch_size=3), [1, 1]) is None
    assert forecast_policy(ExecutionPolicy(RateLimit(float("inf"), 3)), [1, 1]) is None
    forecast = forecast_policy(ExecutionPolicy(RateLimit(120, 1), total_timeout=1), [1] * 5)
    assert forecast is not None
    assert forecast.span_ns == 2 * SECOND
    assert forecast.cancelled == 3


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0004, "0s"),
        (0.04, "0.04s"),
        (2.46, "2.5s"),
        (12.4, "12s"),
        (295, "4m55s"),
        (3601.2, "1h1s"),
    ],
)
def test_format_span(seconds: float, text: str) -> None:
    assert format_span(seconds) == text


@pytest.mark.parametrize(
    "policy",
    [
        ExecutionPolicy(RateLimit(60, 3)),
        ExecutionPolicy(RateLimit(60, 4), batch_size=4),
        ExecutionPolicy(RateLimit(30, 5), batch_size=3, batch_backoff=2.5),
    ],
    ids=["unbatched", "batched", "backoff"],
)
def test_the_forecast_is_what_the_scheduler_does_with_instant_tests(
    policy: ExecutionPolicy, clock: FakeClock
) -> None:
    costs = [1, 2, 0, 1, 3, 1, 1, 0, 2, 1, 1, 1, 3, 1]
    scheduler = TaskScheduler(policy, clock=clock, session_start_ns=clock.now)
    origin = clock.now
    starts = []
    batched = policy.batch_size is not None
    # In one process the plugin tells each batch's opener what its batch costs.
    paced = [cost for cost in costs if cost]
    for index, cost in enumerate(costs):
        batch_cost = None
        if batched and cost:
            position = sum(1 for earlier in costs[:index] if earlier)
            assert policy.batch_size is not None
            batch_cost = sum(paced[position : position + policy.batch_size])
        ticket = scheduler.admit(cost, batch_cost)
        starts.append(ticket.start_ns - origin)
        scheduler.finish(ticket, failed=False)
    forecast = forecast_policy(policy, costs)
    assert forecast is not None
    assert list(forecast.starts_ns) == starts


def test_the_policy_windows_count() -> None:
    from pytest_ratebatch.limits.policy import WindowLimit

    policy = ExecutionPolicy(RateLimit(60, 5), windows=(WindowLimit(10, 60 * SECOND),))
    forecast = forecast_policy(policy, [1] * 25)
    assert forecast is not None
    assert forecast.span_ns == 120 * SECOND
    windows_only = ExecutionPolicy(windows=(WindowLimit(2, SECOND),))
    forecast = forecast_policy(windows_only, [1] * 5)
    assert forecast is not None
    assert forecast.span_ns == 2 * SECOND


@pytest.mark.parametrize("count", [0, 1, 4, 5, 6, 37])
@pytest.mark.parametrize("burst", [1, 5])
@pytest.mark.parametrize("deadline", [None, 0, 1, SECOND - 1, SECOND, 3 * SECOND, 3 * SECOND + 1])
def test_even_starts_need_no_list_and_agree_with_the_simulation(
    count: int, burst: int, deadline: int | None
) -> None:
    even = simulate([1] * count, interval_ns=SECOND, burst=burst, deadline_ns=deadline)
    assert even.even is not None
    # A cost of 0 at the end changes nothing but forces the general path.
    general = simulate([1] * count + [0], interval_ns=SECOND, burst=burst, deadline_ns=deadline)
    assert general.even is None
    assert even.starts_ns == general.starts_ns[:count]
    assert even.span_ns == general.span_ns
    expected_cancelled = general.cancelled - (1 if general.cancelled else 0)
    assert even.cancelled == expected_cancelled
    assert [even.left_after(n) for n in range(count + 1)] == [
        general.left_after(n) for n in range(count + 1)
    ]


@pytest.mark.parametrize("count", [0, 1, 5, 6, 7, 23])
@pytest.mark.parametrize(("batch_size", "burst"), [(1, 1), (2, 2), (3, 5), (5, 5)])
@pytest.mark.parametrize("backoff", [0, SECOND // 3, 4 * SECOND])
@pytest.mark.parametrize("deadline", [None, 0, 2 * SECOND, 7 * SECOND + 1])
def test_batches_of_unit_costs_are_scheduled_a_batch_at_a_time_as_test_by_test(
    count: int, batch_size: int, burst: int, backoff: int, deadline: int | None
) -> None:
    limits = {
        "interval_ns": SECOND,
        "burst": burst,
        "batch_size": batch_size,
        "backoff_ns": backoff,
        "deadline_ns": deadline,
    }
    by_batch = simulate([1] * count, **limits)  # type: ignore[arg-type]
    # A cost of 0 at the end (exempt: no batch, starts with the last test) forces the
    # test-by-test path.
    by_test = simulate([1] * count + [0], **limits)  # type: ignore[arg-type]
    assert by_batch.starts_ns == by_test.starts_ns[:count]
    assert by_batch.span_ns == by_test.span_ns
    assert by_batch.cancelled == by_test.cancelled - (1 if by_test.cancelled else 0)
