"""The example app end to end in a real browser: headless Chromium driven by Selenium against the app
served by a real WSGI server, with real CSRF and the simulated (offline) Stripe Checkout.

Needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``, ``/usr/bin/chromedriver``);
without them the tests skip, or fail when ``CREDITS_TEST_REQUIRE_BROWSER=1`` (as in CI). Nothing is
downloaded: both paths are given to Selenium, so Selenium Manager never runs.

Screenshots go to ``CREDITS_SCREENSHOTS_DIR`` (a temporary directory when unset); the ones in
``docs/screenshots/`` were made with ``CREDITS_SCREENSHOTS_DIR=docs/screenshots``.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import flask_migrate
import pytest
import requests
from _browser_server import live_server  # tests/ is on sys.path (pytest's rootdir-relative import)
from helpers import PASSWORD

from example_app import create_app
from example_app.extensions import credits
from example_app.models import db
from example_app.stories import story_chunks, write_story

try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # pragma: no cover - reported by the `browser` fixture
    webdriver = None

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REQUIRE_BROWSER = os.environ.get("CREDITS_TEST_REQUIRE_BROWSER") == "1"
TIMEOUT = 15  # seconds, for any one page to load or element to appear
WIDTH, HEIGHT = 1200, 900  # the viewport, and so the screenshots
COST = 5  # the example app's PERSONA_COST

pytestmark = pytest.mark.timeout(120)


def browser_unavailable(reason: str) -> None:
    if REQUIRE_BROWSER:
        pytest.fail(f"{reason} (CREDITS_TEST_REQUIRE_BROWSER=1 turns this skip into a failure)")
    pytest.skip(reason)


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    """The example app on SQLite, with real CSRF and the simulated Stripe, served on 127.0.0.1."""
    database = tmp_path_factory.mktemp("browser-db") / "example.sqlite3"
    app = create_app(
        {
            "TESTING": True,  # the simulated Stripe is refused outside debug and testing
            "WTF_CSRF_ENABLED": True,
            "SECRET_KEY": "browser-test-secret",
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{database}",
            "SQLALCHEMY_ENGINE_OPTIONS": {"connect_args": {"timeout": 30}},
            "CREDITS_STRIPE_MODE": "simulated",
            # A pause between a story's chunks, so that the page visibly fills in as they arrive.
            "STORY_CHUNK_DELAY": 0.05,
            "ADMIN_USERNAMES": "chief",
            # Every test signs up from 127.0.0.1 within a minute or so: more than the default 10 per minute.
            "LOGIN_LIMIT_PER_IP": "100 per minute",
        }
    )
    with app.app_context():
        flask_migrate.upgrade()
    with live_server(app) as url:
        yield url
    with app.app_context():
        db.engine.dispose()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium from Debian, one per module; each test clears its cookies."""
    if webdriver is None:
        browser_unavailable("selenium is not installed: pip install -e '.[test]'")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            browser_unavailable(
                f"{path} not found (Debian package {package}): apt-get install chromium chromium-driver"
            )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-quic",
        "--no-proxy-server",
        f"--window-size={WIDTH},{HEIGHT}",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(argument)
    # The console, where Chromium reports what a Content-Security-Policy refused.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path means Selenium Manager is never asked to find (or download) anything.
    service = Service(executable_path=CHROMEDRIVER)
    try:
        driver = webdriver.Chrome(service=service, options=options)
    except WebDriverException as exc:
        browser_unavailable(f"Chromium did not start: {exc.msg}")
    try:
        # The exact viewport, whatever room the headless window keeps for its (invisible) toolbars.
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )
        driver.set_page_load_timeout(TIMEOUT)
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser, base_url):
    browser.delete_all_cookies()
    return Page(browser, base_url)


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    configured = os.environ.get("CREDITS_SCREENSHOTS_DIR")
    if not configured:
        return tmp_path_factory.mktemp("screenshots")
    directory = Path(configured)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


# -- driving the pages ------------------------------------------------------------------------------


