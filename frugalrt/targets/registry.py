"""Device targets: one entry per board family, with its TVM target dict and the tools it needs.

Target dicts are the ones verified to compile with TVM 0.27 (`/work/shared/notes/tvm-0.27.md`);
TVM itself is only imported by :func:`tvm_target`, so listing targets stays cheap.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from frugalrt.errors import TargetError

Artifact = Literal["shared-lib", "c-bundle", "cuda-source"]
Runner = Literal["local", "rpc", "qemu-arm", "qemu-system", "none"]  # none: compile only here


@dataclass(frozen=True)
class DeviceTarget:
    """A compilation target: ``tvm`` is the TVM target dict (``host`` its host dict, for CUDA)."""

    name: str
    description: str
    tvm: dict[str, Any]
    artifact: Artifact = "shared-lib"
    host: Optional[dict[str, Any]] = None
    cross_cc: Optional[str] = None
    runner: Runner = "local"
    needs: tuple[str, ...] = field(default_factory=tuple)

    def missing_tools(self) -> list[str]:
        """The tools in ``needs`` that are not on PATH."""
        return [tool for tool in self.needs if shutil.which(tool) is None]


def _llvm(mtriple: str, mcpu: str, *mattr: str, **extra: Any) -> dict[str, Any]:
    target = {"kind": "llvm", "mtriple": mtriple, "mcpu": mcpu}
    if mattr:
        target["mattr"] = list(mattr)
    target.update(extra)
    return target


_ARMHF = {"mfloat-abi": "hard"}
_AARCH64_CC = "aarch64-linux-gnu-g++"
_ARMHF_CC = "arm-linux-gnueabihf-gcc"  # the C driver suffices: TVM objects need no libstdc++

TARGETS: dict[str, DeviceTarget] = {t.name: t for t in [
    DeviceTarget("host", "this machine's CPU (mcpu detected by LLVM)", {"kind": "llvm"}, needs=("g++",)),
    DeviceTarget("x86-64-v1", "any x86-64 CPU (baseline ISA, no AVX)",
                 _llvm("x86_64-linux-gnu", "x86-64"), needs=("g++",)),
    DeviceTarget("rpi4", "Raspberry Pi 4 (AArch64 Cortex-A72, NEON)",
                 _llvm("aarch64-linux-gnu", "cortex-a72", "+neon"), cross_cc=_AARCH64_CC, runner="rpc",
                 needs=(_AARCH64_CC, "qemu-aarch64")),
    DeviceTarget("rpi3", "Raspberry Pi 3 (AArch64 Cortex-A53, NEON)",
                 _llvm("aarch64-linux-gnu", "cortex-a53", "+neon"), cross_cc=_AARCH64_CC, runner="rpc",
                 needs=(_AARCH64_CC, "qemu-aarch64")),
    DeviceTarget("android-arm64", "Android phone (AArch64 Cortex-A57, NEON; linked without libc)",
                 _llvm("aarch64-linux-android", "cortex-a57", "+neon"), cross_cc=_AARCH64_CC, runner="rpc",
                 needs=(_AARCH64_CC,)),
    DeviceTarget("armv7", "32-bit ARM Linux (ARMv7-A Cortex-A7, NEON, hard float)",
                 _llvm("armv7a-linux-gnueabihf", "cortex-a7", "+neon", "+vfp4", **_ARMHF),
                 cross_cc=_ARMHF_CC, runner="qemu-arm", needs=(_ARMHF_CC, "qemu-arm")),
    DeviceTarget("rpi-zero", "Raspberry Pi Zero / 1 (ARMv6 ARM1176JZF-S, VFP, hard float)",
                 _llvm("armv6kz-linux-gnueabihf", "arm1176jzf-s", **_ARMHF),
                 cross_cc=_ARMHF_CC, runner="qemu-arm", needs=(_ARMHF_CC, "arm-none-eabi-gcc", "qemu-arm")),
    DeviceTarget("cortex-m4", "Cortex-M4F microcontroller (C bundle, no OS)",
                 {"kind": "c"}, artifact="c-bundle", runner="qemu-system",
                 needs=("arm-none-eabi-gcc", "qemu-system-arm")),
    DeviceTarget("cortex-m7", "Cortex-M7 microcontroller (C bundle, no OS)",
                 {"kind": "c"}, artifact="c-bundle", runner="qemu-system",
                 needs=("arm-none-eabi-gcc", "qemu-system-arm")),
    DeviceTarget("cuda", "NVIDIA GPU, sm_75+ (CUDA source, compile only; nvcc checks it)",
                 {"kind": "cuda", "arch": "sm_75"}, artifact="cuda-source", host={"kind": "llvm"},
                 runner="none", needs=("nvcc",)),
]}


def get_target(name: str) -> DeviceTarget:
    """The registered target ``name``; an unknown name raises TargetError listing the known ones."""
    try:
        return TARGETS[name]
    except KeyError:
        raise TargetError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)} "
                          "(see `frugalrt targets`)") from None


def tvm_target(target: DeviceTarget | str):
    """The ``tvm.target.Target`` of a DeviceTarget; ``host`` gets the CPU LLVM detects here."""
    import tvm
    from tvm.target import codegen

    target = get_target(target) if isinstance(target, str) else target
    spec = dict(target.tvm)
    if target.name == "host":
        spec["mcpu"] = codegen.llvm_get_system_cpu()
    return tvm.target.Target(spec, host=target.host) if target.host else tvm.target.Target(spec)
