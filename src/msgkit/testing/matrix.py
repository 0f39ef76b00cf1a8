"""The capability matrix: generated from the transports' declared Capabilities, checked against the contract suite.

Nothing in the matrix is written by hand. Each column is a built-in transport built (not connected)
from a representative URL; each row is a :class:`msgkit.Capabilities` field, described by that
class's docstring; the tests that exercise a row are the contract tests marked
``@pytest.mark.msgkit_capability("<field>")``.

Usage::

    python -m msgkit.testing.matrix --write docs/capabilities.md   # regenerate the page
    python -m msgkit.testing.matrix --check docs/capabilities.md   # fail if the page is stale
    python -m msgkit.testing.matrix --results contract.json [--allow-unproven sqs:persistent]

``--results`` reads files written by the contract suite with ``--msgkit-results PATH`` and fails
when a transport declares a capability whose contract tests did not pass on it (declared but not
proven), or when a column of the matrix has no run in the results (``--partial`` drops that
second rule, for a subset of the brokers or a transport of your own).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import inspect
import json
import pkgutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msgkit.testing.results import MARKER
from msgkit.transports.base import Capabilities, Transport
from msgkit.transports.registry import transport_from_url

#: The page this module writes, relative to the repository root.
PAGE = Path("docs/capabilities.md")


@dataclass(frozen=True, slots=True)
class Column:
    """One transport configuration of the matrix."""

    #: Short id, used by ``--allow-unproven ID:CAPABILITY``.
    id: str
    title: str
    #: A representative URL: the transport is built from it without connecting.
    url: str
    #: The transport's page, relative to docs/.
    page: str


COLUMNS: tuple[Column, ...] = (
    Column("memory", "memory", "memory://", "transports/memory.md"),
    Column("rabbitmq", "RabbitMQ", "amqp://localhost/", "transports/rabbitmq.md"),
    Column("redis", "Redis Streams", "redis://localhost/0", "transports/redis.md"),
    Column("kafka", "Kafka", "kafka://localhost:9092", "transports/kafka.md"),
    Column("sqs", "SQS standard", "sqs://localhost?region=us-east-1", "transports/sqs.md"),
    Column("sqs-fifo", "SQS FIFO", "sqs://localhost?region=us-east-1&fifo=true", "transports/sqs.md"),
)


# ---------------------------------------------------------------- what the code declares


def capability_descriptions() -> dict[str, str]:
    """Each Capabilities field and its description, from the class docstring's ``Attributes:``."""
    doc = inspect.getdoc(Capabilities) or ""
    described: dict[str, str] = {}
    current: str | None = None
    in_attributes = False
    for line in doc.splitlines():
        if line.strip() == "Attributes:":
            in_attributes = True
            continue
        if not in_attributes or not line.strip():
            continue
        if line.startswith("    ") and not line.startswith("        ") and ":" in line:
            current, _, text = line.strip().partition(":")
            described[current] = text.strip()
        elif current is not None:
            described[current] += " " + line.strip()
    return {f.name: described.get(f.name, "") for f in dataclasses.fields(Capabilities)}


def declared(column: Column) -> tuple[type[Transport], Capabilities]:
    """The transport class serving ``column.url`` and the capabilities it declares (no connection)."""
    transport = transport_from_url(column.url)
    return type(transport), transport.capabilities


def transport_id(cls: type[Transport]) -> str:
    """``module.QualifiedName`` of a transport class, as the results file records it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def contract_tests() -> dict[str, list[str]]:
    """Each Capabilities field and the contract tests marked as exercising it (sorted)."""
    import msgkit.testing.contract as contract

    tests: dict[str, list[str]] = {f.name: [] for f in dataclasses.fields(Capabilities)}
    for info in sorted(pkgutil.iter_modules(contract.__path__), key=lambda i: i.name):
        if not info.name.startswith("test_"):
            continue
        module = importlib.import_module(f"{contract.__name__}.{info.name}")
        for name, function in sorted(vars(module).items()):
            if not name.startswith("test_"):
                continue
            for mark in getattr(function, "pytestmark", []):
                if mark.name == MARKER:
                    for field in mark.args:
                        if field not in tests:
                            raise ValueError(f"{info.name}.{name} is marked with unknown capability {field!r}")
                        tests[field].append(f"{info.name}::{name}")
    return {field: sorted(names) for field, names in tests.items()}


def _value(field: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if field == "max_message_size":
        for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value % size == 0:
                return f"{value // size} {unit}"
        return f"{value:,} B"
    if isinstance(value, float):
        return f"{value:g} s"
    return str(value)


def _footnote(cls: type[Transport]) -> str | None:
    """The transport's own docstring on ``capabilities``, when it adds one (e.g. known after connect)."""
    prop = cls.__dict__.get("capabilities")
    doc = getattr(prop, "__doc__", None)  # its own, not inherited from Transport.capabilities
    return " ".join(doc.split()) if doc else None


