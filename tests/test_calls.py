"""Call limits end to end: real pytest sessions (subprocesses, so that this process is never
patched) whose tests call a real rate-limited server on 127.0.0.1 with real clients:
http.client, urllib, requests, httpx and httpx2 (sync and async), aiohttp and the openai SDK.

Each check that a limit was kept has a control: the same suite without the call limit
gets 429s from the server, so the check can fail."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.call_server import CallServer, max_in_window
from tests.redis_server import RedisServer

pytest_plugins = ["pytester"]

#: The server's limit, and the call limit that states it with 100 ms to spare: a call
#: reaches the server a little after its admission (the client's own work, a loaded
#: machine's scheduling), and the limit keeps only 20 ms for that. Without the call limit
#: the same calls draw 429s (each test's control run), so the spare hides no pacing fault.
SERVER_LIMIT = "4 per 1 second"
CALL_LIMIT = "127.0.0.1=4/1.1s"
TIMEOUT = 120
#: Plugins of this environment that the sessions here do not need, and that take seconds
#: to import (hypothesis alone more than one): each session starts in about a second.
QUICK = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:benchmark",
         "-p", "no:anyio")  # fmt: skip

# Each client's ``statuses(count)``: ``count`` calls to ``URL`` (one after another, or at
# once for the async clients), their HTTP statuses. A 429 is a status, not an error.
CLIENTS: dict[str, str] = {
    "http.client": """
        import http.client
        from urllib.parse import urlsplit

        SERVER = urlsplit(URL)
        CONNECTION = http.client.HTTPConnection(SERVER.hostname, SERVER.port, timeout=10)

        def statuses(count):
            found = []
            for _ in range(count):  # one kept-alive connection for every call
                CONNECTION.request("POST", "/v1/things", body=b'{"n": 1}')
                response = CONNECTION.getresponse()
                response.read()
                found.append(response.status)
            return found
        """,
    "urllib": """
        import urllib.error
        import urllib.request

        def statuses(count):
            found = []
            for _ in range(count):
                try:
                    with urllib.request.urlopen(URL + "/v1/things", timeout=10) as response:
                        found.append(response.status)
                except urllib.error.HTTPError as error:
                    error.close()
                    found.append(error.code)
            return found
        """,
    "requests": """
        import requests

        SESSION = requests.Session()

        def statuses(count):
            return [
                SESSION.post(URL + "/v1/things", json={"n": 1}, timeout=10).status_code
                for _ in range(count)
            ]
        """,
    "httpx": """
        import httpx

        CLIENT = httpx.Client(timeout=10)

        def statuses(count):
            return [CLIENT.post(URL + "/v1/things", json={"n": 1}).status_code
                    for _ in range(count)]
        """,
    "httpx-async": """
        import asyncio
        import httpx

        def statuses(count):
            async def main():
                async with httpx.AsyncClient(timeout=10) as client:
                    calls = [client.post(URL + "/v1/things", json={"n": 1}) for _ in range(count)]
                    return [response.status_code for response in await asyncio.gather(*calls)]

            return asyncio.run(main())
        """,
    "httpx2": """
        import httpx2

        CLIENT = httpx2.Client(timeout=10)

        def statuses(count):
            return [CLIENT.get(URL + "/v1/things").status_code for _ in range(count)]
        """,
    "httpx2-async": """
        import asyncio
        import httpx2

        def statuses(count):
            async def main():
                async with httpx2.AsyncClient(timeout=10) as client:
                    calls = [client.get(URL + "/v1/things") for _ in range(count)]
                    return [response.status_code for response in await asyncio.gather(*calls)]

            return asyncio.run(main())
        """,
    "aiohttp": """
        import asyncio
        import aiohttp

        def statuses(count):
            async def one(session):
                async with session.post(URL + "/v1/things", json={"n": 1}) as response:
                    await response.read()
                    return response.status

            async def main():
                async with aiohttp.ClientSession() as session:
                    return list(await asyncio.gather(*(one(session) for _ in range(count))))

            return asyncio.run(main())
        """,
    "openai": """
        import openai

        CLIENT = openai.OpenAI(base_url=URL + "/v1", api_key="x", max_retries=0)

        def statuses(count):
            found = []
            for _ in range(count):
                try:
                    CLIENT.models.list()  # GET /v1/models; the server's JSON parses as a page
                except openai.APIStatusError as error:
                    found.append(error.status_code)
                else:
                    found.append(200)
            return found
        """,
}
ASYNC_CLIENTS = {"httpx-async", "httpx2-async", "aiohttp"}

CALLING_TESTS = """
@pytest.mark.parametrize("n", range({tests}))
def test_call(n):
    assert statuses({calls}) == [200] * {calls}
