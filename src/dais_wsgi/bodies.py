"""Small request bodies (admin API, login form), read whole before parsing.

Falcon reads a body by its ``Content-Length``, so a chunked one would read
as empty, and one ``read()`` of a body still arriving may return only a
part of it (as under another WSGI server, or before
:mod:`dais_wsgi.streaming` buffered these bodies whole). The admin API and
the login form take small documents, so they read the body to its end
first, within :data:`MAX_SMALL_BODY` decoded bytes, and then parse it with
Falcon's handler for its media type.
"""

from __future__ import annotations

import io
import json
from typing import Any

import falcon

from dais_core.errors import InvalidData, TooLarge, UnsupportedType
from dais_core.keys import shown

__all__ = ["MAX_SMALL_BODY", "read_media", "strict_json"]

#: The largest admin API or login body, in bytes.
MAX_SMALL_BODY = 1024 * 1024
_BLOCK = 64 * 1024


def whole_body(req: falcon.Request, limit: int = MAX_SMALL_BODY) -> bytes:
    """Read the body to its end, however many reads it takes to arrive.

    Raises:
        TooLarge: It is, or announces itself, over ``limit`` bytes.
    """
    length = req.content_length
    if length is not None and length > limit:
        raise TooLarge(f"the body is over the limit of {limit} bytes")
    blocks = []
    total = 0
    while block := req.stream.read(_BLOCK):
        total += len(block)
        if total > limit:
            raise TooLarge(f"the body is over the limit of {limit} bytes")
        blocks.append(block)
    return b"".join(blocks)


def read_media(req: falcon.Request, accepted: tuple[str, ...]) -> Any:
    """Read the whole body and parse it; ``None`` when there is none.

    Args:
        req: The request.
        accepted: The media types taken, each with a handler in the app.

    Raises:
        UnsupportedType: A body of another media type.
        InvalidData: A body its handler cannot parse (nested too deeply
            included), or JSON holding a lone UTF-16 surrogate (no store
            could keep it).
        TooLarge: Over :data:`MAX_SMALL_BODY`.
    """
    data = whole_body(req)
    if not data.strip():
        return None
    media_type = (req.content_type or "").partition(";")[0].strip().lower()
    if media_type not in accepted:
        raise UnsupportedType(f"send the body as {' or '.join(accepted)}")
    handler = req.options.media_handlers[media_type]
    try:
        media = handler.deserialize(io.BytesIO(data), req.content_type, len(data))
    except falcon.MediaMalformedError as exc:
        raise InvalidData(f"the body is not valid {media_type}") from exc
    except RecursionError as exc:
        # A megabyte of "[" is valid JSON to the parser, not to the stack.
        raise InvalidData("the body nests too deeply") from exc
    if _has_surrogate(media):
        raise InvalidData("the body holds a lone UTF-16 surrogate")
    return media


def strict_json(text: str) -> Any:
    """Parse JSON that names each key at most once in every object.

    ``json.loads`` keeps the last of two equal keys, where other parsers
    keep the first or refuse: a body read one way here and another way by
    a proxy or an audit tool in front could grant what neither side saw.

    Raises:
        InvalidData: An object names a key twice.
        ValueError: The text is not JSON.
    """
    return json.loads(text, object_pairs_hook=_unique_keys)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise InvalidData(
                f"the body names the key {shown(key)} twice in one object"
            )
        document[key] = value
    return document


def _has_surrogate(value: Any) -> bool:
    # A loop, not recursion: the parser takes nesting deeper than the
    # interpreter's stack would.
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False
