"""The sqs:// transport against an SQS-compatible server (ElasticMQ): what the contract suite does not cover.

URL forms and options, redaction, queue names, the wire format (text and base64 bodies, one
attribute for id, key and headers, foreign messages), encoded sizes, batching and concurrency of
sends and receives, partial batch failures, the visibility heartbeat, release, delay clamping,
dead-letter queues (msgkit's and a user's RedrivePolicy), one group per topic, FIFO group and
deduplication ids, a vanished queue, bounded outages, a broker restart and the example.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
import pytest_asyncio

import msgkit
from msgkit import Delivery, Message
from msgkit.message import DLQ_REASON, DLQ_TOPIC, DeadLetter, Retry
from msgkit.testing.contract.helpers import Received, eventually
from msgkit.transports import sqs as sqs_module
from msgkit.transports.sqs import GROUP_TAG, SQSSettings, SQSTransport
from msgkit.transports.sqs_subscription import (
    META_ATTRIBUTE,
    SQSSubscription,
    _delay_seconds,
    dead_letter_queue_name,
    decode,
    encode,
    guaranteed_size,
    plan_batches,
    topic_queue_name,
)

WAIT = 30.0
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sqs.py"
LOCAL = "sqs://127.0.0.1:9324?region=us-east-1&secure=false"

pytestmark = pytest.mark.asyncio


def with_options(url: str, **options: object) -> str:
    """``url`` with query ``options`` set (overriding the same names already in it)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(
        {name: str(value).lower() if isinstance(value, bool) else str(value) for name, value in options.items()}
    )
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


def with_address(url: str, host: str, port: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, f"{host}:{port}", parts.path, parts.query, parts.fragment))


#: (URL, topic, group) of the queues the running test made, deleted after it (ElasticMQ keeps them all).
_CREATED: list[tuple[str, str, str | None]] = []


def names() -> tuple[str, str]:
    return f"st-{uuid.uuid4().hex[:10]}", f"sg-{uuid.uuid4().hex[:8]}"


async def cleanup_later(url: str, topic: str, group: str | None = None) -> None:
    """Delete the queues of (topic, group) on the server at ``url`` after the test."""
    _CREATED.append((url, topic, group))


@pytest_asyncio.fixture(autouse=True)
async def _delete_created_queues() -> AsyncIterator[None]:
    _CREATED.clear()
    yield
    created, _CREATED[:] = list(_CREATED), []
    for url, topic, group in created:
        fifo = "fifo=true" in url
        queues = [topic_queue_name(topic, fifo)]
        if group is not None:
            queues.append(dead_letter_queue_name(topic, group, fifo))
        async with connected(url) as transport:
            for name in queues:
                with contextlib.suppress(Exception):
                    found = await transport._client.get_queue_url(QueueName=name)
                    await transport._client.delete_queue(QueueUrl=found["QueueUrl"])


@asynccontextmanager
async def connected(url: str, **options: object) -> AsyncIterator[SQSTransport]:
    transport = SQSTransport.from_url(with_options(url, **options))
    await transport.connect()
    try:
        yield transport
    finally:
        await transport.close()


class Spy:
    """Wraps the aiobotocore client: counts calls, records their arguments, tracks concurrency."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: Counter[str] = Counter()
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.running: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        #: name -> async function(kwargs, call) that replaces the call (to inject failures)
        self.hooks: dict[str, Callable[[dict[str, Any], Callable[..., Awaitable[Any]]], Awaitable[Any]]] = {}

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.client, name)
        if not callable(target) or name.startswith("_"):
            return target

        async def call(**kwargs: Any) -> Any:
            self.calls[name] += 1
            self.requests.append((name, kwargs))
            self.running[name] += 1
            self.peak[name] = max(self.peak[name], self.running[name])
            try:
                hook = self.hooks.get(name)
                return await (hook(kwargs, target) if hook else target(**kwargs))
            finally:
                self.running[name] -= 1

        return call


def spy_on(transport: SQSTransport) -> Spy:
    spy = Spy(transport._client)
    transport._client = spy
    return spy


async def fetch_n(subscription: SQSSubscription, count: int, timeout: float = WAIT) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += await subscription.fetch(count - len(got), timeout=0.5)
    assert len(got) == count, f"fetched {len(got)} of {count}"
    return got


async def raw_receive(transport: SQSTransport, queue_url: str, count: int = 10) -> list[dict[str, Any]]:
    """Receive with the plain client (visibility 0: the messages stay for msgkit)."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + WAIT
    while len(got) < count and time.monotonic() < deadline:
        response = await transport._client.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=min(10, count - len(got)),
            WaitTimeSeconds=1,
            VisibilityTimeout=30,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["All"],
        )
        got += response.get("Messages") or []
    return got


