"""dtype "auto": bfloat16 where the hardware multiplies it natively, float32 on a CPU that would emulate it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pagoda import envs
from pagoda.engine import auto_dtype
from pagoda.engine.arg_utils import EngineArgs
from pagoda.cpu_features import cpu_flags, cpu_has_native_bf16
from pagoda.engine.auto_dtype import resolve_dtype

ZEN3_FLAGS = "fpu sse sse2 avx f16c fma avx2 bmi2 sha_ni vaes vpclmulqdq"  # AVX2 only
ZEN5_FLAGS = ZEN3_FLAGS + " avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16"
SKYLAKE_X_FLAGS = ZEN3_FLAGS + " avx512f avx512dq avx512cd avx512bw avx512vl"  # AVX-512, no bf16 dot product
SAPPHIRE_RAPIDS_FLAGS = SKYLAKE_X_FLAGS + " avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"
ARROW_LAKE_FLAGS = ZEN3_FLAGS + " avx_vnni avx_vnni_int8 avx_ne_convert"  # bf16 conversions, no dot product
GRAVITON3_FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp sve bf16 i8mm"
GRAVITON2_FEATURES = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp"


def cpuinfo(tmp_path: Path, field: str, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\n{field}\t\t: {flags}\n\nprocessor\t: 1\n{field}\t\t: x\n")
    return path


@pytest.mark.parametrize(("field", "flags", "native"), [
    ("flags", ZEN3_FLAGS, False), ("flags", ZEN5_FLAGS, True), ("flags", SKYLAKE_X_FLAGS, False),
    ("flags", SAPPHIRE_RAPIDS_FLAGS, True), ("flags", ARROW_LAKE_FLAGS, False), ("Features", GRAVITON3_FEATURES, True),
    ("Features", GRAVITON2_FEATURES, False),
])  # fmt: skip
def test_native_bf16_is_read_from_the_first_processors_flags(tmp_path: Path, field: str, flags: str,
                                                            native: bool) -> None:
    assert cpu_has_native_bf16(cpu_flags(cpuinfo(tmp_path, field, flags))) is native


def test_unreadable_cpuinfo_is_unknown(tmp_path: Path) -> None:
    assert cpu_flags(tmp_path / "missing") is None
    assert cpu_has_native_bf16(None) is None


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envs, "cuda_visible_devices", lambda: "")


def without_native_bf16(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = cpuinfo(tmp_path, "flags", ZEN3_FLAGS)
    monkeypatch.setattr(auto_dtype, "cpu_flags", lambda: cpu_flags(path))


def test_auto_is_float32_on_a_cpu_without_native_bf16(cpu_only, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    without_native_bf16(monkeypatch, tmp_path)
    with caplog.at_level(logging.INFO, logger=auto_dtype.__name__):
        assert resolve_dtype("auto") == "float32"
    assert "no native bf16" in caplog.text
    assert resolve_dtype("float16") == "float16"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=auto_dtype.__name__):
        assert resolve_dtype("bfloat16") == "bfloat16"  # asked for: kept, with a warning
    assert "slower than in float32" in caplog.text


def test_auto_is_bfloat16_where_bf16_is_native_or_unknown(cpu_only, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = cpuinfo(tmp_path, "flags", ZEN5_FLAGS)
    monkeypatch.setattr(auto_dtype, "cpu_flags", lambda: cpu_flags(path))
    with caplog.at_level(logging.WARNING, logger=auto_dtype.__name__):
        assert resolve_dtype("auto") == "bfloat16"
        assert resolve_dtype("bfloat16") == "bfloat16"
    assert not caplog.records
    monkeypatch.setattr(auto_dtype, "cpu_flags", lambda: None)
    assert resolve_dtype("auto") == "bfloat16"


def test_auto_is_bfloat16_when_a_gpu_is_visible(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    without_native_bf16(monkeypatch, tmp_path)
    monkeypatch.setattr(envs, "cuda_visible_devices", lambda: None)
    monkeypatch.setattr(auto_dtype.os.path, "exists", lambda path: path == "/proc/driver/nvidia/version")
    assert resolve_dtype("auto") == "bfloat16"


def test_the_engine_config_carries_the_resolved_dtype(cpu_only, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path, gemma_path: Path) -> None:
    without_native_bf16(monkeypatch, tmp_path)
    assert EngineArgs(model=str(gemma_path)).create_config().model_config.dtype == "float32"
    assert EngineArgs(model=str(gemma_path), dtype="bfloat16").create_config().model_config.dtype == "bfloat16"
