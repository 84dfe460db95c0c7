"""`--ec-store` / `--ec-role`: the pair builds an ECTransferConfig, every mistake is a clear ValueError, the
flags reach EngineArgs from the CLI and from LLM(...) keywords, and without a store there is no connector."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from ec_helpers import make_config

from pagoda.config import EC_ROLES, ECTransferConfig, KVTransferConfig
from pagoda.ec_connector.factory import (
    make_ec_scheduler_connector,
    make_ec_worker_connector,
    text_hidden_size,
    with_private_ec_lookup_address,
)
from pagoda.engine.arg_utils import EngineArgs, ec_transfer_config
from pagoda.entrypoints.cli import build_parser
from pagoda.entrypoints.cli_flags import engine_kwargs
from pagoda.kv_store_spec import parse_kv_store_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC = "disk:/var/cache/pagoda-ec:20GiB,redis://127.0.0.1:6379/0"


def test_the_pair_builds_the_config() -> None:
    config = ec_transfer_config(SPEC, "ec_both")
    assert config == ECTransferConfig(parse_kv_store_spec(SPEC), "ec_both")
    assert str(config.ec_store) == SPEC
    assert config.is_producer and config.is_consumer
    assert ec_transfer_config(None, None) is None
    by_role = {role: ECTransferConfig(config.ec_store, role) for role in EC_ROLES}
    roles = {role: (ec.is_producer, ec.is_consumer) for role, ec in by_role.items()}
    assert roles == {"ec_producer": (True, False), "ec_consumer": (False, True), "ec_both": (True, True)}
    assert pickle.loads(pickle.dumps(config)) == config  # it travels to the engine process inside PagodaConfig


@pytest.mark.parametrize(
    ("ec_store", "ec_role", "message"),
    [
        (None, "ec_consumer", "ec_role='ec_consumer' needs an encoder-cache store"),
        ("cpu:1GiB", None, "ec_store='cpu:1GiB' needs ec_role"),
        ("cpu:1GiB", "consumer", "ec_role must be one of ('ec_producer', 'ec_consumer', 'ec_both'), got 'consumer'"),
        ("cpu:1GiB", "", "ec_role must be one of"),
        ("floppy:1GiB", "ec_both", "--ec-store item 'floppy:1GiB': unknown tier kind 'floppy'"),
        ("", "ec_both", "--ec-store is empty"),
        ("disk:/tmp/ec", "ec_both", "--ec-store item 'disk:/tmp/ec': missing path"),
    ],
)  # fmt: skip
def test_mistakes_are_named(ec_store: str | None, ec_role: str | None, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        ec_transfer_config(ec_store, ec_role)
    # EngineArgs names them before resolving (or converting) any model.
    with pytest.raises(ValueError, match="ec_role|ec_store|--ec-store"):
        EngineArgs(model="no-such-model", ec_store=ec_store, ec_role=ec_role)


def test_a_config_takes_only_a_parsed_store() -> None:
    with pytest.raises(ValueError, match="ec_store must be a parsed KVStoreConfig"):
        ECTransferConfig("cpu:1GiB", "ec_both")  # type: ignore[arg-type]


def test_the_kv_and_ec_stores_never_share_a_disk_folder(tmp_path: Path) -> None:
    config = make_config(tmp_path, f"disk:{tmp_path}/store:1GiB", "ec_both", "ipc:///unused")
    kv = KVTransferConfig(parse_kv_store_spec(f"cpu:1GiB,disk:{tmp_path}/store/../store:1GiB"))
    with pytest.raises(ValueError, match="--kv-store and --ec-store name the same disk folder"):
        dataclasses.replace(config, kv_transfer_config=kv)
    kv = KVTransferConfig(parse_kv_store_spec(f"disk:{tmp_path}/kv:1GiB"))
    assert dataclasses.replace(config, kv_transfer_config=kv).kv_transfer_config == kv


def test_cli_flags_and_llm_keywords_reach_engine_args() -> None:
    args = build_parser().parse_args(["generate", "gemma3-270m", "--ec-store", SPEC, "--ec-role", "ec_consumer"])
    kwargs = engine_kwargs(args)
    assert kwargs["ec_store"] == SPEC and kwargs["ec_role"] == "ec_consumer"
    engine_args = EngineArgs.from_kwargs("gemma3-270m", **kwargs)  # what LLM(model, **kwargs) does
    assert (engine_args.ec_store, engine_args.ec_role) == (SPEC, "ec_consumer")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--ec-role", "both"])  # argparse names the choices
    defaults = engine_kwargs(build_parser().parse_args(["generate"]))
    assert defaults["ec_store"] is None and defaults["ec_role"] is None


def test_no_store_no_connector(tmp_path: Path) -> None:
    config = dataclasses.replace(make_config(tmp_path, "cpu:1GiB", "ec_both", "ipc:///unused"),
                                 ec_transfer_config=None)
    assert make_ec_scheduler_connector(config) is None
    assert make_ec_worker_connector(config, device=None) is None  # type: ignore[arg-type]
    assert with_private_ec_lookup_address(config) == (config, None)


def test_the_engine_gets_a_private_lookup_address(tmp_path: Path) -> None:
    config = make_config(tmp_path, "cpu:1GiB", "ec_both", None)
    private, folder = with_private_ec_lookup_address(config)
    assert folder is not None and Path(folder).is_dir()
    assert private.ec_transfer_config is not None
    assert private.ec_transfer_config.lookup_address == f"ipc://{folder}/lookup"
    assert with_private_ec_lookup_address(private) == (private, None)  # an address given is kept
    Path(folder).rmdir()


def test_hidden_size_comes_from_the_text_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"text_config": {"hidden_size": 2560}, "vision_config": {}}')
    assert text_hidden_size(tmp_path) == 2560
    (tmp_path / "config.json").write_text('{"hidden_size": 640}')
    assert text_hidden_size(tmp_path) == 640
    (tmp_path / "config.json").write_text('{"text_config": {}}')
    with pytest.raises(ValueError, match="names no hidden_size"):
        text_hidden_size(tmp_path)


def test_the_scheduler_side_never_imports_torch() -> None:
    script = ("import sys\nimport pagoda.ec_connector.factory, pagoda.ec_connector.scheduler_side\n"
              "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