def render() -> str:
    """The whole docs/capabilities.md page."""
    descriptions = capability_descriptions()
    tests = contract_tests()
    columns = [(column, *declared(column)) for column in COLUMNS]
    footnotes: list[str] = []
    headers = []
    for column, cls, _ in columns:
        note = _footnote(cls)
        mark = ""
        if note is not None:
            if note not in footnotes:
                footnotes.append(note)
            mark = f" [^{footnotes.index(note) + 1}]"
        headers.append(f"[{column.title}]({column.page}){mark}")

    lines = [
        "<!-- Generated by `python -m msgkit.testing.matrix --write docs/capabilities.md`: do not edit. -->",
        "",
        "# Capability matrix",
        "",
        "What each transport guarantees, as it declares in its `Capabilities` (`broker.capabilities`).",
        "This page is generated from the code: each column is the transport built, without connecting,",
        "from the URL shown below it with default options; numbers change with URL options (a longer",
        "visibility timeout, a larger message limit). The contract suite skips a test whose capability",
        "a transport does not declare, and CI checks the suite's results against this table: a",
        "capability declared here whose contract tests did not pass on that broker fails the build.",
        "",
        "| capability | " + " | ".join(headers) + " |",
        "| --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    for field in descriptions:
        values = [_value(field, getattr(caps, field)) for _, _, caps in columns]
        lines.append(f"| `{field}` | " + " | ".join(values) + " |")
    lines.append("| URL | " + " | ".join(f"`{column.url}`" for column, _, _ in columns) + " |")
    lines += ["", "## What each capability means and which contract tests exercise it", ""]
    lines += ["| capability | meaning | contract tests |", "| --- | --- | --- |"]
    for field, text in descriptions.items():
        proof = "<br>".join(f"`{name}`" for name in tests[field]) or "none yet: declared, not tested"
        lines.append(f"| `{field}` | {text} | {proof} |")
    lines += [
        "",
        "Test names are `module::function` in `msgkit.testing.contract`; see [Testing](testing.md) to",
        "run the suite against your own broker, and [Writing a transport](writing-a-transport.md) for",
        "how a new transport declares its capabilities.",
    ]
    if footnotes:
        lines.append("")
        lines += [f"[^{n}]: {text}" for n, text in enumerate(footnotes, start=1)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- checking a contract run


def _booleans(capabilities: dict[str, Any]) -> dict[str, bool]:
    return {k: v for k, v in capabilities.items() if isinstance(v, bool)}


def _column_of(run: dict[str, Any], columns: Sequence[tuple[Column, str, dict[str, bool]]]) -> str:
    """The id of the matrix column ``run`` belongs to, else its URL scheme (a transport of yours)."""
    for column, transport, booleans in columns:
        if run.get("transport") == transport and _booleans(run.get("declared", {})) == booleans:
            return column.id
    return str(run.get("url", "")).partition(":")[0] or "unknown"


def check_results(
    runs: Sequence[dict[str, Any]], allowed: Iterable[str] = (), *, every_column: bool = True
) -> tuple[list[str], list[str]]:
    """Check contract runs against what their transports declare; return (problems, notes).

    For every run, each capability its URL declares (a yes, or any number) must have every
    contract test marked with it passed on that run: otherwise the capability is declared but not
    proven. A run belongs to a matrix column when it used the column's transport class and declared
    the same yes/no capabilities (numbers may differ: the suite runs memory:// with a short
    visibility timeout); with ``every_column`` each column must have a run. ``allowed`` lists
    ``COLUMN:CAPABILITY`` pairs (the column id, or the URL scheme of a transport outside the
    matrix) whose unproven state is accepted, e.g. a broker the CI cannot restart; those are notes.
    """
    allowed = set(allowed)
    tests = contract_tests()
    columns = []
    for column in COLUMNS:
        cls, capabilities = declared(column)
        columns.append((column, transport_id(cls), _booleans(dataclasses.asdict(capabilities))))
    problems: list[str] = []
    notes: list[str] = []
    covered = set()
    for run in runs:
        column_id = _column_of(run, columns)
        covered.add(column_id)
        outcomes: dict[str, dict[str, Any]] = run.get("tests", {})
        if not run.get("declared"):
            problems.append(f"{column_id} ({run.get('url')}): its transport could not be built: {run.get('transport')}")
        for field, value in run.get("declared", {}).items():
            if value is False:
                continue  # not declared: its tests are skipped, as they should be
            for test in tests.get(field, []):
                result = outcomes.get(test.partition("::")[2])
                if result is not None and result["outcome"] == "passed":
                    continue
                status = "not run" if result is None else result["outcome"]
                reason = None if result is None else result.get("skip_reason")
                detail = f"{column_id} ({run['url']}): {field} declared, not proven: {test} {status}"
                detail += f" ({reason})" if reason else ""
                if f"{column_id}:{field}" in allowed:
                    notes.append(f"{detail} [allowed]")
                else:
                    problems.append(detail)
    if every_column:
        for column, _, _ in columns:
            if column.id not in covered:
                problems.append(f"{column.id}: no contract run in the results declares what {column.url} declares")
    return problems, notes


def load_runs(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """The runs of every results file; a file of an unknown format is an error."""
    runs: list[dict[str, Any]] = []
    for path in paths:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != 1:
            raise ValueError(f"{path}: unknown results format {data.get('format')!r}")
        runs += data["runs"]
    return runs


# ---------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m msgkit.testing.matrix", description=__doc__.split("\n")[0])
    parser.add_argument("--write", type=Path, metavar="PAGE", help="write the generated page here")
    parser.add_argument("--check", type=Path, metavar="PAGE", help="fail if PAGE differs from the generated page")
    parser.add_argument(
        "--results", type=Path, action="append", default=[], metavar="JSON",
        help="a contract-suite results file (pytest --msgkit-results JSON); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--partial", action="store_true",
        help="with --results: do not require a run for every column (a subset, or your own transport)",
    )  # fmt: skip
    parser.add_argument(
        "--allow-unproven", action="append", default=[], metavar="COLUMN:CAPABILITY",
        help="accept that this declared capability was not proven in the run (e.g. sqs:persistent)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not (args.write or args.check or args.results):
        print(render(), end="")
        return 0
    for pair in args.allow_unproven:
        column, _, field = pair.partition(":")
        if not column or field not in capability_descriptions():
            parser.error(f"--allow-unproven {pair!r}: expected COLUMN:CAPABILITY, e.g. sqs:persistent")
    status = 0
    page = render()
    if args.write:
        args.write.write_text(page, encoding="utf-8")
        print(f"wrote {args.write}")
    if args.check:
        current = args.check.read_text(encoding="utf-8") if args.check.exists() else ""
        if current != page:
            diff = difflib.unified_diff(
                current.splitlines(), page.splitlines(), str(args.check), "generated", lineterm=""
            )
            print("\n".join(diff))
            print(f"{args.check} is stale: run python -m msgkit.testing.matrix --write {args.check}", file=sys.stderr)
            status = 1
        else:
            print(f"{args.check} matches the declared capabilities")
    if args.results:
        problems, notes = check_results(load_runs(args.results), args.allow_unproven, every_column=not args.partial)
        for note in notes:
            print(f"note: {note}")
        for problem in problems:
            print(f"NOT PROVEN: {problem}", file=sys.stderr)
        if problems:
            status = 1
        else:
            print("every capability declared by the transports in the results was proven by the contract suite")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
