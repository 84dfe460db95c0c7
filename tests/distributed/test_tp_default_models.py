"""Tests for tensor parallelism on the default models' real weights (fp32): Gemma 3 270M at TP=2, SmolLM2 at TP=3.

TP=1 (one process, one thread) decodes greedily and records every step's
logits; the TP ranks (one thread each) are then fed the same tokens, so each
step compares the same next-token distribution. Logits agree within
LOGITS_ATOL: the row-parallel all-reduces add partial sums in another order
(~1e-6 per layer, grown through the layers and the final norm). The next
token (argmax) is the same at every step, except where TP=1's top two
logits are within LOGITS_ATOL of each other, a tie that summation order can
break either way. Every rank holds the same gathered logits, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from models.dense_attention import DenseAttention
from rank_runner import run_ranks

from pagoda.distributed.parallel_state import TensorParallelGroup
from pagoda.models import load_model

# Measured: at most 6.3e-5 (Gemma, TP=2) and 4.2e-5 (SmolLM2, TP=3) over 8 steps of these prompts, on logits
# of magnitude up to ~40.
LOGITS_ATOL = 2.5e-4
NUM_STEPS = 16
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]


def _prompt_ids(folder: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return [tokenizer.encode(prompt).ids for prompt in PROMPTS]


@torch.no_grad()
def _step_logits(tp: TensorParallelGroup, folder: Path, prompts: list[list[int]],
                 fed: list[list[int]] | None) -> list[np.ndarray]:
    """Per prompt, [NUM_STEPS, vocab] logits: step 0 after the prompt, step j after feeding token j - 1
    (`fed[i]` when given, else this model's own greedy choice)."""
    model = load_model(folder, torch.float32, torch.device("cpu"), tp=tp)
    results = []
    for index, prompt in enumerate(prompts):
        attention = DenseAttention(model.attention_layer_specs())
        step_ids, position, rows = list(prompt), 0, []
        for step in range(NUM_STEPS):
            attention.begin_step([0], [len(step_ids)])
            positions = torch.arange(position, position + len(step_ids))
            hidden = model(torch.tensor(step_ids), positions, attention)
            logits = model.compute_logits(hidden[-1:])[0]
            rows.append(logits.numpy())
            position += len(step_ids)
            step_ids = [fed[index][step] if fed is not None else int(logits.argmax())]
        results.append(np.stack(rows))
    return results


def _check_against_one_rank(folder: Path, world_size: int) -> None:
    prompts = _prompt_ids(folder)
    (reference,) = run_ranks(1, _step_logits, folder, prompts, None, deadline_s=600.0)
    greedy = [ref.argmax(axis=-1).tolist() for ref in reference]
    ranks = run_ranks(world_size, _step_logits, folder, prompts, greedy, deadline_s=900.0)
    for rank in ranks[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(rank, ranks[0])), "ranks hold different logits"
    for ref, got in zip(reference, ranks[0]):
        np.testing.assert_allclose(got, ref, rtol=0, atol=LOGITS_ATOL)
        for step in np.flatnonzero(got.argmax(axis=-1) != ref.argmax(axis=-1)):
            top2 = np.sort(ref[step])[-2:]
            assert top2[1] - top2[0] < LOGITS_ATOL, f"step {step}: next token differs without a near-tie"


@pytest.mark.slow
def test_gemma3_tp2_matches_tp1(gemma_path: Path) -> None:
    _check_against_one_rank(gemma_path, 2)  # 4 query heads, the single KV head replicated on both ranks


@pytest.mark.slow
def test_smollm2_tp3_matches_tp1(smollm_path: Path) -> None:
    _check_against_one_rank(smollm_path, 3)  # 9 query heads and 3 KV heads: 3 and 1 per rank
