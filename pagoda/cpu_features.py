"""Platform: the CPU's feature flags, read from /proc/cpuinfo without torch (the front end must not import it).

Used by the engine's `dtype="auto"` (engine/auto_dtype.py) and by the models'
bf16 weight packing (models/layers.py): both turn on only where the CPU has
a bf16 dot product, since elsewhere torch and oneDNN convert bf16 around
every multiply (slower than float32, and oneDNN's packed kernels then round
differently from `F.linear`).
"""

from __future__ import annotations

from pathlib import Path

# x86 flags of a bf16 dot-product instruction (vdpbf16ps, or AMX tiles); Arm's is "bf16".
_X86_BF16_DOT = frozenset({"avx512_bf16", "amx_bf16"})


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
    return bool(_X86_BF16_DOT & flags) or "bf16" in flags
