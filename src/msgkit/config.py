"""URLs and settings: where the broker URL comes from, how options are parsed, how secrets hide."""

from __future__ import annotations

import os
from typing import TypeVar
from urllib.parse import SplitResult, parse_qsl, quote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, ValidationError

from msgkit.errors import ConfigurationError

#: Environment variable read when no URL is given explicitly.
URL_ENV_VAR = "MSGKIT_URL"
DEFAULT_URL = "memory://"

#: Query options whose values are secrets and never shown.
_SECRET_OPTIONS = ("password", "secret", "token", "key", "credential")

SettingsT = TypeVar("SettingsT", bound="TransportSettings")


class TransportSettings(BaseModel):
    """Base of every transport's options: frozen, and unknown names are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def resolve_url(url: str | None) -> str:
    """The URL to use: ``url`` if given, else ``$MSGKIT_URL``, else ``memory://``."""
    if url is not None:
        return url
    return os.environ.get(URL_ENV_VAR) or DEFAULT_URL


def _is_secret(option: str) -> bool:
    lowered = option.lower()
    return any(word in lowered for word in _SECRET_OPTIONS)


def redact_url(url: str) -> str:
    """``url`` with its password and secret query values replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        netloc = f"{user}{':***' if sep else ''}@{hostinfo}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = "&".join(
            f"{quote(name)}={'***' if _is_secret(name) else quote(value, safe=':/,')}" for name, value in pairs
        )
    if not netloc and url.startswith(f"{parts.scheme}://"):
        # urlunsplit drops the '//' of an empty authority: memory:// and sqlite:///x must keep it
        text = f"{parts.scheme}://{parts.path}"
        text += f"?{query}" if query else ""
        return text + (f"#{parts.fragment}" if parts.fragment else "")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def split_url(url: str) -> SplitResult:
    """Parse ``url`` and check that it has the ``scheme://`` form, with a clear error if not."""
    if not isinstance(url, str):
        raise ConfigurationError(f"a broker URL must be a string, got {type(url).__name__}")
    if "://" not in url:
        raise ConfigurationError(
            f"malformed broker URL {redact_url(url)!r}: expected 'scheme://...', e.g. 'memory://' or 'amqp://host'"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - urlsplit checks the port lazily
    except ValueError as exc:
        raise ConfigurationError(f"malformed broker URL {redact_url(url)!r}: {exc}") from None
    if not parts.scheme:
        raise ConfigurationError(f"malformed broker URL {redact_url(url)!r}: the scheme is missing")
    return parts


def settings_from_url(
    model: type[SettingsT], url: str, settings: TransportSettings | None = None, **fixed: object
) -> SettingsT:
    """Validate ``url``'s query options (plus ``fixed`` values) into ``model``, with clear errors.

    With ``settings`` (an instance of ``model``) the options come from it instead, and the URL
    must carry none: options in two places would leave it unclear which one wins.
    """
    parts = split_url(url)
    if settings is not None:
        if not isinstance(settings, model):
            raise ConfigurationError(
                f"{parts.scheme}:// takes {model.__name__} settings, not {type(settings).__name__}"
            )
        if parts.query:
            raise ConfigurationError(
                f"give {parts.scheme}:// options in the URL query or in a settings object, not both "
                f"({redact_url(url)!r})"
            )
        return settings
    options: dict[str, object] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in options:
            raise ConfigurationError(f"option {name!r} is given twice in {redact_url(url)!r}")
        options[name] = value
    unknown = sorted(set(options) - set(model.model_fields))
    if unknown:
        known = ", ".join(sorted(model.model_fields)) or "none"
        raise ConfigurationError(
            f"unknown option(s) {', '.join(unknown)} in {redact_url(url)!r}; {parts.scheme}:// knows: {known}"
        )
    options.update(fixed)
    try:
        return model.model_validate(options)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}" for err in exc.errors())
        raise ConfigurationError(f"invalid option in {redact_url(url)!r}: {problems}") from None
