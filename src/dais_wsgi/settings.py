"""Configuration: one frozen object, built once at the entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from dais_core.policies import RatePolicy

__all__ = ["CPU_AFFINITY", "DEFAULT_HOME", "FORWARDERS", "GiB", "MiB", "Settings"]

#: The HTTP clients a gateway can forward webhook calls with.
FORWARDERS = ("curl", "urllib3")

MiB = 2**20
GiB = 2**30
DEFAULT_HOME = Path(".dais")
#: What ``cpu_affinity`` may be: ``auto``, ``off`` or a CPU number.
CPU_AFFINITY = r"auto|off|[0-9]{1,4}"


def _between(low: int, high: int | None = None) -> Any:
    """A whole number from ``low`` up to ``high`` (no bound if ``None``)."""
    checks = [attrs.validators.instance_of(int), attrs.validators.ge(low)]
    if high is not None:
        checks.append(attrs.validators.le(high))
    return attrs.validators.and_(*checks)


#: The longest duration a setting may name: a day.
MAX_SECONDS = 86400.0


def _seconds(instance: Any, attribute: attrs.Attribute[float], value: float) -> None:
    """A duration: more than zero seconds, at most :data:`MAX_SECONDS`."""
    if not (isinstance(value, int | float) and 0 < value <= MAX_SECONDS):
        raise ValueError(
            f"'{attribute.name}' must be seconds above 0 and at most a day "
            f"({MAX_SECONDS:.0f}), not {value!r}"
        )


@attrs.frozen
class Settings:
    """Everything a running gateway needs to know, with production defaults."""

    #: Folder holding the embedded state: the SQLite store and the File Manager.
    home: Path = DEFAULT_HOME
    #: Key store and service registry URL; empty means ``<home>/dais.sqlite3``.
    store_url: str = ""
    #: Throttle state URL: ``memory://`` keeps it in this process.
    throttle_url: str = "memory://"
    #: The File Manager folder; ``None`` means ``<home>/filemanager``.
    filemanager_root: Path | None = None
    #: Interface to listen on.
    host: str = "127.0.0.1"
    #: Port to listen on; 0 picks a free one.
    port: int = attrs.field(default=8080, validator=_between(0, 65535))
    #: Worker threads of the server.
    threads: int = attrs.field(default=8, validator=_between(1, 1024))
    #: Callers' connections the server holds open at once; past it, new
    #: ones wait in the listen backlog until one closes. Each webhook call
    #: the event loop forwards holds one and no thread.
    connection_limit: int = attrs.field(default=100, validator=_between(1, 100_000))
    #: Worker threads that webhook calls and uploads may never hold, so that
    #: health checks and admin calls are answered however busy the others
    #: are; past ``threads - reserved_threads`` of them at once (at least
    #: one), the next is a 503 ``busy``.
    reserved_threads: int = attrs.field(default=2, validator=_between(0, 1024))
    #: Seconds a webhook call or upload past that cap waits for one of them
    #: to end before it is refused: under a load of quick calls one soon
    #: does, while slow ones leave the reserved workers free again soon.
    busy_wait: float = attrs.field(
        default=0.5, validator=[attrs.validators.ge(0.0), attrs.validators.le(60.0)]
    )
    #: Largest file accepted by the Integration API, in bytes (4 GiB).
    max_upload_bytes: int = attrs.field(default=4 * GiB, validator=_between(1))
    #: Room allowed for multipart framing on top of the file, in bytes.
    multipart_overhead: int = attrs.field(default=1 * MiB, validator=_between(0))
    #: Seconds a whole request may take before it is cut off.
    request_timeout: float = attrs.field(default=300.0, validator=_seconds)
    #: Seconds a stopping server (SIGTERM, SIGINT) goes on answering the
    #: requests in flight, no longer taking connections; 0 closes at once.
    shutdown_grace: float = attrs.field(
        default=20.0, validator=[attrs.validators.ge(0.0), attrs.validators.le(3600.0)]
    )
    #: Upload rate per key (one per second, no burst).
    upload_rate: RatePolicy = RatePolicy(rate=1, period=1.0, burst=1)
    #: Uploads a key may have in flight at once in one process; 0 for no cap.
    uploads_in_flight: int = attrs.field(default=2, validator=_between(0))
    #: Webhook rate per key; ``None`` leaves webhook calls unthrottled.
    gateway_rate: RatePolicy | None = None
    #: Largest webhook body forwarded, in bytes.
    max_gateway_body: int = attrs.field(default=10 * MiB, validator=_between(0))
    #: Seconds a webhook call's body may take to arrive (bodies are small).
    gateway_body_timeout: float = attrs.field(default=30.0, validator=_seconds)
    #: Webhook calls a key may have in flight at once in one process, so
    #: that one key cannot hold every worker; 0 for no cap.
    gateway_in_flight: int = attrs.field(default=4, validator=_between(0))
    #: Seconds to wait for an upstream to accept a connection.
    connect_timeout: float = attrs.field(default=5.0, validator=_seconds)
    #: Seconds an upstream may stall while answering (with ``curl``: whole
    #: seconds, up to about 7 s late right after a body was sent).
    read_timeout: float = attrs.field(default=30.0, validator=_seconds)
    #: HTTP client for webhook calls: ``curl`` (libcurl, the fastest) or
    #: ``urllib3`` (pure Python).
    forwarder: str = attrs.field(
        default="curl", validator=attrs.validators.in_(FORWARDERS)
    )
    #: Forward plain webhook calls from the event loop, with no worker thread
    #: held per call (see :mod:`dais_wsgi.lane`); needs ``forwarder`` curl.
    gateway_lane: bool = True
    #: Seconds a verified key is cached while the store announces changes
    #: (PostgreSQL); a revocation reaches every process at once.
    key_cache_ttl: float = 5.0
    #: Seconds a key is cached when changes cannot be announced (SQLite, or
    #: PostgreSQL while its notifications are down): the bound on how long
    #: a revoked key may still pass.
    key_cache_degraded_ttl: float = 1.0
    #: Seconds between two batched writes of records and last-use times.
    record_interval: float = attrs.field(default=0.5, validator=_seconds)
    #: Seconds a browser's admin session lasts after its login (8 hours).
    admin_session: float = attrs.field(default=8 * 3600.0, validator=_seconds)
    #: Extend a caller's ``X-Forwarded-For`` chain instead of starting anew;
    #: set it only behind a proxy that overwrites the header.
    trust_forwarded: bool = False
    #: Keep the server's threads on one CPU (see :mod:`dais_wsgi.affinity`):
    #: ``auto`` keeps to the CPU ``serve`` starts on, or gives each of
    #: ``serve --workers N`` its own; a CPU number names one; ``off`` leaves
    #: placement to the system. An upload's thread uses every CPU while its
    #: body streams.
    cpu_affinity: str = attrs.field(
        default="auto",
        validator=attrs.validators.matches_re(CPU_AFFINITY),
    )

    @property
    def slow_request_cap(self) -> int:
        """Webhook calls and uploads one process holds at once."""
        return max(1, self.threads - self.reserved_threads)

    @property
    def resolved_store_url(self) -> str:
        """The store URL, defaulting to a SQLite file in the home folder."""
        if self.store_url:
            return self.store_url
        return f"sqlite:///{(self.home / 'dais.sqlite3').resolve()}"

    @property
    def resolved_filemanager_root(self) -> Path:
        """The File Manager folder, defaulting to ``<home>/filemanager``."""
        return self.filemanager_root or self.home / "filemanager"
