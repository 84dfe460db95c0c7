"""Encoder outputs that outlive the engine (the EC connector), and the pixel mirror of a separate engine process.

A producer engine in another process encodes an image and saves the output
to the store; an engine in this process, started afterwards, finds it there
and skips the vision encoder (counted as a load, not an encode), with the
same tokens. Through the disk tier (a restart on one machine) and through a
real Redis (another server); a corrupted stored output is detected, dropped,
counted and re-encoded, with the output unchanged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from vision_engine_helpers import noise_image, png_bytes

from pagoda import LLM, SamplingParams

pytestmark = pytest.mark.slow

PARAMS = SamplingParams(temperature=0, max_tokens=6)
PROMPT = "Describe <start_of_image> in detail."

_PRODUCER = """
import json, sys
from pagoda import LLM, SamplingParams

if __name__ == "__main__":
    folder, image, store = sys.argv[1:4]
    llm = LLM(folder, dtype="float32", max_model_len=512, kv_cache_memory=64 << 20, ec_store=store,
              ec_role="ec_producer")
    output = llm.generate({"prompt": %r, "multi_modal_data": {"image": image}},
                          SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    assert llm.flush_kv_store()
    print("TOKENS " + json.dumps(output.outputs[0].token_ids), flush=True)
    llm.shutdown()
""" % PROMPT


def produce_in_another_process(folder: Path, image_path: Path, store: str, tmp_path: Path) -> list[int]:
    script = tmp_path / "producer.py"
    script.write_text(_PRODUCER)
    result = subprocess.run([sys.executable, str(script), str(folder), str(image_path), store],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("TOKENS "))
    return json.loads(line.removeprefix("TOKENS "))


def consume(folder: Path, image_path: Path, store: str) -> tuple[list[int], dict[str, float]]:
    llm = LLM(str(folder), dtype="float32", max_model_len=512, kv_cache_memory=64 << 20, ec_store=store,
              ec_role="ec_consumer")
    try:
        output = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": str(image_path)}}, PARAMS,
                              use_tqdm=False)[0]
        return output.outputs[0].token_ids, llm.get_metrics()
    finally:
        llm.shutdown()


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    path = tmp_path / "picture.png"
    path.write_bytes(png_bytes(noise_image(21)))
    return path


def test_a_restarted_engine_loads_the_encoder_output_from_disk(vision_folder: Path, image_path: Path,
                                                                tmp_path: Path) -> None:
    store = f"disk:{tmp_path / 'ec'}:64MiB"
    produced = produce_in_another_process(vision_folder, image_path, store, tmp_path)
    tokens, metrics = consume(vision_folder, image_path, store)
    assert tokens == produced
    assert metrics["mm.encoder.loaded_items"] == 1 and metrics["mm.encoder.encoded_items"] == 0


def test_another_server_loads_the_encoder_output_through_redis(vision_folder: Path, image_path: Path,
                                                               tmp_path: Path, redis_server) -> None:
    store = redis_server.url
    produced = produce_in_another_process(vision_folder, image_path, store, tmp_path)
    tokens, metrics = consume(vision_folder, image_path, store)
    assert tokens == produced
    assert metrics["mm.encoder.loaded_items"] == 1 and metrics["mm.encoder.encoded_items"] == 0


def test_a_corrupted_stored_output_is_dropped_counted_and_recomputed(vision_folder: Path, image_path: Path,
                                                                     tmp_path: Path) -> None:
    folder = tmp_path / "ec"
    store = f"disk:{folder}:64MiB"
    produced = produce_in_another_process(vision_folder, image_path, store, tmp_path)
    entries = [path for path in folder.rglob("*") if path.is_file()]
    assert entries, "the producer stored nothing"
    for path in entries:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    tokens, metrics = consume(vision_folder, image_path, store)
    assert tokens == produced
    assert metrics["mm.encoder.failed_loads"] == 1 and metrics["mm.encoder.encoded_items"] == 1
    assert metrics["mm.ec.connector.failed_loads"] + metrics.get("mm.ec.connector.mismatched_loads", 0) >= 1


def test_a_separate_engine_process_gets_each_images_pixels_once_and_recovers_from_drift(vision_folder: Path) -> None:
    expected = LLM(str(vision_folder), dtype="float32", max_model_len=512, kv_cache_memory=64 << 20)
    image = png_bytes(noise_image(22))
    prompts = [{"prompt": f"{lead} <start_of_image>?", "multi_modal_data": {"image": image}}
               for lead in ("First", "Second", "Third")]
    want = [o.outputs[0].token_ids for o in expected.generate(prompts, PARAMS, use_tqdm=False)]
    expected.shutdown()
    llm = LLM(str(vision_folder), dtype="float32", max_model_len=512, kv_cache_memory=64 << 20, engine_mode="mp")
    try:
        client = llm.llm_engine.engine_core
        got = [llm.generate(prompt, PARAMS, use_tqdm=False)[0].outputs[0].token_ids for prompt in prompts[:2]]
        assert client._pixel_mirror.stats.hits == 1, "the second request's pixels stayed in the front end"
        # Drift: the engine forgets its pixels while the front end's mirror still lists them.
        assert client._call_utility("reset_mm_cache", bool)
        got.append(llm.generate(prompts[2], PARAMS, use_tqdm=False)[0].outputs[0].token_ids)
        assert got == want
        assert llm.get_metrics()["mm.pixel_mirror.resends"] == 1
    finally:
        llm.shutdown()
