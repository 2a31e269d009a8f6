"""Two gateway processes sharing PostgreSQL, Redis and S3 act as one."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import urllib3

from tests.conftest import REDIS

pytestmark = pytest.mark.integration

COMMAND = shutil.which("dais-gateway") or str(
    Path(sys.executable).parent / "dais-gateway"
)
MiB = 2**20


@attrs.define
class Cluster:
    """Two gateways, a key that may publish to S3, and an admin token."""

    urls: tuple[str, str]
    key_id: str
    token: str
    admin_token: str
    bucket: str


def admin_command(store: str, home: Path, *args: str) -> Any:
    done = subprocess.run(
        [COMMAND, "--store", store, "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if "--json" in args else done.stdout


@pytest.fixture
def cluster(pg_url: str, bucket: str, tmp_path: Path) -> Iterator[Cluster]:
    """Start two ``dais-gateway serve`` processes on one PostgreSQL store."""
    created = admin_command(
        pg_url, tmp_path, "keys", "create", "--project", "p1", "--json"
    )
    admin_command(
        pg_url,
        tmp_path,
        "grants",
        "add",
        created["id"],
        "--resource",
        "data/",
        "--to",
        f"s3://{bucket}/data/",
    )
    admin = admin_command(
        pg_url, tmp_path, "admins", "create", "--role", "platform", "--json"
    )
    processes, urls = [], []
    try:
        for name in ("a", "b"):
            process = subprocess.Popen(
                [
                    COMMAND,
                    "--store",
                    pg_url,
                    "--home",
                    str(tmp_path / name),
                    "serve",
                    "--port",
                    "0",
                    "--throttle",
                    REDIS,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=os.environ | {"DAIS_LOG_LEVEL": "WARNING"},
            )
            processes.append(process)
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("dais gateway on "), line
            urls.append(line.split()[-1])
        yield Cluster(
            (urls[0], urls[1]), created["id"], created["key"], admin["token"], bucket
        )
    finally:
        for process in processes:
            os.kill(process.pid, signal.SIGINT)
        for process in processes:
            process.wait(timeout=20)


def upload(url: str, token: str, resource: str, content: bytes) -> int:
    http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(5, 60))
    response = http.request(
        "POST",
        f"{url}/integration/v1/resources/{resource}",
        fields={"data": ("f.bin", content, "application/octet-stream")},
        headers={"Authorization": f"Bearer {token}"},
    )
    return int(response.status)


class TestOneGatewayOfTwo:
    """One key, two processes, one set of guarantees."""

    def test_the_upload_rate_holds_across_both_processes(self, cluster):
        """Hammering both for a few seconds admits at most one per second in all."""
        statuses: dict[str, list[int]] = {url: [] for url in cluster.urls}
        started = time.monotonic()
        stop_at = started + 3.2

        def hammer(url: str) -> None:
            count = 0
            while time.monotonic() < stop_at and count < 200:
                statuses[url].append(upload(url, cluster.token, "data/rate.bin", b"r"))
                count += 1
                time.sleep(0.02)

        threads = [threading.Thread(target=hammer, args=(url,)) for url in cluster.urls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        elapsed = time.monotonic() - started
        admitted = sum(s.count(200) for s in statuses.values())
        assert all(set(s) <= {200, 429} for s in statuses.values()), statuses
        assert all(429 in s for s in statuses.values())
        assert 2 <= admitted <= 1 + math.floor(elapsed)

    def test_a_revocation_on_one_is_enforced_by_the_other_within_a_second(
        self, cluster
    ):
        """Revoked through A's admin API, the key is refused by B at once."""
        first, second = cluster.urls
        http = urllib3.PoolManager(retries=False)
        assert upload(second, cluster.token, "data/before.bin", b"ok") == 200
        revoked = http.request(
            "POST",
            f"{first}/admin/v1/keys/{cluster.key_id}/revoke",
            headers={"Authorization": f"Bearer {cluster.admin_token}"},
        )
        assert revoked.status == 200
        since = time.monotonic()
        while upload(second, cluster.token, "data/after.bin", b"no") != 401:
            assert time.monotonic() - since < 1.0, "B still accepts the revoked key"
            time.sleep(0.02)

    def test_uploads_through_either_are_whole_in_s3(self, cluster, s3):
        """Multi-part files published through A and B read back byte-identical."""
        contents = {
            url: hashlib.sha256(name.encode()).digest() * (20 * MiB // 32)
            for url, name in zip(cluster.urls, ("a", "b"), strict=True)
        }
        for index, (url, content) in enumerate(contents.items()):
            deadline = time.monotonic() + 5
            while upload(url, cluster.token, f"data/{index}.bin", content) == 429:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        for index, content in enumerate(contents.values()):
            stored = s3.get_object(Bucket=cluster.bucket, Key=f"data/{index}.bin")
            body = stored["Body"].read()
            assert hashlib.sha256(body).digest() == hashlib.sha256(content).digest()
        pending = s3.list_multipart_uploads(Bucket=cluster.bucket)
        assert pending.get("Uploads", []) == []
