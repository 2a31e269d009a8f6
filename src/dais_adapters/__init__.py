"""Adapters of the dais ports, each registered as a pluggy plugin.

One module per technology: :mod:`~dais_adapters.sqlite` and
:mod:`~dais_adapters.postgres` (keys and services),
:mod:`~dais_adapters.localfs` (the File Manager folder),
:mod:`~dais_adapters.objectstore` (S3 through smart-open),
:mod:`~dais_adapters.memory` and :mod:`~dais_adapters.redis_throttle`
(throttle state), :mod:`~dais_adapters.forwarder` (urllib3) and
:mod:`~dais_adapters.inspect` (SQLite integrity); :mod:`~dais_adapters.cache`
holds the key cache and the batched record writer. Each maps its driver's
errors to domain errors at the boundary.
"""

from __future__ import annotations

from dais_adapters.hooks import (
    ForwarderOptions,
    StorageContext,
    hookimpl,
    hookspec,
    plugin_manager,
)

__all__ = [
    "ForwarderOptions",
    "StorageContext",
    "hookimpl",
    "hookspec",
    "plugin_manager",
]
