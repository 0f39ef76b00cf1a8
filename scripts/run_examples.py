#!/usr/bin/env python3
"""Run every example in examples/ and check that each one did what it says.

    python scripts/run_examples.py                 # all runs whose broker URL is set
    python scripts/run_examples.py -k swap -k kafka   # only runs whose name has "swap" or "kafka"
    python scripts/run_examples.py --list

Each run is one example as a subprocess with a time limit; it passes when it exits 0 and its
output has every expected line (so an example that silently does nothing fails). Examples on
memory:// always run. Per-broker runs take their URL from MSGKIT_RABBITMQ_URL, MSGKIT_REDIS_URL,
MSGKIT_KAFKA_URL, MSGKIT_SQS_URL or MSGKIT_POSTGRES_URL and pass it as MSGKIT_URL (or
DATABASE_URL); when it is not set the run is skipped with a note, or fails under
MSGKIT_REQUIRE_BROKERS=1. The tracing runs export OTLP/HTTP to a receiver this script starts on
127.0.0.1, which decodes the protobuf requests and checks that producer and consumer spans of
one trace arrived. Exits 1 if any run failed.

Needs ``pip install -e ".[examples]"`` (``nox -s examples`` does that).
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BROKERS = {  # transport name -> the variable holding its URL
    "rabbitmq": "MSGKIT_RABBITMQ_URL",
    "redis": "MSGKIT_REDIS_URL",
    "kafka": "MSGKIT_KAFKA_URL",
    "sqs": "MSGKIT_SQS_URL",
}
POSTGRES = "MSGKIT_POSTGRES_URL"


# ---------------------------------------------------------------------------- the runs


@dataclass(frozen=True)
class Run:
    """One example run: the script, where it runs, and the lines its output must have."""

    name: str
    script: str  # a file in examples/ (or an absolute path)
    expect: tuple[str, ...]  # regular expressions, each must match a line of the output
    env: Mapping[str, str] = field(default_factory=dict)
    needs: str | None = None  # the variable whose URL this run needs
    url_suffix: str = ""  # appended to that URL (e.g. "&fifo=true")
    url_as: str = "MSGKIT_URL"  # the variable the example reads the URL from
    otlp: bool = False  # export traces to the runner's OTLP receiver and check them
    timeout: float = 120

    def on(self, variable: str, *, url_suffix: str = "", url_as: str = "MSGKIT_URL") -> Run:
        """This run against the URL in ``variable`` (plus ``url_suffix``), passed as ``url_as``."""
        return replace(self, needs=variable, url_suffix=url_suffix, url_as=url_as)


_IN_ORDER = r"^per-key order kept for 6 of 6 accounts; up to \d+ accounts in parallel; 0 overlaps"
_THROUGH_OUTBOX = r"^3 of 3 orders reached the consumer through the outbox; 0 outbox row\(s\) pending"
_TRACED = r"^traced 3 orders from checkout to billing"
_REPLAYED = (
    r"^dead letter .*: ConnectionError after 3 attempt\(s\): attempts exhausted",
    r"^dead letter .*: DecodeError after 1 attempt\(s\)",
    r"^order 3 billed after replay \(attempt 1\); 0 dead letter\(s\) left",
)
_INVOICED = tuple(rf"^order {n}: 1 invoice\(s\)$" for n in (101, 102, 103))
# each broker's own example: (script, what it must print)
_OWN_EXAMPLE = {
    "rabbitmq": ("rabbitmq.py", (r"^billed order 3: .*\(attempt 2\)", r"^dead letter .*order 5 is malformed")),
    "redis": ("redis_streams.py", (r"^billed order 2: .*\(attempt 2\)", r"^dead letter .*order 4 is fraudulent")),
    "kafka": ("kafka.py", (r"^billed order 2 of .*\(attempt 2\)", r"^dead letter .*order 7 is fraudulent")),
    "sqs": ("sqs.py", (r"^billed order 2 of .*\(attempt 2\)", r"^dead letter .*order 7 is fraudulent")),
}


def planned_runs() -> list[Run]:
    """Every run, in the order they go."""
    mem = {"MSGKIT_URL": "memory://"}
    sqlite = {**mem, "DATABASE_URL": "", "MSGKIT_POSTGRES_URL": ""}  # the SQL examples fall back to SQLite
    runs = [
        Run("quickstart", "quickstart.py", (r"^billing order 3: 28\.50",), mem),
        Run("swap_brokers on memory", "swap_brokers.py", (r"^swap: 10 of 10 orders handled by shipping",), mem),
        Run("retries_dead_letters on memory", "retries_dead_letters.py", _REPLAYED, mem),
        Run("ordered_by_key on memory", "ordered_by_key.py", (_IN_ORDER,), mem),
        Run("outbox_service (sqlite)", "outbox_service.py", (r"^  published: order 3 for ada \(7\)",), sqlite),
        Run("inbox_consumer (sqlite)", "inbox_consumer.py", _INVOICED, sqlite),
        Run("fastapi_outbox (sqlite)", "fastapi_outbox.py", (_THROUGH_OUTBOX, r"^database sqlite"), sqlite),
        Run("fastapi_outbox (postgres)", "fastapi_outbox.py", (_THROUGH_OUTBOX, r"^database postgresql"), mem).on(
            POSTGRES, url_as="DATABASE_URL"
        ),
        Run("tracing on memory (OTLP)", "tracing.py", (_TRACED,), mem, otlp=True),
    ]
    for broker, variable in BROKERS.items():
        script, expect = _OWN_EXAMPLE[broker]
        handled = "billing" if broker == "sqs" else "shipping"  # SQS does not fan out to a second group
        fifo = "&fifo=true" if broker == "sqs" else ""  # standard SQS queues do not keep order
        runs += [
            Run(script.removesuffix(".py"), script, expect).on(variable),
            Run(f"swap_brokers on {broker}", "swap_brokers.py", (rf"^swap: 10 of 10 orders handled by {handled}",)).on(
                variable
            ),
            Run(f"retries_dead_letters on {broker}", "retries_dead_letters.py", _REPLAYED).on(variable),
            Run(f"ordered_by_key on {broker}{' fifo' if fifo else ''}", "ordered_by_key.py", (_IN_ORDER,)).on(
                variable, url_suffix=fifo
            ),
            Run(f"tracing on {broker} (OTLP)", "tracing.py", (_TRACED,), otlp=True).on(variable),
        ]
    return runs


# ---------------------------------------------------------------------------- the OTLP receiver


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str  # e.g. "SPAN_KIND_PRODUCER"
    name: str


class OtlpReceiver:
    """A minimal OTLP/HTTP collector on 127.0.0.1: decodes the protobuf export requests it gets
    (``/v1/traces``, ``/v1/metrics``) and keeps the spans and metric names."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.metric_names: set[str] = set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def clear(self) -> None:
        with self._lock:
            self.spans.clear()
            self.metric_names.clear()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                try:
                    reply = receiver._take(self.path, body)
                except Exception as exc:  # a malformed request: tell the exporter, keep serving
                    self.send_error(400, f"cannot decode {self.path}: {exc}")
                    return
                if reply is None:
                    self.send_error(404, f"no OTLP endpoint at {self.path}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
                pass  # quiet: the summary says what arrived

        return Handler

    def _take(self, path: str, body: bytes) -> bytes | None:
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
        from opentelemetry.proto.trace.v1 import trace_pb2

        if path == "/v1/traces":
            traces = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            spans = [
                ReceivedSpan(
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(),
                    kind=trace_pb2.Span.SpanKind.Name(span.kind),
                    name=span.name,
                )
                for resource in traces.resource_spans
                for scope in resource.scope_spans
                for span in scope.spans
            ]
            with self._lock:
                self.spans.extend(spans)
            return bytes(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())
        if path == "/v1/metrics":
            metrics = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
            names = {m.name for r in metrics.resource_metrics for s in r.scope_metrics for m in s.metrics}
            with self._lock:
                self.metric_names |= names
            return bytes(metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString())
        return None


def check_trace(spans: Sequence[ReceivedSpan]) -> tuple[bool, str]:
    """Whether a producer span and a consumer span of one trace arrived, the consumer's parent
    being a producer span; and a note saying what was found."""
    producers = {s.span_id: s for s in spans if s.kind == "SPAN_KIND_PRODUCER"}
    joined = [s for s in spans if s.kind == "SPAN_KIND_CONSUMER" and s.parent_span_id in producers]
    joined = [s for s in joined if producers[s.parent_span_id].trace_id == s.trace_id]
    if not joined:
        kinds = sorted({s.kind for s in spans})
        return False, f"among {len(spans)} span(s) {kinds}, no consumer span is the child of a producer span"
    traces = len({s.trace_id for s in joined})
    return True, f"{len(spans)} spans; {len(joined)} consumer spans are children of producer spans ({traces} trace(s))"


# ---------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Result:
    run: Run
    status: str  # "passed", "failed" or "skipped"
    seconds: float
    note: str = ""
    output: str = ""


def broker_url(run: Run, environ: Mapping[str, str]) -> str | None:
    """The URL a per-broker run needs, or None when it is not set."""
    if run.needs is None:
        return None
    url = environ.get(run.needs, "").strip()
    return url + run.url_suffix if url else None


def missing_output(expect: Sequence[str], output: str) -> list[str]:
    """The expected patterns that no line of ``output`` matches."""
    return [pattern for pattern in expect if not re.search(pattern, output, re.MULTILINE)]


def run_one(run: Run, environ: Mapping[str, str], require: bool, receiver: OtlpReceiver | None) -> Result:
    env = {**environ, "PYTHONUNBUFFERED": "1", **run.env}
    if run.needs is not None:
        url = broker_url(run, environ)
        if url is None:
            status = "failed" if require else "skipped"
            return Result(run, status, 0.0, f"{run.needs} is not set")
        env[run.url_as] = url
    if run.otlp:
        if receiver is None:
            return Result(run, "failed", 0.0, "no OTLP receiver (opentelemetry-proto is not installed?)")
        receiver.clear()
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, str(EXAMPLES / run.script)],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=run.timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        output = _text(exc.stdout) + _text(exc.stderr)
        return Result(run, "failed", time.monotonic() - started, f"timed out after {run.timeout:.0f} s", output)
    seconds = time.monotonic() - started
    output = done.stdout + ("\n--- stderr\n" + done.stderr if done.stderr else "")
    if done.returncode != 0:
        return Result(run, "failed", seconds, f"exit code {done.returncode}", output)
    missing = missing_output(run.expect, done.stdout)
    if missing:
        return Result(run, "failed", seconds, f"no output line matches {missing[0]!r}", output)
    if run.otlp and receiver is not None:
        ok, note = check_trace(list(receiver.spans))
        metrics = sorted(name for name in receiver.metric_names if name.startswith("msgkit."))
        return Result(run, "passed" if ok else "failed", seconds, f"{note}; {len(metrics)} msgkit metrics", output)
    return Result(run, "passed", seconds)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


