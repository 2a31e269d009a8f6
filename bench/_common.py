"""Helpers shared by the benchmark scripts: their servers and errors.

Every process a benchmark starts is kept in a :class:`Processes` and
stopped by its PID, never by name.
"""

from __future__ import annotations

import queue
import re
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BenchError", "Processes", "first_line", "port_of"]


class BenchError(Exception):
    """The benchmark could not run as asked."""


class Processes:
    """The servers this script started, to be stopped by their PIDs."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen[str]]] = []

    def start(
        self, name: str, argv: Sequence[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        """Start a server; its standard error goes to ``<logs>/<name>.log``."""
        with (self.logs / f"{name}.log").open("w") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
            )
        self.started.append((name, proc))
        return proc

    def stop_all(self) -> None:
        """Stop every started process by its PID, newest first.

        SIGTERM first (nginx takes it as a fast shutdown of the master and
        its worker), then SIGKILL for a process that does not go.
        """
        for _name, proc in reversed(self.started):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
        self.started.clear()

    def log_tail(self, name: str) -> str:
        """Return the end of a process' log, for error messages."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """Return the first line a process prints, waiting at most ``timeout``."""
    stdout = proc.stdout
    if stdout is None:
        raise BenchError("the process has no standard output")
    box: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: box.put(stdout.readline()), daemon=True).start()
    try:
        return box.get(timeout=timeout)
    except queue.Empty:
        raise BenchError(f"no output from PID {proc.pid} in {timeout} s") from None


def port_of(line: str) -> int:
    """Read the port from a line announcing ``http://127.0.0.1:PORT``."""
    found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if found is None:
        raise BenchError(f"no listening address in {line!r}")
    return int(found[1])
