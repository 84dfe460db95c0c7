"""Worker layer: gathers the sampling options of this step's sampling rows into device tensors.

Options no row uses stay None, so the sampler skips their work entirely
(no penalty bookkeeping, no top-k, no sort for top-p).
"""

from __future__ import annotations

import numpy as np
import torch

from pagoda.core.scheduler_output import GrammarBitmask
from pagoda.sampling_params import GREEDY_EPSILON
from pagoda.worker.input_batch import InputBatch
from pagoda.worker.sampler import SamplingMetadata


def _optional(values: np.ndarray, unused: float, device: torch.device) -> torch.Tensor | None:
    if np.all(values == unused):
        return None
    return torch.from_numpy(np.ascontiguousarray(values)).to(device)


def _padded_token_ids(batch: InputBatch, rows: np.ndarray, starts: np.ndarray, device: torch.device) -> torch.Tensor:
    """Token ids [starts[i], num_tokens) of each row, right-padded with -1."""
    ends = batch.num_tokens[rows]
    width = max(int((ends - starts).max()), 1)
    cols = starts[:, None] + np.arange(width)[None, :]
    valid = cols < ends[:, None]
    ids = batch.token_ids[rows[:, None], np.minimum(cols, batch.token_ids.shape[1] - 1)]
    return torch.from_numpy(np.where(valid, ids, -1)).to(device)


def _logit_bias(
    batch: InputBatch, rows: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    entries = [
        (i, token_id, bias)
        for i, row in enumerate(rows.tolist())
        for token_id, bias in (batch.states[row].sampling_params.logit_bias or {}).items()
    ]
    if not entries:
        return None
    sample_rows, token_ids, values = zip(*entries)
    return (
        torch.tensor(sample_rows, dtype=torch.int64, device=device),
        torch.tensor(token_ids, dtype=torch.int64, device=device),
        torch.tensor(values, dtype=torch.float32, device=device),
    )


def build_sampling_metadata(batch: InputBatch, rows: np.ndarray, device: torch.device) -> SamplingMetadata:
    temperature = batch.temperature[rows]
    temperature = np.where(temperature < GREEDY_EPSILON, 0.0, temperature).astype(np.float32)
    repetition = _optional(batch.repetition_penalty[rows], 1.0, device)
    presence = _optional(batch.presence_penalty[rows], 0.0, device)
    frequency = _optional(batch.frequency_penalty[rows], 0.0, device)
    seen = None if repetition is None else _padded_token_ids(batch, rows, np.zeros_like(rows), device)
    outputs = None
    if presence is not None or frequency is not None:
        outputs = _padded_token_ids(batch, rows, batch.num_prompt_tokens[rows], device)
    generators = {
        i: batch.states[row].generator
        for i, row in enumerate(rows.tolist())
        if batch.states[row].generator is not None
    }
    num_logprobs = [batch.states[row].sampling_params.logprobs for row in rows.tolist()]
    wanted = [n for n in num_logprobs if n is not None]
    return SamplingMetadata(
        temperature=torch.from_numpy(temperature).to(device),
        all_greedy=bool(np.all(temperature == 0.0)),
        top_k=_optional(batch.top_k[rows], 0, device),
        top_p=_optional(batch.top_p[rows], 1.0, device),
        min_p=_optional(batch.min_p[rows], 0.0, device),
        generators=generators,  # type: ignore[arg-type]
        repetition_penalty=repetition,
        presence_penalty=presence,
        frequency_penalty=frequency,
        seen_token_ids=seen,
        output_token_ids=outputs,
        max_num_logprobs=max(wanted) if wanted else None,
        logit_bias=_logit_bias(batch, rows, device),
    )


def grammar_rows(bitmask: GrammarBitmask, sample_req_ids: list[str], device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The bitmask's rows placed on this step's sampling rows, in their order (a request that does not sample
    this step is skipped)."""
    row_of = {req_id: row for row, req_id in enumerate(sample_req_ids)}
    words = np.frombuffer(bitmask.words, dtype="<i4").reshape(len(bitmask.req_ids), -1)
    # In sampling-row order, so that a batch constrained throughout is rows 0..n-1 (the masker adds in place).
    kept = sorted((row_of[req_id], index) for index, req_id in enumerate(bitmask.req_ids) if req_id in row_of)
    if not kept:
        return None
    rows, indices = zip(*kept)
    return (torch.tensor(rows, dtype=torch.int64, device=device),
            torch.from_numpy(words[list(indices)]).to(device))
