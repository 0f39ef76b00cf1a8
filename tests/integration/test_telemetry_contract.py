"""OpenTelemetry on every transport in the environment: one trace from send to handler, the
semantic-convention attributes, and trace context that survives a retry and a dead letter.

Parametrized like the contract suite (``msgkit_contract_url``: memory:// plus each
``MSGKIT_<BROKER>_URL`` whose scheme has a transport), with the SDK's in-memory exporter.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import msgkit
from msgkit.telemetry import instrument, messaging_system
from msgkit.testing.contract.helpers import ContractRun, contract_run, eventually

FAST_RETRY = msgkit.RetryPolicy(initial_delay=0.0, max_delay=0.0, jitter=0.0, max_attempts=5)


class Spans:
    """An SDK tracer provider exporting to memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])

    def of(self, kind: SpanKind, topic: str) -> list[ReadableSpan]:
        """Finished spans of ``kind`` about ``topic``, oldest first."""
        return self._find(kind, "messaging.destination.name", topic)

    def about(self, kind: SpanKind, message_id: str) -> list[ReadableSpan]:
        """Finished spans of ``kind`` about message ``message_id``, oldest first."""
        return self._find(kind, "messaging.message.id", message_id)

    def _find(self, kind: SpanKind, attribute: str, value: str) -> list[ReadableSpan]:
        found = [
            s
            for s in self.exporter.get_finished_spans()
            if s.kind == kind and s.attributes and s.attributes.get(attribute) == value
        ]
        return sorted(found, key=lambda s: s.start_time or 0)


@pytest.fixture
def spans() -> Iterator[Spans]:
    found = Spans()
    yield found
    found.tracer_provider.shutdown()
    found.meter_provider.shutdown()


@pytest_asyncio.fixture
async def run(msgkit_contract_url: str, spans: Spans) -> AsyncIterator[ContractRun]:
    async with contract_run(msgkit_contract_url) as run:
        instrument(run.broker, tracer_provider=spans.tracer_provider, meter_provider=spans.meter_provider)
        yield run


class Handler:
    """Records each delivery and the span current in the handler; fails while ``fails(delivery)``."""

    def __init__(self, fails: Any = None) -> None:
        self.fails = fails or (lambda delivery: None)
        self.calls: list[tuple[msgkit.Delivery, trace.SpanContext]] = []

    async def __call__(self, delivery: msgkit.Delivery) -> None:
        self.calls.append((delivery, trace.get_current_span().get_span_context()))
        error = self.fails(delivery)
        if error is not None:
            raise error


def assert_child(span: ReadableSpan, parent: ReadableSpan) -> None:
    assert span.context.trace_id == parent.context.trace_id, "not in the producer's trace"
    assert span.parent is not None, "a root span"
    assert span.parent.span_id == parent.context.span_id, "not the producer's child"


@pytest.mark.asyncio
async def test_one_trace_from_send_to_handler_with_the_messaging_attributes(
    run: ContractRun, spans: Spans, msgkit_contract_url: str
) -> None:
    topic, group = run.names()
    await run.broker.declare(topic, group)
    body = b'{"order": 1}'
    with spans.tracer_provider.get_tracer("test").start_as_current_span("request") as request:
        message_id = await run.broker.send(topic, body, key="k1")
    handler = Handler()
    await run.start(topic, group, handler)
    await eventually(lambda: len(spans.of(SpanKind.CONSUMER, topic)) == 1, what="a process span")

    (send,) = spans.of(SpanKind.PRODUCER, topic)
    (process,) = spans.of(SpanKind.CONSUMER, topic)
    assert send.parent is not None
    assert send.parent.span_id == request.get_span_context().span_id
    assert_child(process, send)
    (delivery, current) = handler.calls[0]
    assert current == process.context, "the handler does not run inside the process span"
    assert "traceparent" in delivery.headers

    system = messaging_system(msgkit_contract_url)
    assert send.name == f"{topic} send"
    assert process.name == f"{topic} process"
    assert send.attributes is not None
    assert process.attributes is not None
    for span, operation in ((send, "send"), (process, "process")):
        assert span.attributes is not None
        assert span.attributes["messaging.system"] == system
        assert span.attributes["messaging.destination.name"] == topic
        assert span.attributes["messaging.operation.type"] == operation
        assert span.attributes["messaging.message.id"] == message_id
        assert span.attributes["messaging.message.body.size"] == len(body)
        if system != "memory":
            assert span.attributes["server.address"]
    assert process.attributes["messaging.consumer.group.name"] == group
    assert process.attributes["msgkit.delivery.attempt"] == 1
    assert process.status.status_code is StatusCode.UNSET
    if system == "kafka":  # the one transport with partitions and offsets
        assert process.attributes["messaging.destination.partition.id"] in ("0", "1", "2")
        assert isinstance(process.attributes["messaging.kafka.offset"], int)


@pytest.mark.asyncio
async def test_trace_context_survives_a_retry(run: ContractRun, spans: Spans) -> None:
    topic, group = run.names()
    await run.broker.declare(topic, group)
    await run.broker.send(topic, b"x")
    handler = Handler(lambda d: RuntimeError("first delivery fails") if d.attempt == 1 else None)
    await run.start(topic, group, handler, retry=FAST_RETRY)
    await eventually(lambda: len(spans.of(SpanKind.CONSUMER, topic)) == 2, what="two process spans")

    (send,) = spans.of(SpanKind.PRODUCER, topic)
    failed, handled = spans.of(SpanKind.CONSUMER, topic)
    assert_child(failed, send)
    assert_child(handled, send)
    assert failed.attributes is not None
    assert handled.attributes is not None
    assert handled.attributes["msgkit.delivery.attempt"] >= 2  # type: ignore[operator]
    assert [e.name for e in failed.events] == ["exception", "retry"]
    assert failed.status.status_code is StatusCode.ERROR
    assert handled.status.status_code is StatusCode.UNSET


@pytest.mark.asyncio
async def test_a_dead_letter_is_an_event_and_keeps_the_trace_context(run: ContractRun, spans: Spans) -> None:
    topic, group = run.names()
    await run.broker.declare(topic, group)
    message_id = await run.broker.send(topic, b"poison")
    await run.start(topic, group, Handler(lambda d: msgkit.Reject("not for us")))
    dead = await run.dead_letters(topic, group)  # a dead-letter consumer of the same broker: traced too
    await eventually(lambda: len(dead.deliveries) == 1, what="the dead letter")
    await eventually(lambda: len(spans.about(SpanKind.CONSUMER, message_id)) == 2, what="two process spans")

    (send,) = spans.of(SpanKind.PRODUCER, topic)
    rejected, dead_letter = spans.about(SpanKind.CONSUMER, message_id)
    assert_child(rejected, send)
    assert [e.name for e in rejected.events] == ["exception", "dead_letter"]
    assert rejected.status.status_code is StatusCode.ERROR
    assert_child(dead_letter, send)  # the dead letter carries the producer's context