class Page:
    """The browser on the app: navigate, fill, submit, read, each step waiting for the page it loads."""

    def __init__(self, driver: WebDriver, base_url: str) -> None:
        self.driver = driver
        self.base_url = base_url

    def wait(self) -> WebDriverWait:
        return WebDriverWait(self.driver, TIMEOUT, poll_frequency=0.05)

    def open(self, path: str) -> None:
        self.driver.get(self.base_url + path)
        self.loaded()

    def loaded(self) -> None:
        self.wait().until(lambda d: d.execute_script("return document.readyState") == "complete")

    # Pages are server-rendered and fully loaded before anything is looked up (see `follow`), so
    # presence is enough; a hidden or disabled element would make click() or send_keys() fail.

    def find(self, css: str) -> WebElement:
        return self.wait().until(EC.presence_of_element_located((By.CSS_SELECTOR, css)))

    def button(self, label: str) -> WebElement:
        """The button in the main content whose text is ``label``."""
        xpath = f"//main//button[normalize-space()='{label}']"
        return self.wait().until(EC.presence_of_element_located((By.XPATH, xpath)))

    def link(self, label: str) -> WebElement:
        """The link in the main content (not the navigation) whose text is ``label``."""
        xpath = f"//main//a[normalize-space()='{label}']"
        return self.wait().until(EC.presence_of_element_located((By.XPATH, xpath)))

    def nav(self, label: str) -> None:
        xpath = f"//header//a[normalize-space()='{label}']"
        self.follow(self.wait().until(EC.presence_of_element_located((By.XPATH, xpath))), label)

    def follow_link(self, label: str) -> None:
        self.follow(self.link(label), label)

    def fill(self, css: str, value: str) -> None:
        field = self.find(css)
        field.clear()
        field.send_keys(value)

    def follow(self, element: WebElement, label: str) -> None:
        """Click a button or link and wait until the next page has replaced this one and loaded.

        The page about to go is marked with a property on its window; the next page's window has none.
        (Selenium's staleness_of is racy here: chromedriver may answer a check on an element of a
        document being replaced with a plain WebDriverException.)"""
        self.driver.execute_script("window.__leaving = true")
        element.click()
        WebDriverWait(
            self.driver, TIMEOUT, poll_frequency=0.05, ignored_exceptions=(WebDriverException,)
        ).until(
            lambda d: d.execute_script("return !window.__leaving && document.readyState === 'complete'"),
            message=f"no new page within {TIMEOUT} s of clicking {label!r} on {self.path}",
        )

    def press(self, label: str) -> None:
        self.follow(self.button(label), label)

    def testid(self, name: str) -> str:
        return self.find(f'[data-testid="{name}"]').text.strip()

    def balance(self) -> int:
        return int(self.testid("balance"))

    @property
    def title(self) -> str:
        return self.driver.title

    @property
    def heading(self) -> str:
        return self.find("main h1").text.strip()

    @property
    def text(self) -> str:
        return self.find("main").text

    @property
    def path(self) -> str:
        return self.driver.current_url.removeprefix(self.base_url)

    @property
    def status(self) -> int:
        """The HTTP status of the response this page came from (after redirects)."""
        return int(
            self.driver.execute_script("return performance.getEntriesByType('navigation')[0].responseStatus")
        )

    def flashes(self) -> list[str]:
        return [e.text for e in self.driver.find_elements(By.CSS_SELECTOR, ".messages .flash")]

    def summary(self) -> dict[str, Any]:
        """Status, heading, balance and flash messages of this page in one round trip."""
        return self.driver.execute_script(
            """const text = (css) => document.querySelector(css)?.textContent.trim() ?? null;
            return {
              status: performance.getEntriesByType("navigation")[0].responseStatus,
              heading: text("main h1"),
              balance: text('[data-testid="balance"]'),
              flashes: [...document.querySelectorAll(".messages .flash")].map((e) => e.textContent.trim()),
            };"""
        )

    def screenshot(self, directory: Path, name: str) -> Path:
        self.wait().until(lambda d: d.execute_script("return document.fonts.status") == "loaded")
        self.driver.execute_script("window.scrollTo(0, 0); document.activeElement?.blur()")
        path = directory / f"{name}.png"
        assert self.driver.save_screenshot(str(path)), f"no screenshot written to {path}"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return path

    # -- the app's own steps --

    def sign_up(self, username: str) -> None:
        self.open("/signup")
        self.fill("#username", username)
        self.fill("#password", PASSWORD)
        self.fill("#confirm", PASSWORD)
        self.press("Create my account")
        assert self.path == "/", self.text
        assert f"Welcome, {username}!" in " ".join(self.flashes())

    def start_checkout(self, quantity: int = 1, key_label: str | None = None) -> str:
        """On the credits page, buy ``quantity`` units (for the API key ``key_label``); returns the
        simulated checkout's session id."""
        assert self.heading == "Your credits"
        self.fill("#credits-quantity", str(quantity))
        if key_label is not None:
            Select(self.find("#credits-quantity-for")).select_by_visible_text(f"API key {key_label}")
        self.press("Purchase credits")
        match = re.fullmatch(r"/credits/simulated-checkout/(cs_sim_\w+)", self.path)
        assert match, self.path
        assert self.heading == "Simulated Stripe Checkout"
        return match.group(1)

    def generate_persona(self, seed: str | None = None) -> None:
        if seed is not None:
            self.fill("#seed", seed)
        self.press(f"Generate ({COST} credits)")


