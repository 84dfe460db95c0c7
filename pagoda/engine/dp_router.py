"""Engine layer: which of N data-parallel engine cores takes a request — by load, and by prefix affinity.

Load is what the front end knows for sure (its requests in flight on each
core) plus the core's last reported queue (waiting count weighted above
running, as a waiting request is latency not yet started) and KV usage.
Affinity: a request whose leading tokens match a recent request's goes to
the core that served that one, because its prefix cache holds those blocks
— unless that core is more than `AFFINITY_SLACK` requests busier than the
least-loaded one. (vLLM's balancer looks at load only, so a repeated long
prompt lands on a core without its prefix about half the time with two.)
"""

from __future__ import annotations

from collections import OrderedDict

import xxhash

from pagoda.engine.messages import SchedulerStatsMessage

# Leading tokens that name a prefix: a system prompt or a shared document is longer than this.
AFFINITY_TOKENS = 64
AFFINITY_SLACK = 4.0
_MAX_PREFIXES = 65536
_WAITING_WEIGHT = 4


class DPRouter:
    def __init__(self, num_engines: int) -> None:
        if num_engines < 1:
            raise ValueError(f"data_parallel_size must be positive, got {num_engines}")
        self.num_engines = num_engines
        self.in_flight = [0] * num_engines
        self.stats: list[SchedulerStatsMessage | None] = [None] * num_engines
        self._engine_of: dict[str, int] = {}
        self._prefixes: OrderedDict[bytes, int] = OrderedDict()
        self.num_affine = 0

    def load(self, engine: int) -> float:
        stats = self.stats[engine]
        queued = 0.0 if stats is None else _WAITING_WEIGHT * stats.num_waiting_reqs + stats.num_running_reqs
        kv_usage = 0.0 if stats is None else stats.kv_cache_usage
        return self.in_flight[engine] + queued / 2 + kv_usage

    def route(self, request_id: str, prompt_token_ids: list[int]) -> int:
        """The core for a new request; remembered until `finished(request_id)`."""
        loads = [self.load(engine) for engine in range(self.num_engines)]
        least = min(range(self.num_engines), key=loads.__getitem__)
        key = _prefix_key(prompt_token_ids)
        chosen = least
        if key is not None:
            affine = self._prefixes.get(key)
            if affine is not None and loads[affine] <= loads[least] + AFFINITY_SLACK:
                chosen = affine
                self.num_affine += 1
            self._prefixes[key] = chosen
            self._prefixes.move_to_end(key)
            if len(self._prefixes) > _MAX_PREFIXES:
                self._prefixes.popitem(last=False)
        self._engine_of[request_id] = chosen
        self.in_flight[chosen] += 1
        return chosen

    def engine_of(self, request_id: str) -> int | None:
        return self._engine_of.get(request_id)

    def finished(self, request_id: str) -> None:
        engine = self._engine_of.pop(request_id, None)
        if engine is not None:
            self.in_flight[engine] -= 1

    def summed_stats(self) -> SchedulerStatsMessage | None:
        """Every core's last stats added up (KV usage averaged); None before any core reported."""
        reported = [stats for stats in self.stats if stats is not None]
        if not reported:
            return None
        return SchedulerStatsMessage(
            num_running_reqs=sum(s.num_running_reqs for s in reported),
            num_waiting_reqs=sum(s.num_waiting_reqs for s in reported),
            kv_cache_usage=sum(s.kv_cache_usage for s in reported) / len(reported),
            prefix_cache_queries=sum(s.prefix_cache_queries for s in reported),
            prefix_cache_hits=sum(s.prefix_cache_hits for s in reported),
            num_preemptions=sum(s.num_preemptions for s in reported),
        )


def _prefix_key(token_ids: list[int]) -> bytes | None:
    if len(token_ids) < AFFINITY_TOKENS:
        return None
    return xxhash.xxh3_128_digest(b"".join(t.to_bytes(4, "little") for t in token_ids[:AFFINITY_TOKENS]))
