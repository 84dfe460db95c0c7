"""Shared contract: the `--kv-store` tier list, parsed once into a checked tree of frozen dataclasses.

Syntax: comma-separated tiers, fastest first; each tier is one of

    cpu:SIZE                     local CPU memory (at most once, and first when present)
    disk:PATH:SIZE               local disk directory (at most once)
    redis://HOST:PORT/DB         a Redis server shared by every engine naming it
    redis://:PASSWORD@HOST:PORT/DB
    rediss://HOST:PORT/DB        the same over TLS; the server's CA and a client
                                 certificate as query parameters, e.g.
                                 rediss://h:6380/0?ssl_ca_certs=/etc/ca.crt&ssl_certfile=/etc/c.crt&ssl_keyfile=/etc/c.key

followed by any of these `+option` suffixes:

    +policy=lru|fifo|lfu|mru     eviction policy (cpu, disk; default lru)
    +readonly                    read, never written or removed (disk, redis)
    +writeonly                   written, never read, e.g. to warm a shared Redis (disk, redis)
    +namespace=NAME              key namespace shared by the engines that should share KV
                                 (redis; default pagoda-kv)

SIZE is a number with an optional unit: 4GiB, 512MiB, 1.5GB, 800MB or 1024
(bytes); units B, KB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB
(powers of 1024), case-insensitive. PATH may contain ':' (the size follows
the last one) but not ',' or '+'; a Redis password containing them must be
percent-encoded. Example:

    cpu:4GiB,disk:/var/cache/pagoda-kv:20GiB+policy=lfu,redis://127.0.0.1:6379/0+namespace=team

Tiers are named cpu, disk, redis, then redis2, redis3, ... for further Redis
servers; metrics and per-request hits use these names. The configs are
plain data beside `pagoda.config` (which holds one inside
`KVTransferConfig`): picklable and msgspec-encodable (they travel inside the
engine config to the engine process), checked again whenever they are built
or decoded, and `str()` renders the canonical spec, which parses back to an
equal config. This module imports nothing of the store itself (no tiers, no
Redis client): validating a config costs a parse, not an import of every
tier; `pagoda.kvstore.build` opens the tiers a config names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

KINDS = ("cpu", "disk", "redis")
DEFAULT_POLICY = "lru"
DEFAULT_NAMESPACE = "pagoda-kv"
FORMS = "cpu:SIZE, disk:PATH:SIZE, redis://HOST:PORT/DB or rediss://HOST:PORT/DB (TLS)"
REDIS_SCHEMES = ("redis://", "rediss://")
# What a rediss:// URL's query may set (redis-py reads them): the CA, a client certificate, the checks.
TLS_PARAMETERS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
# The names `pagoda.kvstore.policies.make_policy` accepts (a test keeps the two in step).
EVICTION_POLICIES = ("fifo", "lfu", "lru", "mru")

# Largest first: rendering takes the first unit that divides the size exactly, the shortest exact form.
_UNITS: dict[str, int] = {
    "TiB": 1 << 40, "TB": 10**12, "GiB": 1 << 30, "GB": 10**9, "MiB": 1 << 20, "MB": 10**6,
    "KiB": 1 << 10, "KB": 10**3, "B": 1,
}  # fmt: skip
_UNITS_LOWER = {unit.lower(): factor for unit, factor in _UNITS.items()}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)([A-Za-z]*)")
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9._:-]+")
# user:password@ after the scheme; a regex rather than urlsplit, which raises on some malformed URLs.
_PASSWORD_RE = re.compile(r"(://[^:@/]*:)[^@/]*@")
# Which options each kind accepts.
_OPTIONS: dict[str, tuple[str, ...]] = {
    "cpu": ("policy",),
    "disk": ("policy", "readonly", "writeonly"),
    "redis": ("readonly", "writeonly", "namespace"),
}
_FLAG_OPTIONS = ("readonly", "writeonly")
_VALUE_OPTIONS = ("policy", "namespace")


def parse_size(text: str) -> int:
    """Bytes in a size like 4GiB, 1.5GB or 1024; ValueError naming the text otherwise."""
    match = _SIZE_RE.fullmatch(text.strip())
    expected = "a number with an optional unit B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. 4GiB, 512MiB, 1.5GB, 1024)"
    if match is None or match.group(2).lower() not in {"", *_UNITS_LOWER}:
        raise ValueError(f"bad size {text!r}: expected {expected}")
    try:
        num_bytes = Decimal(match.group(1)) * _UNITS_LOWER.get(match.group(2).lower(), 1)
    except InvalidOperation:
        raise ValueError(f"bad size {text!r}: expected {expected}") from None
    if num_bytes != num_bytes.to_integral_value():
        raise ValueError(f"bad size {text!r}: not a whole number of bytes")
    if num_bytes <= 0:
        raise ValueError(f"bad size {text!r}: must be positive")
    return int(num_bytes)


def format_size(num_bytes: int) -> str:
    """The shortest exact rendering of a size: 4GiB, 1500MB, 1000."""
    for unit, factor in _UNITS.items():
        if factor > 1 and num_bytes % factor == 0:
            return f"{num_bytes // factor}{unit}"
    return str(num_bytes)


def redact_url(url: str) -> str:
    """The URL with its password masked, for logs and error messages; works on malformed URLs too."""
    return _PASSWORD_RE.sub(r"\1***@", url)


def _check_option_applies(kind: str, option: str) -> None:
    if option not in _OPTIONS[kind]:
        why = " (a CPU tier starts empty in each engine)" if option in _FLAG_OPTIONS else ""
        raise ValueError(
            f"option +{option} does not apply to a {kind} tier{why}; "
            f"it takes {', '.join('+' + name for name in _OPTIONS[kind])}"
        )


def _check_redis_url(url: str) -> None:
    shown = redact_url(url)
    if not url.startswith(REDIS_SCHEMES):
        raise ValueError(f"bad Redis URL {shown!r}: expected redis://HOST:PORT/DB or rediss://HOST:PORT/DB")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"bad Redis URL {shown!r}: {exc} (expected redis://HOST:PORT/DB)") from None
    try:
        parts.port  # noqa: B018  # urlsplit checks the port only when it is read
    except ValueError:
        raise ValueError(f"bad Redis URL {shown!r}: the port must be a number from 0 to 65535") from None
    if not parts.hostname:
        raise ValueError(f"bad Redis URL {shown!r}: missing host (expected redis://HOST:PORT/DB)")
    if parts.fragment:
        raise ValueError(f"bad Redis URL {shown!r}: no fragment allowed (options go after '+')")
    if parts.query:
        _check_tls_query(shown, parts.scheme, parts.query)
    database = parts.path.lstrip("/")
    if database and not database.isdigit():
        raise ValueError(f"bad Redis URL {shown!r}: the database after '/' must be a number, got {database!r}")


def _check_tls_query(shown: str, scheme: str, query: str) -> None:
    if scheme != "rediss":
        raise ValueError(f"bad Redis URL {shown!r}: a query is only for rediss:// (TLS) parameters; "
                         "store options go after '+'")
    for name, _, value in (item.partition("=") for item in query.split("&")):
        if name not in TLS_PARAMETERS:
            raise ValueError(f"bad Redis URL {shown!r}: unknown TLS parameter {name!r}; expected "
                             f"{', '.join(TLS_PARAMETERS)}")
        if not value:
            raise ValueError(f"bad Redis URL {shown!r}: {name} needs a value")
        if name == "ssl_cert_reqs" and value not in ("required", "optional", "none"):
            raise ValueError(f"bad Redis URL {shown!r}: ssl_cert_reqs is required, optional or none, got {value!r}")
        if name == "ssl_check_hostname" and value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"bad Redis URL {shown!r}: ssl_check_hostname is true or false, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class TierSpec:
    """One tier of the store; fields that do not apply to its kind stay None."""

    kind: str
    size_bytes: int | None = None  # cpu, disk
    path: str | None = None  # disk
    url: str | None = None  # redis
    policy: str = DEFAULT_POLICY  # cpu, disk
    readonly: bool = False
    writeonly: bool = False
    namespace: str = DEFAULT_NAMESPACE  # redis

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown tier kind {self.kind!r}; expected {FORMS}")
        if (self.size_bytes is not None) != (self.kind in ("cpu", "disk")):
            raise ValueError(f"a {self.kind} tier {'needs' if self.size_bytes is None else 'takes no'} size")
        if self.size_bytes is not None and self.size_bytes <= 0:
            raise ValueError(f"size must be positive, got {self.size_bytes}")
        if (self.path is not None) != (self.kind == "disk"):
            raise ValueError(f"a {self.kind} tier {'needs' if self.path is None else 'takes no'} path")
        if self.path is not None and (not self.path or "," in self.path or "+" in self.path):
            raise ValueError(f"disk path must be non-empty without ',' or '+', got {self.path!r}")
        if (self.url is not None) != (self.kind == "redis"):
            raise ValueError(f"a {self.kind} tier {'needs' if self.url is None else 'takes no'} URL")
        if self.url is not None:
            _check_redis_url(self.url)
        if self.policy != DEFAULT_POLICY:
            _check_option_applies(self.kind, "policy")
            if self.policy.lower() not in EVICTION_POLICIES:
                raise ValueError(f"eviction policy must be one of {sorted(EVICTION_POLICIES)}, got {self.policy!r}")
            if self.policy != self.policy.lower():
                raise ValueError(f"policy must be lower case, got {self.policy!r}")
        if self.readonly:
            _check_option_applies(self.kind, "readonly")
        if self.writeonly:
            _check_option_applies(self.kind, "writeonly")
        if self.readonly and self.writeonly:
            raise ValueError("+readonly and +writeonly cannot be combined (the tier would be neither read nor written)")
        if self.namespace != DEFAULT_NAMESPACE:
            _check_option_applies(self.kind, "namespace")
            if not _NAMESPACE_RE.fullmatch(self.namespace):
                raise ValueError(f"namespace must be letters, digits or '._:-', got {self.namespace!r}")

    def __str__(self) -> str:
        if self.kind == "cpu":
            text = f"cpu:{format_size(self.size_bytes or 0)}"
        elif self.kind == "disk":
            text = f"disk:{self.path}:{format_size(self.size_bytes or 0)}"
        else:
            text = self.url or ""
        if self.policy != DEFAULT_POLICY:
            text += f"+policy={self.policy}"
        text += "+readonly" * self.readonly + "+writeonly" * self.writeonly
        if self.namespace != DEFAULT_NAMESPACE:
            text += f"+namespace={self.namespace}"
        return text


@dataclass(frozen=True, slots=True)
class KVStoreConfig:
    """The tiers of the store, fastest first."""

    tiers: tuple[TierSpec, ...]

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ValueError(f"the KV store needs at least one tier: {FORMS}")
        seen: set[tuple[str, str | None, str]] = set()
        for position, tier in enumerate(self.tiers):
            shown = redact_url(str(tier))
            # cpu and disk at most once; Redis once per server and namespace.
            identity = (tier.kind, tier.url, tier.namespace if tier.kind == "redis" else "")
            if identity in seen:
                what = "Redis URL and namespace" if tier.kind == "redis" else f"{tier.kind} tier"
                raise ValueError(f"{shown!r} repeats a {what} listed before; each may appear once")
            seen.add(identity)
            if tier.kind == "cpu" and position > 0:
                raise ValueError(f"the cpu tier {shown!r} must come first (tiers are listed fastest first)")

    def tier_names(self) -> list[str]:
        """Each tier's name, as metrics and store hits report it: cpu, disk, redis, redis2, ..."""
        names: list[str] = []
        counts: dict[str, int] = {}
        for tier in self.tiers:
            counts[tier.kind] = counts.get(tier.kind, 0) + 1
            names.append(tier.kind if counts[tier.kind] == 1 else f"{tier.kind}{counts[tier.kind]}")
        return names

    def __str__(self) -> str:
        return ",".join(str(tier) for tier in self.tiers)


