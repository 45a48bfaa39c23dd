"""The timeline picture and the command line that reads reports back, checked by parsing
what they write."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from pytest_ratebatch.__main__ import main
from pytest_ratebatch.limits.policy import ExecutionPolicy, RateLimit, WindowLimit
from pytest_ratebatch.views.loading import ReportError, load_report
from pytest_ratebatch.views.report import REPORT_FORMAT, Tally, TestRecord, build_report
from pytest_ratebatch.views.timeline import render_timeline

SECOND = 1_000_000_000
SVG = "{http://www.w3.org/2000/svg}"


def make_report(
    tests: list[tuple[str, str, int, int, int]],
    policy: ExecutionPolicy | None = None,
    events: list[dict[str, Any]] | None = None,
    store_offset: int | None = None,
    started_at: float = 1_800_000_000.0,
) -> dict[str, Any]:
    """A report of ``(worker, outcome, start_s, duration_ms, batch)`` tests."""
    policy = policy or ExecutionPolicy(RateLimit(60, 2), batch_size=2)
    records = []
    tally = Tally()
    for index, (worker, outcome, start, duration_ms, batch) in enumerate(tests):
        record = TestRecord(f"test_a.py::test_{index}", outcome)
        record.worker = worker
        if outcome != "cancelled":
            record.start_ns = start * SECOND
            record.finish_ns = record.start_ns + duration_ms * 1_000_000
            record.tokens = 1
            record.batch = batch
            record.waited_ns = SECOND // 2 if index else 0
            if store_offset is not None:
                record.store_ns = store_offset + record.start_ns
            tally.admitted(batch, 1, record.start_ns, record.waited_ns)
        else:
            record.reason = "ratebatch: cancelled (total timeout (5s) passed)"
            tally.cancel(0)
        records.append(record)
    tally.collected = len(records)
    data: dict[str, Any] = json.loads(
        json.dumps(
            build_report(
                policy,
                records,
                tally,
                events=events or [],
                stop_reason="",
                store="memory",
                session_wall=started_at,
                duration_ns=10 * SECOND,
            )
        )
    )
    return data


def parse(svg: str) -> ElementTree.Element:
    return ElementTree.fromstring(svg)


def lanes(root: ElementTree.Element) -> list[str]:
    return [
        group.get("data-lane", "") for group in root.iter(f"{SVG}g") if group.get("class") == "lane"
    ]


def bars(root: ElementTree.Element) -> list[ElementTree.Element]:
    return [
        rect for rect in root.iter(f"{SVG}rect") if (rect.get("class") or "").startswith("test ")
    ]


def by_class(root: ElementTree.Element, tag: str, cls: str) -> list[ElementTree.Element]:
    return [element for element in root.iter(f"{SVG}{tag}") if element.get("class") == cls]


SESSION = [
    ("gw0", "passed", 0, 100, 1),
    ("gw1", "failed", 0, 300, 1),
    ("gw1", "passed", 2, 100, 2),
    ("gw0", "skipped", 2, 50, 2),
    ("gw0", "error", 4, 100, 3),
    ("", "cancelled", 0, 0, 0),
]


def test_a_lane_per_worker_a_bar_per_test_coloured_by_outcome() -> None:
    root = parse(render_timeline([("r", make_report(SESSION))]))
    assert lanes(root) == ["gw0", "gw1"]
    drawn = bars(root)
    assert len(drawn) == 5  # the cancelled test never started
    assert sorted(rect.get("class", "") for rect in drawn) == sorted(
        f"test {outcome}" for _, outcome, *_ in SESSION if outcome != "cancelled"
    )
    # Bars run left to right in start order, with widths in proportion to the durations.
    by_id = {rect.get("data-nodeid"): rect for rect in drawn}
    first, later = by_id["test_a.py::test_0"], by_id["test_a.py::test_4"]
    assert float(first.get("x", 0)) < float(later.get("x", 0))
    wide = by_id["test_a.py::test_1"]
    assert float(wide.get("width", 0)) == pytest.approx(3 * float(first.get("width", 0)), rel=0.05)
    assert len(by_class(root, "rect", "wait")) == 4  # every test but the first waited
    assert [line.get("data-batch") for line in by_class(root, "line", "batch")] == ["1", "2", "3"]
    title = next(text for text in root.iter(f"{SVG}text") if text.get("class") == "title")
    assert "6 tests" in (title.text or "")
    assert "1 cancelled" in (title.text or "")


def test_the_chart_shows_the_cost_against_the_bound_and_each_window() -> None:
    policy = ExecutionPolicy(RateLimit(60, 2), windows=(WindowLimit(3, 2 * SECOND),))
    root = parse(render_timeline([("r", make_report(SESSION, policy))]))
    chart = next(group for group in root.iter(f"{SVG}g") if group.get("class") == "chart")
    assert chart.get("data-total-cost") == "5"
    (bound,) = by_class(root, "path", "bound")
    assert (bound.get("data-burst"), bound.get("data-interval-ns")) == ("2", str(SECOND))
    (window,) = by_class(root, "path", "window-bound")
    assert (window.get("data-count"), window.get("data-window-ns")) == ("3", str(2 * SECOND))
    (cost,) = by_class(root, "path", "cost")
    assert cost.get("d", "").count("V") == 5  # it rises at each of the five starts


def test_pauses_and_throttles_are_drawn() -> None:
    event = {
        "event": "throttle", "test": "test_a.py::test_1", "status": 429, "wait": 1.0,
        "at_ns": SECOND, "paused_until_ns": 2 * SECOND,
        "store_ns": 5 * SECOND, "paused_until_store_ns": 6 * SECOND,
    }  # fmt: skip
    root = parse(render_timeline([("r", make_report(SESSION, events=[event]))]))
    (pause,) = by_class(root, "rect", "pause")
    assert "HTTP 429" in (pause.findtext(f"{SVG}title") or "")
    assert len(by_class(root, "path", "throttle")) == 1


def test_reports_sharing_a_redis_key_merge_on_the_store_clock() -> None:
    # Session b started 100 s later on the wall clock, but its tests ran 1 s after a's on
    # the server's clock: the server's clock decides.
    a = make_report([("", "passed", 0, 100, 0)], store_offset=50 * SECOND)
    b = make_report(
        [("gw0", "passed", 0, 100, 0)], store_offset=51 * SECOND, started_at=1.8e9 + 100
    )
    root = parse(render_timeline([("a", a), ("b", b)]))
    assert lanes(root) == ["a: session", "b: gw0"]
    first, second = (float(rect.get("x", 0)) for rect in bars(root))
    assert second > first
    title = next(text for text in root.iter(f"{SVG}text") if text.get("class") == "title")
    assert "on the store's clock" in (title.text or "")
    # Without a store clock, the wall-clock starts line the sessions up instead.
    c = make_report([("", "passed", 0, 100, 0)], started_at=1.8e9 + 100)
    root = parse(render_timeline([("a", make_report([("", "passed", 0, 100, 0)])), ("c", c)]))
    assert "on the store's clock" not in "".join(root.itertext())


def test_thousands_of_tests(tmp_path: Path) -> None:
    tests = [(f"gw{index % 4}", "passed", index // 8, 10, index // 8 + 1) for index in range(4000)]
    report = make_report(tests, ExecutionPolicy(RateLimit(480, 8), batch_size=8))
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    data = load_report(path)
    assert len(data["tests"]) == 4000
    assert data["summary"]["run"] == 4000
    root = parse(render_timeline([("r", data)]))
    assert len(bars(root)) == 4000
    assert len(by_class(root, "line", "batch")) == 500
    labels = [text.text for text in root.iter(f"{SVG}text") if (text.text or "b").startswith("b")]
    labels = [label for label in labels if label and label[1:].isdigit()]
    assert 0 < len(labels) <= 40  # batch labels thinned out, not piled up


# --- the command line ------------------------------------------------------------------


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_summary_prints_the_summary_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "r.json", make_report(SESSION))
    assert main(["summary", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "policy: rate 60/min, burst 2, batch size 2, backoff 0s",
        "tests: 5 run, 1 cancelled, in 3 batches",
        "waited: 2s in total, longest 0.5s",
        "pace: 45/min after the first burst (limit 60/min): the tests set the pace, not the limit",
        "stop: none, every test was started",
    ]


def test_timeline_writes_the_picture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = write(tmp_path / "one.json", make_report(SESSION))
    second = write(tmp_path / "two.json", make_report(SESSION))
    out = tmp_path / "pictures" / "t.svg"
    assert main(["timeline", str(first), str(second), "-o", str(out)]) == 0
    assert capsys.readouterr().out == f"timeline: {out}\n"
    assert lanes(parse(out.read_text()))[:2] == ["one: gw0", "one: gw1"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json", "not JSON"),
        ('["a list"]', "not a pytest-ratebatch report"),
        (
            '{"format": 1, "tests": []}',
            f"report format 1; this version of pytest-ratebatch reads format {REPORT_FORMAT}",
        ),
        (f'{{"format": {REPORT_FORMAT}, "tests": []}}', "incomplete report"),
    ],
    ids=["missing", "not-json", "not-a-report", "old-format", "incomplete"],
)
@pytest.mark.parametrize("command", ["summary", "timeline"])
def test_bad_input_is_one_line_and_status_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str | None,
    message: str,
    command: str,
) -> None:
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    assert (
        main(
            [
                command,
                str(path),
                *(["-o", str(tmp_path / "t.svg")] if command == "timeline" else []),
            ]
        )
        == 2
    )
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"python -m pytest_ratebatch: error: {path}: ")
    assert message in line
    assert not (tmp_path / "t.svg").exists()


def test_the_module_runs_without_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest_ratebatch", "summary", str(tmp_path / "missing.json")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().endswith("missing.json: no such file")
    assert "Traceback" not in result.stderr
    usage = subprocess.run(
        [sys.executable, "-m", "pytest_ratebatch"], capture_output=True, text=True, check=False
    )
    assert usage.returncode == 2
    assert "usage: python -m pytest_ratebatch" in usage.stderr


def test_load_report_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="a directory"):
        load_report(tmp_path)


SET_BY_LIMIT = "the limit set the pace"
SET_BY_TESTS = "the tests set the pace, not the limit"
SET_BY_SERVER = "the server's throttles set the pace"


@pytest.mark.parametrize(
    ("rate", "achieved", "rate_after", "line"),
    [
        (120.0, 119.8, None, "pace: 119.8/min after the first burst (limit 120/min): "
                             f"{SET_BY_LIMIT}"),
        (120.0, 50.0, 60.0, "pace: 50/min after the first burst (limit 120/min, 60/min after "
                            f"throttles): {SET_BY_SERVER}"),
        (120.0, 50.0, None, f"pace: 50/min after the first burst (limit 120/min): {SET_BY_TESTS}"),
        ("auto", 40.0, 45.0, "pace: 40/min after the first burst (rate auto, 45/min after "
                             f"throttles): {SET_BY_SERVER}"),
        ("auto", 40.0, None, None),
        (None, 40.0, None, None),
        (120.0, None, None, None),
    ],
)  # fmt: skip
def test_the_pace_line_says_who_set_the_pace(
    rate: object, achieved: float | None, rate_after: float | None, line: str | None
) -> None:
    from pytest_ratebatch.views.report import describe_pace

    summary = {"achieved_per_minute": achieved}
    assert describe_pace({"rate_per_minute": rate}, summary, {"rate_after": rate_after}) == line


# --- the calls -----------------------------------------------------------------------------


def with_calls(report: dict[str, Any], calls: dict[int, list[tuple[float, int, int]]]) -> None:
    """Give test ``i`` of the report its calls, ``(start_s, status, resent)`` each, as a
    session with call limits reports them."""
    for index, made in calls.items():
        report["tests"][index]["calls"] = [
            {"host": "api.example.com", "start": start, "wait": 0.25, "status": status,
             "resent": resent}
            for start, status, resent in made
        ]  # fmt: skip


def ticks(root: ElementTree.Element) -> dict[str, list[ElementTree.Element]]:
    """Each lane's call ticks."""
    return {
        group.get("data-lane", ""): [
            line
            for line in group.iter(f"{SVG}line")
            if (line.get("class") or "").split()[0] == "call"
        ]
        for group in root.iter(f"{SVG}g")
        if group.get("class") == "lane"
    }


