"""OpenTelemetry for msgkit: a span per send and per delivery, trace context in headers, metrics.

::

    from msgkit.telemetry import instrument

    broker = msgkit.Broker(url)
    telemetry = instrument(broker)      # before building consumers

This uses the OpenTelemetry *API* only (``pip install "msgkit[otel]"``): spans and metrics go
nowhere until the application installs an SDK, and until then an instrumented broker only
passes trace context along (see "Without an SDK" below). ``import msgkit`` imports neither this
module nor OpenTelemetry.

What an instrumented broker does (names from the OpenTelemetry messaging semantic conventions):

* Every publish is a PRODUCER span ``<topic> send``. Its context goes into each message's headers
  (``traceparent``, ``tracestate``, ``baggage`` with the default propagator) unless the message
  carries a trace context already: that one is kept and linked. This is how the outbox carries
  the context of the transaction that added a message. A batch is one span with
  ``messaging.batch.message_count``; its messages share the batch span's context.
* Every delivery is a CONSUMER span ``<topic> process``, child of the context in its headers and
  current while the handler runs. It sits outside the retry policy, so it records the final
  outcome: ``retry`` and ``dead_letter`` events, every exception the handler chain raised, and
  ERROR status when the delivery failed.
* Metrics: ``msgkit.messages.sent``, ``.received``, ``.acked``, ``.retried``, ``.dead_lettered``,
  ``msgkit.handler.duration``, ``msgkit.consumer.in_flight`` and ``msgkit.consumer.lag``.

Without an SDK (no tracer or meter provider other than the API's own) a delivery costs a counter
and a header lookup: no span, no measurement, no extra coroutine. A delivery whose headers carry trace context
still makes it current for its handler, and sends still write the current context into headers,
so a service without an SDK does not break the traces of those around it. msgkit looks for an
SDK installed after :func:`instrument` on the first message, then every 256 messages.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from msgkit.errors import DecodeError, MissingDependencyError, PublishError, Reject

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, propagate, trace
    from opentelemetry.context import Context
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import Link, SpanKind, StatusCode
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError('msgkit.telemetry needs OpenTelemetry: pip install "msgkit[otel]"') from exc

from msgkit.broker import Broker
from msgkit.consumer import Consumer
from msgkit.message import DLQ_ERROR_TYPE, Ack, DeadLetter, Delivery, Message, Outcome, Retry
from msgkit.middleware import CallNext, Middleware
from msgkit.producer import Publish, SendMiddleware

__all__ = ["SCHEMA_URL", "Telemetry", "instrument", "messaging_system"]

#: The version of the semantic conventions the attribute names follow.
SCHEMA_URL: Final = "https://opentelemetry.io/schemas/1.28.0"

# Attribute names: OpenTelemetry semantic conventions, and msgkit's own under ``msgkit.``.
SYSTEM: Final = "messaging.system"
DESTINATION: Final = "messaging.destination.name"
OPERATION_TYPE: Final = "messaging.operation.type"
OPERATION_NAME: Final = "messaging.operation.name"
GROUP: Final = "messaging.consumer.group.name"
MESSAGE_ID: Final = "messaging.message.id"
BODY_SIZE: Final = "messaging.message.body.size"
BATCH_COUNT: Final = "messaging.batch.message_count"
PARTITION: Final = "messaging.destination.partition.id"
KAFKA_OFFSET: Final = "messaging.kafka.offset"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
ERROR_TYPE: Final = "error.type"
ATTEMPT: Final = "msgkit.delivery.attempt"
OUTCOME: Final = "msgkit.outcome"
RETRY_DELAY: Final = "msgkit.retry.delay"
RETRY_REASON: Final = "msgkit.retry.reason"
DEAD_LETTER_REASON: Final = "msgkit.dead_letter.reason"

#: ``messaging.system`` for each URL scheme; any other scheme is used as it is.
_SYSTEMS: Final = {
    "amqp": "rabbitmq",
    "amqps": "rabbitmq",
    "kafka": "kafka",
    "sqs": "aws_sqs",
    "redis": "redis",
    "rediss": "redis",
    "memory": "memory",
}

_ROOT: Final = Context()  # what extraction starts from: a delivery never inherits the loop's span
_SDK_CHECK_EVERY: Final = 256
# The type of the last exception the handler chain raised for this delivery: set by the inner
# middleware, read by the outer one (each delivery runs in a contextvars context of its own).
_failure: ContextVar[str | None] = ContextVar("msgkit_telemetry_failure", default=None)


def messaging_system(url: str) -> str:
    """The ``messaging.system`` value for a broker URL: ``rabbitmq``, ``kafka``, ``aws_sqs``, ``redis``..."""
    scheme = urlsplit(url).scheme.lower()
    return _SYSTEMS.get(scheme, scheme)


def _server_attributes(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    if parts.scheme.lower() == "memory":
        return {}
    first = parts.netloc.rpartition("@")[2].split(",")[0]  # kafka://a:9092,b:9092: the first
    try:
        address = urlsplit(f"//{first}")
        host, port = address.hostname, address.port
    except ValueError:
        return {}
    attributes: dict[str, Any] = {}
    if host:
        attributes[SERVER_ADDRESS] = host
        if port is not None:
            attributes[SERVER_PORT] = port
    return attributes


def _is_sdk(provider: object) -> bool:
    """Whether ``provider`` records anything: the API's own providers (no-op, proxy) do not."""
    return not type(provider).__module__.startswith(("opentelemetry.trace", "opentelemetry.metrics"))


