"""Bodies stream to the application: early refusal, deadlines, disconnects."""

from __future__ import annotations

import contextlib
import filecmp
import logging
import os
import resource
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from waitress.server import create_server

from dais_core.values import DataType
from dais_wsgi.server import BackgroundServer
from dais_wsgi.streaming import StreamingChannel
from tests.integration.conftest import FAST, Gateway

pytestmark = pytest.mark.integration

CURL = shutil.which("curl")
MiB = 2**20
GiB = 2**30


def sparse(path: Path, size: int) -> Path:
    """A file of ``size`` zero bytes that takes no room on disk."""
    with path.open("wb") as handle:
        handle.truncate(size)
    return path


def curl_upload(url: str, token: str, source: Path, *extra: str) -> tuple[int, int]:
    """Upload with curl -F; return the status and the bytes curl sent."""
    assert CURL, "curl is needed for the integration tests"
    done = subprocess.run(
        [
            CURL,
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_upload}",
            "--max-time",
            "120",
            "-H",
            f"Authorization: Bearer {token}",
            *extra,
            "-F",
            f"data=@{source}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    status, sent = done.stdout.split()
    return int(status), int(float(sent))


def staged(gateway: Gateway) -> list[Path]:
    folder = gateway.filemanager / ".dais-staging"
    return list(folder.iterdir()) if folder.exists() else []


def wait_until_empty(gateway: Gateway, seconds: float = 10.0) -> list[Path]:
    """Poll (bounded) until no staged copy is left; return what is left."""
    deadline = time.monotonic() + seconds
    while staged(gateway) and time.monotonic() < deadline:
        time.sleep(0.05)
    return staged(gateway)


@pytest.fixture
def grant(gateway: Gateway) -> tuple[str, str]:
    return gateway.make_key(
        grants=(("big/", ("filemanager://p1/big/",), DataType.BINARY),)
    )


BOUNDARY = "b0undary"
#: The opening of the multipart body of the raw uploads below: the head of
#: the one file part.
OPENING = (
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="data"; '
    f'filename="x"\r\nContent-Type: application/octet-stream\r\n\r\n'
).encode()


def raw_upload_head(gateway: Gateway, token: str, resource: str, length: int) -> bytes:
    """The headers and opening of a multipart upload with a declared length."""
    boundary, opening = BOUNDARY, OPENING
    port = gateway.url.rsplit(":", 1)[1]
    head = (
        f"POST /integration/v1/resources/{resource} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(opening) + length}\r\n\r\n"
    ).encode()
    return head + opening


def connect(gateway: Gateway) -> socket.socket:
    port = int(gateway.url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_status(sock: socket.socket) -> int:
    """Read an answer's status line, or 0 if the connection closed first."""
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return int(data.split()[1]) if data.startswith(b"HTTP/1.1") else 0


def read_answer(sock: socket.socket) -> bytes:
    """Read one answer with a Content-Length, whole; return its head."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"the connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "the connection closed inside the body"
        body += chunk
    return head + b"\r\n"


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes the connection, sending nothing more."""
    with contextlib.suppress(ConnectionResetError):
        return sock.recv(4096) == b""
    return True


class TestEarlyRefusal:
    """Requests refused on their headers are not read."""

    def test_a_1_gib_upload_with_a_bad_key_is_refused_before_its_body(
        self, gateway, grant, tmp_path
    ):
        """curl -F sends Expect: 100-continue; the 401 comes before the body."""
        source = sparse(tmp_path / "big.bin", GiB)
        token = grant[1][:-1] + ("x" if grant[1][-1] != "x" else "y")
        status, sent = curl_upload(
            f"{gateway.url}/integration/v1/resources/big/x", token, source
        )
        assert status == 401
        assert sent < 4 * MiB

    def test_a_refused_upload_ends_its_connection_without_an_error(
        self, gateway, grant, tmp_path, caplog
    ):
        """A client leaving as its refusal is flushed leaves no crash in the log."""
        source = sparse(tmp_path / "big.bin", 64 * MiB)
        url = f"{gateway.url}/integration/v1/resources/other/x"
        with caplog.at_level(logging.WARNING):
            for _ in range(5):
                assert curl_upload(url, grant[1], source)[0] == 401
            time.sleep(0.3)  # the server closes after the client has its answer
        assert [r.getMessage() for r in caplog.records if r.name == "waitress"] == []

    @pytest.mark.parametrize("path", ["webhook", "upload"])
    def test_a_refusal_before_the_body_says_it_closes(self, gateway, path):
        """A 401 sent while the body is still coming carries Connection: close."""
        target = {
            "webhook": "/project-gateway/webhooks/p1/lineage-version/1/svc/api/x",
            "upload": "/integration/v1/resources/big/x",
        }[path]
        with connect(gateway) as sock:
            sock.sendall(
                f"POST {target} HTTP/1.1\r\nHost: x\r\n"
                "Authorization: Bearer dais_0000000000000000_bad\r\n"
                "Content-Length: 2\r\n\r\n".encode()
            )
            head = read_answer(sock)
            sock.sendall(b"hi")
            assert head.startswith(b"HTTP/1.1 401 ")
            assert b"\r\nConnection: close\r\n" in head
            assert closed_by_server(sock)

    def test_a_refusal_after_the_whole_body_keeps_the_connection(self, gateway):
        """A small body sent with its headers is read whole; the next call follows."""
        with connect(gateway) as sock:
            sock.sendall(
                b"POST /integration/v1/resources/big/x HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer dais_0000000000000000_bad\r\n"
                b"Content-Length: 2\r\n\r\nhi"
            )
            head = read_answer(sock)
            assert head.startswith(b"HTTP/1.1 401 ")
            assert b"Connection: close" not in head
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_answer(sock).startswith(b"HTTP/1.1 200 ")

    def test_without_expect_the_server_stops_reading_after_a_few_mib(
        self, gateway, grant, tmp_path
    ):
        """A client that pushes its body at once is cut off after a bounded drain."""
        source = sparse(tmp_path / "big.bin", GiB)
        status, sent = curl_upload(
            f"{gateway.url}/integration/v1/resources/other/x",
            grant[1],
            source,
            "-H",
            "Expect:",
        )
        # The 401 is sent at once; a client still pushing its body when the
        # bounded drain ends may see the connection reset before reading it
        # (status 0). Either way the server stopped reading.
        assert status in {401, 0}
        assert sent < 64 * MiB

    def test_a_content_length_over_the_limit_is_413_before_the_body(
        self, start_gateway, tmp_path
    ):
        """An over-limit Content-Length is refused from the header."""
        gateway = start_gateway(max_upload_bytes=MiB, **FAST)
        _, token = gateway.make_key(
            grants=(("x", ("filemanager://p1/x",), DataType.BINARY),)
        )
        source = sparse(tmp_path / "big.bin", 256 * MiB)
        status, sent = curl_upload(
            f"{gateway.url}/integration/v1/resources/x", token, source
        )
        assert status == 413
        assert sent < 4 * MiB
        assert not (gateway.filemanager / "p1/x").exists()


class TestReservedWorkers:
    """Slow uploads never hold the workers kept for other requests."""

    def test_an_upload_past_the_cap_is_503_before_its_body(
        self, start_gateway, tmp_path
    ):
        """With the one allowed upload streaming, another key's upload is 503."""
        gateway = start_gateway(threads=3, reserved_threads=2, **FAST)
        grants = (("big/", ("filemanager://p1/big/",), DataType.BINARY),)
        _, first = gateway.make_key(grants=grants)
        _, second = gateway.make_key(grants=grants)
        source = sparse(tmp_path / "big.bin", 256 * MiB)
        with connect(gateway) as sock:
            sock.sendall(raw_upload_head(gateway, first, "big/slow", 4 * MiB))
            sock.sendall(b"s" * MiB)
            time.sleep(0.3)
            status, sent = curl_upload(
                f"{gateway.url}/integration/v1/resources/big/other", second, source
            )
        assert status == 503
        assert sent < 4 * MiB
        assert not (gateway.filemanager / "p1/big/other").exists()


class TestPipelining:
    """A connection's requests read ahead are bounded."""

    def test_pipelined_requests_past_the_bound_close_the_connection(self, gateway):
        """Sixteen are answered, the last saying it closes; the rest are not read."""
        with connect(gateway) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 40)
            heads = read_answers(sock, 16)
            assert all(h.startswith(b"HTTP/1.1 200 ") for h in heads)
            assert b"Connection: close" not in heads[14]
            assert b"\r\nConnection: close\r\n" in heads[15] + b"\r\n"
            assert closed_by_server(sock)

    def test_clients_that_never_read_their_answers_hold_no_worker(self, gateway):
        """Big answers piled up unread do not keep /healthz from an answer."""
        port = int(gateway.url.rsplit(":", 1)[1])
        hogs = []
        try:
            for _ in range(8):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", port))
                with contextlib.suppress(OSError):
                    sock.setblocking(False)
                    sock.send(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 400)
                hogs.append(sock)
            time.sleep(1.0)
            with connect(gateway) as probe:
                probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_answer(probe).startswith(b"HTTP/1.1 200 ")
        finally:
            for sock in hogs:
                sock.close()


class TestChunked:
    """Bodies without Content-Length are accepted and limited like any other."""

    def test_a_chunked_upload_lands_whole(self, gateway, grant, tmp_path):
        """curl with Transfer-Encoding: chunked publishes the file."""
        source = tmp_path / "x.bin"
        source.write_bytes(bytes(range(256)) * 40_000)
        status, _ = curl_upload(
            f"{gateway.url}/integration/v1/resources/big/x.bin",
            grant[1],
            source,
            "-H",
            "Transfer-Encoding: chunked",
        )
        assert status == 200
        assert (
            gateway.filemanager / "p1/big/x.bin"
        ).read_bytes() == source.read_bytes()

    def test_a_chunked_upload_over_the_limit_is_413(self, start_gateway, tmp_path):
        """A chunked body that runs over the limit is cut off; nothing is written."""
        gateway = start_gateway(max_upload_bytes=MiB, **FAST)
        _, token = gateway.make_key(
            grants=(("x", ("filemanager://p1/x",), DataType.BINARY),)
        )
        source = sparse(tmp_path / "big.bin", 8 * MiB)
        status, _ = curl_upload(
            f"{gateway.url}/integration/v1/resources/x",
            token,
            source,
            "-H",
            "Transfer-Encoding: chunked",
        )
        assert status == 413
        assert not (gateway.filemanager / "p1/x").exists()
        assert wait_until_empty(gateway) == []


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send what the server takes; it may close before the end."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


def raw_chunked_upload_head(gateway: Gateway, token: str, resource: str) -> bytes:
    """The headers of a chunked upload, and its first chunk: the part's head."""
    boundary, opening = BOUNDARY, OPENING
    head = (
        f"POST /integration/v1/resources/{resource} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    return head + b"%x\r\n" % len(opening) + opening + b"\r\n"


class TestChunkFraming:
    """A chunked body's framing is bounded, and a broken one ends the connection."""

    @pytest.mark.parametrize(
        "framing",
        [
            pytest.param(b"1" * MiB, id="endless-size-line"),
            pytest.param(b"0\r\nX-Trailer: " + b"t" * MiB, id="endless-trailer"),
            pytest.param(b"\r\n" * 200_000, id="empty-lines"),
            pytest.param(b"1\r\nz\r\n" * 100_000, id="one-byte-chunks"),
        ],
    )
    def test_a_runaway_framing_line_is_400(self, gateway, grant, framing):
        """The line is not kept growing in memory: 400, nothing staged or written."""
        with connect(gateway) as sock:
            sock.sendall(raw_chunked_upload_head(gateway, grant[1], "big/x"))
            time.sleep(0.2)  # the body now streams to the upload
            with contextlib.suppress(OSError):
                sock.sendall(framing)
            assert read_status(sock) == 400
        assert not (gateway.filemanager / "p1/big/x").exists()
        assert wait_until_empty(gateway) == []

    def test_a_client_still_sending_gets_the_refusal_whole(self, gateway, grant):
        """The 400 for framing that outweighs the body ends in a close, not a reset."""
        request = raw_chunked_upload_head(gateway, grant[1], "big/x")
        request += b"7\r\nzzzzzzz\r\n" * 250_000
        for _ in range(10):
            with connect(gateway) as sock:
                sender = threading.Thread(target=_send_quietly, args=(sock, request))
                sender.start()
                answer = b""
                # To the end: a reset instead of a clean close fails the test.
                while chunk := sock.recv(65536):
                    answer += chunk
                sender.join(10)
            assert answer.startswith(b"HTTP/1.1 400 "), answer

    def test_a_bad_chunk_ends_the_connection(self, gateway, grant):
        """What follows broken framing is never read as a request of its own."""
        with connect(gateway) as sock:
            sock.sendall(raw_chunked_upload_head(gateway, grant[1], "big/x"))
            time.sleep(0.2)
            sock.sendall(b"zz\r\n")
            head = read_answer(sock)
            assert head.startswith(b"HTTP/1.1 400 ")
            assert b"\r\nConnection: close\r\n" in head
            with contextlib.suppress(OSError):
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert closed_by_server(sock)


class TestDeadlinesAndDisconnects:
    """Slow or vanished clients leave nothing behind."""

    def test_a_trickling_client_is_cut_off_at_the_deadline(self, start_gateway):
        """A body sent a byte at a time gets 408 at the deadline; nothing lands."""
        gateway = start_gateway(request_timeout=1.5, **FAST)
        _, token = gateway.make_key(
            grants=(("x", ("filemanager://p1/x",), DataType.BINARY),)
        )
        with connect(gateway) as sock:
            sock.sendall(raw_upload_head(gateway, token, "x", 1000))
            started = time.monotonic()
            status = 0
            for _ in range(60):
                try:
                    sock.sendall(b"z")
                except OSError:
                    break
                sock.settimeout(0.1)
                try:
                    peek = sock.recv(4096, socket.MSG_PEEK)
                except TimeoutError:
                    continue
                status = read_status(sock) if peek else 0
                break
            elapsed = time.monotonic() - started
        assert status == 408
        assert 1.0 < elapsed < 5.0
        assert not (gateway.filemanager / "p1/x").exists()
        assert wait_until_empty(gateway) == []

    def test_a_client_stalling_in_its_headers_is_disconnected(self, start_gateway):
        """Half-sent headers do not hold a connection past the deadline."""
        gateway = start_gateway(request_timeout=1.0, **FAST)
        with connect(gateway) as sock:
            sock.sendall(b"POST /integration/v1/resources/x HTTP/1.1\r\nHost: a\r\n")
            started = time.monotonic()
            sock.settimeout(6)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(4096) == b""
            assert time.monotonic() - started < 5.0

    def test_a_client_that_disconnects_mid_upload_leaves_nothing(self, gateway, grant):
        """Half a body then a closed socket: no file, no staged copy."""
        with connect(gateway) as sock:
            sock.sendall(raw_upload_head(gateway, grant[1], "big/gone.bin", 8 * MiB))
            sock.sendall(b"y" * (2 * MiB))
            time.sleep(0.3)
        assert wait_until_empty(gateway) == []
        assert not (gateway.filemanager / "p1/big/gone.bin").exists()

    def test_a_disconnect_keeps_the_previous_copy(self, gateway, grant, tmp_path):
        """An interrupted overwrite leaves the earlier file untouched."""
        source = tmp_path / "v1"
        source.write_bytes(b"version one")
        assert (
            curl_upload(
                f"{gateway.url}/integration/v1/resources/big/keep", grant[1], source
            )[0]
            == 200
        )
        with connect(gateway) as sock:
            sock.sendall(raw_upload_head(gateway, grant[1], "big/keep", 4 * MiB))
            sock.sendall(b"w" * MiB)
            time.sleep(0.3)
        assert wait_until_empty(gateway) == []
        assert (gateway.filemanager / "p1/big/keep").read_bytes() == b"version one"


class TestRollbackOfNewFolders:
    """A rolled-back publish takes away the folders its commit made."""

    def test_a_failed_location_leaves_no_new_folder_at_another(self, gateway, tmp_path):
        """The first location's new folders go when the second cannot commit."""
        _, token = gateway.make_key(
            grants=(
                (
                    "two",
                    (
                        "filemanager://p1/m3/deep/y.bin",
                        "filemanager://p1/m4/deep/y.bin",
                    ),
                    DataType.BINARY,
                ),
            )
        )
        project = gateway.filemanager / "p1"
        project.mkdir(parents=True)
        closing = b"\r\n--b0undary--\r\n"
        with connect(gateway) as sock:
            sock.sendall(raw_upload_head(gateway, token, "two", MiB + len(closing)))
            sock.sendall(b"q" * (MiB // 2))
            deadline = time.monotonic() + 10
            while len(staged(gateway)) < 2:
                assert time.monotonic() < deadline, "the upload was never staged"
                time.sleep(0.02)
            # A file where the second location needs a folder: its commit fails.
            (project / "m4").write_bytes(b"in the way")
            sock.sendall(b"q" * (MiB // 2) + closing)
            status = read_status(sock)
        assert status == 409  # the caller's names clash with what the folder holds
        assert sorted(p.name for p in project.iterdir()) == ["m4"]
        assert wait_until_empty(gateway) == []


class TestManyDescriptors:
    """The event loop serves sockets whatever their descriptor numbers."""

    def test_a_socket_numbered_past_1024_is_served(self, gateway):
        """select() cannot watch descriptor 1024 or above; the loop uses poll()."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip(f"this process may open only {hard} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
        padding = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
        try:
            # The gateway runs in this process: its next sockets get high numbers.
            with connect(gateway) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_status(sock) == 200
        finally:
            for fd in padding:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class TestFoldersSwappedMidUpload:
    """The destination folder is the one checked when the upload began."""

    @pytest.mark.parametrize("swap", ["removed", "renamed"])
    def test_a_link_swapped_in_cannot_lead_the_file_outside(
        self, gateway, grant, tmp_path, swap
    ):
        """Replacing the folder with a link mid-body writes nothing through it."""
        outside = tmp_path / "outside"
        outside.mkdir()
        folder = gateway.filemanager / "p1/big/t"
        folder.mkdir(parents=True)
        closing = b"\r\n--b0undary--\r\n"
        with connect(gateway) as sock:
            sock.sendall(
                raw_upload_head(
                    gateway, grant[1], "big/t/f.bin", 2 * MiB + len(closing)
                )
            )
            sock.sendall(b"z" * MiB)
            deadline = time.monotonic() + 10
            while not staged(gateway):
                assert time.monotonic() < deadline, "the upload was never staged"
                time.sleep(0.02)
            if swap == "removed":
                shutil.rmtree(folder)
            else:
                folder.rename(folder.with_name("t.old"))
            folder.symlink_to(outside)
            sock.sendall(b"z" * MiB + closing)
            status = read_status(sock)
        assert list(outside.iterdir()) == []
        assert wait_until_empty(gateway) == []
        if swap == "renamed":
            # The folder it was checked in, wherever that now is in the root.
            assert status == 200
            assert (
                gateway.filemanager / "p1/big/t.old/f.bin"
            ).stat().st_size == 2 * MiB
        else:
            assert status == 500


class TestLargeUploads:
    """Large files stream through whole."""

    def test_a_64_mib_random_file_lands_byte_identical(self, gateway, grant, tmp_path):
        """curl waits for 100 Continue, streams 64 MiB, and the copy is exact."""
        source = tmp_path / "random.bin"
        with source.open("wb") as handle:
            for _ in range(64):
                handle.write(os.urandom(MiB))
        status, sent = curl_upload(
            f"{gateway.url}/integration/v1/resources/big/random.bin", grant[1], source
        )
        assert status == 200
        assert sent > 64 * MiB
        stored = gateway.filemanager / "p1/big/random.bin"
        assert filecmp.cmp(stored, source, shallow=False)


def read_answers(sock: socket.socket, count: int) -> list[bytes]:
    """Read ``count`` answers (each with a Content-Length); return their heads."""
    data, heads = b"", []
    while len(heads) < count:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {heads!r}"
            data += chunk
        head, _, data = data.partition(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        while len(data) < length:
            chunk = sock.recv(65536)
            assert chunk, "closed inside a body"
            data += chunk
        data = data[length:]
        heads.append(head)
    return heads


class TestSmallBodyDeadlines:
    """A small body too slow to arrive is a 408, after the answers owed."""

    def test_a_dripping_small_body_is_answered_408(self, start_gateway):
        """The deadline gives a JSON 408, not a silent close."""
        gateway = start_gateway(request_timeout=1.0, **FAST)
        with connect(gateway) as sock:
            sock.sendall(
                b"POST /app/login HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                b"Content-Length: 100\r\n\r\ntoken="
            )
            (head,) = read_answers(sock, 1)
        assert head.startswith(b"HTTP/1.1 408 ")

    def test_a_slow_call_before_it_still_gets_its_answer(self, start_gateway, upstream):
        """A webhook call in progress is answered; the late body after it is 408."""
        gateway = start_gateway(request_timeout=1.0, **FAST)
        gateway.add_service("p1", 1, "svc", upstream.url)
        _, token = gateway.make_key(permissions=(("svc", "/"),))
        upstream.delay = 2.0
        with connect(gateway) as sock:
            sock.sendall(
                b"POST /project-gateway/webhooks/p1/lineage-version/1/svc/x HTTP/1.1"
                b"\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                b"Content-Length: 2\r\n\r\nhi"
                b"POST /app/login HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                b"Content-Length: 100\r\n\r\ntoken=" % token.encode()
            )
            heads = read_answers(sock, 2)
        assert [head.split()[1] for head in heads] == [b"200", b"408"]
        assert len(upstream.calls) == 1


class TestWholeSmallBodies:
    """A body that arrives with its head is not streamed; a later one is."""

    @pytest.fixture
    def inputs(self) -> Iterator[tuple[int, list[tuple[str, bytes]]]]:
        """A bare streaming server recording what ``wsgi.input`` each call got."""
        seen: list[tuple[str, bytes]] = []

        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            body = environ["wsgi.input"]
            seen.append((type(body).__name__, body.read()))
            start_response("204 No Content", [])
            return []

        server = create_server(app, host="127.0.0.1", port=0)
        server.channel_class = StreamingChannel
        runner = BackgroundServer(server).start()
        yield server.effective_port, seen
        runner.stop()

    def test_a_body_sent_with_its_head_reaches_the_app_buffered(self, inputs):
        """One piece: waitress' own buffer, no pipe; a split one streams."""
        port, seen = inputs
        head = (
            b"POST /integration/v1/resources/x HTTP/1.1\r\nHost: a\r\n"
            b"Content-Length: 5\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(head + b"hello")
            assert sock.recv(100).startswith(b"HTTP/1.1 204")
            sock.sendall(head + b"he")
            time.sleep(0.2)
            sock.sendall(b"llo")
            assert sock.recv(100).startswith(b"HTTP/1.1 204")
        assert seen[0][1] == seen[1][1] == b"hello"
        assert seen[0][0] != "BodyPipe"
        assert seen[1][0] == "BodyPipe"

    def test_a_small_body_is_invited_at_once(self, inputs):
        """Expect: 100-continue on a small endpoint gets its 100 with the head."""
        port, seen = inputs
        head = (
            b"POST /app/login HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(head)
            assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(b"hello")
            assert sock.recv(100).startswith(b"HTTP/1.1 204")
        assert seen[0][1] == b"hello"

    def test_a_small_endpoints_body_is_read_whole_before_the_app(self, inputs):
        """Outside webhooks and uploads, even a split body reaches the app whole."""
        port, seen = inputs
        head = b"POST /app/login HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(head + b"he")
            time.sleep(0.3)
            assert seen == []  # no worker has the request yet
            sock.sendall(b"llo")
            assert sock.recv(100).startswith(b"HTTP/1.1 204")
        assert seen[0][1] == b"hello"
        assert seen[0][0] != "BodyPipe"
