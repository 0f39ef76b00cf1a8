"""OpenTelemetry on memory:// with the SDK's in-memory exporters: one trace from send to handler,
semantic-convention attributes, retries and dead letters as events, the outbox path on SQLite,
metrics, the no-SDK path, the broker's middleware seam, and log records about messages."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

import msgkit
from msgkit.outbox import Outbox, OutboxRelay, create_schema, engine_from_url
from msgkit.telemetry import Telemetry, _add_position, instrument, messaging_system

from .conftest import eventually

REPO = Path(__file__).resolve().parents[2]
THEIRS = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"  # a context from elsewhere
FAST_RETRY = msgkit.RetryPolicy(initial_delay=0.0, max_delay=0.0, jitter=0.0, max_attempts=3)


@dataclass
class Otel:
    """An SDK tracer provider and meter provider that keep everything in memory."""

    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    @property
    def providers(self) -> dict[str, Any]:
        return {"tracer_provider": self.tracer_provider, "meter_provider": self.meter_provider}

    def finished(self, kind: SpanKind | None = None, name: str | None = None) -> list[ReadableSpan]:
        return [
            s
            for s in self.spans.get_finished_spans()
            if (kind is None or s.kind == kind) and (name is None or s.name == name)
        ]

    def points(self, name: str) -> list[Any]:
        """Data points of metric ``name`` (read now)."""
        data = self.metrics.get_metrics_data()
        found = []
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found

    def total(self, name: str, **attributes: Any) -> float:
        wanted = {k.replace("__", "."): v for k, v in attributes.items()}
        points = [p for p in self.points(name) if all(p.attributes.get(k) == v for k, v in wanted.items())]
        return sum(p.value if hasattr(p, "value") else p.count for p in points)


@pytest.fixture
def otel() -> Iterator[Otel]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    yield Otel(exporter, reader, tracer_provider, meter_provider)
    tracer_provider.shutdown()
    meter_provider.shutdown()


@pytest_asyncio.fixture
async def traced(memory_url: str, otel: Otel) -> AsyncIterator[msgkit.Broker]:
    broker = msgkit.Broker(memory_url)
    instrument(broker, **otel.providers)
    async with broker:
        yield broker


class Handler:
    """Records each delivery with the span current while it ran; fails the first ``fail`` times."""

    def __init__(self, fail: int = 0, error: Exception | None = None) -> None:
        self.fail = fail
        self.error = error or RuntimeError("boom")
        self.calls: list[tuple[msgkit.Delivery, trace.SpanContext]] = []

    async def __call__(self, delivery: msgkit.Delivery) -> None:
        self.calls.append((delivery, trace.get_current_span().get_span_context()))
        if len(self.calls) <= self.fail:
            raise self.error


async def consume(broker: msgkit.Broker, topic: str, handler: Any, count: int, **options: Any) -> msgkit.Consumer:
    options.setdefault("settle_interval", 0.005)
    consumer = broker.consumer(topic, "g", handler, **options)
    await consumer.start()
    await eventually(lambda: len(handler.calls) >= count, what=f"{count} handler calls")
    return consumer


# ---------------------------------------------------------------------------------------------- traces


@pytest.mark.asyncio
async def test_one_trace_from_send_to_handler_with_the_consumer_span_a_child_of_the_producer_span(
    traced: msgkit.Broker, otel: Otel
) -> None:
    await traced.declare("orders", "g")
    message_id = await traced.send("orders", {"id": 1})
    handler = Handler()
    consumer = await consume(traced, "orders", handler, 1)
    await consumer.stop()

    (send,) = otel.finished(SpanKind.PRODUCER)
    (process,) = otel.finished(SpanKind.CONSUMER)
    delivery, current = handler.calls[0]
    assert delivery.headers["traceparent"].split("-")[1:3] == [
        f"{send.context.trace_id:032x}",
        f"{send.context.span_id:016x}",
    ]
    assert process.parent is not None
    assert process.parent.span_id == send.context.span_id
    assert process.context.trace_id == send.context.trace_id
    assert current == process.context  # the handler runs inside the process span
    assert send.name == "orders send"
    assert process.name == "orders process"
    assert send.attributes is not None
    assert process.attributes is not None
    assert dict(send.attributes) == {
        "messaging.system": "memory",
        "messaging.destination.name": "orders",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.message.id": message_id,
        "messaging.message.body.size": len(b'{"id":1}'),
    }
    assert dict(process.attributes) == {
        "messaging.system": "memory",
        "messaging.destination.name": "orders",
        "messaging.consumer.group.name": "g",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.message.id": message_id,
        "messaging.message.body.size": len(b'{"id":1}'),
        "msgkit.delivery.attempt": 1,
    }
    assert process.status.status_code is StatusCode.UNSET
    assert not process.events


@pytest.mark.asyncio
async def test_a_send_inside_a_span_joins_its_trace_and_a_message_without_context_starts_one(
    traced: msgkit.Broker, otel: Otel
) -> None:
    await traced.declare("orders", "g")
    with otel.tracer_provider.get_tracer("app").start_as_current_span("request") as request:
        await traced.send("orders", b"a")
    await traced.transport.publish("orders", [msgkit.Message(b"no context")])  # around the producer
    handler = Handler()
    consumer = await consume(traced, "orders", handler, 2)
    await consumer.stop()

    (send,) = otel.finished(SpanKind.PRODUCER)
    first, second = sorted(otel.finished(SpanKind.CONSUMER), key=lambda s: s.start_time or 0)
    assert send.parent is not None
    assert send.parent.span_id == request.get_span_context().span_id
    assert first.context.trace_id == request.get_span_context().trace_id
    assert second.parent is None  # a root span: not a child of whatever the consumer loop had current
    assert second.context.trace_id != request.get_span_context().trace_id


@pytest.mark.asyncio
async def test_trace_context_survives_a_retry_and_the_failure_is_on_the_span(memory_url: str, otel: Otel) -> None:
    async with msgkit.Broker(memory_url) as broker:
        instrument(broker, **otel.providers)
        await broker.declare("orders", "g")
        await broker.send("orders", b"x")
        handler = Handler(fail=1, error=ValueError("first try fails"))
        consumer = await consume(broker, "orders", handler, 2, retry=FAST_RETRY)
        await eventually(lambda: len(otel.finished(SpanKind.CONSUMER)) == 2, what="two process spans")
        await consumer.stop()

    (send,) = otel.finished(SpanKind.PRODUCER)
    failed, handled = sorted(otel.finished(SpanKind.CONSUMER), key=lambda s: s.start_time or 0)
    for span in (failed, handled):
        assert span.parent is not None
        assert span.parent.span_id == send.context.span_id
        assert span.context.trace_id == send.context.trace_id
    assert failed.attributes is not None
    assert handled.attributes is not None
    assert (failed.attributes["msgkit.delivery.attempt"], handled.attributes["msgkit.delivery.attempt"]) == (1, 2)
    assert [e.name for e in failed.events] == ["exception", "retry"]
    exception, retry = failed.events
    assert exception.attributes is not None
    assert exception.attributes["exception.type"] == "ValueError"
    assert retry.attributes is not None
    assert retry.attributes["msgkit.retry.delay"] == 0.0
    assert "ValueError: first try fails" in str(retry.attributes["msgkit.retry.reason"])
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes["error.type"] == "ValueError"
    assert handled.status.status_code is StatusCode.UNSET
    assert not handled.events
    assert handler.calls[1][1] == handled.context


@pytest.mark.asyncio
async def test_a_dead_letter_is_an_event_with_its_reason_and_an_error(traced: msgkit.Broker, otel: Otel) -> None:
    await traced.declare("orders", "g")
    await traced.send("orders", b"x")
    handler = Handler(fail=1, error=msgkit.Reject("not for us"))
    consumer = await consume(traced, "orders", handler, 1)
    await eventually(lambda: len(otel.finished(SpanKind.CONSUMER)) == 1)
    await consumer.stop()

    (process,) = otel.finished(SpanKind.CONSUMER)
    assert [e.name for e in process.events] == ["exception", "dead_letter"]
    dead_letter = process.events[1]
    assert dead_letter.attributes is not None
    assert dead_letter.attributes["msgkit.dead_letter.reason"] == "not for us"
    assert process.status.status_code is StatusCode.ERROR
    assert process.attributes is not None
    assert process.attributes["error.type"] == "Reject"
    assert otel.total("msgkit.messages.dead_lettered", messaging__consumer__group__name="g") == 1
    assert otel.total("msgkit.messages.acked") == 0


@pytest.mark.asyncio
async def test_a_retry_the_handler_asks_for_is_an_event_but_not_an_error(traced: msgkit.Broker, otel: Otel) -> None:
    await traced.declare("orders", "g")
    await traced.send("orders", b"x")
    calls: list[int] = []

    async def handle(delivery: msgkit.Delivery) -> msgkit.Retry | None:
        calls.append(delivery.attempt)
        return msgkit.Retry(0.0, "not yet") if delivery.attempt == 1 else None

    consumer = traced.consumer("orders", "g", handle, settle_interval=0.005)
    await consumer.start()
    await eventually(lambda: len(otel.finished(SpanKind.CONSUMER)) == 2)
    await consumer.stop()
    first = min(otel.finished(SpanKind.CONSUMER), key=lambda s: s.start_time or 0)
    assert [e.name for e in first.events] == ["retry"]
    assert first.status.status_code is StatusCode.UNSET


@pytest.mark.asyncio
async def test_an_error_escaping_without_a_retry_policy_is_recorded_and_the_span_ended(
    traced: msgkit.Broker, otel: Otel
) -> None:
    await traced.declare("orders", "g")
    await traced.send("orders", b"x")
    handler = Handler(fail=1)
    consumer = await consume(traced, "orders", handler, 2, retry=None)
    await eventually(lambda: len(otel.finished(SpanKind.CONSUMER)) == 2)
    await consumer.stop()
    failed = min(otel.finished(SpanKind.CONSUMER), key=lambda s: s.start_time or 0)
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes is not None
    assert failed.attributes["error.type"] == "RuntimeError"
    assert [e.name for e in failed.events] == ["exception", "exception"]  # inside, then escaping the span
    assert otel.total("msgkit.messages.retried") == 1


@pytest.mark.asyncio
async def test_a_batch_is_one_span_whose_context_every_message_carries(traced: msgkit.Broker, otel: Otel) -> None:
    await traced.declare("orders", "g")
    ids = await traced.send_batch("orders", [b"a", b"b", b"c"])
    handler = Handler()
    consumer = await consume(traced, "orders", handler, 3)
    await eventually(lambda: len(otel.finished(SpanKind.CONSUMER)) == 3)
    await consumer.stop()

    (send,) = otel.finished(SpanKind.PRODUCER)
    assert send.attributes is not None
    assert send.attributes["messaging.batch.message_count"] == 3
    assert "messaging.message.id" not in send.attributes
    processes = otel.finished(SpanKind.CONSUMER)
    assert sorted(s.attributes["messaging.message.id"] for s in processes if s.attributes) == sorted(ids)
    assert {s.parent.span_id for s in processes if s.parent} == {send.context.span_id}
    assert otel.total("msgkit.messages.sent", messaging__destination__name="orders") == 3


@pytest.mark.asyncio
async def test_a_message_that_carries_context_keeps_it_and_the_send_span_links_to_it(
    traced: msgkit.Broker, otel: Otel
) -> None:
    await traced.declare("orders", "g")
    await traced.send_batch("orders", [msgkit.Message.of(b"a", headers={"traceparent": THEIRS}), b"b"])
    handler = Handler()
    consumer = await consume(traced, "orders", handler, 2)
    await consumer.stop()

    (send,) = otel.finished(SpanKind.PRODUCER)
    assert [f"{link.context.span_id:016x}" for link in send.links] == ["b7ad6b7169203331"]
    kept, fresh = (d.headers["traceparent"] for d, _ in handler.calls)
    assert kept == THEIRS
    assert fresh.split("-")[2] == f"{send.context.span_id:016x}"


@pytest.mark.asyncio
async def test_a_failed_publish_marks_the_send_span_as_an_error(memory_url: str, otel: Otel) -> None:
    async with msgkit.Broker(memory_url) as broker:
        instrument(broker, **otel.providers)
        await broker.transport.close()
        with pytest.raises(msgkit.MsgkitError):
            await broker.send("orders", b"x")
    (send,) = otel.finished(SpanKind.PRODUCER)
    assert send.status.status_code is StatusCode.ERROR
    assert [e.name for e in send.events] == ["exception"]
    assert otel.total("msgkit.messages.sent") == 0


@pytest.mark.asyncio
async def test_a_handler_cancelled_at_stop_ends_its_span_with_an_event(traced: msgkit.Broker, otel: Otel) -> None:
    await traced.declare("orders", "g")
    await traced.send("orders", b"x")
    started = asyncio.Event()

    async def stuck(delivery: msgkit.Delivery) -> None:
        started.set()
        await asyncio.sleep(60)

    consumer = traced.consumer("orders", "g", stuck)
    await consumer.start()
    await asyncio.wait_for(started.wait(), 5)
    await consumer.stop(timeout=0.01)
    (process,) = otel.finished(SpanKind.CONSUMER)
    assert [e.name for e in process.events] == ["cancelled"]
    assert otel.total("msgkit.messages.received") == 1
    assert otel.total("msgkit.messages.acked") + otel.total("msgkit.messages.retried") == 0


# ---------------------------------------------------------------------------------------------- outbox


@pytest_asyncio.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = engine_from_url(f"sqlite:///{tmp_path / 'service.db'}")
    await create_schema(engine)
    yield engine
    await engine.dispose()


@pytest.mark.asyncio
async def test_the_outbox_carries_the_context_of_the_transaction_that_added_the_message(
    engine: AsyncEngine, traced: msgkit.Broker, otel: Otel
) -> None:
    telemetry = Telemetry(**otel.providers)
    outbox = Outbox(on_add=telemetry.on_outbox_add)
    await traced.declare("orders", "g")
    with otel.tracer_provider.get_tracer("app").start_as_current_span("place order") as request:
        async with async_sessionmaker(engine)() as session, session.begin():
            message_id = await outbox.add(session, "orders", {"id": 7})
            await outbox.add(session, "orders", {"id": 8}, headers={"traceparent": THEIRS})
    handler = Handler()
    consumer = await consume(traced, "orders", handler, 0)
    async with OutboxRelay(engine, traced, poll_interval=0.05):
        await eventually(lambda: len(handler.calls) == 2, what="the relayed messages handled")
    await consumer.stop()

    (create,) = otel.finished(SpanKind.PRODUCER, "orders create")  # none for the message with a context
    (send,) = otel.finished(SpanKind.PRODUCER, "orders send")
    process, theirs = sorted(otel.finished(SpanKind.CONSUMER), key=lambda s: s.start_time or 0)
    assert f"{theirs.context.trace_id:032x}" == THEIRS.split("-")[1]
    trace_id = request.get_span_context().trace_id
    assert create.parent is not None
    assert create.parent.span_id == request.get_span_context().span_id
    assert create.attributes is not None
    assert create.attributes["messaging.message.id"] == message_id
    assert process.context.trace_id == trace_id
    assert process.parent is not None
    assert process.parent.span_id == create.context.span_id
    assert [link.context.span_id for link in send.links] == [create.context.span_id, int(THEIRS.split("-")[2], 16)]


# ---------------------------------------------------------------------------------------------- metrics


@pytest.mark.asyncio
async def test_metrics_count_messages_by_outcome_and_time_the_handler(traced: msgkit.Broker, otel: Otel) -> None:
    await traced.declare("orders", "g")
    await traced.send_batch("orders", [b"ok", b"ok", b"retry once", b"reject"])

    async def handle(delivery: msgkit.Delivery) -> None:
        if delivery.body == b"reject":
            raise msgkit.Reject("no")
        if delivery.body == b"retry once" and delivery.attempt == 1:
            raise RuntimeError("again")

    consumer = traced.consumer("orders", "g", handle, retry=FAST_RETRY, settle_interval=0.005)
    await consumer.start()
    await eventually(lambda: otel.total("msgkit.messages.acked") == 3, what="three acks")
    await consumer.stop()

    labels = {"messaging__system": "memory", "messaging__destination__name": "orders"}
    assert otel.total("msgkit.messages.sent", **labels) == 4
    assert otel.total("msgkit.messages.received", **labels, messaging__consumer__group__name="g") == 5
    assert otel.total("msgkit.messages.retried", **labels) == 1
    assert otel.total("msgkit.messages.dead_lettered", **labels) == 1
    assert otel.total("msgkit.handler.duration", msgkit__outcome="ack") == 3
    assert otel.total("msgkit.handler.duration", msgkit__outcome="retry") == 1
    assert otel.total("msgkit.handler.duration", msgkit__outcome="dead_letter") == 1


@pytest.mark.asyncio
async def test_in_flight_and_lag_are_observed_from_running_consumers(traced: msgkit.Broker, otel: Otel) -> None:
    await traced.declare("orders", "g")
    await traced.send_batch("orders", [b"a", b"b", b"c", b"d", b"e", b"f", b"g"])
    release = asyncio.Event()
    handler_calls: list[msgkit.Delivery] = []

    async def slow(delivery: msgkit.Delivery) -> None:
        handler_calls.append(delivery)
        await release.wait()

    consumer = traced.consumer("orders", "g", slow, max_in_flight=2)
    await consumer.start()
    await eventually(lambda: len(handler_calls) == 2)
    assert otel.total("msgkit.consumer.in_flight", messaging__consumer__group__name="g") == 2
    # Consumer.lag comes from the transport (memory knows it): 5 of 7 not fetched yet
    assert otel.total("msgkit.consumer.lag", messaging__destination__name="orders") == 5
    release.set()
    await consumer.stop()


# ---------------------------------------------------------------------------------------------- no SDK


@pytest.mark.asyncio
async def test_without_an_sdk_nothing_is_recorded_but_incoming_context_reaches_outgoing_messages(
    memory_url: str,
) -> None:
    async with msgkit.Broker(memory_url) as broker:
        telemetry = instrument(
            broker, tracer_provider=trace.NoOpTracerProvider(), meter_provider=metrics.NoOpMeterProvider()
        )
        assert "sdk=False" in repr(telemetry)
        await broker.declare("in", "g")
        await broker.declare("out", "g")
        await broker.send("in", b"x", headers={"traceparent": THEIRS})
        await broker.send("in", b"y")  # no context: nothing to pass on

        async def forward(delivery: msgkit.Delivery) -> None:
            await broker.send("out", delivery.body)

        forwarder = broker.consumer("in", "g", forward, settle_interval=0.005)
        handler = Handler()
        await forwarder.start()
        await consume(broker, "out", handler, 2)
        await forwarder.stop()
    by_body = {d.body: d.headers for d, _ in handler.calls}
    assert by_body[b"x"]["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    assert "traceparent" not in by_body[b"y"]
    assert all(not context.is_valid for _, context in handler.calls[1:])


LATE_SDK = """
import asyncio
import msgkit
from msgkit.telemetry import instrument
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

