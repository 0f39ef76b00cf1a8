"""The capability matrix: generated from the code, recorded by the plugin, checked against results."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from msgkit import Capabilities
from msgkit.testing import matrix
from msgkit.testing.matrix import COLUMNS, check_results, contract_tests, declared, render, transport_id

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- the generated page


def test_the_committed_page_is_what_the_code_declares() -> None:
    committed = (ROOT / matrix.PAGE).read_text(encoding="utf-8")
    assert committed == render(), (
        "docs/capabilities.md is stale: python -m msgkit.testing.matrix --write docs/capabilities.md"
    )


def test_the_page_shows_each_column_s_declared_values() -> None:
    rows: dict[str, list[str]] = {}
    for line in render().splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            rows.setdefault(cells[0].strip("`"), cells[1:])  # the matrix comes before the meanings
    for index, column in enumerate(COLUMNS):
        _, capabilities = declared(column)
        assert rows["fan_out"][index] == ("yes" if capabilities.fan_out else "no"), column.id
        assert rows["ordered"][index] == ("yes" if capabilities.ordered else "no"), column.id
    assert rows["exclusive_keys"] == ["no", "no", "no", "no", "no", "yes"]  # only SQS FIFO
    assert rows["max_message_size"][0] == "1 MiB"


def test_every_capability_is_described_by_the_capabilities_docstring() -> None:
    descriptions = matrix.capability_descriptions()
    assert list(descriptions) == [f.name for f in dataclasses.fields(Capabilities)]
    assert all(descriptions.values()), f"fields without a description: {[k for k, v in descriptions.items() if not v]}"


def test_every_capability_has_a_marked_contract_test() -> None:
    untested = {field for field, tests in contract_tests().items() if not tests}
    assert not untested, f"capabilities no contract test is marked with: {sorted(untested)}"
    assert "test_groups::test_every_group_receives_every_message" in contract_tests()["fan_out"]


def test_the_cli_check_fails_on_a_stale_page_and_passes_on_a_fresh_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "capabilities.md"
    assert matrix.main(["--write", str(page)]) == 0
    assert matrix.main(["--check", str(page)]) == 0
    page.write_text(page.read_text().replace("| `fan_out` | yes", "| `fan_out` | no"), encoding="utf-8")
    assert matrix.main(["--check", str(page)]) == 1
    assert "is stale" in capsys.readouterr().err


# ---------------------------------------------------------------- checking contract results


def _run(column_id: str, outcome: str = "passed", **overrides: dict[str, Any]) -> dict[str, Any]:
    """A results entry for ``column_id`` in which every marked contract test had ``outcome``."""
    column = next(c for c in COLUMNS if c.id == column_id)
    cls, capabilities = declared(column)
    tests: dict[str, dict[str, Any]] = {}
    for field, names in contract_tests().items():
        for name in names:
            tests[name.partition("::")[2]] = {"outcome": outcome, "capabilities": [field], "skip_reason": None}
    tests.update(overrides)
    return {
        "url": column.url,
        "transport": transport_id(cls),
        "declared": dataclasses.asdict(capabilities),
        "tests": tests,
    }


def test_results_where_every_declared_capability_passed_are_accepted() -> None:
    problems, notes = check_results([_run(column.id) for column in COLUMNS])
    assert (problems, notes) == ([], [])


def test_a_declared_capability_whose_test_was_skipped_is_not_proven() -> None:
    skipped = {"outcome": "skipped", "capabilities": ["persistent"], "skip_reason": "no broker restart command"}
    runs = [_run("kafka", test_broker_restarts_under_load_lose_nothing=skipped)]
    problems, _ = check_results(runs, every_column=False)
    assert len(problems) == 1
    assert "kafka" in problems[0]
    assert "persistent declared, not proven" in problems[0]
    assert "no broker restart command" in problems[0]

    problems, notes = check_results(runs, ["kafka:persistent"], every_column=False)
    assert problems == []
    assert len(notes) == 1
    assert "[allowed]" in notes[0]


def test_failed_and_missing_tests_of_declared_capabilities_are_not_proven() -> None:
    failed = {"outcome": "failed", "capabilities": ["max_message_size"], "skip_reason": None}
    run = _run("memory", test_a_message_too_large_is_refused_before_it_reaches_the_broker=failed)
    del run["tests"]["test_per_key_order_holds_while_different_keys_run_in_parallel"]
    problems, _ = check_results([run], every_column=False)
    assert any("max_message_size declared, not proven" in p and "failed" in p for p in problems)
    assert any("ordered declared, not proven" in p and "not run" in p for p in problems)


def test_capabilities_not_declared_may_be_skipped() -> None:
    # SQS standard declares neither fan_out nor replay_for_new_group nor ordered: skipping is right
    problems, _ = check_results([_run("sqs", outcome="skipped")], every_column=False)
    skipped_fields = {p.split(": ")[1].split(" declared")[0] for p in problems}
    _, sqs = declared(next(c for c in COLUMNS if c.id == "sqs"))
    assert skipped_fields == {f for f, v in dataclasses.asdict(sqs).items() if v is not False}
    assert "fan_out" not in skipped_fields


def test_every_column_needs_a_run_unless_partial() -> None:
    problems, _ = check_results([_run("memory")])
    assert sorted(p.split(":")[0] for p in problems) == sorted(c.id for c in COLUMNS if c.id != "memory")
    assert check_results([_run("memory")], every_column=False) == ([], [])


def test_sqs_fifo_results_are_told_apart_from_sqs_standard() -> None:
    problems, _ = check_results([_run("sqs")], every_column=True)
    assert any(p.startswith("sqs-fifo:") for p in problems)
    assert not any(p.startswith("sqs:") for p in problems)


# ---------------------------------------------------------------- the plugin records results

RECORDED = """
import pytest
from msgkit.testing.contract.helpers import require