"""


def client_code(client: str, url: str) -> str:
    """The start of a test module: ``URL`` and ``statuses(count)`` with ``client``."""
    return f"import pytest\n\nURL = {url!r}\n" + textwrap.dedent(CLIENTS[client])


def client_suite(client: str, url: str, tests: int = 4, calls: int = 2) -> str:
    """A test module whose ``tests`` tests each make ``calls`` calls with ``client``."""
    return client_code(client, url) + CALLING_TESTS.format(tests=tests, calls=calls)


def write_suite(
    pytester: pytest.Pytester, client: str, url: str, tests: int = 4, calls: int = 2
) -> None:
    pytester.makepyfile(test_suite=client_suite(client, url, tests, calls))


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*QUICK, *args, timeout=TIMEOUT)


def load_report(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def assert_kept(server: CallServer, requests: int) -> None:
    """Every call reached the server within its limit: none refused, and no window of the
    server's holds more arrivals than it allows (the refused ones included)."""
    assert server.stats() == {"requests": requests, "rejected": 0}
    assert max_in_window(server.admitted(), server.window) <= server.amount
    arrived = [arrival.at for arrival in server.arrivals()]
    assert max_in_window(arrived, server.window) <= server.amount


@pytest.fixture
def server() -> Iterator[CallServer]:
    with CallServer.start(SERVER_LIMIT) as running:
        yield running


# --- every client keeps the limit ------------------------------------------------------------


@pytest.mark.parametrize("client", list(CLIENTS))
def test_each_client_keeps_the_call_limit(
    pytester: pytest.Pytester, server: CallServer, client: str
) -> None:
    # Sync clients: 4 tests of 2 calls; async ones: 2 tests of 4 calls at once.
    tests, calls = (2, 4) if client in ASYNC_CLIENTS else (4, 2)
    write_suite(pytester, client, server.url, tests, calls)
    control = run(pytester)  # no call limit: the suite calls faster than the server allows
    assert control.ret == pytest.ExitCode.TESTS_FAILED, control.stdout.str()
    assert server.stats()["rejected"] > 0
    server.reset()
    result = run(pytester, "--call-limit", CALL_LIMIT)
    result.assert_outcomes(passed=tests)
    assert_kept(server, 8)
    result.stdout.fnmatch_lines(
        [
            "policy: calls 127.0.0.1=4/1.1s",
            # What held the calls back is right for calls one after another only: see
            # test_call_limits.py::test_waiters_at_once_are_put_down_to_the_window_that_held_them
            "calls to 127.0.0.1 (4/1.1s): 8 calls in *s (*/min), * waited *s in all, mostly for "
            "*, 0 throttled",
        ]
    )


# --- shared across processes -------------------------------------------------------------------


def test_xdist_workers_share_a_hosts_limit(pytester: pytest.Pytester, server: CallServer) -> None:
    write_suite(pytester, "requests", server.url, tests=6, calls=2)
    result = run(pytester, "-n", "2", "--call-limit", CALL_LIMIT, "--ratebatch-report=r.json")
    result.assert_outcomes(passed=6)
    assert_kept(server, 12)
    output = result.stdout.str()
    assert output.count("calls to 127.0.0.1 (4/1.1s): 12 calls in") == 1  # the controller's
    assert "store: file (shared by this session's workers)" in output
    report = load_report(pytester.path / "r.json")
    assert len({test["worker"] for test in report["tests"]}) == 2  # really on both workers
    assert report["calls"]["127.0.0.1"]["calls"] == 12
    assert sorted(len(test["calls"]) for test in report["tests"]) == [2] * 6


