"""A moto S3 server on 127.0.0.1, in a subprocess of its own.

:meth:`MotoServer.start` picks a free loopback port, starts ``python -m
moto.server`` bound to it, and waits until it answers an S3 request;
:meth:`MotoServer.stop` stops that one process by its PID. A server that
cannot start raises :class:`MotoServerError`, never a skip: a test that needs
S3 and has none has failed.

:func:`aws_environment` is what a test process sets so that boto3 finds the
server through the standard variables alone, with the developer's own AWS
profile, files and tokens kept out of the way.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import IO

__all__ = ["MotoServer", "MotoServerError", "aws_environment"]

HOST = "127.0.0.1"
#: Seconds to wait for a started server to answer.
START_TIMEOUT = 30.0
#: Seconds to wait for a stopped server to exit before it is killed.
STOP_TIMEOUT = 10.0
_ATTEMPTS = 3


class MotoServerError(RuntimeError):
    """The moto server would not start or answer."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _answers(endpoint: str) -> bool:
    # No proxy: the request must go to loopback, whatever the environment says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(endpoint + "/", timeout=2) as response:
            return b"ListAllMyBucketsResult" in response.read()
    except (urllib.error.URLError, OSError):
        return False


class MotoServer:
    """A running ``moto.server`` process.

    Args:
        process: The server process.
        endpoint: Its base URL, ``http://127.0.0.1:<port>``.
        log: The file that holds its output.
    """

    def __init__(self, process: subprocess.Popen[bytes], endpoint: str, log: IO[bytes]):
        self.process = process
        self.endpoint = endpoint
        self.log = log

    @classmethod
    def start(cls, timeout: float = START_TIMEOUT) -> MotoServer:
        """Start a server on a free loopback port and wait until it answers.

        A port taken by someone else between the probe and the start is
        retried on another port, a few times.

        Raises:
            MotoServerError: The server exited or did not answer in time.
        """
        failures = []
        for _ in range(_ATTEMPTS):
            try:
                return cls._start_once(_free_port(), timeout)
            except MotoServerError as exc:
                failures.append(str(exc))
        raise MotoServerError("; ".join(failures))

    @classmethod
    def _start_once(cls, port: int, timeout: float) -> MotoServer:
        log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        command = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        server = cls(process, f"http://{HOST}:{port}", log)
        try:
            server._wait(timeout)
        except MotoServerError:
            server.stop()
            raise
        return server

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise MotoServerError(
                    f"moto exited with status {self.process.returncode}: {self.output()}"
                )
            if _answers(self.endpoint):
                return
            time.sleep(0.1)
        raise MotoServerError(
            f"moto did not answer within {timeout} s: {self.output()}"
        )

    def output(self, limit: int = 2000) -> str:
        """Return the end of the server's output, for error messages."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-limit:]

    def stop(self) -> None:
        """Stop the server process by its PID, killing it if it lingers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        with contextlib.suppress(OSError):
            self.log.close()

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def aws_environment(endpoint: str) -> dict[str, str | None]:
    """Return the AWS variables that point boto3 at ``endpoint`` and only there.

    A value of ``None`` means the variable must be removed: a service-specific
    endpoint, a profile or a session token from the developer's shell would
    otherwise win over, or mix with, the test settings.
    """
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_SESSION_TOKEN": None,
        "AWS_SECURITY_TOKEN": None,
        "AWS_PROFILE": None,
        "AWS_DEFAULT_PROFILE": None,
        "AWS_ENDPOINT_URL_S3": None,
        "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": None,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "NO_PROXY": f"{HOST},localhost",
        "no_proxy": f"{HOST},localhost",
    }
