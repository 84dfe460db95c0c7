"""A 4k-token Gemma 3 prompt: sliding-window groups hold only the window's blocks; output equals transformers."""

from __future__ import annotations

import random

import pytest
import torch

from pagoda import SamplingParams
from pagoda.core.kv_cache_interface import SlidingWindowSpec

pytestmark = pytest.mark.slow

PROMPT_LEN = 4000
NUM_NEW_TOKENS = 8


def test_long_prompt_holds_only_window_blocks_and_matches_transformers(gemma_llm, hf_models):
    rng = random.Random(3)
    prompt = [2] + [rng.randrange(1000, 200000) for _ in range(PROMPT_LEN - 1)]
    engine = gemma_llm.llm_engine
    core = engine.engine_core.engine_core
    manager = core.scheduler.kv_cache_manager
    groups = core.kv_cache_config.groups
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, min_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    engine.add_request("long", prompt, params)
    token_ids: list[int] = []
    checked_decode_steps = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        for output in outputs:
            token_ids = output.outputs[0].token_ids
        # Out-of-window blocks are released when the next step is scheduled, so check from the second token on.
        if 2 <= len(token_ids) < NUM_NEW_TOKENS:
            for group, block_ids in zip(groups, manager.get_block_ids("long")):
                held = sum(1 for block_id in block_ids if block_id != 0)
                if isinstance(group.spec, SlidingWindowSpec):
                    window_blocks = -(-(group.spec.sliding_window - 1) // group.spec.block_size) + 1
                    assert held <= window_blocks, f"sliding group holds {held} blocks"
                else:
                    assert held == -(-(PROMPT_LEN + len(token_ids) - 1) // group.spec.block_size)
            checked_decode_steps += 1
    assert checked_decode_steps > 0
    with torch.inference_mode():
        expected = hf_models["gemma3-270m"].generate(
            torch.tensor([prompt]), max_new_tokens=NUM_NEW_TOKENS, eos_token_id=None, pad_token_id=0, do_sample=False
        )[0, PROMPT_LEN:].tolist()
    assert token_ids == expected