def test_two_sessions_share_a_hosts_limit_through_redis(
    pytester: pytest.Pytester,
    server: CallServer,
    redis_server: RedisServer,
    request: pytest.FixtureRequest,
) -> None:
    write_suite(pytester, "httpx", server.url, tests=4, calls=2)
    key = f"calls-{os.getpid()}-{request.node.name}"
    command = [
        sys.executable, "-m", "pytest", *QUICK, "--call-limit", CALL_LIMIT,
        f"--ratebatch-store={redis_server.url}", f"--ratebatch-key={key}",
    ]  # fmt: skip
    sessions = [
        subprocess.Popen(command, cwd=pytester.path, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for session in sessions:
        output, _ = session.communicate(timeout=TIMEOUT)
        assert session.returncode == 0, output
        assert "4 passed" in output
        assert "calls to 127.0.0.1 (4/1.1s): 8 calls in" in output
    assert_kept(server, 16)  # each session alone would have sent 8 calls at 4/1s: 4 at once
    assert redis_server.client().keys(f"*{key}:calls:127.0.0.1*")


def test_a_redis_store_that_dies_mid_call_fails_that_call_and_cancels_the_rest(
    pytester: pytest.Pytester,
    server: CallServer,
    private_redis: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The second test stops the server (SHUTDOWN), then calls the limited host: that call
    # cannot be admitted. It fails its test with the store's reason, the password masked;
    # the next test's start finds the store gone, and it is cancelled.
    pytester.makepyfile(
        test_dying=f"""
        import os

        import redis
        import requests

        def test_before():
            assert requests.get({server.url!r}, timeout=10).status_code == 200

        def test_store_dies():
            try:
                redis.Redis.from_url(os.environ["DYING_REDIS"]).shutdown(nosave=True)
            except redis.ConnectionError:
                pass  # the server closes the connection as it goes
            requests.get({server.url!r}, timeout=10)

        def test_after():
            pass
        """
    )
    monkeypatch.setenv("DYING_REDIS", private_redis.url)  # not in the test's source shown
    result = run(
        pytester, "--call-limit", CALL_LIMIT, f"--ratebatch-store={private_redis.url}",
        "-p", "no:randomly", "-rs",
    )  # fmt: skip
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, output
    result.assert_outcomes(passed=1, failed=1, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*StoreError: *redis://:***@127.0.0.1:*",
            "stop: store unavailable: redis redis://:***@*",
            "*ratebatch: cancelled (store unavailable: *",
        ]
    )
    assert private_redis.password is not None
    assert private_redis.password not in output
    assert "INTERNALERROR" not in output


# --- throttles -----------------------------------------------------------------------------------

STRICTER_SERVER = "4 per 2 seconds"


def test_a_stricter_server_s_429s_are_absorbed_and_sent_again(pytester: pytest.Pytester) -> None:
    with CallServer.start(STRICTER_SERVER) as server:
        write_suite(pytester, "requests", server.url, tests=4, calls=2)
        result = run(pytester, "--call-limit", CALL_LIMIT, "--ratebatch-report=r.json")
        result.assert_outcomes(passed=4)
        stats = server.stats()
    assert stats["rejected"] >= 1  # the server is stricter than the stated limit
    assert stats["requests"] == 8 + stats["rejected"]
    result.stdout.fnmatch_lines(
        [
            f"calls to 127.0.0.1 (4/1.1s): {stats['requests']} calls in *, {stats['rejected']} "
            f"throttle*: {stats['rejected']} re-sent"
        ]
    )
    result.stdout.no_fnmatch_line("*passed to the test*")
    report = load_report(pytester.path / "r.json")
    host = report["calls"]["127.0.0.1"]
    assert (host["calls"], host["throttled"]) == (stats["requests"], stats["rejected"])
    assert (host["resent"], host["passed_on"]) == (stats["rejected"], 0)
    calls = [call for test in report["tests"] for call in test["calls"]]
    assert len(calls) == 8
    assert {call["status"] for call in calls} == {200}
    assert sum(call["resent"] for call in calls) == stats["rejected"]
    assert max(call["wait"] for call in calls if call["resent"]) >= 0.9  # the Retry-After


def test_without_retries_the_429_reaches_the_test(pytester: pytest.Pytester) -> None:
    with CallServer.start(STRICTER_SERVER) as server:
        write_suite(pytester, "requests", server.url, tests=4, calls=2)
        result = run(pytester, "--call-limit", CALL_LIMIT, "--throttle-retries=0")
        stats = server.stats()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert stats["rejected"] >= 1
    assert stats["requests"] == 8  # nothing sent again
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) >= 1
    assert outcomes.get("failed", 0) + outcomes.get("passed", 0) == 4
    result.stdout.fnmatch_lines(
        [
            "*429*",
            f"calls to 127.0.0.1 (4/1.1s): 8 calls in *, {stats['rejected']} throttle*: "
            f"0 re-sent, {stats['rejected']} passed to the test",
        ]
    )


# Three calls with a body that is read once: the third meets the server's limit (2 per 2 s,
# stricter than the call limit) and, as it cannot be sent again, its 429 goes to the test.
STREAMED: dict[str, str] = {
    "httpx-streamed-content": """
        import httpx

        def call():
            def body():
                yield b'{"n": '
                yield b"1}"
            return httpx.post(URL + "/v1/things", content=body(), timeout=10).status_code
        """,
    "aiohttp-async-generator": """
        import asyncio
        import aiohttp

        def call():
            async def body():
                yield b'{"n": '
                yield b"1}"

            async def main():
                async with aiohttp.ClientSession() as session:
                    async with session.post(URL + "/v1/things", data=body()) as response:
                        return response.status

            return asyncio.run(main())
        """,
    "urllib-file-body": """
        import io
        import urllib.error
        import urllib.request

        def call():
            request = urllib.request.Request(
                URL + "/v1/things", data=io.BytesIO(b'{"n": 1}'), headers={"Content-Length": "8"}
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as error:
                error.close()
                return error.code
        """,
    # urllib3 (under requests) iterates a generator itself and hands http.client its chunks
    # as bytes, one ``send`` each, chunked: a stream, which the patch does not send again.
    "requests-generator": """
        import requests

        def call():
            def body():
                yield b'{"n": '
                yield b"1}"
            return requests.post(URL + "/v1/things", data=body(), timeout=10).status_code
        """,
}

STREAMED_TEST = """
def test_streamed():
    assert [call(), call(), call()] == [200, 200, 429]
"""


@pytest.mark.parametrize("client", list(STREAMED))
def test_a_body_read_once_is_not_sent_again(pytester: pytest.Pytester, client: str) -> None:
    with CallServer.start("2 per 2 seconds") as server:
        pytester.makepyfile(
            test_streamed=f"URL = {server.url!r}\n"
            + textwrap.dedent(STREAMED[client])
            + STREAMED_TEST
        )
        result = run(pytester, "--call-limit", CALL_LIMIT)
        stats = server.stats()
    result.assert_outcomes(passed=1)
    assert stats == {"requests": 3, "rejected": 1}
    result.stdout.fnmatch_lines(
        ["calls to 127.0.0.1 (4/1.1s): 3 calls in *, 1 throttle: 0 re-sent, 1 passed to the test"]
    )


# --- what is paced, and what is not ---------------------------------------------------------------


def test_another_host_or_port_is_not_paced(pytester: pytest.Pytester, server: CallServer) -> None:
    with CallServer.start(SERVER_LIMIT) as other:
        pytester.makepyfile(
            test_hosts=f"""
            import requests

            def statuses(url, count):
                return [requests.get(url, timeout=10).status_code for _ in range(count)]

            def test_listed():
                assert statuses({server.url!r}, 8) == [200] * 8

            def test_not_listed():
                assert 429 in statuses({other.url!r}, 8)
            """
        )
        result = run(pytester, "--call-limit", f"127.0.0.1:{server.port}=4/1.1s")
        other_stats = other.stats()
    result.assert_outcomes(passed=2)
    assert_kept(server, 8)
    assert other_stats["requests"] == 8
    assert other_stats["rejected"] >= 4  # 8 calls at once, unpaced
    result.stdout.fnmatch_lines([f"calls to 127.0.0.1:{server.port} (4/1.1s): 8 calls in *"])


def test_a_test_can_opt_out_of_pacing(pytester: pytest.Pytester, server: CallServer) -> None:
    pytester.makepyfile(
        test_opt_out=client_code("requests", server.url)
        + """

def test_1_paced():
    assert statuses(4) == [200] * 4

@pytest.mark.ratebatch(pace_calls=False)
def test_2_not_paced():
    assert statuses(4) == [429] * 4  # paced, they would have waited for the window

@pytest.mark.ratebatch(pace_calls=True)
def test_3_paced():
    assert statuses(4) == [200] * 4
"""
    )
    result = run(pytester, "--call-limit", CALL_LIMIT, "--ratebatch-report=r.json")
    result.assert_outcomes(passed=3)
    assert server.stats() == {"requests": 12, "rejected": 4}
    result.stdout.fnmatch_lines(["calls to 127.0.0.1 (4/1.1s): 8 calls in *, 0 throttled"])
    tests = {
        test["nodeid"].rpartition("::")[2]: test
        for test in load_report(pytester.path / "r.json")["tests"]
    }
    assert [len(tests[name]["calls"]) for name in sorted(tests)] == [4, 0, 4]
    assert max(call["wait"] for call in tests["test_3_paced"]["calls"]) >= 0.5


def test_a_bad_pace_calls_is_a_collection_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_bad="""
        import pytest

        @pytest.mark.ratebatch(pace_calls="no")
        def test_never():
            raise AssertionError("ran")
        """
    )
    result = run(pytester, "--call-limit", CALL_LIMIT)
    assert result.ret != pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*pace_calls must be True or False, not 'no'*"])
    assert "ran" not in result.stdout.str()


