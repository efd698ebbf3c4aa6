"""The two-column page in a real browser: headless Chromium types Chinese and reads the English.

Debian's `chromium` + `chromium-driver` packages, driven by selenium. Where they are missing the
test skips with the reason, except under LABKIT_REQUIRE_BROWSER=1 (CI), where it must run.
The oracle is the served model's own Translator.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

from labkit.config import Preset
from labkit.core.bundle import load_bundle
from labkit.core.translator import translator_for
from labkit.measure import timing
from labkit.serve.process import ServerProcess


def browser_missing() -> str | None:
    """Why no browser test can run here (None when it can): Chromium, its driver, selenium."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[test]')"
    if shutil.which("chromedriver") is None:
        return "chromedriver not found (apt-get install -y chromium chromium-driver)"
    return timing.unavailable("browser")


pytestmark = [
    pytest.mark.browser, pytest.mark.slow,
    pytest.mark.skipif(browser_missing() is not None and os.environ.get("LABKIT_REQUIRE_BROWSER") != "1",
                       reason=f"browser: {browser_missing()}"),
]
SENTENCES = ["我喜欢猫。", "他们有你的兔子。"]
WAIT_S = 60  # the debounce, a model call on a busy machine, the page's redraw


@pytest.fixture(scope="module")
def server(tiny_bundle_dir):
    with ServerProcess.start(["--preset", "ci", "--bundle-dir", str(tiny_bundle_dir), "--threads", "1"],
                             threads=1) as s:
        yield s


@pytest.fixture(scope="module")
def expected(tiny_bundle_dir) -> list[str]:
    return translator_for(load_bundle(tiny_bundle_dir), Preset.from_name("ci")).run(SENTENCES).texts


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                              options=options)
    try:
        yield driver
    finally:
        driver.quit()


def english_becomes(driver, text: str) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    target = driver.find_element(By.ID, "target")
    WebDriverWait(driver, WAIT_S).until(lambda d: target.get_attribute("value") == text)
    return driver.find_element(By.ID, "status").text


def test_typing_chinese_shows_the_english_beside_it(server, browser, expected):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    assert "中文" in browser.find_element(By.TAG_NAME, "h1").text
    source = browser.find_element(By.ID, "source")
    source.send_keys(SENTENCES[0])  # translate-as-you-type, debounced
    status = english_becomes(browser, expected[0])
    assert " ms" in status, status
    source.send_keys("\n" + SENTENCES[1])  # a second line: one translation per line
    english_becomes(browser, "\n".join(expected))


def test_the_button_translates_with_live_typing_off(server, browser, expected):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    browser.find_element(By.ID, "live").click()  # off
    source = browser.find_element(By.ID, "source")
    source.send_keys(SENTENCES[1] + "\n   ")  # and an empty line: its note shows under the columns
    browser.find_element(By.ID, "translate").click()
    english_becomes(browser, expected[1] + "\n")
    assert "empty input" in browser.find_element(By.ID, "notes").text
