"""The sampler's grammar bitmask: forbidden tokens of constrained rows get -inf, nothing else changes."""

from __future__ import annotations

import numpy as np
import torch

from pagoda.core.scheduler_output import GrammarBitmask
from pagoda.worker.sampler import GrammarMasker, Sampler, SamplingMetadata
from pagoda.worker.sampling_metadata import grammar_rows

VOCAB = 70  # not a multiple of 32: the last word is partly padding


def _metadata(rows: int, bitmask: tuple[torch.Tensor, torch.Tensor] | None) -> SamplingMetadata:
    return SamplingMetadata(temperature=torch.zeros(rows), all_greedy=True, top_k=None, top_p=None, min_p=None,
                            generators={}, repetition_penalty=None, presence_penalty=None, frequency_penalty=None,
                            seen_token_ids=None, output_token_ids=None, max_num_logprobs=None,
                            grammar_bitmask=bitmask)


def _words(allowed: list[set[int]]) -> np.ndarray:
    words = np.zeros((len(allowed), (VOCAB + 31) // 32), dtype=np.uint32)
    for row, tokens in enumerate(allowed):
        for token in tokens:
            words[row, token // 32] |= np.uint32(1 << (token % 32))
    return words.view(np.int32)


def test_only_constrained_rows_change_and_only_where_their_grammar_forbids():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    allowed = {5, 31, 32, 69}  # word edges and the last real token
    masker = GrammarMasker()
    for _ in range(2):  # the second call reuses the first's buffers
        masked = masker(logits.clone(), torch.tensor([1]), torch.from_numpy(_words([allowed])))
        assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
        finite = set(torch.nonzero(torch.isfinite(masked[1])).flatten().tolist())
        assert finite == allowed
        assert torch.equal(masked[1, sorted(allowed)], logits[1, sorted(allowed)])


def test_a_batch_constrained_throughout_is_masked_in_place_row_by_row():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1))
    masked = GrammarMasker()(logits.clone(), torch.tensor([0, 1]), torch.from_numpy(_words([{0}, {69}])))
    assert torch.isfinite(masked).nonzero().tolist() == [[0, 0], [1, 69]]


def test_greedy_picks_the_best_allowed_token():
    logits = torch.zeros(2, VOCAB)
    logits[:, 3] = 10.0  # the favourite, forbidden to row 0
    logits[:, 40] = 5.0
    bitmask = (torch.tensor([0]), torch.from_numpy(_words([{40, 41}])))
    assert Sampler()(logits, _metadata(2, bitmask)).token_ids.tolist() == [40, 3]


def test_bitmask_rows_follow_the_requests_to_their_sampling_rows():
    words = _words([{1}, {2}, {3}])
    bitmask = GrammarBitmask(req_ids=["a", "b", "c"], words=words.tobytes())
    rows, placed = grammar_rows(bitmask, ["free", "c", "a"], torch.device("cpu"))  # "b" does not sample
    assert rows.tolist() == [1, 2]
    assert torch.equal(placed, torch.from_numpy(words[[2, 0]]))
    assert grammar_rows(bitmask, ["free"], torch.device("cpu")) is None