def api_persona(base_url: str, secret: str | None, seed: str = "lighthouse") -> requests.Response:
    headers = {"X-API-Key": secret} if secret is not None else {}
    return requests.post(f"{base_url}/api/personas", json={"seed": seed}, headers=headers, timeout=TIMEOUT)


def assert_insufficient(page: Page, balance: int) -> None:
    assert page.status == 402
    assert page.title.startswith("Not enough credits")
    assert page.heading == "Not enough credits"
    assert f"This needs {COST} credits; you have {balance}." in page.text


# -- the tests --------------------------------------------------------------------------------------


def test_buy_credits_spend_them_and_fund_an_api_key(page, base_url, screenshots):
    # A new account starts with nothing.
    page.sign_up("ada")
    assert page.balance() == 0
    page.nav("Buy credits")
    assert page.path == "/credits/"
    assert page.balance() == 0
    assert "No credits yet." in page.text

    # Too poor to generate a persona: 402, with a link to buy credits.
    page.nav("Generate a persona")
    page.generate_persona("lighthouse")
    assert_insufficient(page, 0)
    page.screenshot(screenshots, "insufficient-credits")
    page.follow_link("Buy credits")
    assert page.path == "/credits/"

    # Buy 1 unit (100 credits) through the simulated Stripe Checkout.
    page.start_checkout(quantity=1)
    assert "100 credits for 1.00 USD" in page.text
    page.screenshot(screenshots, "simulated-checkout")
    page.press("Pay")
    assert page.path.startswith("/credits/success?session_id=cs_sim_")
    assert page.heading == "Thank you!"
    assert page.testid("purchase-status") == "100 credits were added. Your balance is now 100."
    assert page.balance() == 100
    page.screenshot(screenshots, "purchase-success")

    # Spend them, 5 at a time, until the balance is too low; the app warns once, as it falls below 10.
    page.open("/personas")
    page.fill("#seed", "lighthouse")  # the result page keeps the seed in the form for the next one
    for expected in range(100 - COST, -1, -COST):
        page.generate_persona()
        shown = page.summary()
        assert shown["status"] == 200, shown
        assert shown["heading"] not in ("Not enough credits", "Generate a persona"), shown  # a persona
        assert shown["balance"] == str(expected), shown
        warning = f"You have {expected} credits left. Buy more before you run out."
        assert (warning in shown["flashes"]) == (expected == 10 - COST), shown
    page.generate_persona()
    assert_insufficient(page, 0)

    page.nav("Buy credits")
    assert page.balance() == 0
    history = page.find("main table tbody").text
    assert history.count("Spend: generate persona") == 20  # a page of history: the 20 newest entries
    # The usage chart: today's bar is the 100 credits spent, in an image with a title and a description,
    # and the endpoint that spent them is in the table below it.
    chart = page.find('main svg[data-testid="usage-chart"]')
    assert chart.get_attribute("role") == "img"
    bars = chart.find_elements(By.CSS_SELECTOR, "rect")
    assert len(bars) == 30
    assert bars[-1].get_attribute("data-credits") == "100"
    assert bars[-1].size["height"] > 0
    assert [b.get_attribute("data-credits") for b in bars[:-1]] == ["0"] * 29
    assert "100 credits spent from" in chart.find_element(By.CSS_SELECTOR, "desc").get_attribute(
        "textContent"
    )
    assert page.testid("usage-endpoints").splitlines()[-1] == "main.create_persona 100"
    page.find(".credits-usage").screenshot(str(screenshots / "usage.png"))
    page.follow_link("Older entries")
    older = page.find("main table tbody").text.splitlines()
    assert len(older) == 1
    assert "Purchase: bought 100 credits" in older[0]
    assert older[0].endswith("+100 100")
    # And back: "Newer entries" is the 20 spends again, each naming the request that paid.
    page.follow_link("Newer entries")
    newer = page.find("main table tbody").text.splitlines()
    assert len(newer) == 20
    assert all('Spend: generate persona "lighthouse" POST main.create_persona' in row for row in newer), (
        newer[0]
    )
    page.follow_link("Older entries")
    page.follow_link("Newest entries")
    assert page.find("main table tbody").text.splitlines() == newer

    # An API key: the secret is shown once.
    page.nav("API keys")
    page.fill("#name", "laptop")
    page.press("Create key")
    assert page.heading == "Your new key “laptop”"
    secret = page.testid("secret")
    key_id = page.testid("key-id")
    assert secret.startswith("sk_"), secret

    # The new key has no credits of its own (the user's are not used for it): the API answers 402.
    refused = api_persona(base_url, secret)
    assert refused.status_code == 402
    assert refused.json()["error"] == "insufficient_credits"
    assert api_persona(base_url, None).status_code == 401
    assert api_persona(base_url, secret + "x").status_code == 401

    # Buy 2 units for the key: the "For" select on the credits page chooses its wallet.
    page.follow_link("Buy credits for it")
    assert page.testid(f"key-balance-{key_id}") == "0"
    page.start_checkout(quantity=2, key_label="laptop")
    assert "200 credits for 2.00 USD (for API key laptop)." in page.text
    page.press("Pay")
    assert page.heading == "Thank you!"
    assert page.testid("purchase-status") == (
        "200 credits were added to API key laptop. Its balance is now 200."
    )

    page.nav("Buy credits")
    assert page.balance() == 0  # the user's own balance did not move
    assert page.testid(f"key-balance-{key_id}") == "200"

    # Spend from the key over the JSON API, against the same live server.
    for expected in (195, 190, 185):
        answer = api_persona(base_url, secret, seed=f"api-{expected}")
        assert answer.status_code == 200, answer.text
        assert answer.json()["cost"] == COST
        assert answer.json()["balance"] == expected
        assert answer.json()["persona"]["seed"] == f"api-{expected}"

    page.open("/credits/")
    assert page.testid(f"key-balance-{key_id}") == "185"
    assert page.balance() == 0
    page.screenshot(screenshots, "credits")

    page.nav("API keys")
    assert page.heading == "API keys"
    row = page.find("main table tbody tr").text
    assert "laptop" in row
    assert key_id in row
    assert "185" in row
    page.screenshot(screenshots, "api-keys")

    # Every page ran under the example app's Content-Security-Policy, and nothing on them was refused.
    console = [entry["message"] for entry in page.driver.get_log("browser")]
    assert not [message for message in console if "Content Security Policy" in message], console