# --- the patches' lifetime ------------------------------------------------------------------------

PATCHED = ("putrequest", "putheader", "endheaders", "send", "getresponse")


def test_the_libraries_are_restored_after_the_session(
    pytester: pytest.Pytester, server: CallServer
) -> None:
    import aiohttp
    import httpx

    connection = http.client.HTTPConnection
    originals = {name: connection.__dict__[name] for name in PATCHED}
    transports = (
        httpx.HTTPTransport.__dict__["handle_request"],
        httpx.AsyncHTTPTransport.__dict__["handle_async_request"],
        aiohttp.ClientSession.__dict__["_request"],
    )
    finders = list(sys.meta_path)
    pytester.makeconftest(
        """
        import sys
        from pathlib import Path

        def pytest_unconfigure(config):
            # pytester puts sys.meta_path back after an in-process run: look before it does.
            finders = [type(finder).__module__ for finder in sys.meta_path]
            Path("finders.json").write_text(__import__("json").dumps(finders))
        """
    )
    pytester.makepyfile(
        test_inside=f"""
        import http.client
        import sys

        import aiohttp
        import httpx

        def test_patched_while_the_session_runs():
            assert http.client.HTTPConnection.putrequest.__name__ == "paced_putrequest"
            assert httpx.HTTPTransport.handle_request.__name__ == "paced_handle_request"
            assert aiohttp.ClientSession._request.__name__ == "paced_request"
            finders = [type(finder).__module__ for finder in sys.meta_path]
            assert "pytest_ratebatch.calls.install" in finders
            with httpx.Client() as client:
                assert [client.get({server.url!r}).status_code for _ in range(6)] == [200] * 6
        """
    )
    result = pytester.runpytest_inprocess("--call-limit", CALL_LIMIT, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert_kept(server, 6)
    assert {name: connection.__dict__[name] for name in PATCHED} == originals
    assert (
        httpx.HTTPTransport.__dict__["handle_request"],
        httpx.AsyncHTTPTransport.__dict__["handle_async_request"],
        aiohttp.ClientSession.__dict__["_request"],
    ) == transports
    assert sys.meta_path == finders
    inside = json.loads((pytester.path / "finders.json").read_text())
    assert "pytest_ratebatch.calls.install" not in inside


def test_a_library_imported_before_or_during_the_session_is_patched(
    pytester: pytest.Pytester, server: CallServer
) -> None:
    pytester.makeconftest("import httpx  # before the session: patched as it starts\n")
    pytester.makepyfile(
        test_late=f"""
        import asyncio
        import sys

        import httpx

        URL = {server.url!r}

        def test_imported_before():
            with httpx.Client() as client:
                assert [client.get(URL).status_code for _ in range(4)] == [200] * 4

        def test_imported_inside_the_test():
            assert "aiohttp" not in sys.modules
            import aiohttp

            async def main():
                async with aiohttp.ClientSession() as session:
                    return await asyncio.gather(*(session.get(URL) for _ in range(4)))

            assert [response.status for response in asyncio.run(main())] == [200] * 4
            assert aiohttp.ClientSession._request.__name__ == "paced_request"
        """
    )
    result = run(pytester, "--call-limit", CALL_LIMIT)
    result.assert_outcomes(passed=2)
    assert_kept(server, 8)
    result.stdout.fnmatch_lines(["calls to 127.0.0.1 (4/1.1s): 8 calls in *, 0 throttled"])


# --- the report, and bad options -----------------------------------------------------------------


def test_the_json_report_has_each_hosts_calls_and_each_tests(
    pytester: pytest.Pytester, server: CallServer
) -> None:
    pytester.makeini(f"[pytest]\ncall_limits =\n    {CALL_LIMIT}\n    api.example.com = auto\n")
    write_suite(pytester, "urllib", server.url, tests=4, calls=2)
    result = run(pytester, "--ratebatch-report=r.json")
    result.assert_outcomes(passed=4)
    assert_kept(server, 8)
    result.stdout.fnmatch_lines(
        ["calls to 127.0.0.1 (4/1.1s): 8 calls in *", "calls to api.example.com (auto): none"]
    )
    report = load_report(pytester.path / "r.json")
    assert [limit["text"] for limit in report["policy"]["call_limits"]] == [
        "127.0.0.1=4/1.1s",
        "api.example.com=auto",
    ]
    host = report["calls"]["127.0.0.1"]
    assert set(host) == {
        "limit",
        "calls",
        "throttled",
        "resent",
        "passed_on",
        "waits",
        "waited",
        "first",
        "last",
        "achieved_per_minute",
        "bound",
    }
    assert host["limit"] == "127.0.0.1=4/1.1s"
    assert (host["calls"], host["throttled"], host["resent"], host["passed_on"]) == (8, 0, 0, 0)
    assert host["waits"] >= 1
    assert host["waited"] >= 0.9  # the second four waited for the first window to pass
    assert 0 <= host["first"] <= host["last"]
    assert host["last"] - host["first"] >= 1.0
    assert 0 < host["achieved_per_minute"] <= 7 * 60 / 1.0
    assert host["bound"]["4/1.1s"] >= 0.9
    assert max(host["bound"], key=host["bound"].get) == "4/1.1s"
    assert report["calls"]["api.example.com"]["calls"] == 0
    calls = []
    for test in report["tests"]:
        assert len(test["calls"]) == 2
        for call in test["calls"]:
            assert set(call) == {"host", "start", "wait", "status", "resent"}
            assert (call["host"], call["status"], call["resent"]) == ("127.0.0.1", 200, 0)
            calls.append(call)
    starts = sorted(call["start"] for call in calls)
    assert starts[4] - starts[0] >= 1.0  # the stated window, on the session's clock
    assert sum(call["wait"] for call in calls) == pytest.approx(host["waited"], abs=0.01)


@pytest.mark.parametrize(
    ("args", "ini", "message"),
    [
        (
            ["--call-limit", "nope"],
            "",
            "--call-limit='nope' (command line): 'nope' is not "
            "HOST=LIMITS (e.g. api.example.com=20/2s, 127.0.0.1:8080=auto)",
        ),
        (
            ["--call-limit", "127.0.0.1=4/1s", "--call-limit", "127.0.0.1 = auto"],
            "",
            "--call-limit='127.0.0.1=4/1s\\n127.0.0.1 = auto' (command line): 127.0.0.1 is stated "
            "twice (127.0.0.1=4/1s and 127.0.0.1=auto): state each host once",
        ),
        (
            ["--call-limit", "::1=4/1s"],
            "",
            "--call-limit='::1=4/1s' (command line): '::1': write "
            "an IPv6 address in brackets, e.g. [::1] or [::1]:8080",
        ),
        (
            ["--call-limit", "127.0.0.1=4/1"],
            "",
            "--call-limit='127.0.0.1=4/1' (command line): "
            "'4/1': the window needs a unit (e.g. 1s) (or auto, or concurrency N)",
        ),
        (
            [],
            "call_limits =\n    127.0.0.1 = 4/1s\n    api.example.com = fast",
            "call_limits='127.0.0.1 = 4/1s\\napi.example.com = fast' (ini file */tox.ini): "
            "'fast' is not N/DURATION*",
        ),
        (
            ["-o", "call_limits=h:99999=1/s"],
            "",
            "call_limits='h:99999=1/s' (-o/--override-ini): '99999' is not a port (1 to 65535)",
        ),
    ],
)
def test_a_bad_call_limit_ends_the_run_before_any_test(
    pytester: pytest.Pytester, args: list[str], ini: str, message: str
) -> None:
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(test_never="def test_never(): raise AssertionError('ran')")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: ratebatch: {message.replace('[', '[[]')}"])
    output = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in output
    assert "INTERNALERROR" not in output
    assert "ran" not in result.stdout.str()


# The first connection to the server takes 0.3 s to open (as a TLS handshake to a real API
# can), the later ones none: for sync clients in ``socket.socket.connect``, for asyncio ones
# (httpx's anyio, aiohttp) in the event loop's ``sock_connect``.
SLOW_FIRST_CONNECTION = """
import asyncio
import asyncio.selector_events
import socket
import time

SLOW = 0.3
PORT = {port}
slow = [True]
connect = socket.socket.connect
sock_connect = asyncio.selector_events.BaseSelectorEventLoop.sock_connect


def first(address):
    if slow[0] and isinstance(address, tuple) and address[1] == PORT:
        slow[0] = False
        return True
    return False


def slow_connect(self, address):
    if first(address):
        time.sleep(SLOW)
    return connect(self, address)


async def slow_sock_connect(self, sock, address):
    if first(address):
        await asyncio.sleep(SLOW)
    return await sock_connect(self, sock, address)


socket.socket.connect = slow_connect
asyncio.selector_events.BaseSelectorEventLoop.sock_connect = slow_sock_connect
"""


@pytest.mark.parametrize("client", ["http.client", "requests", "httpx", "httpx-async", "aiohttp"])
def test_a_slow_first_connection_does_not_bring_calls_closer_than_the_limit(
    pytester: pytest.Pytester, server: CallServer, client: str
) -> None:
    """A call is admitted once its connection is open (http.client in ``putrequest``,
    httpx and httpx2 in httpcore's connection, aiohttp in ``ClientRequest.send``): the time
    a new connection takes (here 0.3 s, more than the limit's spare) does not come between
    the admission and the arrival, where it would let calls admitted a window later on an
    open connection reach the server less than a window after the first."""
    pytester.makeconftest(SLOW_FIRST_CONNECTION.format(port=server.port))
    write_suite(pytester, client, server.url, tests=2, calls=4)
    result = run(pytester, "--call-limit", CALL_LIMIT)
    result.assert_outcomes(passed=2)  # a 429 is sent again: the tests pass all the same
    assert_kept(server, 8)


# --- auto, concurrency, and the event loop ------------------------------------------------------


def test_auto_obeys_the_servers_published_budget(pytester: pytest.Pytester) -> None:
    with CallServer.start(SERVER_LIMIT, headers="openai") as server:
        write_suite(pytester, "openai", server.url, tests=6, calls=2)
        result = run(pytester, "--call-limit", "127.0.0.1=auto")
        stats = server.stats()
    result.assert_outcomes(passed=6)
    assert stats["requests"] == 12 + stats["rejected"]
    assert stats["rejected"] <= 2
    result.stdout.fnmatch_lines(["calls to 127.0.0.1 (auto): * calls in *, * waited *"])


def test_a_concurrency_holds_calls_until_the_one_in_flight_is_answered(
    pytester: pytest.Pytester,
) -> None:
    with CallServer.start("100 per 1 second", delay=0.2) as server:
        write_suite(pytester, "httpx-async", server.url, tests=1, calls=4)
        result = run(pytester, "--call-limit", "127.0.0.1=concurrency 1")
        arrivals = sorted(arrival.at for arrival in server.arrivals())
    result.assert_outcomes(passed=1)
    assert len(arrivals) == 4
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert min(gaps) >= 0.15  # one at a time: each waited for the answer before it (0.2 s)
    result.stdout.fnmatch_lines(
        ["calls to 127.0.0.1 (concurrency 1): 4 calls in *, mostly for concurrency, 0 throttled"]
    )


#: The longest a ticking loop may go without a tick. A wait that blocked the loop would
#: stop it for a whole wait (more than a second in these tests); a loaded machine delays a
#: 10 ms sleep by tens of milliseconds, rarely more.
LONGEST_GAP = 0.6
TICKING = (
    """
import asyncio
import time

TICK = 0.01

async def ticking(work):
    \"\"\"Run ``work`` while a task ticks every 10 ms; (ticks, expected ticks, seconds, the
    longest time between two ticks).\"\"\"
    ticks = 0
    longest = 0.0
    done = asyncio.Event()

    async def ticker():
        nonlocal ticks, longest
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(TICK)
            ticks += 1
            now = time.monotonic()
            longest, last = max(longest, now - last), now

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    await work()
    elapsed = time.monotonic() - started
    done.set()
    await task
    return ticks, elapsed / TICK, elapsed, longest
"""
    + f"\nLONGEST_GAP = {LONGEST_GAP}\n"
)


def test_the_event_loop_runs_while_an_async_client_waits(
    pytester: pytest.Pytester, server: CallServer
) -> None:
    pytester.makepyfile(
        test_ticks=TICKING
        + f"""
import httpx

def test_ticks():
    async def calls():
        async with httpx.AsyncClient(timeout=10) as client:
            responses = await asyncio.gather(*(client.get({server.url!r}) for _ in range(6)))
        assert [response.status_code for response in responses] == [200] * 6

    async def warm_up():  # httpx imports its async back end at its first connection
        async with httpx.AsyncClient(timeout=10) as client:
            await client.get({server.url!r})

    asyncio.run(warm_up())
    ticks, expected, elapsed, longest = asyncio.run(ticking(calls))
    print(f"ticks {{ticks}} of {{expected:.0f}} in {{elapsed:.2f}}s, longest gap {{longest:.3f}}s")
    assert elapsed >= 1.0  # three of the six waited a window (1.12 s) after the first call
    assert longest < LONGEST_GAP
"""
    )
    result = run(pytester, "--call-limit", CALL_LIMIT, "-s")
    result.assert_outcomes(passed=1)
    assert server.stats()["requests"] >= 6
    result.stdout.fnmatch_lines(["calls to 127.0.0.1 (4/1.1s): * calls in *"])


def test_the_fixture_waits_with_await(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_fixture=TICKING
        + """
import pytest

def test_acquire_async(ratebatch):
    async def acquire():
        for _ in range(4):
            await ratebatch.acquire_async()
        await ratebatch.acquire_async(0)  # nothing to take: at once

    async def refused():
        for cost in (-1, True, 1.5):
            with pytest.raises(ValueError, match="cost must be a whole number"):
                await ratebatch.acquire_async(cost)

    assert ratebatch.active
    asyncio.run(refused())
    ticks, expected, elapsed, longest = asyncio.run(ticking(acquire))
    print(f"ticks {ticks} of {expected:.0f} in {elapsed:.2f}s, longest gap {longest:.3f}s")
    assert elapsed >= 4.5  # four tokens at 50/min after the test's own: 1.2 s each
    assert longest < LONGEST_GAP
"""
    )
    result = run(pytester, "--rate-per-minute=50", "-s", "--ratebatch-report=r.json")
    result.assert_outcomes(passed=1)
    (test,) = load_report(pytester.path / "r.json")["tests"]
    assert test["outcome"] == "passed"
