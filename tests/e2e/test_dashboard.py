"""The operator dashboard in headless Chromium (Debian's chromium and chromedriver, through selenium): the page
loads from the gateway alone, lists the models, follows live traffic, draws its charts, and asks for a key when
auth is on."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from tests.conftest import ROOT, Process, start_gateway

KEY = "sk-dashboard-test"
PRICE_IN, PRICE_OUT = 1000.0, 2000.0  # USD per million tokens: cents per request, so the cost shows
TRAFFIC = 5
_LOAD_FAILED = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")


def _unavailable(why: str) -> None:
    """No browser: a failure under CI (where `make test` installs it), a skip on a developer's machine."""
    if os.environ.get("CI"):
        pytest.fail(f"the dashboard test needs headless Chromium: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture
def browser() -> Iterator:
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        _unavailable(f"selenium is not installed ({exc}): pip install -e '.[test]'")
    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver_path is None:
        _unavailable("Debian's chromium and chromium-driver are not installed: "
                     "apt-get install -y chromium chromium-driver (`make test` does it)")
    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage", "--window-size=1440,1200", "--hide-scrollbars",
                # belt and braces: a name outside loopback does not even resolve
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    try:  # an explicit chromedriver: selenium's own driver manager (which downloads) never runs
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except WebDriverException as exc:
        _unavailable(f"chromium did not start: {exc.msg}")
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def open_gateway(upstream, tmp_path_factory) -> Iterator[Process]:
    """Auth off, a database, budgets (one to alert on), an experiment."""
    config = f"""
models:
  - id: remote-a
    backend: openai
    base_url: "{upstream.url}"
    upstream_model: mock-model
    pricing: {{input_per_mtok: {PRICE_IN}, output_per_mtok: {PRICE_OUT}}}
  - {{id: remote-b, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
routing: {{health_check_s: 0}}
policies:
  budgets:
    - {{scope: global, period: day, max_cost_usd: 1.0, max_tokens: 5000}}
    - {{scope: model, match: remote-a, period: day, max_cost_usd: 0.1}}
experiments:
  - name: dashboard-ab
    target: remote-b
    variants:
      - {{name: control, model: remote-b, weight: 70}}
      - {{name: candidate, model: remote-a, weight: 30}}
"""
    server = start_gateway(tmp_path_factory.mktemp("dashboard"), config, env={"POINTSMAN_ADMIN_KEY": ""})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def locked_gateway(upstream, tmp_path_factory) -> Iterator[Process]:
    """Auth on and no database: the analytics and experiments sections have nothing to show."""
    config = f"""
models:
  - {{id: remote-a, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
routing: {{health_check_s: 0}}
auth: {{api_keys: ["{KEY}"]}}
storage: {{database_url: ""}}
"""
    server = start_gateway(tmp_path_factory.mktemp("dashboard-locked"), config,
                           env={"POINTSMAN_ADMIN_KEY": ""})
    yield server
    server.stop()


def _wait(driver, condition, what: str, timeout: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    notes = "; ".join(n.text for n in driver.find_elements("css selector", ".note, .banner") if n.text)
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        condition, f"{what} (page notes: {notes or 'none'})")


def _value(driver, css: str) -> str | None:
    found = driver.find_elements("css selector", css)
    return found[0].get_attribute("data-value") if found else None


def _console_errors(driver, allowed_statuses: frozenset[int] = frozenset()) -> list[str]:
    """SEVERE console lines, less the failed loads answered with an allowed status (a 401 the page expects)."""
    errors = []
    for entry in driver.get_log("browser"):
        if entry["level"] != "SEVERE":
            continue
        failed = _LOAD_FAILED.search(entry["message"])
        if failed and int(failed.group(1)) in allowed_statuses:
            continue
        errors.append(entry["message"])
    return errors


def _requested_urls(driver) -> list[str]:
    """Every URL the page asked for, from Chromium's network events."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _screenshot(driver, name: str) -> Path:
    folder = Path(os.environ.get("POINTSMAN_ARTIFACTS") or ROOT / "tests/artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    # the whole page: the window grows to the page's height plus the window's own frame
    height, frame = driver.execute_script("return [document.body.scrollHeight, "
                                          "window.outerHeight - window.innerHeight]")
    driver.set_window_size(1440, height + frame)
    assert driver.save_screenshot(str(path)), f"no screenshot written to {path}"
    return path


def test_the_page_and_its_assets_come_with_their_types_and_a_policy_that_forbids_other_origins(open_gateway):
    page = httpx.get(open_gateway.url + "/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    assert "http" not in csp and "*" not in csp and "unsafe" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    # everything the page loads is its own
    for ref in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        assert ref.startswith("/dashboard/"), ref
    for name, kind in [("dashboard.js", "text/javascript"), ("dashboard.css", "text/css"),
                       ("favicon.svg", "image/svg+xml")]:
        asset = httpx.get(f"{open_gateway.url}/dashboard/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), name
        assert asset.headers["content-security-policy"] == csp
    script = httpx.get(open_gateway.url + "/dashboard/dashboard.js").text
    assert set(re.findall(r"https?://[^\s\"'`]+", script)) == {"http://www.w3.org/2000/svg"}  # a name, not a place
    missing = httpx.get(open_gateway.url + "/dashboard/%2E%2E%2Fapp.py")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(open_gateway.url + "/dashboard/secrets.txt").status_code == 404


def test_the_dashboard_follows_live_traffic(open_gateway, browser):
    url = open_gateway.url
    browser.get(url + "/dashboard")
    _wait(browser, lambda d: d.find_elements("css selector", '#models-body tr[data-model="remote-b"]'),
          "the models are listed")
    states = {row.get_attribute("data-model"): row.find_element("css selector", '[data-metric="status"]').text
              for row in browser.find_elements("css selector", "#models-body tr[data-model]")}
    assert states == {"remote-a": "available", "remote-b": "available"}
    _wait(browser, lambda d: _value(d, "#metric-requests") == "0", "the analytics answered, with no traffic yet")
    _wait(browser, lambda d: d.find_elements("css selector", '#experiments [data-experiment="dashboard-ab"]'),
          "the experiment is listed")
    weights = {v.get_attribute("data-variant"): v.find_element("css selector", '[data-metric="weight"]')
               .get_attribute("data-value") for v in browser.find_elements("css selector", ".variant")}
    assert weights == {"control": "70", "candidate": "30"}

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    tokens = cost = 0.0
    for i in range(TRAFFIC):
        answer = client.chat.completions.create(model="remote-a", max_tokens=8,
                                                messages=[{"role": "user", "content": f"dashboard request {i}"}])
        tokens += answer.usage.total_tokens
        cost += (answer.usage.prompt_tokens * PRICE_IN + answer.usage.completion_tokens * PRICE_OUT) / 1e6

    _wait(browser, lambda d: _value(d, "#metric-requests") == str(TRAFFIC), "the live request count shows the traffic")
    assert _value(browser, "#metric-tokens") == str(int(tokens))
    assert float(_value(browser, "#metric-cost")) == pytest.approx(cost)
    assert browser.find_element("css selector", "#metric-cost").text.startswith("$0.")
    assert _value(browser, "#metric-errors") == "0" and _value(browser, "#metric-latency-p95")
    row = browser.find_element("css selector", '#by-model-body tr[data-key="remote-a"]')
    assert row.find_element("css selector", '[data-metric="requests"]').get_attribute("data-value") == str(TRAFFIC)
    # the charts were drawn: bars adding up to the traffic, a latency point per minute that had some
    bars = browser.find_elements("css selector", "#chart-requests rect.bar")
    assert bars and sum(int(b.get_attribute("data-value")) for b in bars) == TRAFFIC
    assert all(b.size["height"] > 0 for b in bars)
    assert browser.find_elements("css selector", "#chart-latency circle.dot")

    # budgets as bars of used/limit, forecasts with their alerts highlighted as the API says
    spent = '.budget[data-scope="global"] [data-metric="used_usd"]'
    _wait(browser, lambda d: float(_value(d, spent) or 0) == pytest.approx(cost), "the global budget shows the spend")
    assert float(_value(browser, '.budget[data-scope="model"] [data-metric="used_usd"]')) == pytest.approx(cost)

    def alerts_as_the_api_says(driver) -> bool:
        rows = driver.find_elements("css selector", "#forecasts-body tr[data-alert]")
        forecasts = httpx.get(url + "/admin/analytics/forecast").json()["data"]
        return len(rows) == len(forecasts) > 0 and (
            sorted(r.get_attribute("data-alert") for r in rows)
            == sorted("true" if f["alert"] else "false" for f in forecasts))

    _wait(browser, alerts_as_the_api_says, "the forecasts are listed, alerts as the API flags them")
    assert all(("alert" in (r.get_attribute("class") or "").split()) == (r.get_attribute("data-alert") == "true")
               for r in browser.find_elements("css selector", "#forecasts-body tr[data-alert]"))

    path = _screenshot(browser, "dashboard.png")
    assert path.stat().st_size > 10_000
    assert _console_errors(browser) == []
    urls = _requested_urls(browser)
    assert any(u.endswith("/dashboard/dashboard.js") for u in urls) and any("/admin/analytics" in u for u in urls)
    outside = [u for u in urls if urlsplit(u).scheme not in ("data", "blob", "about")
               and urlsplit(u).hostname != "127.0.0.1"]
    assert outside == []


def test_with_auth_on_the_page_asks_for_the_key_and_then_shows_the_data(locked_gateway, browser):
    browser.get(locked_gateway.url + "/dashboard")
    banner = _wait(browser, lambda d: next((b for b in d.find_elements("css selector", "#auth-note")
                                            if b.is_displayed()), None), "the page says the key is missing")
    assert "401" in banner.text
    models_note = browser.find_element("css selector", "#models .note")
    assert models_note.is_displayed() and "401" in models_note.text and "key" in models_note.text
    assert not browser.find_elements("css selector", "#models-body tr[data-model]")
    _screenshot(browser, "dashboard-401.png")

    browser.find_element("id", "api-key").send_keys(KEY)
    browser.find_element("id", "key-save").click()
    _wait(browser, lambda d: d.find_elements("css selector", '#models-body tr[data-model="remote-a"]'),
          "the models are listed once the key is entered")
    _wait(browser, lambda d: not d.find_element("id", "auth-note").is_displayed(), "the 401 note goes away")
    assert not browser.find_element("css selector", "#models .note").is_displayed()
    assert browser.execute_script("return localStorage.getItem('pointsman.dashboard.key')") == KEY
    # no database: the traffic and experiments sections say so in a note; the rest of the page still works
    for section in ("traffic", "experiments"):
        note = browser.find_element("css selector", f"#{section} .note")
        assert note.is_displayed() and note.text and "401" not in note.text, section
    _screenshot(browser, "dashboard-auth.png")
    # the refusals the page expected (401 before the key) and the sections with no database (400) only
    assert _console_errors(browser, frozenset({400, 401, 404})) == []
