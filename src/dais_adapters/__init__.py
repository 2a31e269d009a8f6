"""Adapters of the dais ports, each registered as a pluggy plugin.

One module per technology: :mod:`~dais_adapters.sqlite` (keys and services),
:mod:`~dais_adapters.localfs` (the File Manager folder),
:mod:`~dais_adapters.memory` (in-process throttle) and
:mod:`~dais_adapters.forwarder` (urllib3). Each maps its driver's errors to
domain errors at the boundary.
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