async def queue_count(transport: SQSTransport, queue_url: str) -> int:
    response = await transport._client.get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )
    attributes = response["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(attributes["ApproximateNumberOfMessagesNotVisible"])


# ---------------------------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("url", "endpoint", "region", "key_id"),
    [
        (LOCAL, "http://127.0.0.1:9324", "us-east-1", "msgkit"),
        ("sqs://?region=eu-west-1", None, "eu-west-1", None),
        ("sqs://", None, None, None),
        ("sqs://sqs.eu-west-1.amazonaws.com", "https://sqs.eu-west-1.amazonaws.com", "eu-west-1", None),
        ("sqs://AKIAEXAMPLE:se%2Fcret@localhost:4566?secure=false", "http://localhost:4566", None, "AKIAEXAMPLE"),
        ("sqs://[::1]:9324?secure=false&region=local-1", "http://[::1]:9324", "local-1", "msgkit"),
        (
            "sqs://vpce-1.sqs.us-east-1.vpce.amazonaws.com?region=us-east-1",
            "https://vpce-1.sqs.us-east-1.vpce.amazonaws.com",
            "us-east-1",
            None,
        ),
    ],
)
async def test_url_forms(url: str, endpoint: str | None, region: str | None, key_id: str | None) -> None:
    transport = SQSTransport.from_url(url)
    assert transport._endpoint == endpoint
    assert transport._region == region
    assert transport._credentials.get("aws_access_key_id") == key_id
    if key_id == "AKIAEXAMPLE":
        assert transport._credentials["aws_secret_access_key"] == "se/cret"


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("sqs://127.0.0.1:9324/queue?secure=false", "no path"),
        ("sqs://127.0.0.1:9324?secure=false&colour=red", "unknown option"),
        ("sqs://KEY@127.0.0.1:9324?secure=false", "both the access key id and the secret"),
        ("sqs://127.0.0.1:9324?secure=false&tls_verify=false", "tls_"),
        ("sqs://:9324", "needs a host"),
        ("sqs://?secure=false", "needs a host"),
        ("sqs://host?wait_time=30", "wait_time"),
        ("sqs://host?visibility_timeout=0", "visibility_timeout"),
        ("sqs://host?max_message_size=2000000", "max_message_size"),
        ("sqs://host?fifo=perhaps", "fifo"),
        ("sqs://host?session_token=abc", "session_token needs credentials"),
        ("sqs://K:S@host?profile=dev", "not both"),
        ("amqp://host", "sqs://"),
    ],
)
async def test_bad_urls_are_configuration_errors(url: str, complaint: str) -> None:
    with pytest.raises(msgkit.ConfigurationError, match=complaint):
        SQSTransport.from_url(url)


async def test_options_from_a_settings_object() -> None:
    transport = SQSTransport.from_url(
        "sqs://127.0.0.1:9324", SQSSettings(secure=False, fifo=True, visibility_timeout=7)
    )
    assert transport.capabilities.ordered
    assert transport.capabilities.consumer_loss_redelivery == 8.0
    with pytest.raises(msgkit.ConfigurationError, match="not both"):
        SQSTransport.from_url("sqs://127.0.0.1:9324?fifo=true", SQSSettings(secure=False))
    with pytest.raises(msgkit.ConfigurationError, match="SQSSettings"):
        SQSTransport.from_url("sqs://127.0.0.1:9324", msgkit.config.TransportSettings())


async def test_capabilities_are_declared_honestly() -> None:
    standard = SQSTransport.from_url(LOCAL).capabilities
    fifo = SQSTransport.from_url(with_options(LOCAL, fifo=True, max_message_size=1_048_576)).capabilities
    assert (standard.fan_out, standard.replay_for_new_group, standard.ordered) == (False, False, False)
    assert fifo.ordered
    assert not fifo.fan_out
    assert standard.max_message_size == guaranteed_size(262_144) == 195_840
    assert fifo.max_message_size == guaranteed_size(1_048_576)
    assert standard.consumer_loss_redelivery == 11.0  # the default 10 s visibility timeout, plus a second


async def test_secrets_never_show_in_repr_or_errors() -> None:
    url = "sqs://AKIAEXAMPLE:hunter2secret@127.0.0.1:9?secure=false&session_token=tok3n-value&connect_timeout=1"
    transport = SQSTransport.from_url(url)
    assert "hunter2secret" not in repr(transport)
    assert "tok3n-value" not in repr(transport)
    with pytest.raises(msgkit.BrokerUnavailableError) as caught:
        await transport.connect()  # nothing listens on port 9
    text = str(caught.value) + repr(caught.value.__cause__)
    assert "127.0.0.1" in text
    assert "hunter2secret" not in text
    assert "tok3n-value" not in text
    await transport.close()


async def test_unreachable_server_is_broker_unavailable_quickly() -> None:
    transport = SQSTransport.from_url(with_options("sqs://127.0.0.1:9?secure=false", connect_timeout=1))
    started = time.monotonic()
    with pytest.raises(msgkit.BrokerUnavailableError, match="cannot reach SQS"):
        await transport.connect()
    assert time.monotonic() - started < 10


