"""Engine layer: turns the workers' logprob lists into `Logprob` dicts with decoded tokens."""

from __future__ import annotations

from tokenizers import Tokenizer

from pagoda.core.model_runner_output import LogprobsLists
from pagoda.outputs import Logprob, PromptLogprobs, SampleLogprobs
from pagoda.sampling_params import SamplingParams


class LogprobsProcessor:
    """Accumulates sample and prompt logprobs for one sequence."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._num_logprobs = params.logprobs
        self._num_prompt_logprobs = params.prompt_logprobs
        self.cumulative_logprob: float | None = None if params.logprobs is None else 0.0
        self._sample: SampleLogprobs = []
        self._prompt: PromptLogprobs = [] if params.prompt_logprobs is None else [None]
        self._num_sample_sent = 0
        self._num_prompt_sent = 0

    def update(self, sample: LogprobsLists | None, prompt: LogprobsLists | None) -> None:
        if sample is not None and self._num_logprobs is not None:
            for position in self._to_dicts(sample, self._num_logprobs):
                self._sample.append(position)
            for logprobs in sample.logprobs:
                self.cumulative_logprob = (self.cumulative_logprob or 0.0) + logprobs[0]
        if prompt is not None and self._num_prompt_logprobs is not None:
            self._prompt.extend(self._to_dicts(prompt, self._num_prompt_logprobs))

    def _to_dicts(self, lists: LogprobsLists, num_top: int) -> list[dict[int, Logprob]]:
        positions: list[dict[int, Logprob]] = []
        for token_ids, logprobs, rank in zip(lists.token_ids, lists.logprobs, lists.ranks):
            entry: dict[int, Logprob] = {}
            # The chosen token comes first with its own rank; the top-k follow ranked 1..k.
            entry[token_ids[0]] = Logprob(logprobs[0], rank, self._decode(token_ids[0]))
            for top_rank, (token_id, logprob) in enumerate(zip(token_ids[1 : num_top + 1], logprobs[1:]), 1):
                entry.setdefault(token_id, Logprob(logprob, top_rank, self._decode(token_id)))
            positions.append(entry)
        return positions

    def _decode(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def take_sample_logprobs(self, delta: bool) -> SampleLogprobs | None:
        if self._num_logprobs is None:
            return None
        if not delta:
            return list(self._sample)
        new = self._sample[self._num_sample_sent :]
        self._num_sample_sent = len(self._sample)
        return new

    def take_prompt_logprobs(self, delta: bool) -> PromptLogprobs | None:
        if self._num_prompt_logprobs is None:
            return None
        if not delta:
            return list(self._prompt)
        new = self._prompt[self._num_prompt_sent :]
        self._num_prompt_sent = len(self._prompt)
        return new
