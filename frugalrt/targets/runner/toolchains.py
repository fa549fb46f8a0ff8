"""How each ARM target's static runner is built, and which qemu-user CPU runs it here.

Every runner is linked with ``-static`` against glibc from a Debian cross toolchain, so a phone
or a Pi needs no C library of ours: Android accepts static executables (they bypass its linker and
bionic), and any ARM Linux kernel >= 3.2 (glibc's floor) runs them. Debian's armhf glibc is
ARMv7/Thumb-2 code, so the ARMv6 Pi Zero gets the armel toolchain (ARMv5TE glibc, soft-float
calling convention) with VFP instructions enabled (``-mfloat-abi=softfp``). The 32-bit ARMv7
targets also get ``runner-noneon`` (VFPv3-D16 only) for old chips without NEON (Tegra 2, some
Cortex-A9s); qemu's cortex-r5f (VFPv3-D16, no NEON) runs it here.
"""
from __future__ import annotations

from dataclasses import dataclass

from frugalrt.errors import TargetError


@dataclass(frozen=True)
class RunnerBuild:
    """One runner executable of a target: file name, compiler and flags, and its qemu-user command."""

    file: str
    cc: str
    cflags: tuple[str, ...]
    qemu: tuple[str, ...]  # qemu-user command (program path appended) for tests and emulation here
    package: str  # the Debian package that provides ``cc`` with its static C library
    cpu: str  # what the build needs of the device's CPU, in words


_AARCH64 = "aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"
_ARMHF = "arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf"
_ARMEL = "arm-linux-gnueabi-gcc", "gcc-arm-linux-gnueabi"


def _aarch64(mcpu: str) -> RunnerBuild:
    return RunnerBuild("runner", _AARCH64[0], (f"-mcpu={mcpu}",), ("qemu-aarch64", "-cpu", mcpu), _AARCH64[1],
                       f"AArch64 (ARMv8-A, tuned for {mcpu})")


def _armv7(neon_fpu: str, tune: str, qemu_cpu: str) -> tuple[RunnerBuild, RunnerBuild]:
    base = ("-marm", "-march=armv7-a", "-mfloat-abi=hard", f"-mtune={tune}")
    return (RunnerBuild("runner", _ARMHF[0], (*base, f"-mfpu={neon_fpu}"), ("qemu-arm", "-cpu", qemu_cpu),
                        _ARMHF[1], f"ARMv7-A with NEON ({neon_fpu})"),
            RunnerBuild("runner-noneon", _ARMHF[0], (*base, "-mfpu=vfpv3-d16"), ("qemu-arm", "-cpu", "cortex-r5f"),
                        _ARMHF[1], "ARMv7 with VFPv3-D16, no NEON"))


RUNNER_BUILDS: dict[str, tuple[RunnerBuild, ...]] = {
    "rpi4": (_aarch64("cortex-a72"),),
    "rpi3": (_aarch64("cortex-a53"),),
    "android-arm64": (_aarch64("cortex-a57"),),
    "armv7": _armv7("neon-vfpv4", "cortex-a7", "cortex-a7"),
    "android-armv7": _armv7("neon", "cortex-a9", "cortex-a9"),
    "rpi-zero": (RunnerBuild("runner", _ARMEL[0], ("-marm", "-march=armv6kz+fp", "-mfloat-abi=softfp"),
                             ("qemu-arm", "-cpu", "arm1176"), _ARMEL[1], "ARMv6 with VFPv2 (ARM1176JZF-S)"),),
}


def runner_builds(target: str) -> tuple[RunnerBuild, ...]:
    """The runner builds of ``target``; TargetError for a target that has none."""
    try:
        return RUNNER_BUILDS[target]
    except KeyError:
        raise TargetError(f"target {target} has no static runner; runners exist for "
                          f"{', '.join(RUNNER_BUILDS)}") from None
