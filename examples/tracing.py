"""Traces and metrics for msgkit with the OpenTelemetry SDK.

    pip install "msgkit[otel]" opentelemetry-sdk
    python examples/tracing.py

Prints each span as it ends (one line each: the trace, the span, its parent) and the message
counters at the end. With OTEL_EXPORTER_OTLP_ENDPOINT set (e.g. http://localhost:4318) spans and
metrics go to that OpenTelemetry collector over OTLP/HTTP instead
(``pip install opentelemetry-exporter-otlp-proto-http``, or ``msgkit[examples]``). Runs on
memory:// unless MSGKIT_URL says otherwise; trace context travels in message headers, so the
consumer's spans join the producer's trace on every broker.
"""

from __future__ import annotations

import asyncio
import os
import uuid

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from pydantic import BaseModel

import msgkit
from msgkit.telemetry import instrument


class Order(BaseModel):
    id: int
    total: float


def one_line(span: ReadableSpan) -> str:
    parent = f"{span.parent.span_id:016x}" if span.parent else "-" * 16
    events = ", ".join(e.name for e in span.events)
    return (
        f"trace {span.context.trace_id:032x} span {span.context.span_id:016x} parent {parent} "
        f"{span.kind.name:<8} {span.name}{f'  [{events}]' if events else ''}\n"
    )


def set_up_sdk() -> MetricReader:
    """Install the SDK globally: OTLP/HTTP if OTEL_EXPORTER_OTLP_ENDPOINT is set, else the console."""
    resource = Resource.create({"service.name": "msgkit-example"})
    tracer_provider = TracerProvider(resource=resource)
    reader: MetricReader
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        reader = PeriodicExportingMetricReader(OTLPMetricExporter(), export_interval_millis=5000)
    else:
        tracer_provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(formatter=one_line)))
        reader = InMemoryMetricReader()
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
    return reader


def print_counters(reader: MetricReader) -> None:
    if not isinstance(reader, InMemoryMetricReader):
        return
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else ():
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                if metric.name.startswith("msgkit.messages."):
                    total = sum(getattr(point, "value", 0) for point in metric.data.data_points)
                    print(f"{metric.name} = {total}")


async def main() -> None:
    reader = set_up_sdk()
    tracer = trace.get_tracer("example")
    topic = f"orders-{uuid.uuid4().hex[:6]}"  # a fresh topic: runs never see each other's messages
    async with msgkit.Broker() as broker:
        instrument(broker)  # before building consumers
        await broker.declare(topic, "billing")
        with tracer.start_as_current_span("checkout"):  # e.g. the HTTP request that places orders
            await broker.send_batch(topic, [Order(id=i, total=9.5 * i) for i in range(1, 4)])

        billed: set[int] = set()
        all_billed = asyncio.Event()

        async def bill(order: Order, delivery: msgkit.Delivery) -> None:
            if order.id == 2 and delivery.attempt == 1:
                raise ConnectionError("payment service busy")  # retried: a "retry" event on the span
            with tracer.start_as_current_span(f"charge order {order.id}"):  # a child of "<topic> process"
                billed.add(order.id)
            if len(billed) == 3:
                all_billed.set()

        retry = msgkit.RetryPolicy(initial_delay=0.1, jitter=0)
        consumer = broker.consumer(topic, "billing", bill, retry=retry)
        await consumer.start()
        await asyncio.wait_for(all_billed.wait(), timeout=10)
        await consumer.stop()
        await broker.delete(topic, "billing")  # the throwaway topic and group
    print_counters(reader)
    trace_provider = trace.get_tracer_provider()
    if isinstance(trace_provider, TracerProvider):
        trace_provider.shutdown()  # flushes the batch processor when exporting over OTLP
    meter_provider = metrics.get_meter_provider()
    if isinstance(meter_provider, MeterProvider):
        meter_provider.shutdown()
    where = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "the console"
    print(f"traced {len(billed)} orders from checkout to billing on {broker.url}; spans went to {where}")


if __name__ == "__main__":
    asyncio.run(main())