class _Switch:
    """Whether an SDK is installed: looked up now, on the first message, then every
    :data:`_SDK_CHECK_EVERY` messages until one is (a look costs microseconds)."""

    __slots__ = ("on", "fields", "countdown", "_tracer_provider", "_meter_provider", "_propagator")

    def __init__(self, tracer_provider: object, meter_provider: object, propagator: TextMapPropagator | None):
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._propagator = propagator
        self.on = False
        #: Header names the propagator reads: a delivery with none of them carries no context.
        self.fields: frozenset[str] = frozenset()
        self.check()
        #: Messages until the next look; the first message looks again.
        self.countdown = 0

    def check(self) -> bool:
        """Look now; whether an SDK is installed."""
        self.countdown = _SDK_CHECK_EVERY
        tracer_provider = self._tracer_provider or trace.get_tracer_provider()
        meter_provider = self._meter_provider or metrics.get_meter_provider()
        self.on = _is_sdk(tracer_provider) or _is_sdk(meter_provider)
        self.fields = frozenset((self._propagator or propagate.get_global_textmap()).fields)
        return self.on

    def poll(self) -> bool:
        """Whether an SDK is installed, looking again once the countdown runs out."""
        if self.on:
            return True
        self.countdown -= 1
        return self.countdown < 0 and self.check()


@dataclass(frozen=True, slots=True)
class _Names:
    """What one topic (and group) of one broker puts on every span and measurement, built once."""

    span_name: str
    span: Mapping[str, Any]
    metric: Mapping[str, Any]
    metric_by_outcome: Mapping[str, Mapping[str, Any]]


