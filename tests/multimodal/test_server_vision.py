"""`pagoda serve` on an image model: chat `image_url` parts with data: URIs, through the official `openai` client.

The server answers as `LLM.chat` does for the same conversation, and refuses
with a 400 naming `messages` what it cannot take: a remote URL (it fetches
nothing), bytes that are no image.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from entrypoints.openai_server_helpers import API_KEY, RemoteServer, start_server
from vision_engine_helpers import noise_image, png_bytes

from pagoda import LLM, SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vision_server(vision_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    server = start_server(tmp_path_factory, "--api-key", API_KEY, "--max-model-len", "512",
                          "--served-model-name", "tiny-vision", model=str(vision_folder))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(vision_server: RemoteServer):
    import openai

    return openai.OpenAI(base_url=f"{vision_server.url}/v1", api_key=API_KEY, max_retries=0)


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_an_image_chat_answers_as_llm_chat_does(client, vision_folder: Path) -> None:
    image = png_bytes(noise_image(31))
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is in"},
                                             image_part(data_uri(image)), {"type": "text", "text": "?"}]}]
    llm = LLM(str(vision_folder), dtype="float32", max_model_len=512, kv_cache_memory=256 << 20)
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    llm.shutdown()
    response = client.chat.completions.create(model="tiny-vision", messages=messages, max_tokens=8, temperature=0)
    assert response.choices[0].message.content == expected.outputs[0].text
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    stream = client.chat.completions.create(model="tiny-vision", messages=messages, max_tokens=8, temperature=0,
                                            stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == \
        expected.outputs[0].text


@pytest.mark.parametrize(("url", "message"), [
    ("https://example.com/cat.png", "fetches nothing"),
    (data_uri(b"\x89PNG\r\n\x1a\n not really"), "image 0"),
    ("data:image/png;base64,@@@", "base64"),
])
def test_images_the_server_cannot_take_are_a_400_naming_messages(client, url: str, message: str) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-vision", max_tokens=4,
                                       messages=[{"role": "user", "content": [image_part(url)]}])
    assert message in str(info.value) and info.value.body["param"] == "messages"
    # The server goes on serving.
    ok = client.chat.completions.create(model="tiny-vision", max_tokens=2, messages=[
        {"role": "user", "content": [image_part(data_uri(png_bytes(noise_image(32))))]}])
    assert ok.choices[0].finish_reason == "length"


def test_the_chat_page_uploads_an_image_and_answers_as_llm_chat_does(vision_server, vision_folder: Path, browser,
                                                                    tmp_path: Path) -> None:
    from entrypoints.browser_helpers import bubbles, field, idle, send, wait
    from selenium.webdriver.common.by import By

    image = png_bytes(noise_image(7))
    (tmp_path / "noise.png").write_bytes(image)
    text = "What is in this picture?"
    # The page sends the image part first, then the text.
    messages = [{"role": "user", "content": [image_part(data_uri(image)), {"type": "text", "text": text}]}]
    llm = LLM(str(vision_folder), dtype="float32", max_model_len=512, kv_cache_memory=256 << 20)
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0].text
    llm.shutdown()

    browser.get(f"{vision_server.url}/")
    field(browser, "api-key", API_KEY)
    browser.find_element(By.ID, "system").click()
    wait(browser, lambda: browser.find_element(By.ID, "model-name").text == "tiny-vision")
    field(browser, "temperature", "0")
    field(browser, "max-tokens", "8")
    browser.find_element(By.ID, "image").send_keys(str(tmp_path / "noise.png"))
    send(browser, text)
    wait(browser, lambda: len(bubbles(browser, "assistant")) == 1 and idle(browser))
    assert not bubbles(browser, "error")
    assert browser.find_elements(By.CSS_SELECTOR, ".bubble.user img")  # the picture shows in the conversation
    assert bubbles(browser, "assistant")[0].split() == expected.split()
