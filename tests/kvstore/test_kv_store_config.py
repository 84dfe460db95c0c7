"""`--kv-store` syntax: valid specs round-trip through str(), every mistake is named, configs build into tiers."""

from __future__ import annotations

import pickle
from pathlib import Path

import msgspec
import pytest

from pagoda.config import KVTransferConfig
from pagoda.kv_store_spec import EVICTION_POLICIES, KVStoreConfig, TierSpec, format_size, parse_kv_store_spec, parse_size
from pagoda.kvstore.build import build_storage_manager
from pagoda.kvstore.policies import make_policy
from pagoda.kvstore.tiers.cpu import CPUTier
from pagoda.kvstore.tiers.disk import DiskTier
from pagoda.kvstore.tiers.redis import RedisTier

EXAMPLE = "cpu:4GiB,disk:/var/cache/pagoda-kv:20GiB+policy=lfu,redis://127.0.0.1:6379/0+namespace=team"


def test_the_documented_example() -> None:
    config = parse_kv_store_spec(EXAMPLE)
    assert config.tiers == (
        TierSpec(kind="cpu", size_bytes=4 << 30),
        TierSpec(kind="disk", path="/var/cache/pagoda-kv", size_bytes=20 << 30, policy="lfu"),
        TierSpec(kind="redis", url="redis://127.0.0.1:6379/0", namespace="team"),
    )
    assert str(config) == EXAMPLE
    assert config.tier_names() == ["cpu", "disk", "redis"]


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("cpu:512MiB", "cpu:512MiB"),
        ("cpu:1.5GB+policy=MRU", "cpu:1500MB+policy=mru"),
        ("cpu:800MB , disk:relative/dir:1024", "cpu:800MB,disk:relative/dir:1KiB"),
        ("cpu:1000+policy=lru", "cpu:1KB"),  # the default policy is not written out
        ("disk:/mnt/a:b:2gib+readonly", "disk:/mnt/a:b:2GiB+readonly"),  # the size follows the last ':'
        ("cpu:1GiB,redis://:s3cret@cache.local:6380/2+writeonly", "cpu:1GiB,redis://:s3cret@cache.local:6380/2+writeonly"),
        ("redis://h/0+namespace=a,redis://h/0+namespace=b+readonly", "redis://h/0+namespace=a,redis://h/0+readonly+namespace=b"),
        ("redis://h:1/0+namespace=pagoda-kv", "redis://h:1/0"),
    ],
)  # fmt: skip
def test_valid_specs_round_trip_through_str(spec: str, canonical: str) -> None:
    config = parse_kv_store_spec(spec)
    assert str(config) == canonical
    assert parse_kv_store_spec(str(config)) == config


def test_configs_cross_process_boundaries() -> None:
    config = parse_kv_store_spec(EXAMPLE)
    assert pickle.loads(pickle.dumps(config)) == config
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(config), type=KVStoreConfig) == config
    assert msgspec.json.decode(msgspec.json.encode(config), type=KVStoreConfig) == config


