"""Health, readiness and metrics endpoints."""

from __future__ import annotations

import pytest

from dais_core.values import DataType
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration


class TestHealth:
    """What load balancers and Prometheus read."""

    def test_healthz_is_ok(self, http, gateway):
        """The process answers."""
        response = http.request("GET", f"{gateway.url}/healthz")
        assert (response.status, response.json()) == (200, {"status": "ok"})

    def test_readyz_checks_the_store_the_throttle_and_the_storages(self, http, gateway):
        """Every dependency answers: 200 with each check named."""
        response = http.request("GET", f"{gateway.url}/readyz")
        assert response.status == 200
        assert response.json()["checks"] == {
            "key_store": "ok",
            "storage:filemanager": "ok",
            "storage:s3": "ok",
        }

    def test_readyz_is_503_when_the_file_manager_is_unusable(
        self, http, start_gateway, tmp_path
    ):
        """A File Manager root that is a file makes the gateway unready."""
        blocked = tmp_path / "not-a-folder"
        blocked.write_text("x")
        gateway = start_gateway(filemanager_root=blocked / "fm")
        response = http.request("GET", f"{gateway.url}/readyz")
        assert response.status == 503
        body = response.json()
        assert body["status"] == "unavailable"
        assert body["checks"]["key_store"] == "ok"
        assert body["checks"]["storage:filemanager"] != "ok"

    def test_metrics_count_requests_bytes_and_throttle_decisions(
        self, http, gateway: Gateway
    ):
        """After an upload and a refused call the counters show both."""
        _, token = gateway.make_key(
            grants=(("x", ("filemanager://p1/x",), DataType.BINARY),)
        )
        headers = {"Authorization": f"Bearer {token}"}
        ok = http.request(
            "POST",
            f"{gateway.url}/integration/v1/resources/x",
            fields={"data": ("x", b"12345678", "application/octet-stream")},
            headers=headers,
        )
        assert ok.status == 200
        http.request("POST", f"{gateway.url}/integration/v1/resources/x")
        text = http.request("GET", f"{gateway.url}/metrics").data.decode()
        assert 'dais_requests_total{endpoint="upload",status="200"} 1.0' in text
        assert 'dais_requests_total{endpoint="upload",status="401"} 1.0' in text
        assert "dais_uploaded_bytes_total 8.0" in text
        assert (
            'dais_throttle_decisions_total{outcome="allowed",policy="upload"} 1.0'
            in text
        )
        assert 'dais_key_cache_lookups_total{result="miss"} 1.0' in text
