"""The chat page at `/`, in a real headless browser (Debian's Chromium through selenium): it asks for the API
key, shows the model, holds a three-turn conversation streamed from /v1/chat/completions, stops a long answer
and goes on, and shows an error bubble (not a blank) when the server answers 4xx."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from openai_server_helpers import API_KEY

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("chromedriver") is None,
                       reason="chromium-driver is not installed (`make test-tools` installs it)"),
]

WAIT_S = 120


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1100,800"):
        options.add_argument(flag)
    if shutil.which("chromium"):
        options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda _: condition())


def _field(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(value)


def _bubbles(driver, kind: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [b.text for b in driver.find_elements(By.CSS_SELECTOR, f".bubble.{kind}")]


def _send(driver, text: str) -> None:
    from selenium.webdriver.common.by import By

    _field(driver, "input", text)
    driver.find_element(By.ID, "send").click()


def _idle(driver) -> bool:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "send").is_enabled()


def test_the_page_is_served_without_the_key_and_can_be_turned_off(openai_server):
    page = httpx.get(f"{openai_server.url}/", timeout=30)
    assert page.status_code == 200 and "<title>Pagoda chat</title>" in page.text
    assert "http://" not in page.text.replace("http://127.0.0.1", "") and "https://" not in page.text  # no CDN
    assert httpx.get(f"{openai_server.url}/v1/models", timeout=30).status_code == 401


def test_a_conversation_a_stop_and_an_error_in_a_browser(openai_server, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{openai_server.url}/")
    model_name = browser.find_element(By.ID, "model-name")
    _wait(browser, lambda: "API key" in model_name.text)
    _field(browser, "api-key", API_KEY)
    browser.find_element(By.ID, "system").click()  # leaving the key field commits it
    _wait(browser, lambda: model_name.text == "smollm2-135m")
    _field(browser, "temperature", "0")
    _field(browser, "max-tokens", "16")

    for turn, text in enumerate(["What is the capital of France?", "And of Italy?", "Thanks!"], 1):
        _send(browser, text)
        _wait(browser, lambda turn=turn: len(_bubbles(browser, "assistant")) == turn and _idle(browser))
        assert _bubbles(browser, "assistant")[-1].strip(), f"turn {turn} got an empty answer"
    assert _bubbles(browser, "user") == ["What is the capital of France?", "And of Italy?", "Thanks!"]
    assert "tok/s" in browser.find_element(By.ID, "status").text

    _field(browser, "max-tokens", "1500")
    _send(browser, "Write a very long story about a lighthouse keeper.")
    _wait(browser, lambda: len(_bubbles(browser, "assistant")[-1].split()) >= 5)
    browser.find_element(By.ID, "stop").click()
    _wait(browser, lambda: _idle(browser), timeout=15)
    assert "(stopped)" in browser.find_element(By.ID, "status").text
    stopped = _bubbles(browser, "assistant")[-1]
    assert stopped.strip()
    _field(browser, "max-tokens", "8")
    _send(browser, "Now say hello.")
    _wait(browser, lambda: len(_bubbles(browser, "assistant")) == 5 and _idle(browser))
    assert _bubbles(browser, "assistant")[-1].strip() and _bubbles(browser, "assistant")[-2] == stopped

    _field(browser, "max-tokens", "999999")
    _send(browser, "This asks for more tokens than the context holds.")
    _wait(browser, lambda: _bubbles(browser, "error") and _idle(browser))
    error = _bubbles(browser, "error")[-1]
    assert error.startswith("Error 400") and "max_tokens" in error
    screenshot = os.environ.get("PAGODA_CHAT_SCREENSHOT")
    if screenshot:
        browser.save_screenshot(str(Path(screenshot)))