@pytest.mark.msgkit_capability("fan_out")
def test_fans_out(msgkit_contract_url):
    pass

@pytest.mark.msgkit_capability("persistent")
def test_restarts(msgkit_contract_url):
    require(False, "persistent")

@pytest.mark.parametrize("n", [1, 2])
def test_parametrized(msgkit_contract_url, n):
    assert n == 1

def test_not_a_contract_test():
    pass
"""


@pytest.fixture
def pytester(pytester: pytest.Pytester) -> pytest.Pytester:
    """pytester with an ini file, so that pytest-asyncio does not warn in the inner runs."""
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    return pytester


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("MSGKIT_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_the_plugin_writes_each_contract_test_s_outcome_and_capabilities(
    pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(RECORDED)
    out = pytester.path / "out" / "results.json"
    result = pytester.runpytest("--msgkit-url", "memory://recorded", "--msgkit-results", str(out))
    result.assert_outcomes(passed=3, skipped=1, failed=1)

    data = json.loads(out.read_text())
    assert data["format"] == 1
    [run] = data["runs"]
    assert run["url"] == "memory://recorded"
    assert run["transport"] == "msgkit.transports.memory.MemoryTransport"
    assert run["declared"]["fan_out"] is True
    assert run["declared"]["persistent"] is False
    assert run["tests"] == {
        "test_fans_out": {"outcome": "passed", "capabilities": ["fan_out"], "skip_reason": None},
        "test_parametrized": {"outcome": "failed", "capabilities": [], "skip_reason": None},
        "test_restarts": {
            "outcome": "skipped",
            "capabilities": ["persistent"],
            "skip_reason": "the transport does not declare Capabilities.persistent",
        },
    }


def test_the_results_path_may_come_from_the_environment_and_urls_are_redacted(
    pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile("def test_url(msgkit_contract_url):\n    pass\n")
    out = pytester.path / "env-results.json"
    clean_env.setenv("MSGKIT_CONTRACT_RESULTS", str(out))
    result = pytester.runpytest("--msgkit-url", "amqp://user:s3cr3t@localhost/")
    result.assert_outcomes(passed=1)
    text = out.read_text()
    assert "s3cr3t" not in text
    assert json.loads(text)["runs"][0]["url"] == "amqp://user:***@localhost/"
