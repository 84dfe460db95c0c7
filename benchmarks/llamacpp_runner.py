"""llama.cpp peer for benchmarks/offline_throughput.py: greedy decoding of many sequences in one batch.

Runs inside the separate venv that benchmarks/setup_llamacpp.sh builds
(llama-cpp-python, a benchmark peer only, never a Pagoda dependency), on the
original Q4_K_M GGUF of Gemma 3 270M. llama-cpp-python's high-level `Llama`
class decodes one sequence, so this uses the low-level API: every sequence
gets its own seq id in one context, prompts are prefilled in batches of up to
`N_BATCH` tokens, then each step decodes one token of every sequence in a
single `llama_decode` call and takes the argmax of its logits row. Exactly
`max_tokens` tokens are generated per sequence: end-of-sequence is not checked.
"""

from __future__ import annotations

import os
import time

import llama_cpp
import numpy as np

# Tokens per llama_decode call during prefill; llama.cpp splits it into micro-batches itself.
N_BATCH = 2048
# Per-sequence context is rounded up to this, the granularity llama.cpp pads its cache to.
CTX_PAD = 256


def _threads() -> int:
    # Follow OMP_NUM_THREADS like the torch engines do, so a trial run on a shared machine can be held to one core.
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


class BatchedGreedy:
    """One llama.cpp model and context holding up to `n_seq` sequences of `seq_len` tokens each."""

    def __init__(self, gguf_path: str, n_seq: int, seq_len: int) -> None:
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(gguf_path.encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        per_seq = -(-seq_len // CTX_PAD) * CTX_PAD
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = n_seq * per_seq
        ctx_params.n_batch = max(N_BATCH, n_seq)
        ctx_params.n_seq_max = n_seq
        ctx_params.n_threads = ctx_params.n_threads_batch = _threads()
        self.ctx = llama_cpp.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.n_batch = ctx_params.n_batch
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """Decode (token, position, seq id, wants logits) entries; the greedy token of each logits row."""
        batch = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        status = llama_cpp.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        rows = sum(1 for entry in entries if entry[3])
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx), shape=(rows, self.n_vocab))
        return logits.argmax(axis=1)

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list[float]]:
        """Greedy continuations of all prompts at once, and per generated position the time it was known.

        Times are seconds since the call; position i's time is when every
        sequence had its i-th token (for one sequence: that token's own time).
        """
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        started = time.perf_counter()
        outputs: list[list[int]] = [[] for _ in prompts]
        # Prefill: prompts laid end to end, cut into batches; the last token of each prompt yields its first output.
        flat = [(token, pos, seq, pos == len(prompt) - 1)
                for seq, prompt in enumerate(prompts) for pos, token in enumerate(prompt)]
        for start in range(0, len(flat), self.n_batch):
            chunk = flat[start:start + self.n_batch]
            next_tokens = self._decode(chunk)
            for (_, _, seq, _), token in zip((e for e in chunk if e[3]), next_tokens):
                outputs[seq].append(int(token))
        times = [time.perf_counter() - started]
        for _ in range(max_tokens - 1):
            step = [(out[-1], len(prompt) + len(out) - 1, seq, True)
                    for seq, (prompt, out) in enumerate(zip(prompts, outputs))]
            for out, token in zip(outputs, self._decode(step)):
                out.append(int(token))
            times.append(time.perf_counter() - started)
        return outputs, times


def run_llamacpp(gguf_path: str, prompts: list[list[int]], warmup: list[list[int]], max_tokens: int,
                 stream: bool) -> dict:
    """The result dict offline_throughput.py expects, for a batch (`stream` False) or one streamed request."""
    started = time.perf_counter()
    longest = max(len(p) for p in prompts + warmup) + max_tokens
    engine = BatchedGreedy(gguf_path, max(len(prompts), len(warmup)), longest)
    startup = time.perf_counter() - started
    try:
        engine.generate(warmup, 4)
        started = time.perf_counter()
        outputs, times = engine.generate(prompts, max_tokens)
        elapsed = time.perf_counter() - started
    finally:
        engine.close()
    result = {"startup": startup, "first_tokens": outputs[0][:16]}
    if stream:
        return {**result, "token_times": times}
    return {**result, "elapsed": elapsed, "num_output_tokens": sum(len(out) for out in outputs)}