async def test_closed_transport_refuses_work(msgkit_sqs_url: str) -> None:
    transport = SQSTransport.from_url(msgkit_sqs_url)
    await transport.connect()
    topic, group = names()
    await cleanup_later(msgkit_sqs_url, topic, group)
    subscription = await transport.subscribe(topic, group, prefetch=10)
    await asyncio.gather(transport.close(), transport.close())
    await transport.close()
    with pytest.raises(msgkit.ClosedError):
        await transport.publish(topic, [Message(b"x")])
    with pytest.raises(msgkit.ClosedError):
        await transport.declare(topic)
    with pytest.raises(msgkit.ClosedError):
        await subscription.fetch(1, 0.1)


# ---------------------------------------------------------------------------------------------- names and wire format


async def test_queue_names_fit_sqs_and_do_not_collide() -> None:
    assert topic_queue_name("orders", False) == "orders"
    assert topic_queue_name("orders", True) == "orders.fifo"
    dotted = topic_queue_name("orders.created", False)
    assert dotted.startswith("orders_created-")
    assert dotted != topic_queue_name("orders_created", False)
    long_topic = "t" * 200
    for fifo in (False, True):
        for name in (topic_queue_name(long_topic, fifo), dead_letter_queue_name(long_topic, "g" * 200, fifo)):
            assert len(name) <= 80
            assert name.endswith(".fifo") == fifo
            stem = name.removesuffix(".fifo")
            assert stem.replace("-", "").replace("_", "").isalnum()
    assert dead_letter_queue_name("a-b", "c", False) != dead_letter_queue_name("a", "b-c", False)
    assert dead_letter_queue_name("a", "b", False).endswith("-dlq")


async def test_wire_format_keeps_bytes_text_and_any_headers() -> None:
    headers = {f"h{i}": f"välue {i} \x00 \ufffe \ud800" for i in range(30)}  # nothing SQS would refuse survives as is
    for body in (b"plain text \xe2\x9c\x93", bytes(range(256)), b"", b"\x00", "\ufffe".encode()):
        message = Message(body, key="ключ", headers=headers)
        entry, size = encode(message, fifo=False)
        value = entry["MessageAttributes"][META_ATTRIBUTE]["StringValue"]
        assert not re.search("[\x00\ufffe\ud800-\udfff]", entry["MessageBody"] + value)
        assert size == len(entry["MessageBody"].encode()) + len(value.encode()) + len("msgkit") + len("String")
        raw = {"Body": entry["MessageBody"], "MessageId": "sqs-id", "MessageAttributes": entry["MessageAttributes"]}
        back = decode(raw)
        assert (back.body, back.id, back.key, dict(back.headers), back.timestamp) == (
            body,
            message.id,
            "ключ",
            headers,
            message.timestamp,
        )
    text_entry, _ = encode(Message(b"just text"), fifo=False)
    assert text_entry["MessageBody"] == "just text"
    assert '"e"' not in text_entry["MessageAttributes"][META_ATTRIBUTE]["StringValue"]


async def test_batches_hold_ten_within_the_byte_limit_and_fifo_groups_stay_in_one_lane() -> None:
    standard = [{"MessageBody": "x"} for _ in range(25)]
    assert plan_batches(standard, [1] * 25, 1000) == [[list(range(10))], [list(range(10, 20))], [list(range(20, 25))]]
    assert plan_batches(standard[:5], [100] * 5, 250) == [[[0, 1]], [[2, 3]], [[4]]]
    assert plan_batches(standard[:2], [900, 900], 500) == [[[0]], [[1]]]  # one entry at least
    fifo = [{"MessageBody": "x", "MessageGroupId": f"key-{i % 5}"} for i in range(100)]
    lanes = plan_batches(fifo, [1] * 100, 1000)
    for key in range(5):
        holding = [lane for lane in lanes if any(i % 5 == key for batch in lane for i in batch)]
        assert len(holding) == 1, "a MessageGroupId must stay in one lane"
        order = [i for batch in holding[0] for i in batch if i % 5 == key]
        assert order == sorted(order)
    assert all(len(batch) <= 10 for lane in lanes for batch in lane)
    assert sorted(i for lane in lanes for batch in lane for i in batch) == list(range(100))


async def test_delay_seconds_round_up_and_stay_within_twelve_hours() -> None:
    assert _delay_seconds(1.25, 0.0) == 2
    assert _delay_seconds(0.0, 5.0) == 0
    assert _delay_seconds(0.01, 0.0) == 1
    assert _delay_seconds(1e9, 0.0) == 43_195
    assert _delay_seconds(60, 43_190.0) == 5
    assert _delay_seconds(60, 50_000.0) == 0


# ---------------------------------------------------------------------------------------------- on the wire


