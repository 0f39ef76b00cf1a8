"""The SQS transport: ``sqs://``, with aiobotocore, for AWS SQS or an SQS-compatible server (ElasticMQ).

A topic is one queue (created by ``declare``, its URL cached); with ``fifo=true`` every topic is
a FIFO queue ``<name>.fifo`` whose MessageGroupId is the message key (the id for messages without
one) and whose MessageDeduplicationId is the msgkit id. SQS has no fan-out without SNS, so a topic
has one group: the first group that declares it owns it (a ``msgkit-group`` queue tag), and
another group is refused with a ConfigurationError; consumers of the owning group compete.

* **publish** is SendMessageBatch in tens (and within the batch byte limit), sent concurrently;
  entries that fail for a reason on SQS's side are retried, the rest are reported per message;
* **consume** keeps up to ``max_pollers`` long polls going, never asking for more messages than
  the consumer has free slots; attempts are ApproximateReceiveCount; a heartbeat extends the
  visibility timeout of held messages (ChangeMessageVisibilityBatch at about half the timeout);
* **ack** is DeleteMessageBatch; **Retry(delay)** and **release** are ChangeMessageVisibilityBatch
  (whole seconds, at most 12 h from the receive); **DeadLetter** sends to the group's dead-letter
  queue ``<topic>-<group>-<hash>-dlq`` (or the target of a RedrivePolicy the user set) first.

Bodies, headers, sizes, URL options and capabilities: docs/transports/sqs.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from functools import partial
from typing import Any, TypeVar
from urllib.parse import unquote

import aiohttp
import botocore.exceptions as bex  # type: ignore[import-untyped]
from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import AioSession  # type: ignore[import-untyped]
from pydantic import Field

from msgkit.config import TransportSettings, redact_url, settings_from_url, split_url
from msgkit.errors import (
    BrokerUnavailableError,
    ClosedError,
    ConfigurationError,
    MessageTooLargeError,
    MsgkitError,
    PublishError,
)
from msgkit.message import Message
from msgkit.transports._outage import OutageClock
from msgkit.transports.base import Capabilities, Transport
from msgkit.transports.sqs_subscription import (
    DEAD_LETTER_GROUP,
    QueueInfo,
    ReceiveMemory,
    SQSSubscription,
    add_reason_attributes,
    dead_letter_queue_name,
    encode,
    guaranteed_size,
    plan_batches,
    topic_queue_name,
)

logger = logging.getLogger("msgkit.sqs")

T = TypeVar("T")

#: The queue tag naming the group that consumes a topic's queue.
GROUP_TAG = "msgkit-group"
#: Dead letters are kept this long (SQS's maximum retention, 14 days).
DEAD_LETTER_RETENTION = 1_209_600
#: The largest message SQS accepts at all; dead-letter queues are created with it when possible.
SQS_MAX_SIZE = 1_048_576

_TRANSIENT = (bex.ConnectionError, bex.HTTPClientError, aiohttp.ClientError, asyncio.TimeoutError)
_TRANSIENT_CODES = frozenset(
    {
        "ServiceUnavailable",
        "InternalError",
        "InternalFailure",
        "RequestThrottled",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "KmsThrottled",
        "AWS.SimpleQueueService.KmsThrottled",
    }
)
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "AuthFailure",
        "ExpiredToken",
        "IncompleteSignature",
        "InvalidClientTokenId",
        "InvalidSecurity",
        "MissingAuthenticationToken",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
        "KmsAccessDenied",
        "AWS.SimpleQueueService.KmsAccessDenied",
    }
)
_GONE_CODES = frozenset({"QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue"})
_EXISTS_CODES = frozenset({"QueueNameExists", "QueueAlreadyExists"})
_AWS_HOST = re.compile(r"(?:sqs[.-]([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?|([a-z0-9-]+)\.queue\.amazonaws\.com)")
_HOST = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]+")
_PROBE_QUEUE = "msgkit-connect-probe"
#: Seconds a queue that vanished may take to come back (a restarting server) before it is re-created.
_REAPPEAR_GRACE = 30.0


class SQSSettings(TransportSettings):
    """Options of ``sqs://`` URLs (see docs/transports/sqs.md)."""

    region: str | None = Field(None, pattern=r"^[a-z0-9-]{1,40}$")
    secure: bool = True
    fifo: bool = False
    visibility_timeout: int = Field(10, ge=1, le=43_200)
    wait_time: int = Field(20, ge=1, le=20)
    max_message_size: int = Field(262_144, ge=2048, le=SQS_MAX_SIZE)
    max_receive_count: int = Field(0, ge=0, le=1000)
    max_pollers: int = Field(10, ge=1, le=100)
    max_connections: int = Field(50, ge=8, le=1000)
    reconnect_timeout: float = Field(30.0, gt=0, le=3600)
    connect_timeout: float = Field(5.0, gt=0, le=300)
    profile: str | None = Field(None, min_length=1)
    session_token: str | None = Field(None, min_length=1)
    tls_ca_file: str | None = None
    tls_verify: bool = True


