"""Run a short Python script in a child interpreter, for process-wide state."""

from __future__ import annotations

import subprocess
import sys
import textwrap

__all__ = ["run_python"]


def run_python(script: str) -> str:
    """Run ``script`` (dedented) in a new interpreter; return what it printed.

    For tests of what a process sets for itself (CPU affinity, resource
    limits), which must not leak into the test run.
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
