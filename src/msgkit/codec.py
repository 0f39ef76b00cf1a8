"""Bodies to bytes and back: JSON through pydantic (adapters built once), raw bytes as they are.

Never pickle: a message body must not be able to run code in the consumer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pydantic_core
from pydantic import BaseModel, TypeAdapter, ValidationError

from msgkit.errors import DecodeError

Decoder = Callable[[bytes], Any]

#: What ``send`` accepts as a body: raw bytes, a pydantic model, or anything pydantic can dump to JSON.
Body = bytes | bytearray | memoryview | BaseModel | dict[str, Any] | list[Any] | str | int | float | bool | None


def encode_body(body: object) -> bytes:
    """Bytes for ``body``: bytes-like values unchanged, everything else as JSON."""
    if type(body) is bytes:
        return body
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    if isinstance(body, BaseModel):
        return body.__pydantic_serializer__.to_json(body)
    try:
        return pydantic_core.to_json(body)
    except pydantic_core.PydanticSerializationError as exc:
        raise TypeError(f"cannot encode a {type(body).__name__} body as JSON: {exc}") from None


def _raw(body: bytes) -> bytes:
    return body


def decoder_for(target: Any) -> Decoder:
    """A function that turns body bytes into ``target``, raising DecodeError on bad input.

    ``bytes`` means the raw body; any other type is validated from JSON by pydantic.
    """
    if target is bytes:
        return _raw
    validate: Callable[[bytes], Any]
    if isinstance(target, type) and issubclass(target, BaseModel):
        validate = target.model_validate_json
    else:
        validate = TypeAdapter(target).validate_json
    name = getattr(target, "__name__", repr(target))

    def decode(body: bytes) -> Any:
        try:
            return validate(body)
        except ValidationError as exc:
            raise DecodeError(f"body is not a valid {name}: {_summary(exc)}") from None

    return decode


def _summary(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc + ': ' if loc else ''}{err['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
