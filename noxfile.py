"""Development sessions: tests, lint, format check, type check."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

SOURCES = [p for p in ("src", "tests", "bench", "noxfile.py") if Path(p).exists()]


@nox.session
def tests(session: nox.Session) -> None:
    """Run the whole test suite: unit tests and integration tests."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check lint rules and formatting with ruff."""
    session.install("ruff")
    session.run("ruff", "check", *SOURCES)
    session.run("ruff", "format", "--check", *SOURCES)


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check src/ with mypy in strict mode."""
    session.install("-e", ".[all]", "mypy", "types-pycurl")
    session.run("mypy")


@nox.session
def demo(session: nox.Session) -> None:
    """Run the demo: the gateway, a sample service and a demo key."""
    session.install("-e", ".")
    session.run("dais-gateway", "demo", *session.posargs)
