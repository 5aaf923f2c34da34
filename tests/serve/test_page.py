"""The page at GET /, driven in a real headless chromium: type a text, classify it, read what it shows.

Needs Debian's `chromium` and `chromium-driver` and the selenium package. Without them the tests skip,
unless NLPRNN_BROWSER_TESTS=1 (as CI sets it), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from nlprnn.deploy import Predictor

from deploy.tiny_bundles import LABELS, build_bundle
from serve.server_process import Server

BROWSER_REQUIRED = os.environ.get("NLPRNN_BROWSER_TESTS") == "1"
TEXT = "good movie, but the plot was awful and the acting dull"


def missing_browser() -> str | None:
    """Why the browser cannot be driven here, or None when it can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return 'selenium is not installed (pip install -e ".[dev]")'
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        return "chromium or chromedriver is missing (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    reason = missing_browser()
    if reason is not None:
        if BROWSER_REQUIRED:
            pytest.fail(f"NLPRNN_BROWSER_TESTS=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start.
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,800"):
        options.add_argument(flag)
    # An explicit driver path keeps Selenium Manager from looking for a driver online.
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("page") / "bundle")


@pytest.fixture(scope="module")
def server(bundle: Path) -> Iterator[Server]:
    server = Server(bundle, "--max_chars", "200")
    yield server
    assert server.stop() == 0


def submit(browser, server: Server, text: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"http://127.0.0.1:{server.port}/")
    box = browser.find_element(By.ID, "text")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "classify").click()


def wait_for(browser, condition) -> object:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, 10).until(lambda driver: condition(driver))


def rgba(css: str) -> tuple[float, float, float, float]:
    """A computed CSS colour, rgb(...) or rgba(...), as (red, green, blue, alpha)."""
    values = [float(v) for v in re.findall(r"[\d.]+", css)]
    return (*values[:3], values[3] if len(values) > 3 else 1.0)


def test_the_page_shows_the_predictors_label_probabilities_and_shaded_words(browser, server, bundle):
    from selenium.webdriver.common.by import By

    submit(browser, server, TEXT)
    label = wait_for(browser, lambda d: d.find_element(By.ID, "label").text)
    [(expected_label, probabilities)] = Predictor(bundle, threads=1).predict([TEXT])
    [explanation] = Predictor(bundle, threads=1).explain([TEXT])
    assert label == expected_label

    bars = browser.find_elements(By.CSS_SELECTOR, "#probabilities .row")
    assert [row.get_attribute("data-label") for row in bars] == LABELS
    shown = [float(bar.get_attribute("data-probability")) for bar in browser.find_elements(By.CSS_SELECTOR, ".bar")]
    assert shown == pytest.approx([probabilities[label] for label in LABELS], abs=1e-6)

    words = browser.find_elements(By.CSS_SELECTOR, "#words .word")
    assert [word.text for word in words] == [w.word for w in explanation.words]
    assert browser.find_element(By.ID, "words").get_attribute("textContent") == TEXT  # spacing and commas kept
    contributions = [float(word.get_attribute("data-contribution")) for word in words]
    assert contributions == pytest.approx([w.contribution for w in explanation.words], abs=1e-6)
    for word, contribution in zip(words, contributions):
        red, green, _, alpha = rgba(word.value_of_css_property("background-color"))
        if contribution > 0:
            assert green > red and alpha > 0, (word.text, contribution)  # green: for the label
        elif contribution < 0:
            assert red > green and alpha > 0, (word.text, contribution)  # red: against it
        else:
            assert alpha == 0, (word.text, contribution)


def test_the_page_shows_the_servers_error_for_a_refused_text(browser, server):
    from selenium.webdriver.common.by import By

    submit(browser, server, "x" * 201)
    error = wait_for(browser, lambda d: d.find_element(By.ID, "error").text)
    assert "texts[0] has 201 characters; at most 200" in error
    assert not browser.find_element(By.ID, "result").is_displayed()