def test_a_story_streams_into_the_page_and_costs_one_credit_per_chunk(page, screenshots):
    seed = "lighthouse"
    chunks = len(list(story_chunks(seed, 10)))  # one credit per 10 words, the default
    page.sign_up("hedy")

    # No credits: the hold cannot be placed, the API answers 402 and the page links to the credits page.
    page.nav("Write a story")
    assert page.heading == "Write a story"
    page.fill("#seed", seed)
    page.button("Write a story").click()
    page.wait().until(lambda d: "Not enough credits" in page.find("#story-status").text)
    assert page.find("#story-status").text.startswith(
        "Not enough credits: a story needs 10 to start; you have 0."
    )
    page.follow(page.find("#story-status a"), "Buy credits")
    assert page.path == "/credits/"

    page.start_checkout(quantity=1)
    page.press("Pay")
    assert page.balance() == 100

    page.nav("Write a story")
    page.fill("#seed", seed)
    # Every length the story's text goes through, recorded by the page itself as it changes.
    page.driver.execute_script(
        """const text = document.querySelector('[data-testid="story-text"]');
        window.__lengths = [];
        new MutationObserver(() => window.__lengths.push(text.textContent.length))
          .observe(text, { childList: true, characterData: true, subtree: true });"""
    )
    page.button("Write a story").click()
    page.wait().until(lambda d: page.find("#story-status").text == "Done.")
    story = page.driver.execute_script(
        "return document.querySelector('[data-testid=\"story-text\"]').textContent"
    )
    assert story == write_story(seed)
    lengths = page.driver.execute_script("return window.__lengths")
    partial = {length for length in lengths if 0 < length < len(story)}
    assert len(partial) >= 2, lengths  # it arrived in pieces, shown as they came
    assert page.testid("story-cost") == f"This story cost {chunks} credits. You have {100 - chunks} left."
    assert page.testid("credits-balance") == str(100 - chunks)  # the badge in the navigation, updated
    page.screenshot(screenshots, "story")

    page.nav("Buy credits")
    assert page.balance() == 100 - chunks
    assert "Spend: write story (API)" in page.find("main table tbody").text

    console = [entry["message"] for entry in page.driver.get_log("browser")]
    assert not [message for message in console if "Content Security Policy" in message], console