def _parse_options(kind: str, suffixes: list[str]) -> dict[str, Any]:
    """TierSpec keyword arguments from `+option` suffixes, each known, applicable to `kind` and given once."""
    options: dict[str, Any] = {}
    known = (*_VALUE_OPTIONS, *_FLAG_OPTIONS)
    for suffix in suffixes:
        name, has_value, value = suffix.partition("=")
        if name not in known:
            raise ValueError(f"unknown option +{suffix}; expected {', '.join('+' + option for option in known)}")
        if name in options:
            raise ValueError(f"option +{name} is given twice")
        _check_option_applies(kind, name)
        if name in _FLAG_OPTIONS:
            if has_value:
                raise ValueError(f"option +{name} takes no value, got +{suffix}")
            options[name] = True
        elif not value:
            raise ValueError(f"option +{name} needs a value, e.g. +{name}={'lfu' if name == 'policy' else 'team'}")
        else:
            # Policy names are case-insensitive; the canonical form is lower case.
            options[name] = value.lower() if name == "policy" else value
    return options


def _parse_tier(item: str) -> TierSpec:
    base, *suffixes = item.split("+")
    if base.startswith(REDIS_SCHEMES):
        return TierSpec(kind="redis", url=base, **_parse_options("redis", suffixes))
    kind, _, rest = base.partition(":")
    if kind == "cpu":
        if not rest:
            raise ValueError("missing size: expected cpu:SIZE, e.g. cpu:4GiB")
        return TierSpec(kind="cpu", size_bytes=parse_size(rest), **_parse_options("cpu", suffixes))
    if kind == "disk":
        path, colon, size = rest.rpartition(":")
        if not colon or not path or not size:
            missing = "path and size" if not colon else "path" if not path else "size"
            raise ValueError(f"missing {missing}: expected disk:PATH:SIZE, e.g. disk:/var/cache/pagoda-kv:20GiB")
        return TierSpec(kind="disk", path=path, size_bytes=parse_size(size), **_parse_options("disk", suffixes))
    if kind in ("redis", "rediss"):
        raise ValueError("expected redis://HOST:PORT/DB or rediss://HOST:PORT/DB")
    raise ValueError(f"unknown tier kind {kind!r}; expected {FORMS}")


def parse_kv_store_spec(spec: str, flag: str = "--kv-store") -> KVStoreConfig:
    """The config a `--kv-store` string describes; ValueError naming the bad item and what was expected.

    `flag` names the option in messages: the encoder-cache store (`--ec-store`) uses the same syntax.
    """
    if not spec.strip():
        raise ValueError(f"{flag} is empty; expected comma-separated tiers: {FORMS}")
    tiers: list[TierSpec] = []
    for position, raw_item in enumerate(spec.split(","), start=1):
        item = raw_item.strip()
        if not item:
            raise ValueError(f"{flag} {spec!r}: tier {position} is empty; expected {FORMS}")
        try:
            tiers.append(_parse_tier(item))
        except ValueError as exc:
            raise ValueError(f"{flag} item {redact_url(item)!r}: {exc}") from None
    try:
        return KVStoreConfig(tuple(tiers))
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None