class _QueueGone(MsgkitError):
    """The queue was deleted under us (or the server lost it): re-create it and try again."""


class SQSTransport(Transport):
    """The ``sqs://`` transport. See the module docstring and docs/transports/sqs.md."""

    schemes = ("sqs",)

    def __init__(self, url: str, settings: SQSSettings | None = None) -> None:
        parts = split_url(url)
        self._url = redact_url(url)
        if parts.scheme.lower() != "sqs":
            raise ConfigurationError(f"SQSTransport serves sqs:// URLs, not {parts.scheme}://")
        self.settings = s = settings_from_url(SQSSettings, url, settings)
        if parts.path not in ("", "/"):
            raise ConfigurationError(
                f"sqs:// URLs take no path ({self._url!r}): sqs://[KEY:SECRET@]HOST[:PORT]?options"
            )
        host = parts.hostname
        if host is not None and not _HOST.fullmatch(host):
            raise ConfigurationError(f"invalid host {host!r} in {self._url!r}")
        if host is None and (parts.port or not s.secure):
            raise ConfigurationError(f"a port or secure=false needs a host in {self._url!r}")
        if not s.secure and (s.tls_ca_file or not s.tls_verify):
            raise ConfigurationError(f"tls_* options need secure=true ({self._url!r})")
        if bool(parts.username) != bool(parts.password):
            raise ConfigurationError(
                f"give both the access key id and the secret: sqs://KEY:SECRET@HOST ({self._url!r})"
            )
        if parts.username and s.profile:
            raise ConfigurationError(f"give credentials in the URL or a profile, not both ({self._url!r})")
        if s.session_token and not parts.username:
            raise ConfigurationError(f"session_token needs credentials in the URL ({self._url!r})")
        self._endpoint: str | None = None
        if host is not None:
            shown = f"[{host}]" if ":" in host else host
            self._endpoint = f"{'https' if s.secure else 'http'}://{shown}{f':{parts.port}' if parts.port else ''}"
        aws = _AWS_HOST.fullmatch(host or "")
        self._region = s.region or (aws and (aws.group(1) or aws.group(2))) or None
        self._credentials: dict[str, str] = {}
        if parts.username:
            self._credentials = {
                "aws_access_key_id": unquote(parts.username),
                "aws_secret_access_key": unquote(parts.password or ""),
            }
            if s.session_token:
                self._credentials["aws_session_token"] = s.session_token
        elif not s.secure:  # an emulator over plain HTTP: it checks no signature, botocore wants some
            self._credentials = {"aws_access_key_id": "msgkit", "aws_secret_access_key": "msgkit"}
        self._client: Any = None
        self._stack: AsyncExitStack | None = None
        self._connecting = asyncio.Lock()
        reserved = max(4, s.max_connections // 4)  # long polls never take the connections sends need
        self._poll_slots = asyncio.Semaphore(s.max_connections - reserved)
        self._send_slots = asyncio.Semaphore(reserved)
        self._topics: dict[str, QueueInfo] = {}
        self._groups: dict[tuple[str, str], tuple[QueueInfo, QueueInfo]] = {}
        self._deleted: set[str] = set()  # queues deleted by delete(): never re-created behind its back
        self._locks: defaultdict[object, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._subscriptions: set[SQSSubscription] = set()
        self._pollers: set[asyncio.Task[None]] = set()  # receive loops, also of closed subscriptions
        self._chores: set[asyncio.Task[None]] = set()  # visibility changes running in the background
        self._outage = OutageClock(f"SQS at {self._url}", self.settings.reconnect_timeout, logger)
        self.memory = ReceiveMemory()  # receives given back unhandled, dead letters read
        self._closing = False
        self._closed = False
        self._capabilities = Capabilities(
            fan_out=False,
            replay_for_new_group=False,
            ordered=s.fifo,
            native_delay=True,
            delay_tolerance=1.5,  # whole seconds of visibility, plus the wake-up of a long poll
            max_message_size=guaranteed_size(s.max_message_size),
            consumer_loss_redelivery=s.visibility_timeout + 1.0,
            persistent=True,
            exclusive_keys=s.fifo,  # one message group in flight at a time
        )

    @classmethod
    def from_url(cls, url: str, settings: TransportSettings | None = None) -> SQSTransport:
        if settings is not None and not isinstance(settings, SQSSettings):
            raise ConfigurationError(f"sqs:// takes SQSSettings, not {type(settings).__name__}")
        return cls(url, settings)

    def __repr__(self) -> str:
        return f"SQSTransport({self._url!r})"

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def connected(self) -> bool:
        """Whether the client is open (connected and not closed)."""
        return self._client is not None and not self._closed

    # ------------------------------------------------------------------ connection

    async def connect(self) -> None:
        self._check_open()
        async with self._connecting:
            if self._client is not None:
                return
            s = self.settings
            stack = AsyncExitStack()
            try:
                session = AioSession(profile=s.profile)
                region = self._region or session.get_config_variable("region")
                if region is None:
                    if self._endpoint is None:
                        raise ConfigurationError(
                            f"no AWS region for {self._url!r}: add ?region=NAME or set AWS_REGION / AWS_DEFAULT_REGION"
                        )
                    region = "us-east-1"  # an emulator's endpoint: the region only goes into signatures
                config = AioConfig(
                    max_pool_connections=s.max_connections,
                    connect_timeout=s.connect_timeout,
                    read_timeout=s.wait_time + 10,
                    retries={"mode": "standard", "total_max_attempts": 2},  # outages are retried here
                    user_agent_extra="msgkit",
                )
                verify: bool | str = s.tls_ca_file or s.tls_verify
                create = session.create_client(
                    "sqs",
                    region_name=region,
                    endpoint_url=self._endpoint,
                    verify=verify,
                    config=config,
                    **self._credentials,
                )
                client = await stack.enter_async_context(create)
                try:
                    await client.get_queue_url(QueueName=_PROBE_QUEUE)
                except bex.ClientError as exc:
                    code = _code(exc)
                    if code not in _GONE_CODES and code not in ("AccessDenied", "AccessDeniedException"):
                        raise
            except BaseException as exc:
                await stack.aclose()
                if isinstance(exc, _TRANSIENT):
                    raise BrokerUnavailableError(f"cannot reach SQS at {self._url}: {exc}") from exc
                if isinstance(exc, bex.ClientError):
                    raise self._error(exc, "connect") from exc
                if isinstance(exc, bex.NoCredentialsError | bex.PartialCredentialsError | bex.ProfileNotFound):
                    raise ConfigurationError(f"SQS at {self._url}: {exc}") from exc
                if isinstance(exc, bex.BotoCoreError):
                    raise ConfigurationError(f"SQS at {self._url}: {exc}") from exc
                raise
            self._client, self._stack = client, stack

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True  # subscriptions release what they received but never handed out first
        for subscription in list(self._subscriptions):
            await subscription.close()
        for task in self._pollers:  # what a cut-off long poll got comes back after the visibility timeout
            task.cancel()
        if self._chores:
            await asyncio.wait(self._chores, timeout=5.0)
        await asyncio.gather(*self._pollers, *self._chores, return_exceptions=True)
        self._closed = True
        if self._stack is not None:
            await self._stack.aclose()

    def _check_open(self) -> None:
        if self._closed or self._closing:
            raise ClosedError(f"transport {self._url} is closed")

    def _require_client(self) -> Any:
        if self._closed:
            raise ClosedError(f"transport {self._url} is closed")
        if self._client is None:
            raise ClosedError(f"transport {self._url} is not connected: call connect() first")
        return self._client

    def forget(self, subscription: SQSSubscription) -> None:
        """Called by a subscription when it closes."""
        self._subscriptions.discard(subscription)

    def track(self, task: asyncio.Task[None], *, poller: bool) -> None:
        """Keep a subscription's background task until it ends; ``close()`` ends it (pollers) or waits."""
        tasks = self._pollers if poller else self._chores
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    # ------------------------------------------------------------------ errors and outages

    def _error(self, exc: bex.ClientError, what: str) -> MsgkitError:
        code = _code(exc)
        text = exc.response.get("Error", {}).get("Message", "") or str(exc)
        if code in _DENIED_CODES:
            return ConfigurationError(f"SQS at {self._url} refused {what}: {code}: {text}")
        return MsgkitError(f"SQS at {self._url}: {what} failed: {code}: {text}")

    def _note_outage(self, what: str, exc: BaseException) -> None:
        self._outage.failed(what, exc)

    async def _call(self, what: str, op: Callable[[], Awaitable[T]], *, retry: bool = True) -> T:
        """Run ``op``, retrying network failures and throttling with backoff until ``reconnect_timeout``."""
        delay = 0.05
        while True:
            self._require_client()
            try:
                result = await op()
            except bex.ClientError as exc:
                code = _code(exc)
                if code in _GONE_CODES:
                    raise _QueueGone(f"{what}: the queue does not exist") from exc
                if (
                    code not in _TRANSIENT_CODES
                    and exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 400) < 500
                ):
                    raise self._error(exc, what) from exc
                failure: BaseException = exc
            except _TRANSIENT as exc:
                failure = exc
            except (bex.NoCredentialsError, bex.PartialCredentialsError) as exc:
                raise ConfigurationError(f"SQS at {self._url}: {what}: {exc}") from exc
            except (RuntimeError, AttributeError) as exc:  # the client closed under the call
                if self._closed:
                    raise ClosedError(f"transport {self._url} is closed") from exc
                raise
            else:
                self._outage.recovered()
                return result
            if self._closed:
                raise ClosedError(f"transport {self._url} is closed") from failure
            self._note_outage(what, failure)
            if not retry:
                raise BrokerUnavailableError(f"SQS at {self._url}: {what} failed: {failure}") from failure
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def call_queue(self, queue: QueueInfo, what: str, method: str, *, retry: bool = True, **kwargs: Any) -> Any:
        """Call the client's ``method`` on ``queue``; re-create the queue once if it vanished."""
        client = self._require_client()
        for attempt in range(2):
            try:
                return await self._call(
                    f"{what} on queue {queue.name}",
                    partial(getattr(client, method), QueueUrl=queue.url, **kwargs),
                    retry=retry,
                )
            except _QueueGone:
                if attempt:
                    raise
                await self._reopen(queue)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ queues

    async def _open_queue(self, name: str, *, fifo: bool, dead_letter: bool) -> QueueInfo:
        """Create the queue (or find it when it exists with other attributes, or creating is denied)."""
        client = self._require_client()
        s = self.settings
        attributes = {"VisibilityTimeout": str(s.visibility_timeout), "MaximumMessageSize": str(s.max_message_size)}
        if fifo:
            attributes["FifoQueue"] = "true"
        if dead_letter:
            attributes |= {
                "MessageRetentionPeriod": str(DEAD_LETTER_RETENTION),
                "MaximumMessageSize": str(SQS_MAX_SIZE),
            }

        async def create() -> str:
            try:
                response = await client.create_queue(QueueName=name, Attributes=attributes)
            except bex.ClientError as exc:
                code = _code(exc)
                if (
                    dead_letter
                    and code == "InvalidAttributeValue"
                    and attributes["MaximumMessageSize"] != str(s.max_message_size)
                ):  # a server that still caps messages at 256 KiB
                    attributes["MaximumMessageSize"] = str(s.max_message_size)
                    return await create()
                if code not in _EXISTS_CODES and code not in _DENIED_CODES:
                    raise
                try:
                    response = await client.get_queue_url(QueueName=name)
                except bex.ClientError:
                    if code in _EXISTS_CODES:
                        raise
                    raise exc from None
            url: str = response["QueueUrl"]
            return url

        url = await self._call(f"creating queue {name}", create)
        self._deleted.discard(name)
        return await self._describe(name, url, dead_letter=dead_letter)

    async def _describe(self, name: str, url: str, *, dead_letter: bool) -> QueueInfo:
        client = self._require_client()
        describe = partial(client.get_queue_attributes, QueueUrl=url, AttributeNames=["All"])
        response = await self._call(f"reading the attributes of queue {name}", describe)
        attributes: dict[str, str] = response.get("Attributes") or {}
        redrive = attributes.get("RedrivePolicy")
        target = None
        if redrive:
            try:
                target = json.loads(redrive).get("deadLetterTargetArn")
            except ValueError:
                logger.warning("queue %s has an unreadable RedrivePolicy %r; ignored", name, redrive)
        default_size = SQS_MAX_SIZE if dead_letter else self.settings.max_message_size
        return QueueInfo(
            name=name,
            url=url,
            fifo=attributes.get("FifoQueue") == "true" or name.endswith(".fifo"),
            max_size=int(attributes.get("MaximumMessageSize") or default_size),
            arn=attributes.get("QueueArn", ""),
            dead_letter=dead_letter,
            redrive_target=target,
        )

    async def _reopen(self, queue: QueueInfo) -> None:
        """Re-create a queue that vanished (deleted, or lost by a server without persistence)."""
        client = self._require_client()
        async with self._locks[("reopen", queue.name)]:
            # A server that just restarted may answer before it has restored its queues (ElasticMQ
            # does, and fails to start if a queue it restores was created meanwhile): wait a little.
            deadline = time.monotonic() + _REAPPEAR_GRACE
            while True:
                try:
                    response = await self._call(
                        f"finding queue {queue.name}", partial(client.get_queue_url, QueueName=queue.name)
                    )
                except _QueueGone:
                    if time.monotonic() >= deadline:
                        break
                    await asyncio.sleep(0.5)
                else:
                    queue.url = response["QueueUrl"]
                    return
            if queue.name in self._deleted:
                raise _QueueGone(f"queue {queue.name} was deleted")
            logger.warning("SQS queue %s does not exist any more; creating it again", queue.name)
            fresh = await self._open_queue(queue.name, fifo=queue.fifo, dead_letter=queue.dead_letter)
            queue.url, queue.arn = fresh.url, fresh.arn
            if queue.owner is not None:
                await self._tag(queue, queue.owner)

    async def _topic_queue(self, topic: str) -> QueueInfo:
        queue = self._topics.get(topic)
        if queue is None:
            async with self._locks[("topic", topic)]:
                queue = self._topics.get(topic)
                if queue is None:
                    name = topic_queue_name(topic, self.settings.fifo)
                    queue = self._topics[topic] = await self._open_queue(
                        name, fifo=self.settings.fifo, dead_letter=False
                    )
        return queue

    async def _group_queues(self, topic: str, group: str) -> tuple[QueueInfo, QueueInfo]:
        """The topic's queue, claimed for ``group``, and the group's dead-letter queue."""
        found = self._groups.get((topic, group))
        if found is not None:
            return found
        async with self._locks[("group", topic, group)]:
            found = self._groups.get((topic, group))
            if found is None:
                queue = await self._topic_queue(topic)
                await self._claim(queue, topic, group)
                dead = await self._dead_letter_queue(queue, topic, group)
                found = self._groups[(topic, group)] = (queue, dead)
        return found

    async def _claim(self, queue: QueueInfo, topic: str, group: str) -> None:
        """Make ``group`` the one group of the topic's queue, or refuse it when another group has it."""
        if not queue.owner_known:
            try:
                response = await self.call_queue(queue, "reading tags", "list_queue_tags")
                queue.owner = (response.get("Tags") or {}).get(GROUP_TAG)
            except ConfigurationError as exc:
                logger.info(
                    "cannot read the tags of SQS queue %s (%s); groups of %r are not checked", queue.name, exc, topic
                )
                queue.owner = group
            queue.owner_known = True
        if queue.owner is None:
            await self._tag(queue, group)
            queue.owner = group
        elif queue.owner != group:
            raise ConfigurationError(
                f"topic {topic!r} (SQS queue {queue.name}) is consumed by group {queue.owner!r}; SQS has no "
                f"fan-out, so group {group!r} would take messages meant for {queue.owner!r}. Use group "
                f"{queue.owner!r} (consumers of one group compete) or another topic; to hand the topic to "
                f"another group, remove the queue's {GROUP_TAG!r} tag"
            )

    async def _tag(self, queue: QueueInfo, group: str) -> None:
        try:
            await self.call_queue(queue, "tagging", "tag_queue", Tags={GROUP_TAG: group})
        except ConfigurationError as exc:
            logger.info("cannot tag SQS queue %s with its group (%s); other groups are not refused", queue.name, exc)

    async def _dead_letter_queue(self, queue: QueueInfo, topic: str, group: str) -> QueueInfo:
        if queue.redrive_target:  # the user's RedrivePolicy: msgkit's dead letters go there too
            _, _, _, _, account, name = (queue.redrive_target.split(":", 5) + [""] * 6)[:6]
            client = self._require_client()
            find = partial(client.get_queue_url, QueueName=name, QueueOwnerAWSAccountId=account)
            response = await self._call(f"finding dead-letter queue {name}", find)
            return await self._describe(name, response["QueueUrl"], dead_letter=True)
        name = dead_letter_queue_name(topic, group, queue.fifo)
        dead = await self._open_queue(name, fifo=queue.fifo, dead_letter=True)
        if self.settings.max_receive_count:
            policy = json.dumps(
                {"deadLetterTargetArn": dead.arn, "maxReceiveCount": str(self.settings.max_receive_count)}
            )
            await self.call_queue(
                queue, "setting the RedrivePolicy", "set_queue_attributes", Attributes={"RedrivePolicy": policy}
            )
            queue.redrive_target = dead.arn
        return dead

    async def declare(self, topic: str, group: str | None = None) -> None:
        self._require_client()
        if group is None:
            await self._topic_queue(topic)
        else:
            await self._group_queues(topic, group)

    async def delete(self, topic: str, group: str) -> None:
        """Delete the topic's queue, with its messages, when ``group`` owns it (its ``msgkit-group``
        tag) or no group does, and the group's dead-letter queue ``<topic>-<group>-<hash>-dlq``.

        A topic queue owned by another group stays. So does one whose tags cannot be read (no
        permission): then it cannot be told whose it is. A dead-letter queue the user set as the
        topic queue's RedrivePolicy target is never deleted; msgkit deletes only the one it names.
        On AWS a deleted queue's name can be used again only after 60 seconds (ElasticMQ at once).
        The queues are those of this transport's ``fifo`` option (``<topic>.fifo`` with it).
        """
        self._check_open()
        client = self._require_client()
        fifo = self.settings.fifo
        name = topic_queue_name(topic, fifo)
        url = await self._existing_queue_url(name)
        if url is not None:
            owner: str | None = None
            try:
                tags = await self._call(
                    f"reading the tags of queue {name}", partial(client.list_queue_tags, QueueUrl=url)
                )
                owner = (tags.get("Tags") or {}).get(GROUP_TAG)
            except _QueueGone:
                url = None
            except ConfigurationError as exc:
                logger.info("cannot read the tags of SQS queue %s (%s): keeping it", name, exc)
                owner = ""
            if url is not None and owner in (None, group):
                await self._delete_queue(name, url)
                self._topics.pop(topic, None)
                for key in [key for key in self._groups if key[0] == topic]:
                    del self._groups[key]
            elif url is not None:
                logger.info("SQS queue %s belongs to group %r: kept", name, owner)
        dead_name = dead_letter_queue_name(topic, group, fifo)
        dead_url = await self._existing_queue_url(dead_name)
        if dead_url is not None:
            await self._delete_queue(dead_name, dead_url)
        self._groups.pop((topic, group), None)

    async def _existing_queue_url(self, name: str) -> str | None:
        client = self._require_client()
        try:
            response = await self._call(f"finding queue {name}", partial(client.get_queue_url, QueueName=name))
        except _QueueGone:
            return None
        url: str = response["QueueUrl"]
        return url

    async def _delete_queue(self, name: str, url: str) -> None:
        client = self._require_client()
        self._deleted.add(name)
        try:
            await self._call(f"deleting queue {name}", partial(client.delete_queue, QueueUrl=url))
        except _QueueGone:
            pass

    # ------------------------------------------------------------------ publishing

    async def publish(self, topic: str, messages: Sequence[Message]) -> None:
        self._require_client()
        if not messages:
            return
        queue = await self._topic_queue(topic)
        failed = await self._send(queue, messages, dead_letters=False)
        if failed:
            raise PublishError(
                f"{len(failed)} of {len(messages)} messages not stored on topic {topic!r} (SQS queue {queue.name}): "
                f"{failed[0][1]}",
                failed,
            )

    async def send_dead_letters(self, queue: QueueInfo, messages: Sequence[Message]) -> list[tuple[str, str]]:
        """Store dead letters; return (id, reason) of those not stored."""
        try:
            return await self._send(queue, messages, dead_letters=True)
        except MessageTooLargeError as exc:
            return [(m.id, str(exc)) for m in messages]

    async def _send(
        self, queue: QueueInfo, messages: Sequence[Message], *, dead_letters: bool
    ) -> list[tuple[str, str]]:
        """SendMessageBatch in chunks of ten within the byte limit; on FIFO queues each MessageGroupId's
        messages go out in order (one lane per group hash), elsewhere every chunk at once."""
        fifo, limit = queue.fifo, queue.max_size
        entries: list[dict[str, Any]] = []
        sizes: list[int] = []
        dead_letters_read = self.memory.dead_letters
        for message in messages:
            # a dead letter sent back to its topic (a replay) must not be dropped as a duplicate
            # of its first send, which SQS remembers for 5 minutes
            fresh = dead_letters or (fifo and message.id in dead_letters_read)
            entry, size = encode(message, fifo, unique_dedup=fresh)
            if dead_letters:
                size += add_reason_attributes(entry, message)
            if size > limit:
                raise MessageTooLargeError(
                    f"message {message.id} takes {size} bytes on SQS (binary bodies are base64-encoded; id, key and "
                    f"headers go in one attribute), over the {limit} bytes of queue {queue.name}; nothing was sent"
                )
            entries.append(entry)
            sizes.append(size)
        byte_limit = max(self.settings.max_message_size, min(sizes))

        async def lane(batches: list[list[int]]) -> list[tuple[str, str]]:
            failed: list[tuple[str, str]] = []
            for batch in batches:
                failed += await self._send_chunk(queue, messages, entries, batch)
            return failed

        results = await asyncio.gather(*(lane(batches) for batches in plan_batches(entries, sizes, byte_limit)))
        return [failure for result in results for failure in result]

    async def _send_chunk(
        self, queue: QueueInfo, messages: Sequence[Message], entries: list[dict[str, Any]], chunk: list[int]
    ) -> list[tuple[str, str]]:
        failed: list[tuple[str, str]] = []
        pending = chunk
        for attempt in range(4):
            batch = [{"Id": str(index), **entries[index]} for index in pending]
            try:
                async with self._send_slots:
                    response = await self.call_queue(queue, "sending", "send_message_batch", Entries=batch)
            except MsgkitError as exc:
                if isinstance(exc, ClosedError):
                    raise
                return failed + [(messages[index].id, str(exc)) for index in pending]
            retry: list[int] = []
            for failure in response.get("Failed") or []:
                index = int(failure["Id"])
                reason = f"{failure.get('Code', '')}: {failure.get('Message', '')}"
                if failure.get("SenderFault") or attempt == 3:
                    failed.append((messages[index].id, reason))
                else:
                    retry.append(index)
            if not retry:
                break
            pending = sorted(retry)
            await asyncio.sleep(0.05 * 2**attempt)
        return failed

    # ------------------------------------------------------------------ consuming

    async def receive(
        self, queue: QueueInfo, count: int, wait: int, visibility: int, system_attributes: list[str]
    ) -> list[dict[str, Any]]:
        """One long-polling ReceiveMessage (for a subscription's pollers)."""
        async with self._poll_slots:
            response = await self.call_queue(
                queue,
                "receiving",
                "receive_message",
                MaxNumberOfMessages=count,
                WaitTimeSeconds=wait,
                VisibilityTimeout=visibility,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=system_attributes,
            )
        messages: list[dict[str, Any]] = response.get("Messages") or []
        return messages

    async def subscribe(self, topic: str, group: str, *, prefetch: int) -> SQSSubscription:
        self._check_open()
        self._require_client()
        queue, dead = await self._group_queues(topic, group)
        return self._attach(SQSSubscription(self, queue, topic, group, prefetch, dead=dead))

    async def subscribe_dead_letters(self, topic: str, group: str, *, prefetch: int) -> SQSSubscription:
        self._check_open()
        self._require_client()
        _, dead = await self._group_queues(topic, group)
        name = f"{topic}.{group}.dead-letters"
        subscription = SQSSubscription(self, dead, name, DEAD_LETTER_GROUP, prefetch, dead=None, source=(topic, group))
        return self._attach(subscription)

    def _attach(self, subscription: SQSSubscription) -> SQSSubscription:
        self._subscriptions.add(subscription)
        return subscription

    async def queue_url(self, topic: str, group: str | None = None) -> str:
        """The URL of ``topic``'s queue, or with ``group`` of its dead-letter queue (for tools and tests)."""
        self._require_client()
        if group is None:
            return (await self._topic_queue(topic)).url
        return (await self._group_queues(topic, group))[1].url


def _code(exc: bex.ClientError) -> str:
    code: str = exc.response.get("Error", {}).get("Code", "")
    return code
