"""Worker layer: picks the next token for every sampling row of the batch at once.

Order of operations (as in vLLM): structured output's grammar bitmask (tokens
a row's grammar forbids get -inf), logprobs from those logits, then logit
bias, then penalties, then greedy or temperature → min-p → top-k → top-p → a
draw by the exponential race `argmax(p / Exp(1))`, which needs no sort and no host sync.
Rows with a `seed` draw their noise from their own generator, so their text
does not depend on what else is in the batch. The full-vocabulary sort runs
only when some row uses top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.core.model_runner_output import LogprobsLists


@dataclass
class SamplingMetadata:
    """Per sampling row options, as device tensors (None where no row uses them)."""

    temperature: torch.Tensor  # [N] float32; 0 = greedy
    all_greedy: bool
    top_k: torch.Tensor | None  # [N] int64; 0 = all tokens
    top_p: torch.Tensor | None  # [N] float32
    min_p: torch.Tensor | None  # [N] float32
    generators: dict[int, torch.Generator]  # row -> generator of seeded rows
    # Penalties: token ids of prompt+output and of output only, padded with -1.
    repetition_penalty: torch.Tensor | None  # [N] float32
    presence_penalty: torch.Tensor | None
    frequency_penalty: torch.Tensor | None
    seen_token_ids: torch.Tensor | None  # [N, L] int64
    output_token_ids: torch.Tensor | None  # [N, L'] int64
    max_num_logprobs: int | None  # None: no row wants logprobs
    # Sparse logit bias: (rows [B], token ids [B], values [B]) over all biased entries.
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # Structured output: (rows [G], bitmask [G, ceil(V / 32)] int32) of the rows under a grammar.
    grammar_bitmask: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N] int64
    logprobs: LogprobsLists | None  # rows in the same order; the sampled token first


class Sampler:
    def __init__(self) -> None:
        self.grammar_masker = GrammarMasker()

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        logits = logits.float()
        if metadata.grammar_bitmask is not None:
            logits = self.grammar_masker(logits, *metadata.grammar_bitmask)
        raw_logprobs = None if metadata.max_num_logprobs is None else torch.log_softmax(logits, dim=-1)
        logits = apply_logit_bias(logits, metadata)
        logits = apply_penalties(logits, metadata)
        greedy = logits.argmax(dim=-1)
        if metadata.all_greedy:
            token_ids = greedy
        else:
            token_ids = torch.where(metadata.temperature == 0, greedy, self._sample(logits, metadata))
        logprobs = None
        if raw_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, token_ids, metadata.max_num_logprobs or 0)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    def _sample(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        temperature = torch.where(metadata.temperature == 0, 1.0, metadata.temperature)
        logits = logits / temperature.unsqueeze(1)
        if metadata.top_k is not None:
            logits = apply_top_k(logits, metadata.top_k)
        if metadata.top_p is not None:
            logits = apply_top_p(logits, metadata.top_p)
        probs = torch.softmax(logits, dim=-1)
        if metadata.min_p is not None:
            threshold = probs.amax(dim=-1, keepdim=True) * metadata.min_p.unsqueeze(1)
            probs = probs.masked_fill(probs < threshold, 0.0)
        noise = torch.empty_like(probs).exponential_()
        for row, generator in metadata.generators.items():
            noise[row].exponential_(generator=generator)
        return (probs / noise).argmax(dim=-1)


class GrammarMasker:
    """Adds 0 or -inf to every logit of the constrained rows, as their packed bitmask words say.

    Each byte of the bitmask selects one of 256 rows of eight (0 | -inf) biases, so one gather and one add
    cover the rows: at 64 rows of Gemma's 262k vocabulary ~16 ms, where unpacking bits by shifts and a
    `masked_fill_` took ~124. The gather's buffers persist across steps (a fresh 64 MB tensor per step pays
    its page faults every time).
    """

    def __init__(self) -> None:
        self._table: torch.Tensor | None = None  # [256, 8] float32
        self._index = torch.empty(0, dtype=torch.int64)
        self._bias = torch.empty(0, 8)

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        device = logits.device
        if self._table is None or self._table.device != device:
            bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
            self._table = torch.where(bits.bool(), 0.0, float("-inf")).to(device)
            self._index, self._bias = self._index.to(device), self._bias.to(device)
        packed = words.contiguous().view(torch.uint8).flatten()
        if self._index.numel() < packed.numel():
            self._index = torch.empty(packed.numel(), dtype=torch.int64, device=device)
            self._bias = torch.empty(packed.numel(), 8, device=device)
        index = self._index[: packed.numel()].copy_(packed)
        bias = torch.index_select(self._table, 0, index, out=self._bias[: packed.numel()])
        bias = bias.view(words.shape[0], -1)[:, : logits.shape[1]]
        if rows.numel() == logits.shape[0]:  # every row constrained, in order (grammar_rows keeps the order)
            return logits.add_(bias)
        return logits.index_add_(0, rows, bias)


def apply_logit_bias(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    if metadata.logit_bias is None:
        return logits
    rows, token_ids, values = metadata.logit_bias
    return logits.index_put((rows, token_ids), values, accumulate=True)


def apply_penalties(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    if metadata.repetition_penalty is not None and metadata.seen_token_ids is not None:
        seen = _token_mask(metadata.seen_token_ids, logits.shape[1])
        penalty = metadata.repetition_penalty.unsqueeze(1)
        scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, scaled, logits)
    if metadata.output_token_ids is not None and (
        metadata.presence_penalty is not None or metadata.frequency_penalty is not None
    ):
        counts = _token_counts(metadata.output_token_ids, logits.shape[1])
        if metadata.frequency_penalty is not None:
            logits = logits - metadata.frequency_penalty.unsqueeze(1) * counts
        if metadata.presence_penalty is not None:
            logits = logits - metadata.presence_penalty.unsqueeze(1) * (counts > 0)
    return logits


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, V] float counts of each id in each row; -1 is padding."""
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, device=token_ids.device)
    index = torch.where(token_ids < 0, vocab_size, token_ids)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=counts.dtype))
    return counts[:, :vocab_size]


def _token_mask(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return _token_counts(token_ids, vocab_size) > 0


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits (k = 0: keep all)."""
    vocab_size = logits.shape[1]
    k = torch.where(top_k <= 0, vocab_size, top_k).clamp(max=vocab_size)
    max_k = int(k.max())
    top_values = logits.topk(max_k, dim=-1).values
    threshold = top_values.gather(1, (k - 1).unsqueeze(1))
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (at least one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_p.unsqueeze(1)
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> LogprobsLists:
    """The chosen token's logprob and rank, followed by the top `num_top`."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    if num_top > 0:
        top_values, top_ids = logprobs.topk(num_top, dim=-1)
        ids = torch.cat([token_ids.unsqueeze(1), top_ids], dim=1)
        values = torch.cat([chosen, top_values], dim=1)
    else:
        ids, values = token_ids.unsqueeze(1), chosen
    return LogprobsLists(token_ids=ids.tolist(), logprobs=values.tolist(), ranks=ranks.tolist())