def test_pay_later_settles_and_fail_and_cancel_add_nothing(page):
    page.sign_up("grace")

    # Pay later: pending, nothing added until the delayed payment succeeds.
    page.nav("Buy credits")
    session_id = page.start_checkout(quantity=3)
    page.press("Pay later (delayed method)")
    assert page.heading == "Payment pending"
    assert page.testid("purchase-status") == (
        "Your payment is being processed. 300 credits will be added as soon as it clears."
    )
    page.follow_link("Back to your credits")
    assert page.balance() == 0

    page.open(f"/credits/simulated-checkout/{session_id}")
    assert "The delayed payment is pending." in page.text
    page.press("Delayed payment succeeds")
    assert page.heading == "Thank you!"
    assert page.balance() == 300

    # Fail: a failure message, nothing added.
    page.nav("Buy credits")
    failed_session_id = page.start_checkout(quantity=1)
    page.press("Fail")
    assert page.heading == "Payment failed"
    assert "no credits were added and nothing was charged" in page.testid("purchase-status")
    page.follow_link("Back to your credits")
    assert page.balance() == 300

    # Cancel: back from the checkout, nothing charged.
    session_id = page.start_checkout(quantity=1)
    page.press("Cancel")
    assert page.heading == "Purchase cancelled"
    assert page.testid("purchase-status") == "You cancelled the checkout. Nothing was charged."
    page.follow_link("Back to your credits")
    assert page.balance() == 300

    # The cancel page expired the cancelled checkout at (simulated) Stripe; a failed one is over too.
    page.open(f"/credits/simulated-checkout/{session_id}")
    assert "This checkout expired." in page.text
    assert not page.driver.find_elements(By.XPATH, "//main//button")
    page.open(f"/credits/simulated-checkout/{failed_session_id}")
    assert page.status == 200
    assert "This payment failed." in page.text
    assert not page.driver.find_elements(By.XPATH, "//main//button")

    # Another user cannot even see it.
    page.driver.delete_all_cookies()
    page.sign_up("linus")
    page.open(f"/credits/simulated-checkout/{failed_session_id}")
    assert page.status == 404


def test_a_missing_browser_skips_or_fails_when_required(monkeypatch):
    """The skip/fail switch itself (needs no browser)."""
    monkeypatch.setitem(globals(), "REQUIRE_BROWSER", False)
    with pytest.raises(pytest.skip.Exception, match="chromium"):
        browser_unavailable("/usr/bin/chromium not found")
    monkeypatch.setitem(globals(), "REQUIRE_BROWSER", True)
    with pytest.raises(pytest.fail.Exception, match="CREDITS_TEST_REQUIRE_BROWSER=1"):
        browser_unavailable("/usr/bin/chromium not found")


def test_a_plan_grants_its_allowance_and_renewing_replaces_it(page, monkeypatch):
    # The server runs in this process: its clock moves on when the test says (no sleeping a month).
    start = datetime.now(timezone.utc)
    now = [start]
    monkeypatch.setattr(credits, "clock", lambda: now[0])
    page.sign_up("barbara")
    page.nav("Buy credits")
    page.press("Subscribe to Starter")
    assert re.fullmatch(r"/credits/simulated-checkout/cs_sim_\w+", page.path), page.path
    assert "Subscribe to Starter: 500 credits each month" in page.text
    page.press("Pay")
    assert page.path == "/credits/"
    assert page.testid("plan-name") == "Starter"
    assert page.testid("plan-status") == "active"
    assert page.balance() == 500

    # A month later the first allowance has expired; the simulated portal renews the plan.
    now[0] += timedelta(days=30, seconds=1)
    page.open("/credits/")
    assert page.balance() == 0
    page.press("Manage billing")
    assert page.heading == "Simulated Stripe Billing Portal"
    page.press("Renew now")
    page.follow_link("Return to your credits")
    assert page.balance() == 500
    # The new period follows the first one.
    assert page.testid("plan-renewal") == f"Renews on {(start + timedelta(days=60)).strftime('%Y-%m-%d')}."


