"""Processor caches: LRU by bytes; the mirrored sender/receiver pair agrees and recovers from drift."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.core.multimodal import MultiModalFeature, PixelData, PlaceholderRange
from pagoda.multimodal.processor_cache import (
    LRUByteCache,
    ProcessedImage,
    ProcessorCache,
    ReceiverCache,
    SenderCache,
)


def feature(identifier: str, num_bytes: int, with_pixels: bool = True) -> MultiModalFeature:
    pixels = PixelData(shape=(num_bytes,), dtype="uint8", data=bytes([len(identifier) % 256]) * num_bytes)
    return MultiModalFeature(identifier=identifier, position=PlaceholderRange(0, 6, ((1, 5),)), num_crops=1,
                             pixel_values=pixels if with_pixels else None)


def test_lru_order_byte_bound_and_counters() -> None:
    cache: LRUByteCache[str] = LRUByteCache(100)
    assert cache.put("a", "A", 40) and cache.put("b", "B", 40)
    assert cache.get("a") == "A"  # a is now the most recently used
    assert cache.put("c", "C", 40)  # evicts b, the least recently used
    assert cache.keys() == ["a", "c"]
    assert cache.get("b") is None
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (1, 1, 1)
    assert (cache.stats.num_bytes, cache.stats.num_entries) == (80, 2)
    assert cache.put("d", "D", 100)  # exactly the capacity: everything else goes
    assert cache.keys() == ["d"] and cache.stats.evictions == 3 and cache.stats.num_bytes == 100
    assert not cache.put("e", "E", 101)  # larger than the whole cache: not stored, nothing evicted
    assert cache.keys() == ["d"]
    assert cache.put("d", "D2", 10) and cache.stats.num_bytes == 10  # replacing re-counts its bytes
    assert cache.pop("d") == "D2" and cache.stats.num_bytes == 0 and cache.stats.evictions == 3


def test_capacity_zero_disables() -> None:
    cache = ProcessorCache(0)
    processed = ProcessedImage(PixelData((1,), "uint8", b"\0"), 0)
    cache.put("a", processed)
    assert cache.get("a") is None and cache.stats.misses == 1 and cache.stats.num_entries == 0
    sender, receiver = SenderCache(0), ReceiverCache(0)
    assert sender.must_send("a", 1) and sender.must_send("a", 1)
    filled, missing = receiver.fill([feature("a", 1)])
    assert missing == [] and filled[0].pixel_values is not None
    assert receiver.stats.num_entries == 0


def test_processor_cache_returns_what_was_stored() -> None:
    cache = ProcessorCache(1 << 10)
    processed = ProcessedImage(PixelData((2, 4), "float32", bytes(32)), 1)
    cache.put("h", processed)
    assert cache.get("h") is processed and cache.stats.hits == 1 and cache.stats.num_bytes == 32


def test_sender_strips_pixels_the_receiver_holds() -> None:
    sender, receiver = SenderCache(100), ReceiverCache(100)
    sent = sender.strip([feature("a", 30), feature("b", 30), feature("a", 30)])
    assert [f.pixel_values is not None for f in sent] == [True, True, False]
    filled, missing = receiver.fill(sent)
    assert missing == [] and all(f.pixel_values is not None for f in filled)
    assert filled[2].pixel_values == filled[0].pixel_values


def test_receiver_reports_a_miss_and_the_resend_recovers() -> None:
    sender, receiver = SenderCache(100), ReceiverCache(100)
    receiver.fill(sender.strip([feature("a", 30)]))
    # Drift: the engine side lost its entry (say, a restart); the front end still thinks it is there.
    receiver_fresh = ReceiverCache(100)
    request = [feature("a", 30), feature("b", 30)]
    filled, missing = receiver_fresh.fill(sender.strip(request))
    assert missing == ["a"] and filled[0].pixel_values is None and receiver_fresh.stats.misses == 1
    sender.forget(missing)
    filled, missing = receiver_fresh.fill(sender.strip(request))
    assert missing == [] and all(f.pixel_values is not None for f in filled)


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(0, 120),
       requests=st.lists(st.lists(st.tuples(st.sampled_from("abcdefg"), st.integers(1, 60)), min_size=1, max_size=4),
                         max_size=30))
def test_mirrored_caches_agree_under_any_call_sequence(capacity: int, requests: list[list[tuple[str, int]]]) -> None:
    sender, receiver = SenderCache(capacity), ReceiverCache(capacity)
    sizes: dict[str, int] = {}
    for request in requests:
        # An image's pixels have one size: its key is its content.
        features = [feature(key, sizes.setdefault(key, size)) for key, size in request]
        filled, missing = receiver.fill(sender.strip(features))
        assert missing == []
        assert [f.pixel_values for f in filled] == [f.pixel_values for f in features]
        assert sender.keys() == receiver.keys()
        assert sender.stats.num_bytes == receiver.stats.num_bytes <= capacity
        assert sender.stats.evictions == receiver.stats.evictions


@settings(max_examples=100, deadline=None)
@given(capacity=st.integers(1, 120),
       steps=st.lists(st.tuples(st.lists(st.sampled_from("abcde"), min_size=1, max_size=3), st.booleans()),
                      max_size=25))
def test_drift_is_always_recovered_by_resending(capacity: int, steps: list[tuple[list[str], bool]]) -> None:
    sender, receiver = SenderCache(capacity), ReceiverCache(capacity)
    for keys, engine_restarts in steps:
        if engine_restarts:
            receiver = ReceiverCache(capacity)  # the engine side lost everything; the sender does not know
        features = [feature(key, 20) for key in keys]
        filled, missing = receiver.fill(sender.strip(features))
        if missing:
            sender.forget(missing)
            filled, missing = receiver.fill(sender.strip(features))
        assert missing == []
        assert [f.pixel_values for f in filled] == [f.pixel_values for f in features]
