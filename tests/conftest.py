"""Shared fixtures: converted default models and float32 engines, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    from pagoda.models.resolve import resolve_model

    return resolve_model("gemma3-270m")


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    from pagoda.models.resolve import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def model_paths(gemma_path: Path, smollm_path: Path) -> dict[str, Path]:
    return {"gemma3-270m": gemma_path, "smollm2-135m": smollm_path}


# 256 MiB of fp32 KV: a 4k-token Gemma prompt fits with room; tests stay light on memory.
TEST_KV_BYTES = 256 << 20


@pytest.fixture(scope="session")
def gemma_llm(gemma_path: Path):
    from pagoda import LLM

    return LLM(str(gemma_path), dtype="float32", kv_cache_memory=TEST_KV_BYTES, max_model_len=8192)


@pytest.fixture(scope="session")
def smollm_llm(smollm_path: Path):
    from pagoda import LLM

    return LLM(str(smollm_path), dtype="float32", kv_cache_memory=TEST_KV_BYTES, max_model_len=2048)


@pytest.fixture(scope="session")
def llms(gemma_llm, smollm_llm) -> dict:
    return {"gemma3-270m": gemma_llm, "smollm2-135m": smollm_llm}


@pytest.fixture(scope="session")
def hf_models(model_paths: dict[str, Path]) -> dict:
    """transformers' own implementation on the same converted folders, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    return {
        name: AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        for name, path in model_paths.items()
    }


@pytest.fixture
def redis_server():
    """A private redis-server on a free loopback port, per test (tests may kill and restart it)."""
    from redis_server import RedisServer, redis_server_available

    if not redis_server_available():
        pytest.skip("redis-server is not installed (`make install` installs it)")
    with RedisServer() as server:
        yield server


@pytest.fixture
def browser():
    """Headless Chromium (Debian's chromium and chromium-driver) through selenium; skips where it is missing."""
    import shutil

    if shutil.which("chromedriver") is None:
        pytest.skip("chromium-driver is not installed (`make test-tools` installs it)")
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

