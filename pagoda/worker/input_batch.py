"""Worker layer: the persistent batch — requests stay in fixed rows across steps.

Each step the model runner applies only the scheduler's diffs: new requests
take the next free row, finished or unscheduled ones are swap-removed (the
last row moves into the hole, so rows stay contiguous), and new blocks are
appended to a row's block tables. Token ids and per-request sampling options
live in host arrays indexed by row, so building a step's inputs is a few
vectorized numpy gathers, not a Python loop over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pagoda.core.multimodal import MultiModalFeature
from pagoda.sampling_params import SamplingParams
from pagoda.worker.block_table import MultiGroupBlockTable


@dataclass
class CachedRequestState:
    """What the worker remembers of a request between steps (even while unscheduled)."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    generator: torch.Generator | None
    block_ids: tuple[list[int], ...]
    num_computed_tokens: int
    output_token_ids: list[int] = field(default_factory=list)
    # Image items of the prompt, in order (their pixels encode when the scheduler says so).
    mm_features: list[MultiModalFeature] = field(default_factory=list)
    # Prompt positions whose next-token logprobs were already reported (survives preemption).
    num_prompt_logprobs_done: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


class InputBatch:
    def __init__(self, max_num_reqs: int, max_model_len: int, max_num_blocks_per_req: int, num_groups: int) -> None:
        self.max_num_reqs = max_num_reqs
        self.req_ids: list[str] = []
        self.req_id_to_index: dict[str, int] = {}
        self.states: list[CachedRequestState] = []
        self.token_ids = np.zeros((max_num_reqs, max_model_len), dtype=np.int64)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_prompt_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_computed_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.block_table = MultiGroupBlockTable(max_num_reqs, max_num_blocks_per_req, num_groups)
        self.temperature = np.ones(max_num_reqs, dtype=np.float32)
        self.top_p = np.ones(max_num_reqs, dtype=np.float32)
        self.top_k = np.zeros(max_num_reqs, dtype=np.int64)
        self.min_p = np.zeros(max_num_reqs, dtype=np.float32)
        self.repetition_penalty = np.ones(max_num_reqs, dtype=np.float32)
        self.presence_penalty = np.zeros(max_num_reqs, dtype=np.float32)
        self.frequency_penalty = np.zeros(max_num_reqs, dtype=np.float32)
        self._row_arrays = (
            self.num_tokens, self.num_prompt_tokens, self.num_computed_tokens, self.temperature, self.top_p,
            self.top_k, self.min_p, self.repetition_penalty, self.presence_penalty, self.frequency_penalty,
        )

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)

    def add_request(self, state: CachedRequestState) -> int:
        row = self.num_reqs
        if row >= self.max_num_reqs:
            raise RuntimeError(f"input batch is full ({self.max_num_reqs} rows)")
        self.req_ids.append(state.req_id)
        self.states.append(state)
        self.req_id_to_index[state.req_id] = row
        num_prompt = len(state.prompt_token_ids)
        num_tokens = state.num_tokens
        self.token_ids[row, :num_prompt] = state.prompt_token_ids
        self.token_ids[row, num_prompt:num_tokens] = state.output_token_ids
        self.num_tokens[row] = num_tokens
        self.num_prompt_tokens[row] = num_prompt
        self.num_computed_tokens[row] = state.num_computed_tokens
        self.block_table.set_row(row, state.block_ids)
        params = state.sampling_params
        self.temperature[row] = params.temperature
        self.top_p[row] = params.top_p
        self.top_k[row] = params.top_k if params.top_k > 0 else 0
        self.min_p[row] = params.min_p
        self.repetition_penalty[row] = params.repetition_penalty
        self.presence_penalty[row] = params.presence_penalty
        self.frequency_penalty[row] = params.frequency_penalty
        return row

    def remove_request(self, req_id: str) -> None:
        """Swap-remove: the last row moves into the freed row."""
        row = self.req_id_to_index.pop(req_id)
        last = self.num_reqs - 1
        if row != last:
            moved_id = self.req_ids[last]
            self.req_ids[row] = moved_id
            self.states[row] = self.states[last]
            self.req_id_to_index[moved_id] = row
            num_tokens = int(self.num_tokens[last])
            self.token_ids[row, :num_tokens] = self.token_ids[last, :num_tokens]
            for array in self._row_arrays:
                array[row] = array[last]
            self.block_table.move_row(last, row)
        self.req_ids.pop()
        self.states.pop()

    def append_token(self, row: int, token_id: int) -> None:
        position = int(self.num_tokens[row])
        self.token_ids[row, position] = token_id
        self.num_tokens[row] = position + 1
        self.states[row].output_token_ids.append(token_id)