def legend(root: ElementTree.Element) -> list[str]:
    return [
        (element.get("class") or "").removeprefix("legend ")
        for element in root.iter()
        if (element.get("class") or "").startswith("legend ")
    ]


def test_each_call_is_a_tick_on_its_tests_lane() -> None:
    report = make_report(SESSION)
    # test_0 (gw0) runs from 0 to 0.1 s, test_2 (gw1) from 2 to 2.1 s.
    with_calls(report, {0: [(0.0, 200, 0), (0.05, 200, 1)], 2: [(2.1, 429, 2)], 3: []})
    root = parse(render_timeline([("r", report)]))
    drawn = ticks(root)
    assert {lane: len(lines) for lane, lines in drawn.items()} == {"gw0": 2, "gw1": 1}
    by_id = {rect.get("data-nodeid"): rect for rect in bars(root)}
    # Where along its test's bar: at its start, half-way, at its finish.
    for lane, index, nodeid, along in (
        ("gw0", 0, "test_a.py::test_0", 0.0),
        ("gw0", 1, "test_a.py::test_0", 0.5),
        ("gw1", 0, "test_a.py::test_2", 1.0),
    ):
        bar = by_id[nodeid]
        x, width = float(bar.get("x", 0)), float(bar.get("width", 0))
        line = drawn[lane][index]
        assert line.get("x1") == line.get("x2")
        assert float(line.get("x1", 0)) == pytest.approx(x + along * width, abs=0.02)
        # Short and vertical, inside the lane.
        top, bottom = float(line.get("y1", 0)), float(line.get("y2", 0))
        assert float(bar.get("y", 0)) - 2 < top < bottom < float(bar.get("y", 0)) + 16
    # A re-sent call stands out, and every tick says what the call was.
    assert [line.get("class") for line in drawn["gw0"]] == ["call", "call resent"]
    assert drawn["gw1"][0].get("class") == "call resent"
    titles = [line.findtext(f"{SVG}title") for lines in drawn.values() for line in lines]
    assert titles == [
        "test_a.py::test_0: call to api.example.com, waited 0.25s, HTTP 200, not re-sent",
        "test_a.py::test_0: call to api.example.com, waited 0.25s, HTTP 200, re-sent once",
        "test_a.py::test_2: call to api.example.com, waited 0.25s, HTTP 429, re-sent 2 times",
    ]
    assert legend(root)[-4:] == ["call", "call resent", "cost", "bound"]


