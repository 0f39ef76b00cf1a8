"""Broker fixtures: a URL for each broker msgkit is tested against, from the environment or Docker.

For each broker ``NAME`` (rabbitmq, redis, kafka, sqs, postgres) the session fixture
``msgkit_NAME_url`` returns, in this order:

1. ``$MSGKIT_NAME_URL`` if it is set (e.g. from ``. .brokers/env`` after ``scripts/brokers up``);
2. else, when a Docker engine answers, the URL of a testcontainers container started for the
   session (set ``MSGKIT_TESTCONTAINERS=0`` to never try);
3. else the test is skipped, or fails when ``MSGKIT_REQUIRE_BROKERS=1``.

Nothing here imports a broker client or testcontainers until a fixture actually needs it.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest

#: Broker name -> environment variable holding its URL.
BROKER_ENV_VARS: dict[str, str] = {
    "rabbitmq": "MSGKIT_RABBITMQ_URL",
    "redis": "MSGKIT_REDIS_URL",
    "kafka": "MSGKIT_KAFKA_URL",
    "sqs": "MSGKIT_SQS_URL",
    "postgres": "MSGKIT_POSTGRES_URL",
}

#: Set to 1 (CI) to turn a missing broker into a test failure instead of a skip.
REQUIRE_ENV_VAR = "MSGKIT_REQUIRE_BROKERS"
#: Set to 0 to never start containers, even when Docker answers.
TESTCONTAINERS_ENV_VAR = "MSGKIT_TESTCONTAINERS"

_DEFAULT_DOCKER_SOCKETS = ("/var/run/docker.sock", os.path.expanduser("~/.docker/run/docker.sock"))


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def brokers_required(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a missing broker fails the test (``MSGKIT_REQUIRE_BROKERS=1``) instead of skipping it."""
    return _truthy(environ.get(REQUIRE_ENV_VAR))


def _docker_answers(docker_host: str, timeout: float) -> bool:
    """Whether the Docker engine at ``docker_host`` answers ``GET /_ping`` within ``timeout`` seconds."""
    parts = urlsplit(docker_host)
    try:
        if parts.scheme == "unix":
            if not os.path.exists(parts.path):
                return False
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            with sock:
                sock.connect(parts.path)
                return _http_ping(sock)
        if parts.scheme in ("tcp", "http", "https") and parts.hostname:
            port = parts.port or (2376 if parts.scheme == "https" else 2375)
            with socket.create_connection((parts.hostname, port), timeout=timeout) as sock:
                if parts.scheme == "https" or os.environ.get("DOCKER_TLS_VERIFY"):
                    return True  # TLS: a connection is enough
                return _http_ping(sock)
    except OSError:
        return False
    return parts.scheme in ("ssh", "npipe")  # cannot probe cheaply: let testcontainers try


def _http_ping(sock: socket.socket) -> bool:
    sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
    status = sock.recv(64)
    return status.startswith(b"HTTP/1.") and b" 200 " in status


def docker_available(timeout: float = 1.0) -> bool:
    """Whether testcontainers is importable and a Docker engine answers (probed once per process).

    ``MSGKIT_TESTCONTAINERS=0`` says no without probing. The probe looks at ``$DOCKER_HOST`` or
    the default sockets and never waits longer than ``timeout`` seconds per address.
    """
    import importlib.util

    if not _truthy(os.environ.get(TESTCONTAINERS_ENV_VAR, "1")):
        return False
    if importlib.util.find_spec("testcontainers") is None:
        return False
    return _docker_engine_answers(os.environ.get("DOCKER_HOST", ""), timeout)


@functools.cache
def _docker_engine_answers(docker_host: str, timeout: float) -> bool:
    if docker_host:
        return _docker_answers(docker_host, timeout)
    return any(_docker_answers(f"unix://{path}", timeout) for path in _DEFAULT_DOCKER_SOCKETS)


@dataclass(frozen=True)
class BrokerUrl:
    """Where a broker's URL comes from: ``env`` (a URL), ``docker`` (start a container), or ``missing``."""

    name: str
    source: str
    url: str | None = None

    def missing_reason(self) -> str:
        env_var = BROKER_ENV_VARS[self.name]
        return (
            f"no {self.name} broker: set {env_var} (e.g. `. .brokers/env` after `scripts/brokers up {self.name}`) "
            "or run a Docker engine for testcontainers"
        )


def resolve_broker_url(
    name: str,
    environ: Mapping[str, str] = os.environ,
    docker: Callable[[], bool] | None = None,
) -> BrokerUrl:
    """Decide where broker ``name``'s URL comes from: the environment first, then Docker, else missing.

    ``docker`` says whether a Docker engine answers (default: :func:`docker_available`).
    """
    url = environ.get(BROKER_ENV_VARS[name], "").strip()
    if url:
        return BrokerUrl(name, "env", url)
    if (docker or docker_available)():
        return BrokerUrl(name, "docker")
    return BrokerUrl(name, "missing")


def skip_or_fail(reason: str, environ: Mapping[str, str] = os.environ) -> None:
    """Skip the test with ``reason``, or fail it when ``MSGKIT_REQUIRE_BROKERS=1``. Never returns."""
    if brokers_required(environ):
        pytest.fail(f"{reason} ({REQUIRE_ENV_VAR} is set)", pytrace=False)
    pytest.skip(reason)


def _broker_url(name: str) -> Iterator[str]:
    found = resolve_broker_url(name)
    if found.source == "env":
        assert found.url is not None
        yield found.url
        return
    if found.source == "docker":
        from msgkit.testing.containers import start_container

        try:
            container, url = start_container(name)
        except Exception as exc:  # no image, pull refused, start timeout...
            skip_or_fail(f"could not start a {name} container with testcontainers: {type(exc).__name__}: {exc}")
        try:
            yield url
        finally:
            container.stop()
        return
    skip_or_fail(found.missing_reason())


def _url_fixture(name: str) -> Any:
    def fixture() -> Iterator[str]:
        yield from _broker_url(name)

    fixture.__doc__ = f"URL of a {name} broker: ${BROKER_ENV_VARS[name]}, else a testcontainers container, else skip."
    fixture.__name__ = f"msgkit_{name}_url"
    return pytest.fixture(scope="session", name=f"msgkit_{name}_url")(fixture)


msgkit_rabbitmq_url = _url_fixture("rabbitmq")
msgkit_redis_url = _url_fixture("redis")
msgkit_kafka_url = _url_fixture("kafka")
msgkit_sqs_url = _url_fixture("sqs")
msgkit_postgres_url = _url_fixture("postgres")
