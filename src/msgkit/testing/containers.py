"""Broker containers for tests, started with testcontainers (imported only when one is needed).

Only testcontainers' generic ``DockerContainer`` and its Kafka module are used, so no broker
driver beyond msgkit's own extras is required. Images can be overridden with
``MSGKIT_<NAME>_IMAGE`` (e.g. ``MSGKIT_RABBITMQ_IMAGE=rabbitmq:4-alpine``).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from typing import Any

#: Default image of each broker.
IMAGES: dict[str, str] = {
    "rabbitmq": "rabbitmq:3.13-alpine",
    "redis": "redis:7-alpine",
    "kafka": "confluentinc/cp-kafka:7.6.0",
    "sqs": "softwaremill/elasticmq-native:1.6.11",
    "postgres": "postgres:16-alpine",
}

#: A log line (regex) each image prints once it serves clients, and how often it must appear.
_READY: dict[str, tuple[str, int]] = {
    "rabbitmq": (r"Server startup complete", 1),
    "redis": (r"Ready to accept connections", 1),
    "sqs": (r"started in \d+ ?ms", 1),
    # the official image runs a temporary server for its init scripts first
    "postgres": (r"database system is ready to accept connections", 2),
}


def _image(name: str) -> str:
    return os.environ.get(f"MSGKIT_{name.upper()}_IMAGE") or IMAGES[name]


def _wait_for_log(container: Any, pattern: str, times: int, timeout: float = 120.0) -> None:
    try:
        from testcontainers.core.wait_strategies import LogMessageWaitStrategy
    except ImportError:  # testcontainers < 4.11
        from testcontainers.core.waiting_utils import wait_for_logs

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            wait_for_logs(container, lambda logs: len(re.findall(pattern, logs)) >= times, timeout)
        return
    strategy = LogMessageWaitStrategy(pattern, times=times)
    strategy.with_startup_timeout(int(timeout))
    strategy.wait_until_ready(container)


def _generic(name: str, port: int, env: dict[str, str]) -> Any:
    from testcontainers.core.container import DockerContainer

    container = DockerContainer(_image(name)).with_exposed_ports(port)
    for key, value in env.items():
        container = container.with_env(key, value)
    container.start()
    try:
        _wait_for_log(container, *_READY[name])
    except BaseException:
        container.stop()
        raise
    return container


def _address(container: Any, port: int) -> str:
    return f"{container.get_container_host_ip()}:{container.get_exposed_port(port)}"


def _rabbitmq() -> tuple[Any, str]:
    container = _generic("rabbitmq", 5672, {})
    return container, f"amqp://guest:guest@{_address(container, 5672)}/"


def _redis() -> tuple[Any, str]:
    container = _generic("redis", 6379, {})
    return container, f"redis://{_address(container, 6379)}/0"


def _kafka() -> tuple[Any, str]:
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:  # testcontainers < 4.14
        from testcontainers.kafka import KafkaContainer

    container = KafkaContainer(_image("kafka")).with_kraft()
    container.start()
    return container, f"kafka://{container.get_bootstrap_server()}"


def _sqs() -> tuple[Any, str]:
    container = _generic("sqs", 9324, {})
    return container, f"sqs://{_address(container, 9324)}?region=us-east-1&secure=false"


def _postgres() -> tuple[Any, str]:
    env = {"POSTGRES_USER": "msgkit", "POSTGRES_PASSWORD": "msgkit", "POSTGRES_DB": "msgkit"}
    container = _generic("postgres", 5432, env)
    return container, f"postgresql://msgkit:msgkit@{_address(container, 5432)}/msgkit"


_STARTERS: dict[str, Callable[[], tuple[Any, str]]] = {
    "rabbitmq": _rabbitmq,
    "redis": _redis,
    "kafka": _kafka,
    "sqs": _sqs,
    "postgres": _postgres,
}


def start_container(name: str) -> tuple[Any, str]:
    """Start broker ``name`` in a container; return the container (call ``.stop()``) and its msgkit URL."""
    return _STARTERS[name]()