def test_without_calls_no_tick_and_no_legend() -> None:
    plain = parse(render_timeline([("r", make_report(SESSION))]))
    assert ticks(plain) == {"gw0": [], "gw1": []}
    assert not [entry for entry in legend(plain) if entry.startswith("call")]
    report = make_report(SESSION)
    with_calls(report, {0: [(0.05, 200, 0)]})  # none re-sent: no entry for it
    entries = legend(parse(render_timeline([("r", report)])))
    assert "call" in entries
    assert "call resent" not in entries


def test_calls_follow_their_test_onto_the_store_clock() -> None:
    # On the server's clock the test starts at 50 s; its call, 0.05 s after the test's
    # start on the session's clock, 0.05 s after it there too.
    a = make_report([("", "passed", 0, 100, 0)], store_offset=50 * SECOND)
    b = make_report([("gw0", "passed", 1, 100, 0)], store_offset=50 * SECOND)
    with_calls(a, {0: [(0.05, 200, 0)]})
    with_calls(b, {0: [(1.1, 0, 0)]})  # no response: the request failed
    root = parse(render_timeline([("a", a), ("b", b)]))
    drawn = ticks(root)
    (first,), (second,) = drawn["a: session"], drawn["b: gw0"]
    bar_a, bar_b = bars(root)
    assert float(first.get("x1", 0)) == pytest.approx(
        float(bar_a.get("x", 0)) + float(bar_a.get("width", 0)) / 2, abs=0.02
    )
    assert float(second.get("x1", 0)) == pytest.approx(
        float(bar_b.get("x", 0)) + float(bar_b.get("width", 0)), abs=0.02
    )
    assert "no response" in (second.findtext(f"{SVG}title") or "")


def test_the_calls_of_a_real_report_are_drawn(tmp_path: Path) -> None:
    # Thousands of calls: one tick each, the picture still valid.
    tests = [(f"gw{index % 4}", "passed", index // 8, 10, 0) for index in range(400)]
    report = make_report(tests, ExecutionPolicy(RateLimit(480, 8)))
    with_calls(
        report,
        {index: [(index // 8 + step / 1000, 200, step % 2) for step in range(10)]
         for index in range(400)},
    )  # fmt: skip
    path = write(tmp_path / "r.json", report)
    root = parse(render_timeline([("r", load_report(path))]))
    drawn = ticks(root)
    assert sum(len(lines) for lines in drawn.values()) == 4000
    assert (
        sum(line.get("class") == "call resent" for lines in drawn.values() for line in lines)
        == 2000
    )
