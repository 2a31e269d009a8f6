"""The pluggy hooks of dais (project name ``dais``).

Built-in adapters register through the ``dais`` entry-point group exactly as
third-party plugins do. A plugin module defines functions marked with
:data:`hookimpl`; :func:`plugin_manager` loads every installed one.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs
import pluggy

from dais_core.ports import (
    Forwarder,
    Inspector,
    KeyStore,
    ServiceRegistry,
    Storage,
    ThrottleState,
)
from dais_core.values import ForwardRecord, PublishRecord

__all__ = [
    "PROJECT",
    "ForwarderOptions",
    "StorageContext",
    "hookimpl",
    "hookspec",
    "plugin_manager",
]

log = logging.getLogger(__name__)

PROJECT = "dais"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@attrs.frozen
class StorageContext:
    """What storage plugins are told about the deployment."""

    #: Folder holding each project's File Manager files, one subfolder each.
    filemanager_root: Path


@attrs.frozen
class ForwarderOptions:
    """How the gateway talks to upstream services."""

    #: Seconds to wait for an upstream to accept a connection.
    connect_timeout: float = 5.0
    #: Seconds an upstream may stall while answering.
    read_timeout: float = 30.0
    #: Pooled connections kept per upstream host.
    pool_size: int = 16
    #: Seconds a caller's body may take to stream through (the whole
    #: exchange is capped at connect + read + this, when there is a body).
    body_timeout: float = 30.0
    #: The HTTP client: ``curl`` (libcurl through pycurl) or ``urllib3``.
    client: str = "curl"


class Specs:
    """Hook specifications; each returns ``None`` when the URL is not its own."""

    @hookspec(firstresult=True)
    def dais_key_store(self, url: str) -> KeyStore | None:
        """Return a key store for ``url`` (``sqlite:///...``)."""

    @hookspec(firstresult=True)
    def dais_service_registry(self, url: str) -> ServiceRegistry | None:
        """Return a service registry for ``url``."""

    @hookspec(firstresult=True)
    def dais_throttle_state(self, url: str) -> ThrottleState | None:
        """Return throttle state for ``url`` (``memory://``, ...)."""

    @hookspec
    def dais_storages(self, context: StorageContext) -> Mapping[str, Storage]:
        """Return the storages this plugin serves, by URI scheme."""
        raise NotImplementedError

    @hookspec
    def dais_inspectors(self, context: StorageContext) -> Sequence[Inspector]:
        """Return deeper checks of staged copies, run before any commit."""
        raise NotImplementedError

    @hookspec(firstresult=True)
    def dais_forwarder(self, options: ForwarderOptions) -> Forwarder | None:
        """Return the forwarder for gateway calls."""

    @hookspec
    def dais_publish_recorded(self, record: PublishRecord) -> None:
        """Hear of a publish attempt (for metrics or audit sinks)."""

    @hookspec
    def dais_forward_recorded(self, record: ForwardRecord) -> None:
        """Hear of a forwarded webhook call."""


def plugin_manager(*plugins: object, entry_points: bool = True) -> pluggy.PluginManager:
    """Build the plugin manager with the installed plugins and ``plugins``.

    Args:
        *plugins: Extra plugin objects (modules or instances) to register.
        entry_points: Load the ``dais`` entry-point group too.
    """
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(Specs)
    if entry_points:
        _load_entry_points(manager)
    for plugin in plugins:
        manager.register(plugin)
    return manager


def _load_entry_points(manager: pluggy.PluginManager) -> None:
    # Like pluggy's load_setuptools_entrypoints, but a plugin whose optional
    # dependency is not installed (psycopg, redis, boto3) is skipped with a
    # note instead of stopping the gateway that does not use it.
    for entry_point in importlib.metadata.entry_points(group=PROJECT):
        if manager.get_plugin(entry_point.name) or manager.is_blocked(entry_point.name):
            continue
        try:
            plugin = entry_point.load()
        except ImportError as exc:
            log.debug("plugin %s skipped: %s", entry_point.name, exc)
            continue
        manager.register(plugin, name=entry_point.name)
