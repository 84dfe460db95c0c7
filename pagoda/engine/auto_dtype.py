"""Engine layer: what `dtype="auto"` means on the machine the engine starts on, decided without importing torch.

bfloat16 halves the bytes every step reads, and on a GPU or a CPU with
native bf16 dot products (AVX512_BF16 or AMX-BF16 on x86, the BF16 extension
on Arm) its GEMMs run at least as fast as float32's. Without them torch
converts bf16 to float32 around every multiply, which costs more than the
bytes save: `F.linear` at 64 × 640 → 2048 ran 15-18 GFLOP/s in bf16 against
106-138 in float32 on a 2-core AVX2 EPYC, and 51 against 171 on a 2-core
AVX-512 Xeon without AVX512_BF16 (where oneDNN still reports bf16 support,
by conversion). There "auto" is float32.

The flags come from /proc/cpuinfo, because the front end must not pay
torch's import to read one flag. Unknown (no /proc/cpuinfo) keeps bfloat16,
the choice before this check existed.
"""

from __future__ import annotations

import logging
import os

from pagoda import envs
from pagoda.cpu_features import cpu_flags, cpu_has_native_bf16

logger = logging.getLogger(__name__)

PREFERRED = "bfloat16"
WITHOUT_NATIVE_BF16 = "float32"

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
            logger.info("dtype auto: float32, since this CPU has no native bf16 matrix multiply (no AVX512_BF16, "
                        "AMX or BF16 extension), where bf16 GEMMs run several times slower than float32")
            return WITHOUT_NATIVE_BF16
        return PREFERRED
    if requested == "bfloat16" and native is False:
        logger.warning("dtype bfloat16 on a CPU without native bf16 matrix multiply (no AVX512_BF16, AMX or BF16 "
                       "extension): GEMMs run several times slower than in float32 (dtype auto picks float32)")
    return requested
