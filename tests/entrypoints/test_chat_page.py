"""The chat page at `/`, in a real headless browser (Debian's Chromium through selenium): it asks for the API
key, shows the model, holds a three-turn conversation streamed from /v1/chat/completions, stops a long answer
and goes on, and shows an error bubble (not a blank) when the server answers 4xx."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from browser_helpers import bubbles, field, idle, send, wait
from openai_server_helpers import API_KEY

pytestmark = pytest.mark.slow


def test_the_page_is_served_without_the_key_and_can_be_turned_off(openai_server):
    page = httpx.get(f"{openai_server.url}/", timeout=30)
    assert page.status_code == 200 and "<title>Pagoda chat</title>" in page.text
    assert "http://" not in page.text.replace("http://127.0.0.1", "") and "https://" not in page.text  # no CDN
    assert httpx.get(f"{openai_server.url}/v1/models", timeout=30).status_code == 401


def test_a_conversation_a_stop_and_an_error_in_a_browser(openai_server, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{openai_server.url}/")
    model_name = browser.find_element(By.ID, "model-name")
    wait(browser, lambda: "API key" in model_name.text)
    field(browser, "api-key", API_KEY)
    browser.find_element(By.ID, "system").click()  # leaving the key field commits it
    wait(browser, lambda: model_name.text == "smollm2-135m")
    field(browser, "temperature", "0")
    field(browser, "max-tokens", "16")

    for turn, text in enumerate(["What is the capital of France?", "And of Italy?", "Thanks!"], 1):
        send(browser, text)
        wait(browser, lambda turn=turn: len(bubbles(browser, "assistant")) == turn and idle(browser))
        assert bubbles(browser, "assistant")[-1].strip(), f"turn {turn} got an empty answer"
    assert bubbles(browser, "user") == ["What is the capital of France?", "And of Italy?", "Thanks!"]
    assert "tok/s" in browser.find_element(By.ID, "status").text

    field(browser, "max-tokens", "1500")
    send(browser, "Write a very long story about a lighthouse keeper.")
    wait(browser, lambda: len(bubbles(browser, "assistant")[-1].split()) >= 5)
    browser.find_element(By.ID, "stop").click()
    wait(browser, lambda: idle(browser), timeout=15)
    assert "(stopped)" in browser.find_element(By.ID, "status").text
    stopped = bubbles(browser, "assistant")[-1]
    assert stopped.strip()
    field(browser, "max-tokens", "8")
    send(browser, "Now say hello.")
    wait(browser, lambda: len(bubbles(browser, "assistant")) == 5 and idle(browser))
    assert bubbles(browser, "assistant")[-1].strip() and bubbles(browser, "assistant")[-2] == stopped

    field(browser, "max-tokens", "999999")
    send(browser, "This asks for more tokens than the context holds.")
    wait(browser, lambda: bubbles(browser, "error") and idle(browser))
    error = bubbles(browser, "error")[-1]
    assert error.startswith("Error 400") and "max_tokens" in error
    screenshot = os.environ.get("PAGODA_CHAT_SCREENSHOT")
    if screenshot:
        browser.save_screenshot(str(Path(screenshot)))
