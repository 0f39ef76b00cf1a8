"""Finding a transport by URL scheme: the built-in ones, then the ``msgkit.transports`` entry points.

A third-party package registers a transport in its pyproject.toml::

    [project.entry-points."msgkit.transports"]
    nats = "msgkit_nats:NatsTransport"

The entry point's name is the URL scheme; its value is a :class:`~msgkit.transports.base.Transport`
subclass.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from msgkit.config import TransportSettings, redact_url, split_url
from msgkit.errors import ConfigurationError, MissingDependencyError, UnknownSchemeError
from msgkit.transports.base import Transport

ENTRY_POINT_GROUP = "msgkit.transports"

# scheme -> (module, class name, pip extra that brings its client library, that library's module)
_BUILTIN: dict[str, tuple[str, str, str | None, str | None]] = {
    "memory": ("msgkit.transports.memory", "MemoryTransport", None, None),
    "redis": ("msgkit.transports.redis", "RedisTransport", "redis", "redis"),
    "rediss": ("msgkit.transports.redis", "RedisTransport", "redis", "redis"),
    "amqp": ("msgkit.transports.rabbitmq", "RabbitMQTransport", "rabbitmq", "aio_pika"),
    "amqps": ("msgkit.transports.rabbitmq", "RabbitMQTransport", "rabbitmq", "aio_pika"),
    "sqs": ("msgkit.transports.sqs", "SQSTransport", "sqs", "aiobotocore"),
    "kafka": ("msgkit.transports.kafka", "KafkaTransport", "kafka", "aiokafka"),
}

_registered: dict[str, type[Transport]] = {}


def register_transport(scheme: str, transport: type[Transport]) -> None:
    """Serve ``scheme://`` URLs with ``transport`` in this process (tests, plugins without packaging)."""
    if not isinstance(transport, type) or not issubclass(transport, Transport):
        raise TypeError(f"{transport!r} is not a msgkit Transport subclass")
    _registered[scheme.lower()] = transport


def known_schemes() -> list[str]:
    """Every scheme a URL may use here: built in, registered, or from entry points."""
    names = set(_BUILTIN) | set(_registered)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def transport_class(scheme: str) -> type[Transport]:
    """The transport class for ``scheme``; clear errors for unknown schemes and missing extras."""
    scheme = scheme.lower()
    if scheme in _registered:
        return _registered[scheme]
    if scheme in _BUILTIN:
        module_name, class_name, extra, library = _BUILTIN[scheme]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            if library is not None and exc.name is not None and exc.name.split(".")[0] == library:
                raise MissingDependencyError(
                    f'the {scheme}:// transport needs the {library!r} package: pip install "msgkit[{extra}]"'
                ) from exc
            raise
        cls: type[Transport] = getattr(module, class_name)
        return cls
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=scheme):
        loaded = ep.load()
        if not isinstance(loaded, type) or not issubclass(loaded, Transport):
            raise ConfigurationError(
                f"entry point {ep.name!r} in group {ENTRY_POINT_GROUP!r} ({ep.value}) is not a msgkit Transport"
            )
        return loaded
    raise UnknownSchemeError(f"unknown URL scheme {scheme!r}; known schemes: {', '.join(known_schemes())}")


def transport_from_url(url: str, settings: TransportSettings | None = None) -> Transport:
    """Build (not connect) the transport that serves ``url``, with ``settings`` if given."""
    parts = split_url(url)
    try:
        cls = transport_class(parts.scheme)
        return cls.from_url(url) if settings is None else cls.from_url(url, settings)
    except UnknownSchemeError:
        raise UnknownSchemeError(
            f"unknown URL scheme {parts.scheme!r} in {redact_url(url)!r}; known schemes: {', '.join(known_schemes())}"
        ) from None
