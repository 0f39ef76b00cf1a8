"""Recording what the contract suite proved, per broker URL, for the capability matrix.

With ``--msgkit-results PATH`` (or ``$MSGKIT_CONTRACT_RESULTS``) the msgkit pytest plugin writes a
JSON file at the end of the session: for every URL the contract suite ran against, the transport,
the capabilities that URL declares (read without connecting) and, for every contract test, its
outcome, the capabilities it proves (its ``msgkit_capability`` marker) and why it was skipped.
``python -m msgkit.testing.matrix --results PATH`` checks that file against the declared
capabilities. Secrets are redacted from the URLs written.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from msgkit.config import redact_url

#: Version of the file's layout; bumped when it changes incompatibly.
FORMAT = 1
#: The marker a contract test carries to say which ``Capabilities`` fields it proves.
MARKER = "msgkit_capability"

_RANK = {"passed": 0, "skipped": 1, "failed": 2}


def declared_capabilities(url: str) -> tuple[str, dict[str, Any]]:
    """The transport class (``module.Name``) serving ``url`` and what it declares, without connecting."""
    from msgkit.transports.registry import transport_from_url

    transport = transport_from_url(url)
    cls = type(transport)
    return f"{cls.__module__}.{cls.__qualname__}", dataclasses.asdict(transport.capabilities)


def _skip_reason(report: pytest.TestReport) -> str | None:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return None


class ContractResults:
    """A pytest plugin object that collects contract-test outcomes and writes them to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._runs: dict[str, dict[str, dict[str, Any]]] = {}

    def record(self, item: pytest.Item, report: pytest.TestReport) -> None:
        """Fold one phase's report of ``item`` into its test's outcome (failed > skipped > passed)."""
        callspec = getattr(item, "callspec", None)
        url = callspec.params.get("msgkit_contract_url") if callspec is not None else None
        if not isinstance(url, str):
            return  # not a contract-suite test
        if report.when != "call" and report.passed:
            return  # a setup or teardown that went well says nothing about the test
        name = getattr(item, "originalname", item.name)
        capabilities = sorted({str(arg) for mark in item.iter_markers(MARKER) for arg in mark.args})
        outcome = report.outcome
        tests = self._runs.setdefault(url, {})
        previous = tests.get(name)
        if previous is not None and _RANK[previous["outcome"]] >= _RANK[outcome]:
            return  # a parametrized test: keep its worst outcome
        tests[name] = {
            "outcome": outcome,
            "capabilities": capabilities,
            "skip_reason": _skip_reason(report) if outcome == "skipped" else None,
        }

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        self.record(item, report)
        return report

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.write()

    def to_json(self) -> dict[str, Any]:
        """The file's content: one entry per URL, tests sorted by name."""
        runs = []
        for url, tests in self._runs.items():
            try:
                transport, declared = declared_capabilities(url)
            except Exception as exc:  # an unusable URL was already reported by the tests themselves
                transport, declared = f"unknown ({type(exc).__name__})", {}
            runs.append(
                {
                    "url": redact_url(url),
                    "transport": transport,
                    "declared": declared,
                    "tests": dict(sorted(tests.items())),
                }
            )
        return {"format": FORMAT, "runs": runs}

    def write(self) -> None:
        """Write the file (its folder is created if needed)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
