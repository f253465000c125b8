"""Whether this machine computes in bf16 natively or emulates it.

A CPU multiplies bf16 matrices in hardware only with AMX-BF16 or AVX512-BF16 (x86) or the BF16
extension (Arm); elsewhere torch converts to float32 and back around every operation, and a bf16
run is several times slower than a float32 one (a quickstart round: 40–50 s against 4–5 s on an
AVX2 EPYC). On a CUDA GPU bf16 is native from Ampere on."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})  # x86 AMX, x86 AVX-512, Arm FEAT_BF16
CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_field(names: tuple[str, ...], cpuinfo: Path | None = None) -> str | None:
    """The first processor's value of the first of `names` in /proc/cpuinfo; None where absent."""
    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in names:
            return value.strip()
    return None


def cpu_flags(cpuinfo: Path | None = None) -> frozenset[str] | None:
    """The CPU's feature flags (x86 `flags`, Arm `Features`), or None where they cannot be read."""
    flags = cpuinfo_field(("flags", "Features"), cpuinfo)
    return None if flags is None else frozenset(flags.split())


def cpu_name(cpuinfo: Path | None = None) -> str | None:
    """The CPU's model name, e.g. 'AMD EPYC' (a record of where a measurement was taken)."""
    return cpuinfo_field(("model name",), cpuinfo)


def native_bf16(device: str | torch.device, cpuinfo: Path | None = None) -> bool | None:
    """True where bf16 runs in hardware, False where it is emulated, None where it is not known
    (a CPU whose flags cannot be read, an MPS device)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if kind != "cpu":
        return None
    flags = cpu_flags(cpuinfo)
    return None if flags is None else bool(flags & BF16_CPU_FLAGS)


def emulated_bf16_advice(setting: str, device: str | torch.device, cpuinfo: Path | None = None) -> str | None:
    """One line for a user who chose bf16 (`setting`) on a device that would emulate it; None otherwise."""
    if native_bf16(device, cpuinfo) is not False:
        return None
    return (f"{setting}=bfloat16 on a {torch.device(device).type} without native bf16 (no "
            f"{', '.join(sorted(BF16_CPU_FLAGS))} in its flags): torch emulates it, which is several times slower "
            "than float32 here; use float32 on this machine (docs/speed.md)")  # fmt: skip


def bf16_matmul_speedup(width: int, device: str | torch.device, rows: int = 256, repeats: int = 5) -> float:
    """float32 time over bf16 time of a (rows × width) @ (width × 4·width) matrix multiply (an MLP's
    up-projection at this width, at most 1024: the gain has levelled off there), median of
    `repeats` interleaved pairs after a warm-up: > 1 where bf16 multiplies faster, < 1 where it is
    emulated. A whole step gains less (its other ops do not speed up; docs/speed.md)."""
    width = min(width, 1024)
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(rows, width, generator=generator), torch.randn(width, 4 * width, generator=generator)
    pairs = {dtype: (a.to(device, dtype), b.to(device, dtype)) for dtype in (torch.float32, torch.bfloat16)}

    def seconds(dtype: torch.dtype) -> float:
        x, w = pairs[dtype]
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        started = time.perf_counter()
        for _ in range(4):
            x @ w
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        return time.perf_counter() - started

    for dtype in pairs:
        seconds(dtype)  # warm-up: kernel selection, first-touch allocation
    ratios = [seconds(torch.float32) / seconds(torch.bfloat16) for _ in range(repeats)]
    return statistics.median(ratios)
