"""URLs, options, the transport registry, and secrets staying secret."""

from __future__ import annotations

import logging

import pytest

import msgkit
from msgkit.config import TransportSettings, redact_url, resolve_url, settings_from_url
from msgkit.transports import registry
from msgkit.transports.memory import MemoryTransport


def test_url_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MSGKIT_URL", raising=False)
    assert resolve_url(None) == "memory://"
    monkeypatch.setenv("MSGKIT_URL", "memory://from-env")
    assert resolve_url(None) == "memory://from-env"
    assert resolve_url("memory://explicit") == "memory://explicit"
    assert msgkit.Broker().url == "memory://from-env"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("localhost:5672", "expected 'scheme://...'"),
        ("", "expected 'scheme://...'"),
        ("://host", "the scheme is missing"),
        ("memory://x:notaport", "Port could not be cast"),
    ],
)
def test_malformed_urls_name_the_problem(url: str, message: str) -> None:
    with pytest.raises(msgkit.ConfigurationError, match="malformed broker URL") as info:
        msgkit.Broker(url)
    assert message in str(info.value)


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(msgkit.UnknownSchemeError) as info:
        msgkit.Broker("nats://user:hunter2@host")
    text = str(info.value)
    assert "unknown URL scheme 'nats'" in text
    assert "memory" in text
    assert "hunter2" not in text


def test_unknown_and_invalid_options_are_clear() -> None:
    with pytest.raises(msgkit.ConfigurationError, match=r"unknown option\(s\) visiblity_timeout .* knows: history"):
        msgkit.Broker("memory://?visiblity_timeout=3")
    with pytest.raises(msgkit.ConfigurationError, match="visibility_timeout: Input should be greater than 0"):
        msgkit.Broker("memory://?visibility_timeout=-1")
    with pytest.raises(msgkit.ConfigurationError, match="visibility_timeout: Input should be a valid number"):
        msgkit.Broker("memory://?visibility_timeout=soon")
    with pytest.raises(msgkit.ConfigurationError, match="given twice"):
        msgkit.Broker("memory://?history=1&history=2")


def test_memory_url_shape_is_checked() -> None:
    with pytest.raises(msgkit.ConfigurationError, match="take a name, not a path"):
        msgkit.Broker("memory://name/path")
    with pytest.raises(msgkit.ConfigurationError, match="no user, password or port"):
        msgkit.Broker("memory://user:pw@name")
    transport = MemoryTransport.from_url("memory://named?visibility_timeout=2.5&history=10")
    assert transport.name == "named"
    assert transport.settings.visibility_timeout == 2.5
    assert transport.capabilities.consumer_loss_redelivery == 2.5


class _Secretive(TransportSettings):
    token: str = ""
    region: str = ""


def test_secrets_are_redacted_everywhere(caplog: pytest.LogCaptureFixture) -> None:
    url = "amqp://admin:s3cr3t@host:5672/vh?token=abc123&region=eu"
    assert redact_url(url) == "amqp://admin:***@host:5672/vh?token=***&region=eu"
    with pytest.raises(msgkit.ConfigurationError) as info:
        settings_from_url(_Secretive, url + "&bogus=1")
    assert "s3cr3t" not in str(info.value)
    assert "abc123" not in str(info.value)
    broker = msgkit.Broker("memory://")
    broker._url = url  # what a broker with a secret URL shows of itself
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("t").info("broker %r at %s", broker, broker.url)
    assert "s3cr3t" not in repr(broker) + broker.url + caplog.text


def test_missing_extra_names_the_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        registry._BUILTIN, "fake", ("msgkit_fake_transport_module", "X", "fake-extra", "msgkit_fake_transport_module")
    )
    with pytest.raises(msgkit.MissingDependencyError, match=r'pip install "msgkit\[fake-extra\]"'):
        msgkit.Broker("fake://host")


def test_registered_transport_serves_its_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    class Custom(MemoryTransport):
        pass

    monkeypatch.setattr(registry, "_registered", {})
    msgkit.register_transport("custom", Custom)
    assert "custom" in registry.known_schemes()
    with pytest.raises(TypeError):
        msgkit.register_transport("bad", object)  # type: ignore[arg-type]


def test_entry_point_transports_are_found(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import EntryPoint

    ep = EntryPoint(name="viaep", value="msgkit.transports.memory:MemoryTransport", group=registry.ENTRY_POINT_GROUP)

    def fake_entry_points(*, group: str, name: str | None = None) -> list[EntryPoint]:
        assert group == registry.ENTRY_POINT_GROUP
        return [ep] if name in (None, "viaep") else []

    monkeypatch.setattr(registry, "entry_points", fake_entry_points)
    assert registry.transport_class("viaep") is MemoryTransport
    assert "viaep" in registry.known_schemes()


def test_consumer_options_are_validated() -> None:
    broker = msgkit.Broker("memory://opts")

    async def handle(body: bytes) -> None:
        pass

    with pytest.raises(msgkit.ConfigurationError, match="max_in_flight: Input should be greater than or equal to 1"):
        broker.consumer("t", "g", handle, max_in_flight=0)
    with pytest.raises(msgkit.ConfigurationError, match="prefetch"):
        broker.consumer("t", "g", handle, prefetch=3)
    with pytest.raises(msgkit.ConfigurationError, match="not both"):
        broker.consumer("t", "g", handle, settings=msgkit.ConsumerSettings(), max_in_flight=3)


def test_options_from_a_settings_object() -> None:
    from msgkit.transports.memory import MemorySettings

    broker = msgkit.Broker("memory://s", settings=MemorySettings(visibility_timeout=4, history=5))
    transport = broker.transport
    assert isinstance(transport, MemoryTransport)
    assert transport.settings.visibility_timeout == 4
    assert broker.capabilities.consumer_loss_redelivery == 4
    with pytest.raises(msgkit.ConfigurationError, match="not both"):
        msgkit.Broker("memory://s?history=3", settings=MemorySettings())
    with pytest.raises(msgkit.ConfigurationError, match="takes MemorySettings settings, not _Secretive"):
        msgkit.Broker("memory://s", settings=_Secretive())
    with pytest.raises(Exception, match="frozen"):
        transport.settings.history = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("memory://", "memory://"),
        ("sqlite:///tmp/x.db", "sqlite:///tmp/x.db"),
        ("sqlite+aiosqlite:///tmp/x.db?token=s3cret", "sqlite+aiosqlite:///tmp/x.db?token=***"),
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
    ],
)
def test_redaction_keeps_the_url_shape(url: str, shown: str) -> None:
    assert redact_url(url) == shown