async def test_bodies_and_metadata_on_the_wire_and_foreign_messages(msgkit_sqs_url: str) -> None:
    async with connected(msgkit_sqs_url) as transport:
        topic, group = names()
        await cleanup_later(msgkit_sqs_url, topic, group)
        await transport.declare(topic, group)
        url = await transport.queue_url(topic)
        text = Message("ünïcode text ✓".encode(), key="k", headers={f"h{i}": str(i) for i in range(25)})
        binary = Message(b"\x00\xffbinary")
        await transport.publish(topic, [text, binary])
        raw = {m["MessageAttributes"][META_ATTRIBUTE]["StringValue"]: m for m in await raw_receive(transport, url, 2)}
        by_id = {json.loads(meta)["i"]: m for meta, m in raw.items()}
        assert by_id[text.id]["Body"] == "ünïcode text ✓"
        assert by_id[binary.id]["Body"] == "AP9iaW5hcnk="
        for m in by_id.values():
            assert set(m["MessageAttributes"]) == {META_ATTRIBUTE}, "headers must travel in one attribute"
        assert json.loads(by_id[text.id]["MessageAttributes"][META_ATTRIBUTE]["StringValue"])["h"] == text.headers
        await transport._client.change_message_visibility_batch(
            QueueUrl=url,
            Entries=[
                {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
                for n, m in enumerate(raw.values())
            ],
        )

        foreign = await transport._client.send_message(
            QueueUrl=url,
            MessageBody="from another client",
            MessageAttributes={"origin": {"DataType": "String", "StringValue": "legacy"}},
        )
        subscription = await transport.subscribe(topic, group, prefetch=10)
        got = {d.id: d for d in await fetch_n(subscription, 3)}
        assert got[text.id].body == text.body
        assert dict(got[text.id].headers) == text.headers
        assert got[binary.id].body == binary.body
        other = got[foreign["MessageId"]]
        assert (other.body, dict(other.headers), other.key) == (b"from another client", {"origin": "legacy"}, None)
        assert abs(other.message.timestamp - time.time()) < 60
        await subscription.settle([(d, msgkit.ACK) for d in got.values()])
        await subscription.close()


async def test_encoded_size_is_checked_before_anything_is_sent(msgkit_sqs_url: str) -> None:
    async with connected(msgkit_sqs_url, max_message_size=2048) as transport:
        assert transport.capabilities.max_message_size == 768
        topic, group = names()
        await cleanup_later(msgkit_sqs_url, topic, group)
        await transport.declare(topic, group)
        url = await transport.queue_url(topic)
        fits = Message(b"\xff" * 760)  # the largest binary body the capability promises: base64 makes it 1016
        await transport.publish(topic, [fits])
        two_letters = (f"{chr(65 + i // 26)}{chr(97 + i % 26)}" for i in range(300))
        many_tiny_headers = Message(b"x", headers=dict.fromkeys(two_letters, ""))  # size() 637, JSON 2.4 KB
        assert many_tiny_headers.size() <= transport.capabilities.max_message_size
        with pytest.raises(msgkit.MessageTooLargeError, match=f"{many_tiny_headers.id}.*over the 2048 bytes"):
            await transport.publish(topic, [Message(b"first"), many_tiny_headers])
        await asyncio.sleep(0.3)
        assert await queue_count(transport, url) == 1, "nothing of a refused batch may be sent"


async def test_sends_go_in_concurrent_batches_of_ten_and_acks_are_batched(msgkit_sqs_url: str) -> None:
    async with connected(msgkit_sqs_url) as transport:
        spy = spy_on(transport)
        topic, group = names()
        await cleanup_later(msgkit_sqs_url, topic, group)
        await transport.declare(topic, group)
        messages = [Message(f"m{i}".encode()) for i in range(195)]
        await transport.publish(topic, messages)
        batches = [kw["Entries"] for name, kw in spy.requests if name == "send_message_batch"]
        assert [len(b) for b in batches] == [10] * 19 + [5]
        assert spy.peak["send_message_batch"] > 1, "large batches must be sent concurrently"
        assert spy.calls["send_message"] == 0

        subscription = await transport.subscribe(topic, group, prefetch=200)
        got = await fetch_n(subscription, 195)
        assert sorted(d.id for d in got) == sorted(m.id for m in messages)
        assert all(kw["MaxNumberOfMessages"] <= 10 for name, kw in spy.requests if name == "receive_message")
        await subscription.settle([(d, msgkit.ACK) for d in got])
        deletes = [kw["Entries"] for name, kw in spy.requests if name == "delete_message_batch"]
        assert sum(map(len, deletes)) == 195
        assert len(deletes) == 20
        assert spy.calls["delete_message"] == 0
        await subscription.close()


async def test_several_receivers_reach_an_in_flight_bound_above_ten(msgkit_sqs_url: str) -> None:
    async with msgkit.Broker(msgkit_sqs_url) as broker:
        spy = spy_on(broker.transport)
        topic, group = names()
        await cleanup_later(msgkit_sqs_url, topic, group)
        await broker.declare(topic, group)
        await broker.send_batch(topic, [f"m{i}".encode() for i in range(60)])
        gate = asyncio.Event()
        running = 0

        async def blocked(delivery: Delivery) -> None:
            nonlocal running
            running += 1
            await gate.wait()

        consumer = broker.consumer(topic, group, blocked, max_in_flight=35, settle_interval=0.01)
        await consumer.start()
        await eventually(lambda: running == 35, WAIT, lambda: f"{running} running, expected 35")
        await asyncio.sleep(0.3)
        assert consumer.in_flight == 35
        assert spy.peak["receive_message"] >= 3, "receives must run concurrently to fill more than 10 slots"
        gate.set()
        await eventually(lambda: running == 60, WAIT, lambda: f"{running} of 60 handled")
        await consumer.stop()


async def test_partial_batch_failures_are_retried_or_reported_per_message(msgkit_sqs_url: str) -> None:
    async with connected(msgkit_sqs_url) as transport:
        spy = spy_on(transport)
        topic, group = names()
        await cleanup_later(msgkit_sqs_url, topic, group)
        await transport.declare(topic, group)
        messages = [Message(f"m{i}".encode()) for i in range(10)]
        flaky, refused = messages[3], messages[5]
        first = True

        async def inject(kwargs: dict[str, Any], call: Callable[..., Awaitable[Any]]) -> Any:
            nonlocal first
            if not first:
                return await call(**kwargs)
            first = False
            ids = {e["Id"] for e in kwargs["Entries"]}
            assert ids == {str(i) for i in range(10)}
            failed = [
                {"Id": "3", "SenderFault": False, "Code": "InternalError", "Message": "try again"},
                {"Id": "5", "SenderFault": True, "Code": "InvalidParameterValue", "Message": "refused"},
            ]
            kept = [e for e in kwargs["Entries"] if e["Id"] not in ("3", "5")]
            response = await call(**{**kwargs, "Entries": kept})
            return {**response, "Failed": failed}

        spy.hooks["send_message_batch"] = inject
        with pytest.raises(msgkit.PublishError) as caught:
            await transport.publish(topic, messages)
        assert caught.value.failed == ((refused.id, "InvalidParameterValue: refused"),)
        retried = [kw["Entries"] for name, kw in spy.requests if name == "send_message_batch"][1]
        assert [e["Id"] for e in retried] == ["3"]

        subscription = await transport.subscribe(topic, group, prefetch=20)
        got = await fetch_n(subscription, 9)
        assert sorted(d.id for d in got) == sorted(m.id for m in messages if m is not refused)
        assert flaky.id in {d.id for d in got}
        await subscription.settle([(d, msgkit.ACK) for d in got])
        await subscription.close()


# ---------------------------------------------------------------------------------------------- visibility


async def test_the_heartbeat_keeps_a_long_handler_s_message_and_stops_when_settled(msgkit_sqs_url: str) -> None:
    async with connected(msgkit_sqs_url, visibility_timeout=2) as transport:
        spy = spy_on(transport)
        topic, group = names()
        await cleanup_later(msgkit_sqs_url, topic, group)
        await transport.declare(topic, group)
        message = Message(b"slow")
        await transport.publish(topic, [message])
        holder = await transport.subscribe(topic, group, prefetch=10)
        rival = await transport.subscribe(topic, group, prefetch=10)
        (delivery,) = await fetch_n(holder, 1)
        deadline = time.monotonic() + 5.0  # 2.5 visibility timeouts
        while time.monotonic() < deadline:
            assert not await rival.fetch(10, 0.5), "the message reached another consumer while being handled"
        assert spy.calls["change_message_visibility_batch"] >= 2
        await holder.settle([(delivery, msgkit.ACK)])
        extended = spy.calls["change_message_visibility_batch"]
        assert not await rival.fetch(10, 2.5)
        assert spy.calls["change_message_visibility_batch"] == extended, "the heartbeat went on after the ack"
        await holder.close()
        await rival.close()


async def test_a_closed_subscription_stops_heart_beating_and_its_message_comes_back(msgkit_sqs_url: str) -> None:
    async with connected(msgkit_sqs_url, visibility_timeout=2) as transport:
        topic, group = names()
        await cleanup_later(msgkit_sqs_url, topic, group)
        await transport.declare(topic, group)
        message = Message(b"abandoned")
        await transport.publish(topic, [message])
        lost = await transport.subscribe(topic, group, prefetch=10)
        await fetch_n(lost, 1)
        await lost.close()
        closed_at = time.monotonic()
        other = await transport.subscribe(topic, group, prefetch=10)
        (again,) = await fetch_n(other, 1)
        assert again.id == message.id
        assert again.attempt == 2
        assert time.monotonic() - closed_at <= transport.capabilities.consumer_loss_redelivery + 1.5
        await other.settle([(again, msgkit.ACK)])
        await other.close()


async def test_release_is_at_once_and_is_an_attempt_only_for_other_processes(msgkit_sqs_url: str) -> None:
    async with connected(msgkit_sqs_url, visibility_timeout=60) as transport, connected(msgkit_sqs_url) as elsewhere:
        topic, group = names()
        await cleanup_later(msgkit_sqs_url, topic, group)
        await transport.declare(topic, group)
        await transport.publish(topic, [Message(f"m{i}".encode()) for i in range(3)])
        first = await transport.subscribe(topic, group, prefetch=10)
        await first.release(await fetch_n(first, 3))
        second = await transport.subscribe(topic, group, prefetch=10)
        started = time.monotonic()
        again = await fetch_n(second, 3, timeout=5)
        assert time.monotonic() - started < 3, "a released message must be available at once"
        assert {d.attempt for d in again} == {1}, "a release is not an attempt for the process that released"

        await second.release(again)
        other = await elsewhere.subscribe(topic, group, prefetch=10)
        there = await fetch_n(other, 3, timeout=5)
        assert {d.attempt for d in there} == {3}, "SQS counts every receive; other processes see them (documented)"
        await other.settle([(d, msgkit.ACK) for d in there])
        for subscription in (first, second, other):
            await subscription.close()


async def test_retry_delays_are_rounded_up_and_clamped_to_twelve_hours(msgkit_sqs_url: str) -> None:
    async with connected(msgkit_sqs_url) as transport:
        spy = spy_on(transport)
        topic, group = names()
        await cleanup_later(msgkit_sqs_url, topic, group)
        await transport.declare(topic, group)
        await transport.publish(topic, [Message(b"a"), Message(b"b")])
        subscription = await transport.subscribe(topic, group, prefetch=10)
        a, b = await fetch_n(subscription, 2)
        await subscription.settle([(a, Retry(1.25, headers={"dropped": "yes"})), (b, Retry(10**6))])
        (request,) = [kw for name, kw in spy.requests if name == "change_message_visibility_batch"]
        short, capped = sorted(e["VisibilityTimeout"] for e in request["Entries"])
        assert short == 2
        assert 43_190 <= capped <= 43_195  # 12 h from the receive, less the time already held
        (again,) = await fetch_n(subscription, 1, timeout=5)
        assert again.id == a.id
        assert again.attempt == 2
        assert "dropped" not in again.headers, "SQS cannot rewrite headers on redelivery (documented)"
        await subscription.settle([(again, msgkit.ACK)])
        await subscription.close()


# ---------------------------------------------------------------------------------------------- dead letters and groups


async def test_dead_letters_go_to_the_group_s_queue_before_the_original_is_deleted(msgkit_sqs_url: str) -> None:
    async with connected(msgkit_sqs_url) as transport:
        spy = spy_on(transport)
        topic, group = names()
        await cleanup_later(msgkit_sqs_url, topic, group)
        await transport.declare(topic, group)
        message = Message(b"poison", key="k", headers={"origin": "test"})
        await transport.publish(topic, [message])
        subscription = await transport.subscribe(topic, group, prefetch=10)
        (delivery,) = await fetch_n(subscription, 1)
        await subscription.settle([(delivery, DeadLetter("no good", {DLQ_REASON: "no good"}))])
        order = [name for name, _ in spy.requests if name in ("send_message_batch", "delete_message_batch")]
        assert order[-2:] == ["send_message_batch", "delete_message_batch"]
        dead_url = await transport.queue_url(topic, group)
        assert dead_url.endswith("/" + dead_letter_queue_name(topic, group, False))
        attributes = (await transport._client.get_queue_attributes(QueueUrl=dead_url, AttributeNames=["All"]))[
            "Attributes"
        ]
        assert attributes.get("MessageRetentionPeriod", "1209600") == "1209600"
        (raw,) = await raw_receive(transport, dead_url, 1)
        meta = json.loads(raw["MessageAttributes"][META_ATTRIBUTE]["StringValue"])
        assert meta["i"] == message.id
        assert meta["h"] == {"origin": "test", DLQ_REASON: "no good"}
        native = {name: a["StringValue"] for name, a in raw["MessageAttributes"].items() if name != META_ATTRIBUTE}
        assert native == {DLQ_REASON: "no good"}, "the reason must also be a native attribute (console, other tools)"
        assert await queue_count(transport, await transport.queue_url(topic)) == 0
        await subscription.close()


async def test_a_redrive_policy_set_by_the_user_is_used(msgkit_sqs_url: str) -> None:
    async with connected(msgkit_sqs_url, visibility_timeout=30) as transport:
        topic, group = names()
        await cleanup_later(msgkit_sqs_url, topic, group)
        client = transport._client
        own_dlq = (await client.create_queue(QueueName=f"{topic}-own-dlq"))["QueueUrl"]
        arn = (await client.get_queue_attributes(QueueUrl=own_dlq, AttributeNames=["QueueArn"]))["Attributes"][
            "QueueArn"
        ]
        queue_url = (await client.create_queue(QueueName=topic))["QueueUrl"]
        policy = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": 2})
        await client.set_queue_attributes(QueueUrl=queue_url, Attributes={"RedrivePolicy": policy})
        try:
            await transport.declare(topic, group)
            assert await transport.queue_url(topic, group) == own_dlq
            moved, dead_lettered = Message(b"moved by SQS"), Message(b"dead-lettered by msgkit")
            await transport.publish(topic, [moved, dead_lettered])
            subscription = await transport.subscribe(topic, group, prefetch=10)
            for delivery in await fetch_n(subscription, 2):
                if delivery.id == dead_lettered.id:
                    await subscription.settle([(delivery, DeadLetter("bad", {DLQ_REASON: "bad"}))])
                else:
                    await subscription.release([delivery])
            for _ in range(2):  # the third receive of `moved` is where SQS moves it
                for delivery in await subscription.fetch(10, 1.0):
                    await subscription.release([delivery])
            letters = await transport.subscribe_dead_letters(topic, group, prefetch=10)
            got = {d.id: d for d in await fetch_n(letters, 2)}
            assert got[dead_lettered.id].headers[DLQ_REASON] == "bad"
            assert "RedrivePolicy" in got[moved.id].headers[DLQ_REASON]
            assert got[moved.id].headers[DLQ_TOPIC] == topic
            await letters.settle([(d, msgkit.ACK) for d in got.values()])
            await subscription.close()
            await letters.close()
        finally:
            await client.delete_queue(QueueUrl=own_dlq)


async def test_max_receive_count_sets_a_redrive_policy_to_the_group_s_queue(msgkit_sqs_url: str) -> None:
    async with connected(msgkit_sqs_url, max_receive_count=4) as transport:
        topic, group = names()
        await cleanup_later(msgkit_sqs_url, topic, group)
        await transport.declare(topic, group)
        queue, dead = await transport._group_queues(topic, group)
        attributes = (await transport._client.get_queue_attributes(QueueUrl=queue.url, AttributeNames=["All"]))[
            "Attributes"
        ]
        policy = json.loads(attributes["RedrivePolicy"])
        assert policy["deadLetterTargetArn"] == dead.arn
        assert int(policy["maxReceiveCount"]) == 4


async def test_a_topic_has_one_group_and_another_is_refused(msgkit_sqs_url: str) -> None:
    topic, group = names()
    await cleanup_later(msgkit_sqs_url, topic, group)
    async with connected(msgkit_sqs_url) as transport:
        await transport.declare(topic)  # no group yet: publishing works, nobody owns the queue
        await transport.declare(topic, group)
        await transport.declare(topic, group)
        with pytest.raises(msgkit.ConfigurationError, match=f"consumed by group '{group}'"):
            await transport.declare(topic, "another-group")
        tags = (await transport._client.list_queue_tags(QueueUrl=await transport.queue_url(topic)))["Tags"]
        assert tags == {GROUP_TAG: group}
    async with connected(msgkit_sqs_url) as fresh:  # the claim is on the queue, not in one process
        with pytest.raises(msgkit.ConfigurationError, match="fan-out"):
            await fresh.subscribe(topic, "another-group", prefetch=10)
        with pytest.raises(msgkit.ConfigurationError):
            await fresh.subscribe_dead_letters(topic, "another-group", prefetch=10)
        await (await fresh.subscribe(topic, group, prefetch=10)).close()


# ---------------------------------------------------------------------------------------------- FIFO


async def test_fifo_group_and_deduplication_ids(msgkit_sqs_url: str) -> None:
    async with connected(msgkit_sqs_url, fifo=True) as transport:
        topic, group = names()
        await cleanup_later(with_options(msgkit_sqs_url, fifo=True), topic, group)
        await transport.declare(topic, group)
        url = await transport.queue_url(topic)
        assert url.endswith(f"/{topic}.fifo")
        keyed, unicode_key, unkeyed = Message(b"1", key="customer-1"), Message(b"2", key="ключ 🔑"), Message(b"3")
        await transport.publish(topic, [keyed, unicode_key, unkeyed])
        await transport.publish(topic, [Message(b"duplicate", id=keyed.id, key="customer-1")])
        raw = {
            json.loads(m["MessageAttributes"][META_ATTRIBUTE]["StringValue"])["i"]: m
            for m in await raw_receive(transport, url, 3)
        }
        assert raw[keyed.id]["Attributes"]["MessageGroupId"] == "customer-1"
        assert len(raw[unicode_key.id]["Attributes"]["MessageGroupId"]) == 64  # sha256 of a key SQS refuses
        assert raw[unkeyed.id]["Attributes"]["MessageGroupId"] == unkeyed.id
        assert {m["Attributes"]["MessageDeduplicationId"] for m in raw.values()} == {
            keyed.id,
            unicode_key.id,
            unkeyed.id,
        }
        await asyncio.sleep(0.5)
        assert await queue_count(transport, url) == 3, "the resent id must be deduplicated by SQS"


async def test_fifo_keeps_each_key_s_order_across_concurrent_batches(msgkit_sqs_url: str) -> None:
    async with msgkit.Broker(with_options(msgkit_sqs_url, fifo=True)) as broker:
        topic, group = names()
        await cleanup_later(with_options(msgkit_sqs_url, fifo=True), topic, group)
        await broker.declare(topic, group)
        keys = [f"key-{k}" for k in range(7)]
        await broker.send_batch(topic, [Message.of(f"{key}:{n}".encode(), key=key) for n in range(60) for key in keys])
        seen: dict[str, list[int]] = {key: [] for key in keys}

        async def handler(body: bytes) -> None:
            key, _, n = body.decode().partition(":")
            seen[key].append(int(n))

        consumer = broker.consumer(topic, group, handler, max_in_flight=50, ordered_by_key=True)
        await consumer.start()
        await eventually(
            lambda: sum(map(len, seen.values())) >= 420, WAIT, lambda: f"{sum(map(len, seen.values()))} of 420"
        )
        await consumer.stop()
        assert all(seen[key] == list(range(60)) for key in keys), seen


# ---------------------------------------------------------------------------------------------- failures and restarts


async def test_a_vanished_queue_is_created_again(msgkit_sqs_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqs_module, "_REAPPEAR_GRACE", 0.5)
    async with connected(msgkit_sqs_url) as transport:
        topic, group = names()
        await cleanup_later(msgkit_sqs_url, topic, group)
        await transport.declare(topic, group)
        await transport._client.delete_queue(QueueUrl=await transport.queue_url(topic))
        message = Message(b"after the queue came back")
        await transport.publish(topic, [message])
        subscription = await transport.subscribe(topic, group, prefetch=10)
        (delivery,) = await fetch_n(subscription, 1)
        assert delivery.id == message.id
        await subscription.settle([(delivery, msgkit.ACK)])
        await subscription.close()


class _Proxy:
    """A TCP proxy to the SQS server that can be stopped and started: an outage on demand."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._links):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._links.update((writer, up_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()
                self._links.discard(sink)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_an_outage_is_retried_then_surfaces_and_recovery_follows(msgkit_sqs_url: str) -> None:
    parts = urlsplit(msgkit_sqs_url)
    if parts.hostname is None or "secure=false" not in msgkit_sqs_url:
        pytest.skip("needs a plain-HTTP SQS server with a host and port")
    proxy = _Proxy(parts.hostname, parts.port or 80)
    await proxy.start()
    url = with_options(with_address(msgkit_sqs_url, "127.0.0.1", proxy.port), reconnect_timeout=1.5, wait_time=1)
    async with connected(url) as transport:
        topic, group = names()
        await cleanup_later(msgkit_sqs_url, topic, group)
        await transport.declare(topic, group)
        subscription = await transport.subscribe(topic, group, prefetch=10)
        await proxy.stop()
        message = Message(b"during the outage")
        started = time.monotonic()
        with pytest.raises(msgkit.PublishError) as caught:
            await transport.publish(topic, [message])
        assert time.monotonic() - started < 15, "an outage must surface after reconnect_timeout"
        assert caught.value.failed[0][0] == message.id
        assert "unavailable" in caught.value.failed[0][1]

        async def fetch_until_it_raises() -> None:
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:
                await subscription.fetch(10, 0.5)

        with pytest.raises(msgkit.BrokerUnavailableError):
            await fetch_until_it_raises()

        await proxy.start()
        await transport.publish(topic, [message])
        got: list[Delivery] = []
        deadline = time.monotonic() + WAIT
        while not got and time.monotonic() < deadline:
            with contextlib.suppress(msgkit.BrokerUnavailableError):  # raised once more if it failed meanwhile
                got += await subscription.fetch(10, 0.5)
        (delivery,) = got
        assert delivery.id == message.id
        await subscription.settle([(delivery, msgkit.ACK)])
        await subscription.close()
    await proxy.stop()


@pytest.mark.timeout(240)
async def test_queued_and_new_messages_arrive_across_a_server_restart(msgkit_sqs_url: str) -> None:
    command = os.environ.get("MSGKIT_SQS_RESTART_COMMAND")
    if not command:
        pytest.skip("set MSGKIT_SQS_RESTART_COMMAND (. .brokers/env) to restart the server")
    async with msgkit.Broker(with_options(msgkit_sqs_url, wait_time=2)) as broker:
        topic, group = names()
        await cleanup_later(msgkit_sqs_url, topic, group)
        await broker.declare(topic, group)
        before = await broker.send_batch(topic, [f"before {i}".encode() for i in range(20)])
        restart = await asyncio.create_subprocess_shell(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, errors = await restart.communicate()
        assert restart.returncode == 0, errors.decode(errors="replace")
        received = Received()
        consumer = broker.consumer(topic, group, received, max_in_flight=20)
        await consumer.start()
        after: list[str] = []
        deadline = time.monotonic() + 90
        while len(after) < 20:
            try:
                after += await broker.send_batch(topic, [f"after {len(after) + i}".encode() for i in range(5)])
            except msgkit.MsgkitError:
                assert time.monotonic() < deadline, "sending did not recover after the restart"
                await asyncio.sleep(0.5)
        await received.wait_for(before + after, timeout=90)
        await consumer.stop()


async def test_the_example_runs(msgkit_sqs_url: str) -> None:
    env = {**os.environ, "MSGKIT_SQS_URL": msgkit_sqs_url}
    env.pop("MSGKIT_URL", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), 90)
    text = output.decode()
    assert process.returncode == 0, text
    assert "dead letter" in text
    assert "order 7 is fraudulent" in text
    assert "billed order 2 of customer-2: 19.00 (attempt 2)" in text
