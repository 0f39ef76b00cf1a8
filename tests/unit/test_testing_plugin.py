"""The msgkit pytest plugin's own logic: where broker URLs come from, skip vs fail, contract URLs."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from msgkit.testing import containers, fixtures
from msgkit.testing.fixtures import BrokerUrl, docker_available, resolve_broker_url, skip_or_fail

pytest_plugins = ["pytester"]


def _no_docker() -> bool:
    return False


def _docker() -> bool:
    return True


# ---------------------------------------------------------------- URL resolution (pure)


def test_the_environment_wins_over_docker() -> None:
    found = resolve_broker_url("redis", {"MSGKIT_REDIS_URL": " redis://h:1/0 "}, docker=_docker)
    assert found == BrokerUrl("redis", "env", "redis://h:1/0")


def test_docker_is_used_when_the_environment_has_no_url() -> None:
    assert resolve_broker_url("kafka", {"MSGKIT_KAFKA_URL": ""}, docker=_docker) == BrokerUrl("kafka", "docker")


def test_without_url_or_docker_the_broker_is_missing_and_the_reason_says_what_to_do() -> None:
    found = resolve_broker_url("sqs", {}, docker=_no_docker)
    assert found == BrokerUrl("sqs", "missing")
    assert "MSGKIT_SQS_URL" in found.missing_reason()
    assert "scripts/brokers up sqs" in found.missing_reason()


def test_a_missing_broker_skips_by_default_and_fails_when_brokers_are_required() -> None:
    with pytest.raises(pytest.skip.Exception, match="no broker"):
        skip_or_fail("no broker", {})
    with pytest.raises(pytest.skip.Exception):
        skip_or_fail("no broker", {"MSGKIT_REQUIRE_BROKERS": "0"})
    with pytest.raises(pytest.fail.Exception, match="MSGKIT_REQUIRE_BROKERS"):
        skip_or_fail("no broker", {"MSGKIT_REQUIRE_BROKERS": "1"})


# ---------------------------------------------------------------- the Docker probe


@pytest.fixture
def fresh_probe() -> Iterator[None]:
    fixtures._docker_engine_answers.cache_clear()
    yield
    fixtures._docker_engine_answers.cache_clear()


@pytest.mark.usefixtures("fresh_probe")
def test_the_docker_probe_fails_fast_without_an_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as unused:  # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    for host in ("unix:///nonexistent/docker.sock", f"tcp://127.0.0.1:{port}"):
        monkeypatch.setenv("DOCKER_HOST", host)
        started = time.monotonic()
        assert docker_available() is False, host
        assert time.monotonic() - started < 2.0


@pytest.mark.usefixtures("fresh_probe")
def test_docker_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSGKIT_TESTCONTAINERS", "0")
    monkeypatch.setattr(fixtures, "_docker_engine_answers", lambda *a: pytest.fail("probed"))
    assert docker_available() is False


@pytest.mark.usefixtures("fresh_probe")
def test_the_docker_probe_recognises_an_engine_that_answers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = str(tmp_path / "d.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def answer() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(1024)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
        assert docker_available() is True
    finally:
        thread.join(5)
        server.close()


# ---------------------------------------------------------------- the fixtures, in a pytest run

BROKER_TEST = """
def test_url(msgkit_redis_url):
    print("URL=" + msgkit_redis_url)
"""


@pytest.fixture
def pytester(pytester: pytest.Pytester) -> pytest.Pytester:
    """pytester with an ini file, so that pytest-asyncio does not warn in the inner runs."""
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    return pytester


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No MSGKIT_* variables and no Docker."""
    for name in list(os.environ):
        if name.startswith("MSGKIT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MSGKIT_TESTCONTAINERS", "0")
    return monkeypatch


def test_a_broker_fixture_returns_the_url_from_the_environment(
    pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("MSGKIT_REDIS_URL", "redis://example:6379/3")
    pytester.makepyfile(BROKER_TEST)
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*URL=redis://example:6379/3*"])


def test_a_broker_fixture_skips_without_a_broker(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(BROKER_TEST)
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no redis broker: set MSGKIT_REDIS_URL*"])


def test_a_broker_fixture_fails_without_a_broker_when_brokers_are_required(
    pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("MSGKIT_REQUIRE_BROKERS", "1")
    pytester.makepyfile(BROKER_TEST)
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no redis broker*MSGKIT_REQUIRE_BROKERS is set*"])


CONTRACT_TEST = """
def test_url(msgkit_contract_url, msgkit_restart_command):
    print(f"URL={msgkit_contract_url} RESTART={msgkit_restart_command}")
"""


def test_contract_urls_default_to_memory_plus_env_urls_with_a_transport(
    pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("MSGKIT_KAFKA_URL", "nosuchscheme://127.0.0.1:9092")  # no transport for this scheme
    clean_env.setenv("MSGKIT_REDIS_URL", "memory://from-env")  # a scheme with a transport
    clean_env.setenv("MSGKIT_REDIS_RESTART_COMMAND", "restart it")
    pytester.makepyfile(CONTRACT_TEST)
    result = pytester.runpytest("-s", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["*URL=memory://contract-*visibility_timeout=1 RESTART=None*", "*URL=memory://from-env RESTART=restart it*"]
    )
    assert "nosuchscheme://" not in result.stdout.str()


def test_contract_urls_from_the_command_line_replace_the_defaults(
    pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(CONTRACT_TEST)
    result = pytester.runpytest(
        "-s", "-v", "--msgkit-url", "memory://one", "--msgkit-url", "kafka://h:1", "--msgkit-restart-command", "cmd"
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*::test_url?memory? *", "*::test_url?kafka? *"])
    result.stdout.fnmatch_lines(["*URL=memory://one RESTART=cmd*", "*URL=kafka://h:1 RESTART=cmd*"])


# ---------------------------------------------------------------- the testcontainers path, without Docker


class FakeContainer:
    def __init__(self) -> None:
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


def test_with_docker_a_container_is_started_for_the_session_and_stopped_after(
    clean_env: pytest.MonkeyPatch,
) -> None:
    container = FakeContainer()
    clean_env.setattr(fixtures, "docker_available", _docker)
    clean_env.setattr(containers, "start_container", lambda name: (container, f"{name}://container:1"))
    session = fixtures._broker_url("redis")
    assert next(session) == "redis://container:1"
    assert not container.stopped
    with pytest.raises(StopIteration):
        next(session)
    assert container.stopped


def test_a_container_that_does_not_start_skips_or_fails(clean_env: pytest.MonkeyPatch) -> None:
    def refuse(name: str) -> None:
        raise RuntimeError("pull access denied")

    clean_env.setattr(fixtures, "docker_available", _docker)
    clean_env.setattr(containers, "start_container", refuse)
    with pytest.raises(pytest.skip.Exception, match="pull access denied"):
        next(fixtures._broker_url("kafka"))
    clean_env.setenv("MSGKIT_REQUIRE_BROKERS", "1")
    with pytest.raises(pytest.fail.Exception, match="could not start a kafka container"):
        next(fixtures._broker_url("kafka"))