def test_decoding_checks_again() -> None:
    bad = msgspec.json.encode({"tiers": [{"kind": "cpu", "size_bytes": 0}]})
    with pytest.raises(msgspec.ValidationError, match="size must be positive"):
        msgspec.json.decode(bad, type=KVStoreConfig)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "--kv-store is empty"),
        ("cpu:1GiB,,disk:/x:1GiB", "tier 2 is empty"),
        ("gpu:4GiB", "item 'gpu:4GiB': unknown tier kind 'gpu'; expected cpu:SIZE, disk:PATH:SIZE, redis://"),
        ("redis:host:6379", "item 'redis:host:6379': expected redis://HOST:PORT/DB"),
        ("cpu", "item 'cpu': missing size: expected cpu:SIZE"),
        ("disk:/x:", "item 'disk:/x:': missing size"),
        ("disk::1GiB", "item 'disk::1GiB': missing path"),
        ("disk:1GiB", "item 'disk:1GiB': missing path and size"),
        ("cpu:4XB", "item 'cpu:4XB': bad size '4XB': expected a number with an optional unit"),
        ("cpu:4G", "bad size '4G'"),
        ("cpu:0", "bad size '0': must be positive"),
        ("cpu:1.5", "bad size '1.5': not a whole number of bytes"),
        ("cpu:1GiB+compress", r"item 'cpu:1GiB\+compress': unknown option \+compress; expected \+policy"),
        ("cpu:1GiB+policy=random", r"eviction policy must be one of \['fifo', 'lfu', 'lru', 'mru'\], got 'random'"),
        ("cpu:1GiB+policy", r"option \+policy needs a value"),
        ("redis://h/0+readonly=yes", r"option \+readonly takes no value"),
        ("cpu:1GiB+policy=lru+policy=lfu", r"option \+policy is given twice"),
        ("redis://h/0+policy=lfu", r"option \+policy does not apply to a redis tier"),
        ("cpu:1GiB+namespace=x", r"option \+namespace does not apply to a cpu tier"),
        ("cpu:1GiB+readonly", r"option \+readonly does not apply to a cpu tier \(a CPU tier starts empty"),
        ("disk:/x:1GiB+readonly+writeonly", r"\+readonly and \+writeonly cannot be combined"),
        ("cpu:1GiB,cpu:2GiB", "'cpu:2GiB' repeats a cpu tier listed before"),
        ("disk:/a:1GiB,disk:/b:1GiB", "'disk:/b:1GiB' repeats a disk tier listed before"),
        ("redis://h/0,redis://h/0", "'redis://h/0' repeats a Redis URL and namespace"),
        ("disk:/x:1GiB,cpu:1GiB", "the cpu tier 'cpu:1GiB' must come first"),
        ("redis://h:port/0", "the port must be a number"),
        ("redis:///0", "missing host"),
        ("redis://h/zero", "the database after '/' must be a number, got 'zero'"),
        ("redis://h/0?db=1", "a query is only for rediss:// "),
        ("redis://h/0+namespace=a b", "namespace must be letters, digits or '._:-'"),
    ],
)  # fmt: skip
def test_every_mistake_is_named(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_kv_store_spec(spec)


def test_errors_never_show_a_redis_password() -> None:
    with pytest.raises(ValueError) as failure:
        parse_kv_store_spec("redis://:hunter2@h:99999/0")
    assert "hunter2" not in str(failure.value) and ":***@h:99999" in str(failure.value)
    with pytest.raises(ValueError) as failure:
        parse_kv_store_spec("redis://:hunter2@h/0,redis://:hunter2@h/0")
    assert "hunter2" not in str(failure.value)


def test_sizes() -> None:
    assert parse_size("4GiB") == 4 << 30
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("512mib") == 512 << 20
    assert parse_size("1024") == parse_size("1024B") == 1024
    assert [format_size(n) for n in (4 << 30, 1_500_000_000, 1000, 1023)] == ["4GiB", "1500MB", "1KB", "1023"]


def test_structs_check_their_fields() -> None:
    with pytest.raises(ValueError, match="a disk tier needs path"):
        TierSpec(kind="disk", size_bytes=1)
    with pytest.raises(ValueError, match="a redis tier takes no size"):
        TierSpec(kind="redis", url="redis://h/0", size_bytes=1)
    with pytest.raises(ValueError, match="at least one tier"):
        KVStoreConfig(())


def test_the_spec_names_exactly_the_policies_the_store_has() -> None:
    assert [make_policy(name).name for name in EVICTION_POLICIES] == list(EVICTION_POLICIES)
    with pytest.raises(ValueError) as failure:
        make_policy("random")
    assert f"must be one of {sorted(EVICTION_POLICIES)}" in str(failure.value)


def test_the_transfer_config_holds_a_parsed_spec_only() -> None:
    assert KVTransferConfig(parse_kv_store_spec("cpu:1GiB")).kv_store.tiers[0].size_bytes == 1 << 30
    with pytest.raises(ValueError, match="kv_store must be a parsed KVStoreConfig"):
        KVTransferConfig("cpu:1GiB")  # type: ignore[arg-type]


def test_redis_tiers_are_numbered_after_the_first() -> None:
    config = parse_kv_store_spec("cpu:1GiB,redis://a/0,redis://b/0+readonly,redis://c/0")
    assert config.tier_names() == ["cpu", "redis", "redis2", "redis3"]


def test_build_opens_each_tier_with_its_options(tmp_path: Path) -> None:
    spec = f"cpu:1MiB+policy=fifo,disk:{tmp_path}:2MiB+readonly,redis://127.0.0.1:1/0+writeonly+namespace=t"
    manager = build_storage_manager(parse_kv_store_spec(spec))
    cpu, disk, redis = manager.tiers
    assert isinstance(cpu, CPUTier) and cpu.capacity_bytes == 1 << 20 and cpu._policy.name == "fifo"
    assert isinstance(disk, DiskTier) and disk.directory == tmp_path and disk.capacity_bytes == 2 << 20
    assert isinstance(redis, RedisTier) and redis.namespace == "t" and redis.name == "redis"
    assert manager.readonly == {"disk"} and manager.writeonly == {"redis"}
    manager.close()
