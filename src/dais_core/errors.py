"""The domain errors of dais, and the HTTP status each one stands for.

Every failure the core can explain is a subclass of :class:`DaisError`. The
tree is shallow on purpose; the web layer registers one handler for the root
and asks :func:`status_for` which status to send::

    DaisError                          500 (never raised bare)
    ├── InvalidData                    400 invalid_data
    │   ├── InvalidRoute               400 invalid_route
    │   ├── InvalidResourceId          400 invalid_resource_id
    │   ├── CorruptData                400 corrupt_data
    │   └── IncompleteBody             400 incomplete_body
    ├── Unauthenticated                401 unauthenticated
    │   └── UnauthorisedPublish        401 unauthorised_publish
    ├── Forbidden                      403 forbidden
    ├── NotFound                       404 not_found
    ├── RequestTimeout                 408 request_timeout
    ├── TooLarge                       413 too_large
    ├── UnsupportedType                415 unsupported_type
    ├── Throttled                      429 throttled
    ├── PublishFailed                  500 publish_failed
    │   └── LocationConflict           409 location_conflict
    ├── UpstreamUnreachable            502 upstream_unreachable
    ├── Unavailable                    503 unavailable
    │   └── Busy                       503 busy
    └── UpstreamTimeout                504 upstream_timeout

Messages are written for the caller: they never carry key material.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "STATUS_BY_ERROR",
    "Busy",
    "CorruptData",
    "DaisError",
    "Forbidden",
    "IncompleteBody",
    "InvalidData",
    "InvalidResourceId",
    "InvalidRoute",
    "LocationConflict",
    "NotFound",
    "PublishFailed",
    "RequestTimeout",
    "Throttled",
    "TooLarge",
    "Unauthenticated",
    "UnauthorisedPublish",
    "Unavailable",
    "UnsupportedType",
    "UpstreamTimeout",
    "UpstreamUnreachable",
    "status_for",
]


class DaisError(Exception):
    """Root of every domain error.

    Args:
        message: A human sentence for the caller.
        **detail: Extra JSON-safe fields for the error body.
    """

    code = "internal_error"

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.message = message
        self.detail: dict[str, Any] = detail

    def body(self) -> dict[str, Any]:
        """Return the JSON error body: a stable code, the message, the detail."""
        return {"error": self.code, "message": self.message, **self.detail}


class InvalidData(DaisError):
    """The request or its payload breaks a rule."""

    code = "invalid_data"


class InvalidRoute(InvalidData):
    """A gateway route whose checked and forwarded forms could differ."""

    code = "invalid_route"


class InvalidResourceId(InvalidData):
    """A resource id or location path that could escape its root."""

    code = "invalid_resource_id"


class CorruptData(InvalidData):
    """The payload claims a declared type but is damaged."""

    code = "corrupt_data"


class IncompleteBody(InvalidData):
    """The client stopped sending before the body was complete."""

    code = "incomplete_body"


class Unauthenticated(DaisError):
    """No usable credential: missing, malformed, unknown, revoked or expired."""

    code = "unauthenticated"


class UnauthorisedPublish(Unauthenticated):
    """A valid key publishing a resource outside its grants."""

    code = "unauthorised_publish"


class Forbidden(DaisError):
    """A valid key calling a project, service or route it may not reach."""

    code = "forbidden"


class NotFound(DaisError):
    """No such project, lineage version or service."""

    code = "not_found"


class RequestTimeout(DaisError):
    """The request did not finish within its deadline."""

    code = "request_timeout"


class TooLarge(DaisError):
    """The body is over the configured limit."""

    code = "too_large"


class UnsupportedType(DaisError):
    """Not multipart, or a file that is not of its grant's declared type."""

    code = "unsupported_type"


class Throttled(DaisError):
    """The key is over its rate or concurrency allowance.

    Args:
        message: A human sentence for the caller.
        retry_after: Seconds until a retry can be admitted.
        decision: The throttle decision behind the refusal, if any.
        **detail: Extra JSON-safe fields for the error body.
    """

    code = "throttled"

    def __init__(
        self, message: str, retry_after: float, decision: Any = None, **detail: Any
    ) -> None:
        super().__init__(message, **detail)
        self.retry_after = retry_after
        self.decision = decision


class PublishFailed(DaisError):
    """A storage location failed; no location was left half-written."""

    code = "publish_failed"


class LocationConflict(PublishFailed):
    """A location holds something else where the file or its folders go.

    A folder stands where the file goes, or a file where one of its folders
    goes: the name the caller chose clashes with what the location holds,
    not with the storage's health, so the publish fails with 409.
    """

    code = "location_conflict"


class UpstreamUnreachable(DaisError):
    """The gateway could not connect to the upstream service."""

    code = "upstream_unreachable"


class Unavailable(DaisError):
    """A dependency the request needs (the key store, say) is down."""

    code = "unavailable"


class Busy(Unavailable):
    """Every worker this kind of request may hold is taken; retry shortly.

    Args:
        message: A human sentence for the caller.
        retry_after: Seconds after which a retry may be admitted.
        **detail: Extra JSON-safe fields for the error body.
    """

    code = "busy"

    def __init__(self, message: str, retry_after: float, **detail: Any) -> None:
        super().__init__(message, **detail)
        self.retry_after = retry_after


class UpstreamTimeout(DaisError):
    """The upstream service did not answer in time."""

    code = "upstream_timeout"


STATUS_BY_ERROR: Mapping[type[DaisError], int] = {
    DaisError: 500,
    InvalidData: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    RequestTimeout: 408,
    TooLarge: 413,
    UnsupportedType: 415,
    Throttled: 429,
    PublishFailed: 500,
    LocationConflict: 409,
    UpstreamUnreachable: 502,
    Unavailable: 503,
    UpstreamTimeout: 504,
}


def status_for(error: DaisError) -> int:
    """Return the HTTP status of an error, from its nearest mapped class.

    Args:
        error: Any domain error.

    Returns:
        The status of the first class in the error's MRO found in
        :data:`STATUS_BY_ERROR`.
    """
    for cls in type(error).__mro__:
        status = STATUS_BY_ERROR.get(cls)
        if status is not None:
            return status
    return 500