async def main():
    async with msgkit.Broker("memory://late") as broker, msgkit.Broker("memory://late2") as other:
        telemetry = instrument(broker)  # the global providers: no SDK yet
        instrument(other)
        assert "sdk=False" in repr(telemetry), telemetry
        await broker.declare("orders", "g")
        await broker.transport.publish("orders", [msgkit.Message(b"x")])  # waiting, not through telemetry
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)  # the application installs its SDK afterwards
        done = asyncio.Event()

        async def handle(delivery: msgkit.Delivery) -> None:
            done.set()

        consumer = broker.consumer("orders", "g", handle)
        await consumer.start()
        await asyncio.wait_for(done.wait(), 5)  # the first message handled sees the SDK
        await consumer.stop()
        await other.send("invoices", b"y")  # so does the first message sent
    names = sorted(s.name for s in exporter.get_finished_spans())
    assert names == ["invoices send", "orders process"], names

asyncio.run(main())
"""


def test_an_sdk_installed_after_instrumenting_is_used_from_the_first_message() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    subprocess.run([sys.executable, "-c", LATE_SDK], check=True, env=env, timeout=60)


@pytest.mark.asyncio
async def test_an_uninstrumented_broker_adds_no_headers(broker: msgkit.Broker) -> None:
    await broker.declare("orders", "g")
    with TracerProvider().get_tracer("app").start_as_current_span("request"):
        await broker.send("orders", b"x")
    handler = Handler()
    consumer = await consume(broker, "orders", handler, 1)
    await consumer.stop()
    assert dict(handler.calls[0][0].headers) == {}


def test_importing_msgkit_does_not_import_opentelemetry() -> None:
    code = (
        "import sys, msgkit, msgkit.outbox;"
        "bad = [m for m in sys.modules if m.startswith('opentelemetry')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})


# ---------------------------------------------------------------------------------------------- the seam


@pytest.mark.asyncio
async def test_broker_middleware_must_come_before_consumers_and_runs_outside_or_inside_the_retry_policy(
    memory_url: str,
) -> None:
    seen: list[str] = []

    def recorder(name: str) -> msgkit.Middleware:
        async def mw(delivery: msgkit.Delivery, call_next: msgkit.CallNext) -> msgkit.Outcome | None:
            seen.append(f"{name}:{delivery.attempt}")
            try:
                return await call_next(delivery)
            except Exception:
                seen.append(f"{name}:raised")
                raise

        return mw

    async with msgkit.Broker(memory_url) as broker:
        broker.add_middleware(recorder("outer"), outer=True)
        broker.add_middleware(recorder("inner"))
        await broker.declare("orders", "g")
        await broker.send("orders", b"x")
        handler = Handler(fail=1)
        retry = msgkit.RetryPolicy(immediate_retries=1, max_attempts=1)
        consumer = await consume(broker, "orders", handler, 2, middleware=[recorder("own")], retry=retry)
        await consumer.stop()
        with pytest.raises(msgkit.StateError):
            broker.add_middleware(recorder("late"))
        with pytest.raises(msgkit.StateError):
            instrument(broker)
    # the outer middleware sees one call (the retry policy's immediate retry happens inside it)
    assert seen == ["outer:1", "inner:1", "own:1", "own:raised", "inner:raised", "inner:1", "own:1"]


@pytest.mark.asyncio
async def test_send_middleware_runs_first_added_outermost_and_may_replace_messages(memory_url: str) -> None:
    order: list[str] = []

    def tagger(name: str) -> Any:
        async def mw(topic: str, messages: Any, publish: Any) -> None:
            order.append(name)
            await publish(topic, [msgkit.Message(m.body, m.id, m.key, {**m.headers, name: "1"}) for m in messages])

        return mw

    async with msgkit.Broker(memory_url) as broker:
        broker.add_send_middleware(tagger("first"))
        broker.add_send_middleware(tagger("second"))
        await broker.declare("orders", "g")
        message_id = await broker.send("orders", b"x")
        handler = Handler()
        consumer = await consume(broker, "orders", handler, 1)
        await consumer.stop()
    assert order == ["first", "second"]
    delivery = handler.calls[0][0]
    assert delivery.id == message_id
    assert dict(delivery.headers) == {"first": "1", "second": "1"}


# ---------------------------------------------------------------------------------------------- small parts


def test_messaging_system_names_follow_the_semantic_conventions() -> None:
    assert [
        messaging_system(u) for u in ("amqps://h/", "kafka://h:9092", "sqs://h", "rediss://h", "memory://", "nats://h")
    ] == ["rabbitmq", "kafka", "aws_sqs", "redis", "memory", "nats"]


def test_partition_and_offset_come_from_a_receipt_that_documents_them() -> None:
    @dataclass
    class KafkaLike:
        partition: int
        offset: int

    attributes: dict[str, Any] = {}
    _add_position(attributes, KafkaLike(3, 42))
    assert attributes == {"messaging.destination.partition.id": "3", "messaging.kafka.offset": 42}
    attributes.clear()
    _add_position(attributes, object())
    _add_position(attributes, b"1-0")
    assert attributes == {}


# ---------------------------------------------------------------------------------------------- logs


@pytest.mark.asyncio
async def test_log_records_about_a_message_name_it_and_success_logs_nothing_at_info(
    broker: msgkit.Broker, caplog: pytest.LogCaptureFixture
) -> None:
    await broker.declare("orders", "g")
    ids = await broker.send_batch("orders", [b"ok"] * 5 + [b"fail"])

    async def handle(delivery: msgkit.Delivery) -> None:
        if delivery.body == b"fail":
            raise RuntimeError("boom")

    consumer = broker.consumer("orders", "g", handle, retry=FAST_RETRY, settle_interval=0.005)
    with caplog.at_level(logging.DEBUG, logger="msgkit"):
        await consumer.start()
        await eventually(lambda: any("dead-lettered" in r.getMessage() for r in caplog.records))
        await consumer.stop()
    about_messages = [r for r in caplog.records if hasattr(r, "msgkit_message_id")]
    assert len(about_messages) == 3  # retried, retried, dead-lettered
    for record in about_messages:
        assert record.msgkit_message_id == ids[-1]  # type: ignore[attr-defined]
        assert (record.msgkit_topic, record.msgkit_group) == ("orders", "g")  # type: ignore[attr-defined]
        assert ids[-1] in record.getMessage()
        assert "orders/g" in record.getMessage()
    assert [r.msgkit_attempt for r in about_messages] == [1, 2, 3]  # type: ignore[attr-defined]
    assert all(r in about_messages for r in caplog.records if r.levelno >= logging.INFO)  # success: silent