@contextmanager
def otlp_receiver(wanted: bool) -> Iterator[OtlpReceiver | None]:
    if not wanted:
        yield None
        return
    try:
        import opentelemetry.proto  # noqa: F401 - only checks it is installed
    except ImportError:
        yield None
        return
    with OtlpReceiver() as receiver:
        yield receiver


def run_all(
    runs: Sequence[Run],
    environ: Mapping[str, str],
    require: bool,
    report: Callable[[str], None] = print,
) -> list[Result]:
    results = []
    with otlp_receiver(any(run.otlp for run in runs)) as receiver:
        for run in runs:
            result = run_one(run, environ, require, receiver)
            results.append(result)
            note = f"  ({result.note})" if result.note else ""
            report(f"{result.status.upper():<8}{run.name:<40}{result.seconds:6.1f}s{note}")
            if result.status == "failed" and result.output:
                report("    " + "\n    ".join(result.output.rstrip().splitlines()[-40:]))
    return results


def summary(results: Sequence[Result]) -> str:
    count = {status: sum(r.status == status for r in results) for status in ("passed", "failed", "skipped")}
    line = f"examples: {count['passed']} passed, {count['failed']} failed"
    return line + (f", {count['skipped']} skipped" if count["skipped"] else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("-k", dest="only", action="append", default=[], help="run only runs whose name has this text")
    parser.add_argument("--list", action="store_true", help="list the runs and exit")
    args = parser.parse_args(argv)
    runs = [r for r in planned_runs() if not args.only or any(text in r.name for text in args.only)]
    if args.list:
        for run in runs:
            print(f"{run.name:<40}examples/{run.script}{f'  (needs {run.needs})' if run.needs else ''}")
        return 0
    if not runs:
        print(f"no run matches {args.only}", file=sys.stderr)
        return 2
    require = os.environ.get("MSGKIT_REQUIRE_BROKERS") == "1"
    started = time.monotonic()
    results = run_all(runs, os.environ, require)
    missing = sorted({r.run.needs for r in results if r.status == "skipped" and r.run.needs})
    if missing:
        print(f"note: skipped the runs that need {', '.join(missing)} (MSGKIT_REQUIRE_BROKERS=1 fails them instead)")
    print(f"{len(results)} example run(s) in {time.monotonic() - started:.0f}s")
    print(summary(results))
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