def turn_on_auto_top_up(page: Page, threshold: int, pack: str, cap: str) -> None:
    """On the credits page, with a card saved: auto top-up of the account on."""
    page.fill("#credits-atu-threshold-1", str(threshold))
    Select(page.find("#credits-atu-pack-1")).select_by_value(pack)
    page.fill("#credits-atu-cap-1", cap)
    enabled = page.find('.credits-auto-top-up-form input[name="enabled"]')
    if not enabled.is_selected():
        enabled.click()
    page.press("Save auto top-up")
    assert page.path == "/credits/"


def spend_below(page: Page, personas: int) -> None:
    page.open("/personas")
    for _ in range(personas):
        page.generate_persona("lighthouse")
        assert page.status == 200


def poll_credits_page(page: Page, until: Any) -> None:
    """Reload the credits page until ``until(page)``: the automatic purchase's Stripe call runs on a
    worker thread after the response. Bounded by TIMEOUT."""

    def reloaded(_: object) -> bool:
        page.open("/credits/")
        return bool(until(page))

    page.wait().until(reloaded, message="the credits page never showed the automatic purchase's outcome")


def test_auto_top_up_refills_the_balance_from_the_saved_card(page, screenshots):
    page.sign_up("katherine")
    page.nav("Buy credits")
    page.start_checkout(quantity=1)
    page.press("Pay")
    assert page.balance() == 100

    # Save the simulated card that pays, through the simulated setup-mode Checkout.
    page.nav("Buy credits")
    assert page.testid("auto-top-up-status") == "Off."
    assert page.testid("auto-top-up-card") == "No card saved yet: save one to turn auto top-up on."
    page.press("Save a card")
    assert page.path == "/credits/simulated-setup", page.path
    assert page.heading == "Simulated Stripe Checkout"
    page.press("Save Visa ending 4242")
    assert page.path == "/credits/"
    assert page.testid("auto-top-up-card") == "Card: Visa ending 4242."

    # On: below 90 credits, buy the Small pack; at most 20.00 USD a month.
    turn_on_auto_top_up(page, threshold=90, pack="small", cap="20")
    assert page.testid("auto-top-up-status") == (
        "On: when the balance falls below 90 credits, buy 500 credits (Small) for 5.00 USD."
    )
    assert page.testid("auto-top-up-cap") == (
        "Monthly cap: 20.00 USD; 0.00 USD spent on automatic purchases this month."
    )

    spend_below(page, 3)  # 95, 90, then 85: below 90
    poll_credits_page(page, lambda p: p.balance() == 85 + 500)
    assert page.testid("auto-top-up-cap") == (
        "Monthly cap: 20.00 USD; 5.00 USD spent on automatic purchases this month."
    )
    assert page.testid("auto-top-up-status").startswith("On:")
    assert "Purchase: auto top-up" in page.find("main table tbody").text
    page.screenshot(screenshots, "auto-top-up")

    console = [entry["message"] for entry in page.driver.get_log("browser")]
    assert not [message for message in console if "Content Security Policy" in message], console


def test_a_declined_automatic_payment_turns_auto_top_up_off_and_says_why(page):
    page.sign_up("dorothy")
    page.nav("Buy credits")
    page.start_checkout(quantity=1)
    page.press("Pay")
    page.nav("Buy credits")
    page.press("Save a card")
    page.press("Save Visa ending 4242")
    turn_on_auto_top_up(page, threshold=90, pack="small", cap="20")

    # The simulated Stripe's switch: the card saved now is one the bank declines.
    page.press("Next payment is declined")
    assert page.path == "/credits/"
    assert page.testid("auto-top-up-card") == "Card: Visa ending 0002."
    assert page.testid("auto-top-up-status").startswith("On:")

    spend_below(page, 3)
    poll_credits_page(page, lambda p: p.testid("auto-top-up-status") == "Off.")
    assert page.balance() == 85  # nothing bought
    failure = page.testid("auto-top-up-failure")
    assert failure.startswith(
        "Auto top-up was turned off because the last automatic payment failed: Your card was declined."
    ), failure
    assert "buy credits by hand above" in failure
    assert page.find('[data-testid="auto-top-up-failure"]').get_attribute("role") == "alert"
    assert page.testid("auto-top-up-cap") == (
        "Monthly cap: 20.00 USD; 0.00 USD spent on automatic purchases this month."
    )


