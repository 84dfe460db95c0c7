"""End to end: KV in a shared Redis is keyed by the model's content, not by its folder's name.

Three folders of SmolLM2 (float32) on one Redis: `a/smollm` (the converted
model), `b/smollm` (same folder name, one tensor changed the way a fine-tune
changes it: headers and sizes stay byte-identical) and `c/other-name` (the
same files as `a` under another name). Files are symlinks except b's changed
weights, so the test copies one weight file at most.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from pagoda import LLM, SamplingParams

pytestmark = pytest.mark.slow

PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
# Two full 256-token chunks and a recomputed tail.
PROMPT = [1] + [random.Random(3).randrange(100, 40000) for _ in range(599)]
CHANGED_TENSOR = "model.norm.weight"


def linked_copy(source: Path, target: Path, *, except_name: str | None = None) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.name != except_name:
            (target / path.name).symlink_to(path.resolve())
    return target


def scale_tensor_in_place(weights: Path, name: str, factor: float) -> None:
    """Rewrite one float32 tensor's bytes; the header, and so the file size, stays as it was."""
    with weights.open("r+b") as file:
        (header_length,) = struct.unpack("<Q", file.read(8))
        entry = json.loads(file.read(header_length))[name]
        assert entry["dtype"] == "F32"
        begin, end = entry["data_offsets"]
        file.seek(8 + header_length + begin)
        values = np.frombuffer(file.read(end - begin), dtype=np.float32) * np.float32(factor)
        file.seek(8 + header_length + begin)
        file.write(values.tobytes())


def run(folder: Path, kv_store: str):
    llm = LLM(str(folder), dtype="float32", kv_cache_memory=64 << 20, max_model_len=1024, kv_store=kv_store)
    try:
        output = llm.generate([PROMPT], PARAMS, use_tqdm=False)[0]
        assert llm.flush_kv_store()
        return output, llm.get_metrics()
    finally:
        llm.shutdown()


def test_same_folder_name_other_weights_never_hits_same_content_other_name_does(smollm_path, redis_server,
                                                                                tmp_path):
    original = linked_copy(smollm_path, tmp_path / "a" / "smollm")
    tuned = linked_copy(smollm_path, tmp_path / "b" / "smollm", except_name="model.safetensors")
    shutil.copyfile(smollm_path / "model.safetensors", tuned / "model.safetensors")
    scale_tensor_in_place(tuned / "model.safetensors", CHANGED_TENSOR, 1.5)
    renamed = linked_copy(original, tmp_path / "c" / "other-name")
    spec = f"{redis_server.url}+namespace=identity-test"

    first, _ = run(original, spec)
    assert first.metrics.kv_store_tokens == {}

    other_weights, metrics = run(tuned, spec)
    assert other_weights.metrics.kv_store_tokens == {}
    assert metrics["kv_store.redis.hits"] == 0

    same_content, metrics = run(renamed, spec)
    assert same_content.metrics.kv_store_tokens == {"redis": 512}
    assert same_content.outputs[0].token_ids == first.outputs[0].token_ids
