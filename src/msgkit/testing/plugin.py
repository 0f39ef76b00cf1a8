"""The msgkit pytest plugin, loaded automatically wherever msgkit is installed (entry point ``pytest11``).

It provides:

* ``msgkit_<broker>_url`` session fixtures (rabbitmq, redis, kafka, sqs, postgres): see
  :mod:`msgkit.testing.fixtures`;
* ``msgkit_contract_url``: the broker URL a contract-suite test runs against, parametrized over
  ``--msgkit-url`` (repeatable) or, without it, over ``memory://`` plus every ``MSGKIT_<BROKER>_URL``
  in the environment whose scheme has a registered transport; test ids are the URL schemes;
* ``msgkit_restart_command``: ``--msgkit-restart-command``, or ``$MSGKIT_<BROKER>_RESTART_COMMAND``
  for a URL that came from ``$MSGKIT_<BROKER>_URL``, or None;
* ``--msgkit-results PATH``: what the contract suite proved per URL, as JSON (see
  :mod:`msgkit.testing.results`), and the ``msgkit_capability`` marker that says which
  capabilities a contract test proves.

Importing this module has no side effects and imports no broker client.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from msgkit.testing.fixtures import (
    BROKER_ENV_VARS,
    msgkit_kafka_url,
    msgkit_postgres_url,
    msgkit_rabbitmq_url,
    msgkit_redis_url,
    msgkit_sqs_url,
)
from msgkit.testing.results import MARKER, ContractResults

__all__ = [
    "contract_urls",
    "msgkit_contract_url",
    "msgkit_kafka_url",
    "msgkit_postgres_url",
    "msgkit_rabbitmq_url",
    "msgkit_redis_url",
    "msgkit_restart_command",
    "msgkit_sqs_url",
]

_CONTRACT_URLS = pytest.StashKey[list[str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("msgkit", "msgkit broker fixtures and contract suite")
    group.addoption(
        "--msgkit-url",
        action="append",
        default=[],
        dest="msgkit_urls",
        metavar="URL",
        help="broker URL the msgkit contract suite runs against (repeatable); "
        "default: memory:// plus the MSGKIT_<BROKER>_URL variables whose scheme has a transport",
    )
    group.addoption(
        "--msgkit-restart-command",
        default=None,
        dest="msgkit_restart_command",
        metavar="CMD",
        help="shell command that restarts the broker; enables the contract suite's restart test",
    )
    group.addoption(
        "--msgkit-results",
        default=os.environ.get("MSGKIT_CONTRACT_RESULTS") or None,
        dest="msgkit_results",
        metavar="PATH",
        help="write what the contract suite proved per broker URL to this JSON file, for "
        "python -m msgkit.testing.matrix --results PATH (default: $MSGKIT_CONTRACT_RESULTS)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.hasplugin("timeout"):  # the restart test asks for more time
        config.addinivalue_line("markers", "timeout(seconds): per-test timeout (needs pytest-timeout)")
    config.addinivalue_line("markers", f"{MARKER}(*names): the Capabilities fields a contract test proves")
    results: str | None = config.getoption("msgkit_results")
    if results:
        config.pluginmanager.register(ContractResults(Path(results).resolve()), "msgkit-contract-results")


def memory_contract_url() -> str:
    """A private in-memory broker with a 1 s visibility timeout, so consumer-loss tests are quick."""
    return f"memory://contract-{uuid.uuid4().hex[:12]}?visibility_timeout=1"


def contract_urls(config: pytest.Config) -> list[str]:
    """The URLs the contract suite runs against in this session (computed once)."""
    urls = config.stash.get(_CONTRACT_URLS, None)
    if urls is None:
        given: list[str] = config.getoption("msgkit_urls") or []
        urls = list(given) if given else [memory_contract_url(), *_env_urls()]
        config.stash[_CONTRACT_URLS] = urls
    return urls


def _env_urls() -> list[str]:
    from msgkit.transports.registry import known_schemes

    schemes = set(known_schemes())
    urls = []
    for env_var in BROKER_ENV_VARS.values():
        url = os.environ.get(env_var, "").strip()
        if url and urlsplit(url).scheme.lower() in schemes:
            urls.append(url)
    return urls


def url_id(url: str) -> str:
    """A readable test id for ``url``: its scheme (``memory``, ``amqp``, ``kafka``...)."""
    return urlsplit(url).scheme.lower() or "url"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "msgkit_contract_url" in metafunc.fixturenames:
        urls = contract_urls(metafunc.config)
        metafunc.parametrize("msgkit_contract_url", urls, ids=[url_id(u) for u in urls], indirect=True)


@pytest.fixture
def msgkit_contract_url(request: pytest.FixtureRequest) -> str:
    """The broker URL this contract-suite test runs against (one parametrization per URL)."""
    url: str = request.param
    return url


@pytest.fixture
def msgkit_restart_command(request: pytest.FixtureRequest, msgkit_contract_url: str) -> str | None:
    """A shell command that restarts the broker at ``msgkit_contract_url``, or None."""
    given: str | None = request.config.getoption("msgkit_restart_command")
    if given:
        return given
    for name, env_var in BROKER_ENV_VARS.items():
        if os.environ.get(env_var, "").strip() == msgkit_contract_url:
            return os.environ.get(f"MSGKIT_{name.upper()}_RESTART_COMMAND") or None
    return None
