"""A real headless Chromium in the project admin area: log in, read the keys.

Chromium and ChromeDriver come from Debian (``.ci/browsers`` installs them);
Selenium is told where the driver is, so Selenium Manager never runs and
nothing is downloaded. Every page the browser loads is on 127.0.0.1 (or a
``data:`` URL). Without the browser the tests fail; they never skip.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import urllib3
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from dais_core.admin import Role
from dais_core.values import DataType
from dais_wsgi.admin import make_admin
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "artifacts" / "admin-apikeys.png"
# Headless, and quiet: no first-run, sync, component or background traffic,
# which the closed network would refuse; no proxy, so loopback stays local.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
    "--window-size=1280,900",
)
RESOURCE = "reports/browser-check.bin"
CONTENT = b"uploaded from the browser test\n" * 10


@pytest.fixture
def browsers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., WebDriver]]:
    """Start headless Chromium sessions; each is quit after the test."""
    # Belt and braces: Selenium Manager is skipped when the Service names
    # the driver, and must never go online if anything calls it anyway.
    monkeypatch.setenv("SE_OFFLINE", "true")
    started: list[WebDriver] = []

    def start(*, javascript: bool = True) -> WebDriver:
        for binary, package in (
            (CHROMIUM, "chromium"),
            (CHROMEDRIVER, "chromium-driver"),
        ):
            if not os.access(binary, os.X_OK):
                pytest.fail(
                    f"{binary} is missing: install Debian's {package} "
                    "(.ci/browsers does it)",
                    pytrace=False,
                )
        number = len(started)
        options = Options()
        options.binary_location = str(CHROMIUM)
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={tmp_path / f'chromium-{number}'}")
        if not javascript:
            options.add_argument("--blink-settings=scriptEnabled=false")
            options.add_experimental_option(
                "prefs", {"profile.managed_default_content_settings.javascript": 2}
            )
        # The performance log carries each response's HTTP status.
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
        driver_log = tmp_path / f"chromedriver-{number}.log"
        service = Service(executable_path=str(CHROMEDRIVER), log_output=str(driver_log))
        try:
            driver = webdriver.Chrome(service=service, options=options)
        except WebDriverException as exc:
            service.stop()  # our own chromedriver, if it is still running
            problem = exc.msg or repr(exc)
        else:
            problem = None
        if problem is not None:
            pytest.fail(
                f"could not start headless {CHROMIUM} through {CHROMEDRIVER}: "
                f"{problem} (driver log: {driver_log})",
                pytrace=False,
            )
        started.append(driver)
        driver.set_page_load_timeout(15)
        return driver

    yield start
    for driver in started:
        try:
            driver.quit()
        except WebDriverException:
            driver.service.stop()  # ends the chromedriver this test started


def log_in(driver: WebDriver, gateway: Gateway, token: str) -> None:
    """Fill in and send the login form, and wait for the redirect."""
    driver.get(f"{gateway.url}/app/login")
    field = driver.find_element(By.ID, "token")
    assert field.get_attribute("type") == "password"
    field.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(driver, 10).until(expected_conditions.url_contains("/admin/"))


def document_statuses(driver: WebDriver) -> dict[str, int]:
    """The HTTP status of each page loaded since the last call, by path."""
    statuses: dict[str, int] = {}
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] != "Network.responseReceived":
            continue
        if message["params"].get("type") != "Document":
            continue
        response = message["params"]["response"]
        statuses[urlsplit(response["url"]).path] = int(response["status"])
    return statuses


def facts(section: WebElement) -> dict[str, str]:
    """The label and metadata table of a key's section, heading to value."""
    table = section.find_element(By.XPATH, "./table")
    return {
        row.find_element(By.TAG_NAME, "th").text: row.find_element(
            By.TAG_NAME, "td"
        ).text
        for row in table.find_elements(By.TAG_NAME, "tr")
    }


