"""Engine layer: incremental detokenization with stop strings, one instance per sequence.

Text is decoded with `tokenizers`' `DecodeStream`, primed with the tail of the
prompt so the first generated token gets its leading space right and a
multi-byte character split across tokens appears only once complete.
While a sequence runs, the last `len(longest stop) - 1` characters are held
back from the visible text: they could still turn out to be the start of a
stop string, and text once streamed cannot be taken back.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from pagoda.sampling_params import SamplingParams

# Prompt tokens used to prime the stream; enough context for any merge.
_PRIMING_TOKENS = 8


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(
            ids=prompt_token_ids[-_PRIMING_TOKENS:], skip_special_tokens=params.skip_special_tokens
        )
        self._stop = params.stop
        self._include_stop = params.include_stop_str_in_output
        # A stop string may begin this many characters before newly decoded text.
        self._stop_lookback = max(map(len, self._stop)) - 1 if self._stop else 0
        self._hold_back = 0 if self._include_stop else self._stop_lookback
        self.output_text = ""
        self._num_chars_sent = 0

    @property
    def include_stop_token(self) -> bool:
        """Whether the text of a stop token (or EOS) that ended the sequence is kept."""
        return self._include_stop

    def update(self, new_token_ids: list[int], skip_last_token: bool) -> str | None:
        """Decode new tokens; return the stop string that ended the text, if any.

        `skip_last_token`: the last id is a stop token or EOS whose text is not
        part of the output.
        """
        ids = new_token_ids[:-1] if skip_last_token else new_token_ids
        for token_id in ids:
            piece = self._stream.step(self._tokenizer, token_id)
            if not piece:
                continue
            checked_from = max(0, len(self.output_text) - self._stop_lookback)
            self.output_text += piece
            stop = self._find_stop(checked_from)
            if stop is not None:
                return stop
        return None

    def _find_stop(self, start: int) -> str | None:
        """Truncate at the earliest stop string that ends in the new text."""
        best_index, best_stop = -1, None
        for stop in self._stop:
            index = self.output_text.find(stop, start)
            if index != -1 and (best_index == -1 or index < best_index):
                best_index, best_stop = index, stop
        if best_stop is None:
            return None
        end = best_index + len(best_stop) if self._include_stop else best_index
        self.output_text = self.output_text[:end]
        return best_stop

    def get_text(self, finished: bool, delta: bool) -> str:
        """The visible text (all of it, or only what is new since the last call)."""
        length = len(self.output_text) if finished else max(0, len(self.output_text) - self._hold_back)
        if not delta:
            return self.output_text[:length]
        start = self._num_chars_sent
        self._num_chars_sent = max(start, length)
        return self.output_text[start:length]