def test_an_admin_grants_credits_from_the_admin_wallet_page(page, screenshots):
    page.sign_up("chief")
    user_id = page.driver.execute_script(
        """const request = new XMLHttpRequest();
        request.open("GET", "/credits/balance", false);
        request.setRequestHeader("Accept", "application/json");
        request.send();
        return String(JSON.parse(request.responseText).user_id);"""
    )
    page.nav("Admin")
    assert page.heading == "Credits admin"
    page.fill("#credits-admin-q", user_id)
    page.press("Find")
    page.follow_link(f"Open the wallet of user {user_id} anyway")
    assert page.heading == f"Wallet of user {user_id}"
    page.fill("#credits-admin-grant-amount", "25")
    page.fill("#credits-admin-grant-reason", "welcome gift")
    page.press("Grant")
    assert page.status == 200
    assert page.balance() == 25
    assert page.testid("actor") == "chief"
    assert "Grant: welcome gift" in page.text
    page.screenshot(screenshots, "admin-wallet")


# -- issue 17: pending purchases, cancel, a new key's wallet, error pages, the 402's packs, narrow keys --


def test_issue_17_pending_purchases_error_pages_the_402s_packs_and_a_narrow_keys_page(page, screenshots):
    from example_app.personas import generate_persona

    driver = page.driver

    def pending_states() -> list[str]:
        return [e.text for e in driver.find_elements(By.CSS_SELECTOR, '[data-testid="pending-state"]')]

    page.sign_up("margaret")

    # 3: a checkout left unpaid is listed on the credits page; Resume goes back to the same checkout.
    page.nav("Buy credits")
    session_id = page.start_checkout(quantity=2)
    page.nav("Buy credits")
    assert [state.startswith("Not paid yet:") for state in pending_states()] == [True]
    page.follow(page.find('[data-testid="pending-resume"]'), "Resume")
    assert page.path == f"/credits/simulated-checkout/{session_id}"
    # Paid later: listed as waiting for the payment until it goes through, then gone.
    page.press("Pay later (delayed method)")
    assert page.heading == "Payment pending"
    page.follow_link("Back to your credits")
    assert pending_states() == ["Waiting for the payment: the credits are added once it goes through."]
    page.open(f"/credits/simulated-checkout/{session_id}")
    page.press("Delayed payment succeeds")
    page.nav("Buy credits")
    assert page.balance() == 200
    assert pending_states() == []

    # 4: Cancel from the list expires that checkout: it can no longer be paid.
    cancelled = page.start_checkout(quantity=1)
    page.nav("Buy credits")
    page.press("Cancel")
    assert page.heading == "Purchase cancelled"
    page.open(f"/credits/simulated-checkout/{cancelled}")
    assert "This checkout expired." in page.text
    assert not driver.find_elements(By.XPATH, "//main//button")
    page.nav("Buy credits")
    assert pending_states() == []
    assert page.balance() == 200

    # 5: "Buy credits for it" after creating a key selects that key in every "For".
    page.nav("API keys")
    page.fill("#name", "build server of the night shift")
    page.press("Create key")
    key_id = page.testid("key-id")
    page.follow_link("Buy credits for it")
    for select in ("#credits-pack-for", "#credits-quantity-for"):
        chosen = Select(page.find(select)).first_selected_option
        assert (chosen.get_attribute("value"), chosen.text) == (
            key_id,
            "API key build server of the night shift",
        )

    # 8: an unknown URL and a bad session_id: pages in the app's layout, with the right status.
    page.open("/no-such-page")
    assert (page.status, page.testid("error-title")) == (404, "Page not found")
    assert driver.find_elements(By.CSS_SELECTOR, "header nav .brand")
    page.open("/credits/success?session_id=cs_sim_not_one_of_yours")
    assert (page.status, page.testid("error-title")) == (404, "Page not found")
    page.open("/credits/success")
    assert page.status == 400
    assert page.testid("error-title") == "That request could not be understood"

    # 10: the 402 says what is missing and offers the packs that cover it, for the wallet that was
    # short; the checkout opens in a new tab, and "Try again" sends the same seed once it is paid.
    driver.delete_all_cookies()
    page.sign_up("joan")
    page.nav("Generate a persona")
    page.generate_persona("harbour")
    assert_insufficient(page, 0)
    assert page.testid("missing") == f"You are {COST} credits short."
    assert page.find('[data-testid="cover-pack-small"]').text == "Buy Small: 500 credits for 5.00 USD"
    assert page.find('[data-testid="cover-pack-large"]').text == "Buy Large: 2000 credits for 18.00 USD"
    original = driver.current_window_handle
    before = set(driver.window_handles)
    page.find('[data-testid="cover-pack-small"] button').click()
    page.wait().until(lambda d: len(d.window_handles) > len(before))
    driver.switch_to.window((set(driver.window_handles) - before).pop())
    page.wait().until(lambda d: "/credits/simulated-checkout/" in d.current_url)
    page.loaded()
    assert page.heading == "Simulated Stripe Checkout"
    assert "500 credits for 5.00 USD" in page.text
    page.press("Pay")
    assert page.testid("purchase-status") == "500 credits were added. Your balance is now 500."
    driver.close()
    driver.switch_to.window(original)
    assert page.heading == "Not enough credits"  # still here, with what was sent
    page.press("Try again")
    assert page.status == 200
    assert page.heading == generate_persona("harbour").name
    assert page.testid("balance") == str(500 - COST)
    page.nav("Buy credits")
    assert 'Spend: generate persona "harbour"' in page.find("main table tbody").text  # 9: the seed

    # 10: at 500 px the keys table fits: every key's Revoke is on screen, nothing scrolls sideways.
    page.nav("API keys")
    page.fill("#name", "a key with a rather long name for a phone")
    page.press("Create key")
    page.nav("API keys")
    try:
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 500, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )
        page.open("/keys/")
        fits = driver.execute_script(
            """const root = document.documentElement;
            const revoke = [...document.querySelectorAll("main button")]
              .filter((b) => b.textContent.trim() === "Revoke");
            return {
              scroll: root.scrollWidth, client: root.clientWidth, width: window.innerWidth,
              revoke: revoke.map((b) => b.getBoundingClientRect().right),
            };"""
        )
        assert fits["scroll"] <= fits["client"], fits
        assert fits["revoke"], fits
        assert all(right <= fits["width"] for right in fits["revoke"]), fits
        page.screenshot(screenshots, "api-keys-narrow")
    finally:
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )

    console = [entry["message"] for entry in driver.get_log("browser")]
    assert not [message for message in console if "Content Security Policy" in message], console


