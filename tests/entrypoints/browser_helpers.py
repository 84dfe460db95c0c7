"""Test helpers: the chat page's elements as browser tests read and drive them (the `browser` fixture, headless
Chromium through selenium, is in tests/conftest.py)."""

from __future__ import annotations

WAIT_S = 120


def wait(driver, condition, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda _: condition())


def field(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(value)


def bubbles(driver, kind: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [b.text for b in driver.find_elements(By.CSS_SELECTOR, f".bubble.{kind}")]


def send(driver, text: str) -> None:
    from selenium.webdriver.common.by import By

    field(driver, "input", text)
    driver.find_element(By.ID, "send").click()


def idle(driver) -> bool:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "send").is_enabled()
