"""Engine layer: what `dtype="auto"` means on the machine the engine starts on, decided without importing torch.

bfloat16 halves the bytes every step reads, and on a GPU or a CPU with
native bf16 matrix units (AVX-512 / AVX512_BF16 / AMX on x86, the BF16
extension on Arm) its GEMMs run at least as fast as float32's. On a CPU
without them (AVX2-only x86: most desktop and many cloud chips) oneDNN has
no bf16 kernel and torch falls back to a generic one: measured on a 2-core
AVX2 EPYC, `F.linear` on Gemma 3 270M's shapes ran 15-18 GFLOP/s in bf16
against 106-138 in float32 with 64-2048 rows. There "auto" is float32.

The CPU test mirrors torch's own (`torch.ops.mkldnn._is_mkldnn_bf16_supported`,
which a test checks it against) from /proc/cpuinfo, because the front end
must not pay torch's import to read one flag. Unknown (no /proc/cpuinfo)
keeps bfloat16, the choice before this check existed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pagoda import envs

logger = logging.getLogger(__name__)

PREFERRED = "bfloat16"
WITHOUT_NATIVE_BF16 = "float32"

# oneDNN's bf16 paths on x86: AVX-512 core (bf16 by conversion, AVX512_BF16 or AMX-BF16 on top), or
# AVX2 with AVX-VNNI and AVX-NE-CONVERT (its "avx2_vnni_2" level).
_X86_AVX512_CORE = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})
_X86_AVX2_VNNI_2 = frozenset({"avx2", "avx_vnni", "avx_ne_convert"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The first processor's feature flags (x86 "flags", Arm "Features"); None when they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def cpu_has_native_bf16(flags: frozenset[str] | None) -> bool | None:
    """Whether the CPU runs bf16 GEMMs natively (None: unknown)."""
    if flags is None:
        return None
    return _X86_AVX512_CORE <= flags or _X86_AVX2_VNNI_2 <= flags or "bf16" in flags  # Arm: "bf16"


def gpu_visible() -> bool:
    """Whether an NVIDIA or AMD GPU driver is present and not hidden (where `select_device` would pick CUDA)."""
    if envs.cuda_visible_devices() in ("", "-1"):
        return False
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/kfd")


def resolve_dtype(requested: str) -> str:
    """The dtype to run: `requested` itself unless it is "auto"; warns about explicit bf16 on a CPU without it."""
    on_cpu = not gpu_visible()
    native = cpu_has_native_bf16(cpu_flags()) if on_cpu else True
    if requested == "auto":
        if native is False:
            logger.info("dtype auto: float32, since this CPU has no native bf16 matrix multiply (no AVX-512 "
                        "or BF16 extension), where bf16 GEMMs run several times slower than float32")
            return WITHOUT_NATIVE_BF16
        return PREFERRED
    if requested == "bfloat16" and native is False:
        logger.warning("dtype bfloat16 on a CPU without native bf16 matrix multiply (no AVX-512 or BF16 "
                       "extension): GEMMs run several times slower than in float32 (dtype auto picks float32)")
    return requested
