"""The batched sampler: greedy, filters, penalties, seeds and logprobs, each against a direct computation."""

from __future__ import annotations

import torch

from pagoda.worker.sampler import Sampler, SamplingMetadata, apply_top_k, apply_top_p

VOCAB = 50


def metadata(n: int, **overrides) -> SamplingMetadata:
    values = dict(
        temperature=torch.zeros(n), all_greedy=True, top_k=None, top_p=None, min_p=None, generators={},
        repetition_penalty=None, presence_penalty=None, frequency_penalty=None, seen_token_ids=None,
        output_token_ids=None, max_num_logprobs=None,
    )
    values.update(overrides)
    return SamplingMetadata(**values)


def test_greedy_is_argmax():
    logits = torch.randn(4, VOCAB)
    out = Sampler()(logits, metadata(4))
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    assert out.logprobs is None


def test_top_k_keeps_k_largest_and_zero_means_all():
    logits = torch.randn(2, VOCAB)
    filtered = apply_top_k(logits, torch.tensor([3, 0]))
    assert torch.isfinite(filtered[0]).sum() == 3
    assert set(filtered[0].isfinite().nonzero().flatten().tolist()) == set(logits[0].topk(3).indices.tolist())
    assert torch.isfinite(filtered[1]).all()


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = apply_top_p(logits, torch.tensor([0.7])).isfinite()[0].tolist()
    assert kept == [True, True, False, False]
    kept = apply_top_p(logits, torch.tensor([0.01])).isfinite()[0].tolist()
    assert kept == [True, False, False, False]


def test_random_sampling_respects_top_k_and_min_p():
    torch.manual_seed(0)
    logits = torch.randn(1, VOCAB).repeat(200, 1)
    md = metadata(200, temperature=torch.ones(200), all_greedy=False, top_k=torch.full((200,), 2))
    tokens = set(Sampler()(logits, md).token_ids.tolist())
    assert tokens <= set(logits[0].topk(2).indices.tolist()) and len(tokens) == 2
    md = metadata(200, temperature=torch.ones(200), all_greedy=False, min_p=torch.full((200,), 1.0))
    assert set(Sampler()(logits, md).token_ids.tolist()) == {int(logits[0].argmax())}


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(3, VOCAB)

    def sample_row(batch_logits, row):
        generator = torch.Generator().manual_seed(1234)
        n = batch_logits.shape[0]
        md = metadata(n, temperature=torch.ones(n), all_greedy=False, generators={row: generator})
        return Sampler()(batch_logits, md).token_ids[row].item()

    alone = [sample_row(logits[1:2], 0) for _ in range(3)]
    in_batch = [sample_row(logits, 1) for _ in range(3)]
    assert alone == in_batch == [alone[0]] * 3


def test_penalties_change_logits_as_defined():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    seen = torch.tensor([[0, 1, -1]])
    md = metadata(1, repetition_penalty=torch.tensor([2.0]), seen_token_ids=seen)
    from pagoda.worker.sampler import apply_penalties

    assert apply_penalties(logits, md).tolist() == [[1.0, -2.0, 0.5, 0.0]]
    outputs = torch.tensor([[2, 2, 3, -1]])
    md = metadata(1, presence_penalty=torch.tensor([0.5]), frequency_penalty=torch.tensor([0.25]),
                  output_token_ids=outputs)
    assert apply_penalties(logits, md).tolist() == [[2.0, -1.0, 0.5 - 0.5 - 0.5, 0.0 - 0.25 - 0.5]]


def test_logprobs_put_the_sampled_token_first_with_its_rank():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    md = metadata(1, max_num_logprobs=2)
    out = Sampler()(logits, md)
    expected = torch.log_softmax(logits, -1)[0]
    assert out.logprobs.token_ids == [[1, 1, 2]]
    assert out.logprobs.ranks == [1]
    assert torch.allclose(torch.tensor(out.logprobs.logprobs[0]), expected[[1, 1, 2]])
    # With a repetition penalty the greedy choice moves, and its rank is reported under the raw distribution.
    md = metadata(1, max_num_logprobs=0, repetition_penalty=torch.tensor([10.0]),
                  seen_token_ids=torch.tensor([[1]]))
    out = Sampler()(logits, md)
    assert out.token_ids.tolist() == [2]
    assert out.logprobs.ranks == [2]
