"""`/metrics`' grouped collector: cumulative numbers are counters (`_total`), cache levels are gauges."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from pagoda.entrypoints.openai.metrics import _MM_GAUGES, GroupedMetrics


def test_levels_are_gauges_and_totals_are_counters():
    registry = CollectorRegistry()
    collector = GroupedMetrics("m", "mm", "Image caches", "cache", gauges=_MM_GAUGES)
    registry.register(collector)
    collector.snapshot = {"encoder_cache": {"hits": 7.0, "entries": 3.0, "referenced": 0.0, "free_rows": 12.0},
                          "encoder": {"encoded_items": 5.0, "cached_items": 2.0}}
    text = generate_latest(registry).decode()
    assert 'pagoda:mm_hits_total{cache="encoder_cache",model_name="m"} 7.0' in text
    assert 'pagoda:mm_encoded_items_total{cache="encoder",model_name="m"} 5.0' in text
    for gauge, cache, value in [("entries", "encoder_cache", 3.0), ("referenced", "encoder_cache", 0.0),
                                ("free_rows", "encoder_cache", 12.0), ("cached_items", "encoder", 2.0)]:
        assert f"# TYPE pagoda:mm_{gauge} gauge" in text
        assert f'pagoda:mm_{gauge}{{cache="{cache}",model_name="m"}} {value}' in text
        assert f"pagoda:mm_{gauge}_total" not in text
