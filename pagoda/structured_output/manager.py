"""Engine layer: `StructuredOutputManager` — builds matchers off the loop, keeps one per request, packs bitmasks.

It lives in the engine core beside the scheduler, as in vLLM v1. A
constrained request waits here, outside the scheduler, until its matcher is
built, on a thread of the manager's own (llguidance drops the GIL while it
reads the vocabulary and builds a grammar, so neither stalls the requests
already running). Built matchers are kept by constraint and copied for each
new request, so a schema sent a thousand times is compiled once. Each step,
the rows that sample get their next-token bitmask, one bit per vocabulary
entry, carried to the workers in the `SchedulerOutput`; after the step, each
request's matcher takes the tokens it was given.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import llguidance
import llguidance.numpy
import numpy as np

from pagoda.config import ModelConfig
from pagoda.core.scheduler_output import GrammarBitmask
from pagoda.sampling_params import StructuredOutputsParams
from pagoda.structured_output.grammar import grammar_of, is_panic

_COMPILED_CACHE_SIZE = 256  # constraints kept compiled, the least recently used dropped first


class StructuredOutputManager:
    def __init__(self, model_config: ModelConfig, max_num_seqs: int) -> None:
        self._model_config = model_config
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pagoda-grammar")
        self._tokenizer: llguidance.LLTokenizer | None = None  # read on the pool, on first use
        # Constraint -> a matcher at the grammar's start, never advanced: requests get copies.
        self._compiled: OrderedDict[tuple[str, str, bool], Future[llguidance.LLMatcher]] = OrderedDict()
        self._lock = threading.Lock()
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        # Requests whose matcher panicked (a bug in llguidance): they fail alone, the engine goes on.
        self._broken: dict[str, str] = {}
        self._bitmask = np.empty(llguidance.numpy.get_bitmask_shape(max_num_seqs, model_config.vocab_size),
                                 dtype=np.int32)

    def compile(self, params: StructuredOutputsParams) -> Future[llguidance.LLMatcher]:
        """The compiled constraint `params` asks for, from the cache or being compiled now."""
        key = params.key
        with self._lock:
            future = self._compiled.get(key)
            if future is not None:
                self._compiled.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, params)
            self._compiled[key] = future
            while len(self._compiled) > _COMPILED_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return future

    def _compile(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        grammar = grammar_of(params)  # ValueError for a constraint llguidance cannot read
        matcher = llguidance.LLMatcher(self._vocabulary(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs.{params.kind}: {matcher.get_error()}")
        return matcher

    def _vocabulary(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            config = self._model_config
            text = (Path(config.path) / "tokenizer.json").read_text()
            self._tokenizer = llguidance.LLTokenizer(text, n_vocab=config.vocab_size,
                                                     eos_token=list(config.eos_token_ids) or None)
        return self._tokenizer

    def start(self, request_id: str, compiled: llguidance.LLMatcher) -> None:
        """Give `request_id` its own matcher at the start of its grammar."""
        self._matchers[request_id] = compiled.deep_copy()

    def bitmask(self, request_ids: list[str]) -> GrammarBitmask | None:
        """Each constrained request's allowed next tokens, in `request_ids`' order; None if none is constrained."""
        rows = [request_id for request_id in request_ids if request_id in self._matchers]
        if not rows:
            return None
        for index, request_id in enumerate(rows):
            try:
                llguidance.numpy.fill_next_token_bitmask(self._matchers[request_id], self._bitmask, index)
            except BaseException as error:
                if not is_panic(error):
                    raise
                self._broken[request_id] = f"llguidance failed ({str(error)[:200]})"
                self._bitmask[index] = -1  # this step samples freely; the request fails when it is advanced
        return GrammarBitmask(req_ids=rows, words=self._bitmask[: len(rows)].tobytes())

    def accept(self, request_id: str, token_ids: list[int]) -> str | None:
        """Advance the request's matcher: None, "complete" (tokens came after the grammar had ended) or "rejected"."""
        matcher = self._matchers[request_id]
        if request_id in self._broken:
            return "rejected"
        for token_id in token_ids:
            if matcher.is_stopped():
                return "complete"
            try:
                consumed = matcher.consume_token(token_id)
            except BaseException as error:
                if not is_panic(error):
                    raise
                self._broken[request_id] = f"llguidance failed ({str(error)[:200]})"
                return "rejected"
            if not consumed:
                return "rejected"
        # A grammar just completed allows only end-of-sequence next, so the request ends the usual way.
        return None

    def rejection(self, request_id: str) -> str:
        return self._broken.get(request_id) or self._matchers[request_id].get_error()

    def is_constrained(self, request_id: str) -> bool:
        return request_id in self._matchers

    def free(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)
        self._broken.pop(request_id, None)

    @property
    def num_matchers(self) -> int:
        return len(self._matchers)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
