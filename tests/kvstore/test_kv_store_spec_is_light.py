"""Validating a config with a KV store parses the tier list and nothing more: no tier, no Redis client, no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import sys
import msgspec
from pagoda.config import CacheConfig, KVTransferConfig, ModelConfig, PagodaConfig, SchedulerConfig
from pagoda.kv_store_spec import parse_kv_store_spec

store = parse_kv_store_spec("cpu:1GiB,disk:/tmp/pagoda-kv:2GiB+policy=lfu,redis://127.0.0.1:6379/0+readonly")
model = ModelConfig(model="m", path="/m", architecture="LlamaForCausalLM", dtype="float32", max_model_len=64,
                    vocab_size=10, eos_token_ids=(1,), identity="llama-0123456789abcdef")
config = PagodaConfig(model, CacheConfig(), SchedulerConfig(max_model_len=64), KVTransferConfig(store))
assert msgspec.msgpack.decode(msgspec.msgpack.encode(config), type=PagodaConfig) == config  # checked again
heavy = sorted(name for name in sys.modules
               if name.split(".")[0] in ("redis", "torch", "zmq") or name.startswith("pagoda.kvstore"))
assert not heavy, heavy
print("ok")
"""


def test_config_validation_imports_no_store_module() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