class Telemetry:
    """Spans, trace context and metrics for one or more brokers, through the OpenTelemetry API.

    Instruments are created once, here. ``tracer_provider`` and ``meter_provider`` default to
    the global ones (an SDK installed later is picked up by the first message, else within 256
    messages); ``propagator`` defaults to the global text-map propagator (W3C trace context and
    baggage unless ``OTEL_PROPAGATORS`` says otherwise).

    Attributes:
        sent, received, acked, retried, dead_lettered: the message counters.
        handler_duration: the histogram of handling time, seconds, by outcome.
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        from msgkit import __version__

        self._tracer = trace.get_tracer("msgkit", __version__, tracer_provider, schema_url=SCHEMA_URL)
        meter = metrics.get_meter("msgkit", __version__, meter_provider, schema_url=SCHEMA_URL)
        self._propagator = propagator
        self._switch = _Switch(tracer_provider, meter_provider, propagator)
        self._brokers: weakref.WeakKeyDictionary[Broker, str] = weakref.WeakKeyDictionary()  # -> system
        self._system: str | None = None
        self.sent = meter.create_counter("msgkit.messages.sent", "{message}", "Messages the broker stored")
        self.received = meter.create_counter("msgkit.messages.received", "{message}", "Deliveries handled")
        self.acked = meter.create_counter("msgkit.messages.acked", "{message}", "Deliveries acked")
        self.retried = meter.create_counter("msgkit.messages.retried", "{message}", "Deliveries to redeliver")
        self.dead_lettered = meter.create_counter(
            "msgkit.messages.dead_lettered", "{message}", "Deliveries moved to the dead letters"
        )
        self.handler_duration = meter.create_histogram(
            "msgkit.handler.duration", "s", "Time from the start of a delivery's handling to its outcome"
        )
        meter.create_observable_up_down_counter(
            "msgkit.consumer.in_flight", [self._observe_in_flight], "{message}", "Deliveries fetched, not settled"
        )
        meter.create_observable_gauge(
            "msgkit.consumer.lag", [self._observe_lag], "{message}", "Messages of the group not fetched yet"
        )

    def __repr__(self) -> str:
        return f"Telemetry(brokers={len(self._brokers)}, sdk={self._switch.on})"

    def instrument(self, broker: Broker) -> Broker:
        """Trace and measure ``broker``'s sends, and the consumers built on it from now on.

        Call it before building consumers (:meth:`msgkit.Broker.add_middleware` refuses later).
        Instrumenting the same broker twice changes nothing.
        """
        if broker in self._brokers:
            return broker
        system = messaging_system(broker.url)
        server = _server_attributes(broker.url)
        broker.add_middleware(self._process_middleware(system, server), outer=True)  # fails if consumers exist
        broker.add_middleware(self._error_middleware())
        broker.add_send_middleware(self._send_middleware(system, server))
        self._brokers[broker] = self._system = system
        return broker

    # ------------------------------------------------------------------ propagation

    def inject(self, headers: dict[str, str], context: Context | None = None) -> None:
        """Write ``context`` (default: the current one) into ``headers``."""
        (self._propagator or propagate.get_global_textmap()).inject(headers, context)

    def extract(self, headers: Mapping[str, str]) -> Context:
        """The context that ``headers`` carry (an empty one if none)."""
        return (self._propagator or propagate.get_global_textmap()).extract(headers, _ROOT)

    def _carried(self, headers: Mapping[str, str]) -> trace.SpanContext | None:
        """The valid span context in ``headers``, if any."""
        found = trace.get_current_span(self.extract(headers)).get_span_context()
        return found if found.is_valid else None

    def on_outbox_add(self, topic: str, message_id: str, headers: dict[str, str]) -> None:
        """For ``Outbox(on_add=telemetry.on_outbox_add)``: a PRODUCER span ``<topic> create`` for a
        message added to the outbox, its context written into the message's headers.

        The span is a child of the current one (the request or job writing the outbox), so the
        message's consumers join that trace. A message that carries a trace context keeps it.
        """
        if headers and self._carried(headers) is not None:
            return
        if not self._switch.poll():
            self.inject(headers)
            return
        attributes: dict[str, Any] = {
            DESTINATION: topic,
            OPERATION_TYPE: "create",
            OPERATION_NAME: "create",
            MESSAGE_ID: message_id,
        }
        if self._system is not None:
            attributes[SYSTEM] = self._system
        span = self._tracer.start_span(f"{topic} create", kind=SpanKind.PRODUCER, attributes=attributes)
        self.inject(headers, trace.set_span_in_context(span))
        span.end()

    # ------------------------------------------------------------------ sending

    def _contexts(self, messages: Sequence[Message]) -> list[trace.SpanContext | None]:
        """The trace context each message carries already, if any."""
        return [self._carried(m.headers) if m.headers else None for m in messages]

    @staticmethod
    def _with_context(
        messages: Sequence[Message], carrier: Mapping[str, str], contexts: Sequence[trace.SpanContext | None]
    ) -> Sequence[Message]:
        """``messages`` with ``carrier`` added to the headers of those that carry no context yet."""
        if not carrier:
            return messages
        return [
            m if carried is not None else Message(m.body, m.id, m.key, {**m.headers, **carrier}, m.timestamp)
            for m, carried in zip(messages, contexts, strict=True)
        ]

    def _send_middleware(self, system: str, server: Mapping[str, Any]) -> SendMiddleware:
        tracer, sent, switch = self._tracer, self.sent, self._switch
        cache: dict[str, _Names] = {}

        def names(topic: str) -> _Names:
            span = {SYSTEM: system, DESTINATION: topic, OPERATION_TYPE: "send", OPERATION_NAME: "send", **server}
            cache[topic] = found = _Names(f"{topic} send", span, {SYSTEM: system, DESTINATION: topic}, {})
            return found

        async def send(topic: str, messages: Sequence[Message], publish: Publish) -> None:
            if not switch.poll():  # no SDK: pass the current context on, if any
                carrier: dict[str, str] = {}
                self.inject(carrier)
                if carrier:
                    messages = self._with_context(messages, carrier, self._contexts(messages))
                await publish(topic, messages)
                return
            found = cache.get(topic) or names(topic)
            attributes = dict(found.span)
            if len(messages) == 1:
                attributes[MESSAGE_ID] = messages[0].id
                attributes[BODY_SIZE] = len(messages[0].body)
            else:
                attributes[BATCH_COUNT] = len(messages)
            contexts = self._contexts(messages)
            links = [Link(c) for c in contexts if c is not None]
            span = tracer.start_span(found.span_name, kind=SpanKind.PRODUCER, attributes=attributes, links=links)
            context = trace.set_span_in_context(span)
            carrier = {}
            self.inject(carrier, context)
            messages = self._with_context(messages, carrier, contexts)
            token = otel_context.attach(context)
            try:
                await publish(topic, messages)
            except BaseException as exc:
                stored = len(messages) - len(exc.failed) if isinstance(exc, PublishError) else 0
                if stored > 0:
                    sent.add(stored, found.metric)
                _fail(span, exc)
                raise
            else:
                sent.add(len(messages), found.metric)
            finally:
                otel_context.detach(token)
                span.end()

        return send

    # ------------------------------------------------------------------ consuming

    def _process_middleware(self, system: str, server: Mapping[str, Any]) -> Middleware:
        tracer, switch = self._tracer, self._switch
        received, acked, retried, dead_lettered = self.received, self.acked, self.retried, self.dead_lettered
        counters = {"ack": acked, "retry": retried, "dead_letter": dead_lettered}
        duration = self.handler_duration
        cache: dict[tuple[str, str], _Names] = {}

        def names(topic: str, group: str) -> _Names:
            metric = {SYSTEM: system, DESTINATION: topic, GROUP: group}
            span = {**metric, OPERATION_TYPE: "process", OPERATION_NAME: "process", **server}
            by_outcome = {outcome: {**metric, OUTCOME: outcome} for outcome in counters}
            cache[topic, group] = found = _Names(f"{topic} process", span, metric, by_outcome)
            return found

        async def traced(delivery: Delivery, call_next: CallNext) -> Outcome | None:
            message = delivery.message
            found = cache.get((delivery.topic, delivery.group)) or names(delivery.topic, delivery.group)
            parent = self.extract(message.headers) if message.headers else _ROOT
            attributes = dict(found.span)
            attributes[MESSAGE_ID] = message.id
            attributes[BODY_SIZE] = len(message.body)
            attributes[ATTEMPT] = delivery.attempt
            _add_position(attributes, delivery.receipt)
            span = tracer.start_span(found.span_name, parent, SpanKind.CONSUMER, attributes)
            token = otel_context.attach(trace.set_span_in_context(span, parent))
            failure = _failure.set(None)
            received.add(1, found.metric)
            started = time.perf_counter()
            kind: str | None = "ack"
            try:
                outcome = await call_next(delivery)
            except Exception as exc:  # the engine turns it into an outcome: counted as it will
                kind = "dead_letter" if isinstance(exc, DecodeError | Reject) else "retry"
                _fail(span, exc)
                raise
            except BaseException:  # cancelled (a stop ran out of time): the message is released
                kind = None
                span.add_event("cancelled")
                raise
            else:
                if outcome is None or type(outcome) is Ack:
                    pass
                elif isinstance(outcome, Retry):
                    kind = "retry"
                    span.add_event("retry", {RETRY_DELAY: outcome.delay, RETRY_REASON: outcome.reason})
                    error = _failure.get()
                    if error is not None:  # a failure, not a deliberate Retry
                        span.set_attribute(ERROR_TYPE, error)
                        span.set_status(StatusCode.ERROR, outcome.reason)
                elif isinstance(outcome, DeadLetter):
                    kind = "dead_letter"
                    span.add_event("dead_letter", {DEAD_LETTER_REASON: outcome.reason})
                    error = outcome.headers.get(DLQ_ERROR_TYPE) or _failure.get() or "dead_letter"
                    span.set_attribute(ERROR_TYPE, error)
                    span.set_status(StatusCode.ERROR, outcome.reason)
                return outcome
            finally:
                if kind is not None:
                    duration.record(time.perf_counter() - started, found.metric_by_outcome[kind])
                    counters[kind].add(1, found.metric)
                _failure.reset(failure)
                otel_context.detach(token)
                span.end()

        async def carried(delivery: Delivery, call_next: CallNext) -> Outcome | None:
            token = otel_context.attach(self.extract(delivery.message.headers))
            try:
                return await call_next(delivery)
            finally:
                otel_context.detach(token)

        def process(delivery: Delivery, call_next: CallNext) -> Awaitable[Outcome | None]:
            if switch.on:
                return traced(delivery, call_next)
            switch.countdown -= 1
            if switch.countdown < 0 and switch.check():
                return traced(delivery, call_next)
            headers = delivery.message.headers
            if headers and not switch.fields.isdisjoint(headers):  # no SDK: make its context current
                return carried(delivery, call_next)
            return call_next(delivery)  # no SDK, no context: no extra coroutine either

        return process

    def _error_middleware(self) -> Middleware:
        switch = self._switch

        async def record(delivery: Delivery, call_next: CallNext) -> Outcome | None:
            try:
                return await call_next(delivery)
            except Exception as exc:
                trace.get_current_span().record_exception(exc)
                _failure.set(type(exc).__qualname__)
                raise

        def record_errors(delivery: Delivery, call_next: CallNext) -> Awaitable[Outcome | None]:
            """Inside the retry policy: note each exception on the delivery's span, then let it go on."""
            return record(delivery, call_next) if switch.on else call_next(delivery)

        return record_errors

    # ------------------------------------------------------------------ observed metrics

    def _running_consumers(self) -> Iterable[tuple[Consumer, dict[str, Any]]]:
        for broker, system in list(self._brokers.items()):
            for consumer in broker.consumers:
                if consumer.running:
                    yield consumer, {SYSTEM: system, DESTINATION: consumer.topic, GROUP: consumer.group}

    def _observe_in_flight(self, _options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        return [metrics.Observation(c.in_flight, attributes) for c, attributes in self._running_consumers()]

    def _observe_lag(self, _options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        # The hook for lag "where the broker tells it": a consumer whose ``lag`` attribute is an
        # int (messages of its group not fetched yet) is reported; None or no attribute is not.
        observations = []
        for consumer, attributes in self._running_consumers():
            lag = getattr(consumer, "lag", None)
            if type(lag) is int:
                observations.append(metrics.Observation(lag, attributes))
        return observations


def _fail(span: trace.Span, exc: BaseException) -> None:
    span.record_exception(exc, escaped=True)
    span.set_attribute(ERROR_TYPE, type(exc).__qualname__)
    span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")


def _add_position(attributes: dict[str, Any], receipt: object) -> None:
    """Partition and offset, from a receipt that documents int ``partition`` and ``offset`` attributes."""
    partition = getattr(receipt, "partition", None)
    if type(partition) is int:
        attributes[PARTITION] = str(partition)
        offset = getattr(receipt, "offset", None)
        if type(offset) is int:
            attributes[KAFKA_OFFSET] = offset


def instrument(
    broker: Broker,
    *,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
    propagator: TextMapPropagator | None = None,
) -> Telemetry:
    """Instrument ``broker`` with a new :class:`Telemetry` and return it. Call it before building
    consumers; to share one Telemetry (one set of instruments) between brokers, use
    :meth:`Telemetry.instrument` on each."""
    telemetry = Telemetry(tracer_provider=tracer_provider, meter_provider=meter_provider, propagator=propagator)
    telemetry.instrument(broker)
    return telemetry