def test_credits_move_between_account_and_key_and_revoking_the_key_moves_its_credits_back(page, screenshots):
    page.sign_up("moira")
    page.nav("Buy credits")
    page.start_checkout(quantity=3)
    page.press("Pay")
    page.nav("API keys")
    page.fill("#name", "laptop")
    page.press("Create key")
    key_id = page.testid("key-id")

    # "Move credits" on the credits page: from the account to the key.
    page.nav("Buy credits")
    assert page.balance() == 300
    Select(page.find("#credits-move-from")).select_by_visible_text("my account (300 credits)")
    Select(page.find("#credits-move-to")).select_by_visible_text("API key laptop")
    page.fill("#credits-move-amount", "120")
    page.press("Move credits")
    assert page.path == "/credits/"
    assert "Moved 120 credits from your account to API key laptop." in page.flashes()
    assert page.balance() == 180
    assert page.testid(f"key-balance-{key_id}") == "120"
    assert (
        "Transfer: moved on the credits page to API key laptop"
        in page.find("main table.credits-history").text
    )
    page.find("form.credits-move").screenshot(str(screenshots / "move-credits.png"))

    # Revoking the key asks first (Revoke is not the primary action), then moves its credits back.
    page.nav("API keys")
    revoke = page.button("Revoke")
    assert "danger" in revoke.get_attribute("class")
    page.follow(revoke, "Revoke")
    assert page.heading == "Revoke the key “laptop”?"
    assert page.testid("revoke-credits") == "120"
    assert "Revoke it and move them to your account?" in page.testid("revoke-question")
    page.screenshot(screenshots, "revoke-key")
    page.press("Revoke and move 120 credits")
    assert page.path == "/keys/"
    flashes = " ".join(page.flashes())
    assert "Revoked the key 'laptop'" in flashes
    assert "Moved 120 credits from it to your account." in flashes
    assert "Revoked" in page.text

    page.nav("Buy credits")
    assert page.balance() == 300
    history = page.find("main table.credits-history").text
    assert f"Transfer: the key laptop was revoked from API key {key_id}" in history, history
