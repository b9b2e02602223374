"""The timeline page in a real browser: Debian's headless Chromium, driven by selenium.

An investigator's path: open /ui, paste a token, search a range, follow an
actor's timeline, page on, open one event and read its details. Assertions are
on the DOM against the seeded rows (`query_support.expected`). The searches
are audited like API reads: their events are read back from the topic.

Chromium and chromedriver are Debian packages (`./dev test` installs them as
root); selenium is pointed at both binaries, so nothing is downloaded. Set
UPDATE_SCREENSHOT=1 to refresh docs/img/query-timeline.png from this run.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from ingest_support import end_offsets, read_topic, request
from openg2p_audit import kafka_binding
from openg2p_audit.devservices import LocalFunction
from query_support import full_range, reader_role, seed, seed_rows

ROWS = seed_rows(200, seed=21)
REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "img" / "query-timeline.png"


def _binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(f"none of {names} is installed: `./dev test` installs chromium and chromium-driver")


@pytest.fixture(scope="module")
def service(settings, topics, issuer, tmp_path_factory):
    seed(settings, ROWS)
    reader = reader_role(settings, f"audit_ui_{uuid.uuid4().hex[:8]}").model_copy(
        update={"auth_issuer": issuer.url, "auth_jwks_url": issuer.jwks_url}
    )
    fn = LocalFunction("query", "query", reader, tmp_path_factory.mktemp("query-ui"))
    fn.start()
    yield fn
    fn.stop()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = _binary("chromium", "chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,900"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(_binary("chromedriver")))
    driver.set_page_load_timeout(30)
    driver.implicitly_wait(3)  # a loaded CI box may render after the click returns
    yield driver
    driver.quit()


def _rows(browser) -> list[dict[str, str]]:
    out = []
    for tr in browser.find_elements(By.CSS_SELECTOR, "#results tbody tr.event"):
        cells = tr.find_elements(By.TAG_NAME, "td")
        out.append(
            {
                "time": cells[0].text,
                "type": cells[1].text,
                "actor": tr.find_element(By.CSS_SELECTOR, "a.actor").text,
                "resource": cells[4].text,
                "outcome": cells[5].text,
                "id_href": tr.find_element(By.CSS_SELECTOR, "a.detail").get_attribute("href"),
            }
        )
    return out


def _fill(browser, field: str, value: str) -> None:
    box = browser.find_element(By.ID, f"f-{field}")
    box.clear()
    box.send_keys(value)


def test_an_investigator_searches_follows_a_timeline_and_opens_an_event(
    service, browser, issuer, settings, tmp_path
):
    subject = f"browser-{uuid.uuid4().hex[:6]}"
    before = end_offsets(settings.kafka_bootstrap_servers, settings.kafka_events_topic)

    browser.get(service.url + "/ui")
    assert browser.find_element(By.ID, "login")  # no token yet: the sign-in form
    browser.find_element(By.ID, "token").send_keys("not-a-token")
    browser.find_element(By.ID, "sign-in").click()
    assert "valid token" in browser.find_element(By.ID, "error").text

    token = issuer.mint(subject, ("audit.read",))
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.ID, "sign-in").click()
    assert browser.find_element(By.ID, "who").text == subject
    cookie = browser.get_cookie("audit_token")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"

    # A search over the seeded range.
    r = full_range()
    _fill(browser, "from", r["from"])
    _fill(browser, "to", r["to"])
    _fill(browser, "limit", "25")
    browser.find_element(By.ID, "run-search").click()
    rows = _rows(browser)
    want = [x.id for x in sorted(ROWS, key=lambda x: (x.occurred_at, x.id), reverse=True)]
    assert [x["id_href"].rsplit("/", 1)[1] for x in rows] == want[:25]
    assert browser.find_element(By.ID, "next-page")

    # A click on an actor opens that actor's timeline.
    actor = rows[0]["actor"]
    browser.find_element(By.CSS_SELECTOR, "#results a.actor").click()
    assert browser.find_element(By.ID, "timeline-title").text == f"Timeline of actor {actor}"
    theirs = [x for x in sorted(ROWS, key=lambda x: (x.occurred_at, x.id), reverse=True)
              if x.actor_id == actor]  # fmt: skip
    first = _rows(browser)
    assert {x["actor"] for x in first} == {actor}
    assert [x["id_href"].rsplit("/", 1)[1] for x in first] == [x.id for x in theirs][:25]
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(tmp_path / "timeline.png"))
    if os.environ.get("UPDATE_SCREENSHOT"):
        shutil.copy(tmp_path / "timeline.png", SCREENSHOT)

    # Next page: the rest of the timeline, no row twice.
    seen = [x["id_href"] for x in first]
    while browser.find_elements(By.ID, "next-page"):
        browser.find_element(By.ID, "next-page").click()
        page = _rows(browser)
        assert {x["actor"] for x in page} == {actor}
        seen += [x["id_href"] for x in page]
    assert [h.rsplit("/", 1)[1] for h in seen] == [x.id for x in theirs]

    # A resource link opens the resource's timeline.
    browser.find_element(By.CSS_SELECTOR, "#results a.resource").click()
    title = browser.find_element(By.ID, "timeline-title").text
    assert title.startswith("Timeline of beneficiary/BEN-")
    ben = title.rsplit("/", 1)[1]
    assert {x["resource"] for x in _rows(browser)} == {f"beneficiary/{ben}"}

    # One event's full detail, details pretty-printed.
    with_context = next(x for x in theirs if '"context"' in (x.details or ""))
    browser.get(f"{service.url}/ui/events/{with_context.id}")
    assert browser.find_element(By.ID, "event-id").text == with_context.id
    details = browser.find_element(By.ID, "details-1").text
    assert '"context": {' in details and '\n  "extensions": {' in details
    assert "actor_id" in browser.find_element(By.CSS_SELECTOR, "dl.event-detail").text

    # A bad field is named, as the API names it.
    browser.get(f"{service.url}/ui?from=yesterday&to={r['to']}")
    assert browser.find_element(By.ID, "error").text.startswith("from: ")

    # Every search and the event opened were audited as this investigator.
    records = read_topic(settings.kafka_bootstrap_servers, settings.kafka_events_topic, before)
    audited = [kafka_binding.decode(r.headers, r.key, r.value) for r in records]
    mine = [e for e in audited if e.data.actor.id == subject]
    assert mine and {e.type for e in mine} == {"org.openg2p.audit.query.performed"}
    assert any(e.data.resource.id == with_context.id for e in mine)
    assert any((e.data.context or {}).get("filters", {}).get("actor_id") == actor for e in mine)

    # Signing out forgets the token.
    browser.get(service.url + "/ui")
    browser.find_element(By.CSS_SELECTOR, "header form button").click()
    assert browser.find_element(By.ID, "login")
    assert browser.get_cookie("audit_token") is None


def test_the_page_runs_no_script_and_cannot_be_framed(service, issuer):
    reply = request(
        service.url, "/ui", method="GET",
        headers={"Authorization": f"Bearer {issuer.mint('x', ('audit.read',))}"},
    )  # fmt: skip
    assert reply.status == 200
    policy = reply.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert b"<script" not in reply.body
    assert request(service.url, "/ui", method="GET").status == 401


def test_signing_in_checks_the_token_and_its_role(service, issuer):
    from urllib.parse import urlencode

    form = {"Content-Type": "application/x-www-form-urlencoded"}
    no_role = urlencode({"token": issuer.mint("nobody", ("offline_access",))})
    reply = request(service.url, "/ui/token", no_role, form)
    assert reply.status == 403 and b"does not grant the role audit.read" in reply.body
    assert "set-cookie" not in reply.headers
    good = urlencode({"token": issuer.mint("reader", ("audit.read",))})
    reply = request(service.url, "/ui/token", good, form)
    assert reply.status == 303 and reply.headers["location"] == "/ui"
    cookie = reply.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert "Path=/ui" in cookie
    # The JSON API never takes the page's cookie: a page elsewhere cannot borrow it.
    token = cookie.split(";", 1)[0]
    api = request(service.url, "/v1/audit/events?" + urlencode(full_range()), method="GET",
                  headers={"Cookie": token})  # fmt: skip
    assert api.status == 401
