"""Logit bias (OpenAI semantics): added to the logits before sampling, never to the reported logprobs."""

from __future__ import annotations

import pytest
import torch

from pagoda.sampling_params import SamplingParams
from pagoda.worker.sampler import Sampler, SamplingMetadata

VOCAB = 10


def greedy_metadata(n: int, logit_bias=None, max_num_logprobs=None) -> SamplingMetadata:
    return SamplingMetadata(
        temperature=torch.zeros(n), all_greedy=True, top_k=None, top_p=None, min_p=None, generators={},
        repetition_penalty=None, presence_penalty=None, frequency_penalty=None, seen_token_ids=None,
        output_token_ids=None, max_num_logprobs=max_num_logprobs, logit_bias=logit_bias,
    )


def sparse(entries: list[tuple[int, int, float]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, ids, values = zip(*entries)
    return torch.tensor(rows), torch.tensor(ids), torch.tensor(values, dtype=torch.float32)


def test_bias_moves_greedy_choice_only_in_its_row():
    logits = torch.zeros(2, VOCAB)
    logits[:, 3] = 5.0
    out = Sampler()(logits, greedy_metadata(2, sparse([(1, 7, 100.0)])))
    assert out.token_ids.tolist() == [3, 7]


def test_negative_bias_bans_a_token_and_biases_add_up():
    logits = torch.zeros(1, VOCAB)
    logits[0, 3], logits[0, 4] = 5.0, 4.0
    assert Sampler()(logits, greedy_metadata(1, sparse([(0, 3, -100.0)]))).token_ids.tolist() == [4]
    # Two entries on one token accumulate rather than overwrite.
    both = sparse([(0, 2, 3.0), (0, 2, 3.0)])
    assert Sampler()(logits, greedy_metadata(1, both)).token_ids.tolist() == [2]


def test_logprobs_come_from_the_unbiased_logits():
    logits = torch.randn(1, VOCAB)
    out = Sampler()(logits, greedy_metadata(1, sparse([(0, 5, 100.0)]), max_num_logprobs=0))
    assert out.token_ids.tolist() == [5]
    expected = torch.log_softmax(logits, dim=-1)[0, 5].item()
    assert out.logprobs.logprobs[0][0] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("bias", [{-1: 1.0}, {3: 100.5}, {3: -101.0}])
def test_sampling_params_reject_bad_logit_bias(bias):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bias)
