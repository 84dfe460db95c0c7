"""A Redis tier behind a password and TLS (`rediss://`), on a real redis-server with certificates made here:
entries round-trip through `--kv-store`'s own spec; a wrong password or an unknown CA keeps the tier down
(misses, never a crash); bad TLS parameters are refused by the spec parser, naming them."""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path

import numpy as np
import pytest
from kvstore_helpers import make_entry, make_key
from redis_server import RedisServer, redis_server_available

from pagoda.kv_store_spec import parse_kv_store_spec
from pagoda.kvstore.build import build_storage_manager
from pagoda.kvstore.entry import entry_to_numpy
from pagoda.kvstore.tiers.redis import RedisTier

PASSWORD = "s3cret-pass"
VALUES = np.arange(16, dtype=np.float32)

pytestmark = pytest.mark.skipif(not redis_server_available(), reason="redis-server is not installed")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _signed(directory: Path, name: str, subject: str, ca: tuple[Path, Path], extensions: str | None) -> None:
    key, request, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
             "-out", str(request), "-subj", subject)
    sign = ["x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
            "-out", str(cert), "-days", "2"]
    if extensions is not None:
        (directory / f"{name}.ext").write_text(extensions)
        sign += ["-extfile", str(directory / f"{name}.ext")]
    _openssl(*sign)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it; and a stranger CA."""
    directory = tmp_path_factory.mktemp("tls")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(directory / f"{ca}.key"), "-out", str(directory / f"{ca}.crt"), "-days", "2",
                 "-subj", f"/CN=pagoda-test-{ca}")
    ca = (directory / "ca.crt", directory / "ca.key")
    _signed(directory, "server", "/CN=127.0.0.1", ca, "subjectAltName=IP:127.0.0.1\n")
    _signed(directory, "client", "/CN=pagoda-client", ca, None)
    return directory


class TLSRedisServer(RedisServer):
    """redis-server speaking only TLS, asking a client certificate and a password."""

    def __init__(self, certificates: Path) -> None:
        super().__init__()
        self.certificates = certificates

    def command(self) -> list[str]:
        c = self.certificates
        return [*super().command(), "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(c / "server.crt"),
                "--tls-key-file", str(c / "server.key"), "--tls-ca-cert-file", str(c / "ca.crt"),
                "--requirepass", PASSWORD]

    def url_with(self, password: str = PASSWORD, ca: str = "ca.crt") -> str:
        c = self.certificates
        return (f"rediss://:{password}@127.0.0.1:{self.port}/0?ssl_ca_certs={c / ca}"
                f"&ssl_certfile={c / 'client.crt'}&ssl_keyfile={c / 'client.key'}")

    def _answers_ping(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.certificates / "ca.crt"))
        context.load_cert_chain(self.certificates / "client.crt", self.certificates / "client.key")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw, \
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(b"-NOAUTH")
        except OSError:
            return False


@pytest.fixture
def tls_redis(certificates: Path):
    with TLSRedisServer(certificates) as server:
        yield server


def test_entries_round_trip_over_tls_with_a_password(tls_redis: TLSRedisServer) -> None:
    spec = parse_kv_store_spec(f"cpu:1MiB,{tls_redis.url_with()}+namespace=tls")
    assert parse_kv_store_spec(str(spec)) == spec
    writer, reader = build_storage_manager(spec), build_storage_manager(spec)
    try:
        writer.put(make_key(0), VALUES, VALUES.shape, "float32")
        hit = reader.get(make_key(0))
        assert hit is not None and hit.tier == "redis"
        np.testing.assert_array_equal(entry_to_numpy(hit.entry), VALUES)
    finally:
        writer.close()
        reader.close()


@pytest.mark.parametrize("wrong", ["password", "ca"])
def test_a_wrong_password_or_an_unknown_ca_keeps_the_tier_down(tls_redis: TLSRedisServer, wrong: str) -> None:
    url = tls_redis.url_with(password="not-it") if wrong == "password" else tls_redis.url_with(ca="other-ca.crt")
    tier = RedisTier(url, retry_interval_s=60)
    key = make_key(0)
    try:
        assert tier.put(key, make_entry(key)) is False
        assert tier.get(key) is None and tier.is_down
    finally:
        tier.close()


def test_plain_redis_url_cannot_reach_a_tls_only_server(tls_redis: TLSRedisServer) -> None:
    tier = RedisTier(f"redis://:{PASSWORD}@127.0.0.1:{tls_redis.port}/0", retry_interval_s=60)
    try:
        assert tier.get(make_key(0)) is None and tier.is_down
    finally:
        tier.close()


@pytest.mark.parametrize(("spec", "message"), [
    ("redis://127.0.0.1:6379/0?ssl_ca_certs=/ca.crt", "only for rediss://"),
    ("rediss://127.0.0.1:6380/0?ssl_ca=/ca.crt", "unknown TLS parameter 'ssl_ca'"),
    ("rediss://127.0.0.1:6380/0?ssl_ca_certs=", "ssl_ca_certs needs a value"),
    ("rediss://127.0.0.1:6380/0?ssl_cert_reqs=always", "ssl_cert_reqs is required, optional or none"),
    ("rediss://127.0.0.1:6380/0#frag", "no fragment"),
])
def test_bad_tls_parameters_are_refused_naming_them(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_kv_store_spec(spec)
