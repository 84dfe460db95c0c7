"""The KV cache is never zeroed: whatever bytes its slots hold before they are written must not change any output.

One engine runs the same greedy workload after its whole cache was filled
with zeros, NaN, and random bit patterns (Inf and NaN among them), with the
CPU decode kernel and with the portable decode path. The workload has decodes
of rows of different lengths in one batch (padded gathers), prompts past the
sliding window, chunked prefill beside decodes, and a prefix-cache hit.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.worker.attention import paged_attention

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    lengths = [5, 37, 600, 130]
    return [[2] + [rng.randrange(1000, 200000) for _ in range(length - 1)] for length in lengths]


def _kv_tensors(llm: LLM) -> list[torch.Tensor]:
    runner = llm.llm_engine.engine_core.engine_core.executor.worker.model_runner
    return list({id(t): t for t in runner.layer_kv_caches}.values())


def _fill_zeros(tensor: torch.Tensor) -> None:
    tensor.zero_()


def _fill_nan(tensor: torch.Tensor) -> None:
    tensor.fill_(float("nan"))


def _fill_random_bits(tensor: torch.Tensor) -> None:
    bits = tensor.view(torch.int16)  # every bf16 pattern: Inf and NaN included
    bits.copy_(torch.randint(-(2**15), 2**15, bits.shape, dtype=torch.int16, generator=torch.Generator().manual_seed(1)))


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("gemma3-270m", dtype="bfloat16", kv_cache_memory=96 << 20, max_model_len=2048,
               max_num_batched_tokens=256)


def _run(llm: LLM, fill: Callable[[torch.Tensor], None]) -> list[list[int]]:
    assert llm.reset_prefix_cache()
    for tensor in _kv_tensors(llm):
        fill(tensor)
    prompts = _prompts()
    first = llm.generate(prompts, GREEDY, use_tqdm=False)
    # A prefix-cache hit: the 600-token prompt's first 560 tokens, then new ones.
    shared = prompts[2][:560] + prompts[1][1:]
    second = llm.generate([shared], GREEDY, use_tqdm=False)
    assert second[0].num_cached_tokens >= 544
    return [list(out.outputs[0].token_ids) for out in first + second]


def test_poisoned_kv_cache_changes_no_output(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = _run(llm, _fill_zeros)
    assert _run(llm, _fill_nan) == reference
    assert _run(llm, _fill_random_bits) == reference
    # The portable decode path gathers padded rows: the slots past a short row's end are read too. It rounds
    # differently from the kernel in bf16, so it has its own reference.
    monkeypatch.setattr(paged_attention, "load_cpu_decode_attention", lambda: None)
    portable_reference = _run(llm, _fill_zeros)
    assert _run(llm, _fill_nan) == portable_reference
    assert _run(llm, _fill_random_bits) == portable_reference
