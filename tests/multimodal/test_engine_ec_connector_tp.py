"""The encoder-cache store under tensor parallelism (TP=2, the multiprocess executor, the tiny vision model).

An encoder output is whole on every rank: rank 0 alone saves it, once, under
a one-rank key; a fresh TP=2 engine loads it on both ranks instead of
encoding, with the same tokens, and so does a one-rank engine (the key does
not depend on the world size). Rank 0's counters speak for rank 1 too: an
item any rank failed to load is encoded by both.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vision_engine_helpers import noise_image, png_bytes

from pagoda import LLM, SamplingParams
from pagoda.kvstore.entry import peek_entry_key

pytestmark = pytest.mark.slow

PARAMS = SamplingParams(temperature=0, max_tokens=6)
PROMPT = "Describe <start_of_image> in detail."


def generate(folder: Path, image: Path, store: str, role: str, tp: int) -> tuple[list[int], dict[str, float]]:
    llm = LLM(str(folder), dtype="float32", max_model_len=512, kv_cache_memory=64 << 20, ec_store=store,
              ec_role=role, tensor_parallel_size=tp, distributed_executor_backend="mp" if tp > 1 else None)
    try:
        output = llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": str(image)}}, PARAMS,
                              use_tqdm=False)[0]
        assert llm.flush_kv_store()
        return output.outputs[0].token_ids, llm.get_metrics()
    finally:
        llm.shutdown()


def test_rank_0_saves_once_and_every_rank_loads(vision_folder: Path, tmp_path: Path) -> None:
    image = tmp_path / "picture.png"
    image.write_bytes(png_bytes(noise_image(21)))
    folder = tmp_path / "ec"
    store = f"disk:{folder}:64MiB"
    produced, metrics = generate(vision_folder, image, store, "ec_producer", 2)
    assert metrics["mm.encoder.encoded_items"] == 1
    files = list(folder.rglob("*.kv"))
    assert len(files) == 1 and files[0].parent == folder  # one copy, no per-rank folders
    key, _ = peek_entry_key(files[0].read_bytes())
    assert (key.world_size, key.worker_id) == (1, 0)

    for tp in (2, 1):
        tokens, metrics = generate(vision_folder, image, store, "ec_consumer", tp)
        assert tokens == produced, tp
        assert metrics["mm.encoder.loaded_items"] == 1 and metrics["mm.encoder.encoded_items"] == 0, tp