def rows_under(section: WebElement, heading: str) -> list[list[str]] | None:
    """The body rows of the table under an h3; None where it says "None."."""
    shown = section.find_element(
        By.XPATH, f"./h3[normalize-space()='{heading}']/following-sibling::*[1]"
    )
    if shown.tag_name == "p":
        assert shown.text == "None."
        return None
    return [
        [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
        for row in shown.find_elements(By.CSS_SELECTOR, "tbody tr")
    ]


def secrets_of(token: str) -> list[str]:
    """The whole token and its secret part (after ``prefix_id_``)."""
    return [token, token.split("_", 2)[2]]


def full_page_screenshot(driver: WebDriver, path: Path) -> None:
    """Save the whole page, beyond the viewport, as a PNG (Chrome DevTools)."""
    metrics: dict[str, Any] = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics["cssContentSize"]
    shot: dict[str, Any] = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {
                "x": 0,
                "y": 0,
                "width": size["width"],
                "height": size["height"],
                "scale": 1,
            },
        },
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def png_size(path: Path) -> tuple[int, int]:
    """The width and height in a PNG's IHDR; fails if it is no PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def test_a_project_admin_sees_their_keys_and_not_another_projects(
    gateway: Gateway, browsers: Callable[..., WebDriver]
) -> None:
    """Log in, land on p1's keys with their metadata and uploads; p2 is 403."""
    lead = make_admin(gateway.store, Role.PROJECT, "p1", "lead", time.time())
    uploader, uploader_token = gateway.make_key(
        "p1",
        grants=((RESOURCE, (f"filemanager://p1/{RESOURCE}",), DataType.BINARY),),
    )
    idle, idle_token = gateway.make_key("p1")
    other, other_token = gateway.make_key("p2")
    http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(10, 30))
    sent = http.request(
        "POST",
        f"{gateway.url}/integration/v1/resources/{quote(RESOURCE)}",
        fields={"data": ("browser-check.bin", CONTENT, "application/octet-stream")},
        headers={"Authorization": f"Bearer {uploader_token}"},
    )
    assert sent.status == 200, sent.data
    gateway.flush()

    driver = browsers()
    log_in(driver, gateway, lead["token"])

    assert urlsplit(driver.current_url).path == "/app/p1/admin/apikeys"
    assert document_statuses(driver).get("/app/p1/admin/apikeys") == 200
    assert driver.title == "API keys of p1"
    page = driver.page_source
    text = driver.find_element(By.TAG_NAME, "body").text
    assert uploader in text and idle in text
    assert "2 key(s). Secrets are never shown." in text
    assert other not in page
    for token in (uploader_token, idle_token, other_token, lead["token"]):
        for secret in secrets_of(token):
            assert secret not in page

    for key_id in (uploader, idle):
        section = driver.find_element(By.ID, f"key-{key_id}")
        assert section.is_displayed()
        assert section.find_element(By.TAG_NAME, "h2").text == f"{key_id} active"
        shown = facts(section)
        assert (shown["Label"], shown["Requestor"]) == ("test", "tests")
        assert (shown["Expires"], shown["Revoked"]) == ("never", "no")
        assert shown["Created"].startswith(time.strftime("%Y-", time.gmtime()))

    mine = driver.find_element(By.ID, f"key-{uploader}")
    assert rows_under(mine, "Resource grants") == [
        [RESOURCE, f"filemanager://p1/{RESOURCE}", "binary"]
    ]
    uploads = rows_under(mine, "Recent uploads")
    assert uploads is not None and len(uploads) == 1, uploads
    (at, resource, size, outcome, request_id) = uploads[0]
    assert (resource, size, outcome) == (RESOURCE, str(len(CONTENT)), "published")
    assert at.startswith(time.strftime("%Y-", time.gmtime())) and request_id
    assert (
        rows_under(driver.find_element(By.ID, f"key-{idle}"), "Recent uploads") is None
    )

    full_page_screenshot(driver, SCREENSHOT)
    width, height = png_size(SCREENSHOT)
    assert width >= 800 and height >= 600, (width, height)
    assert SCREENSHOT.stat().st_size > 20_000, SCREENSHOT.stat().st_size

    driver.get(f"{gateway.url}/app/p2/admin/apikeys")
    assert document_statuses(driver).get("/app/p2/admin/apikeys") == 403
    refused = driver.page_source
    assert "this admin token may not see that project" in refused
    assert other not in refused and uploader not in refused
    with pytest.raises(NoSuchElementException):
        driver.find_element(By.CSS_SELECTOR, "section.key")


def test_the_keys_page_works_without_javascript(
    gateway: Gateway, browsers: Callable[..., WebDriver]
) -> None:
    """With scripts off, the form still logs in and the page lists the keys."""
    lead = make_admin(gateway.store, Role.PROJECT, "p1", "lead", time.time())
    first, _ = gateway.make_key("p1")
    second, _ = gateway.make_key("p1")
    driver = browsers(javascript=False)

    # Scripts are really off: <noscript> content is parsed and shown.
    driver.get("data:text/html,<noscript><p id=off>scripts are off</p></noscript>")
    assert driver.find_element(By.ID, "off").is_displayed()

    log_in(driver, gateway, lead["token"])
    assert urlsplit(driver.current_url).path == "/app/p1/admin/apikeys"
    assert "<script" not in driver.page_source
    for key_id in (first, second):
        section = driver.find_element(By.ID, f"key-{key_id}")
        assert section.is_displayed() and key_id in section.text
        assert facts(section)["Label"] == "test"
