"""The web layer of dais: the Falcon app, the waitress server and the CLI."""

from __future__ import annotations

from dais_wsgi.app import create_app
from dais_wsgi.bootstrap import Runtime, bootstrap
from dais_wsgi.server import make_server
from dais_wsgi.settings import Settings

__all__ = ["Runtime", "Settings", "bootstrap", "create_app", "make_server"]
