"""Where a bundle runs: Cortex-M boards under qemu-system-arm and 32-bit ARM under qemu-arm.

A bundle is portable C, so any bundle builds for any platform here; the platform fixes the
compiler, its CPU flags, the memory map (linker script) and the emulator command line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from frugalrt.errors import TargetError

KB = 1024


@dataclass(frozen=True)
class Platform:
    name: str
    description: str
    cc: str
    cflags: tuple[str, ...]
    ldflags: tuple[str, ...]
    qemu: tuple[str, ...]  # emulator command, the program path is appended
    flash: Optional[tuple[int, int]] = None  # (origin, bytes) of a bare-metal board
    ram: Optional[tuple[int, int]] = None
    stack_bytes: int = 8 * KB
    heap_bytes: int = 8 * KB  # newlib's stdio buffers of the test firmware (the model itself never mallocs)

    @property
    def bare_metal(self) -> bool:
        return self.flash is not None

    @property
    def size_tool(self) -> str:
        return self.cc.replace("-gcc", "-size")

    @property
    def nm_tool(self) -> str:
        return self.cc.replace("-gcc", "-nm")


_M4 = ("-mthumb", "-mcpu=cortex-m4", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16")
_M7 = ("-mthumb", "-mcpu=cortex-m7", "-mfloat-abi=hard", "-mfpu=fpv5-d16")
_SEMIHOSTED = ("qemu-system-arm", "-nographic", "-monitor", "none", "-serial", "none",
               "-semihosting-config", "enable=on,target=native", "-kernel")
_BARE_LD = ("--specs=rdimon.specs", "-nostartfiles", "-Wl,--gc-sections")


def _board(name: str, description: str, cpu: tuple[str, ...], flash, ram) -> Platform:
    return Platform(name, description, "arm-none-eabi-gcc", cpu, _BARE_LD,
                    (*_SEMIHOSTED[:1], "-M", name, *_SEMIHOSTED[1:]), flash=flash, ram=ram)


PLATFORMS: dict[str, Platform] = {p.name: p for p in [
    _board("mps2-an386", "ARM MPS2 AN386 (Cortex-M4F, 4 MB code SSRAM, 4 MB data SSRAM)", _M4,
           (0x00000000, 4096 * KB), (0x20000000, 4096 * KB)),
    _board("mps2-an500", "ARM MPS2 AN500 (Cortex-M7, 4 MB code SSRAM, 4 MB data SSRAM)", _M7,
           (0x00000000, 4096 * KB), (0x20000000, 4096 * KB)),
    _board("netduinoplus2", "Netduino Plus 2 (STM32F405, Cortex-M4F, 1 MB flash, 128 KB RAM)", _M4,
           (0x08000000, 1024 * KB), (0x20000000, 128 * KB)),
    Platform("armv7", "32-bit ARM Linux (Cortex-A7, NEON) under qemu-arm", "arm-linux-gnueabihf-gcc",
             ("-mcpu=cortex-a7", "-mfpu=neon-vfpv4", "-mfloat-abi=hard"), ("-static",),
             ("qemu-arm", "-cpu", "cortex-a7", "-L", "/usr/arm-linux-gnueabihf")),
    Platform("rpi-zero", "ARMv6 ARM1176JZF-S (Raspberry Pi Zero): newlib + semihosting under qemu-arm",
             "arm-none-eabi-gcc", ("-marm", "-march=armv6kz+fp", "-mfloat-abi=hard"),
             ("--specs=rdimon.specs",), ("qemu-arm", "-cpu", "arm1176")),
]}

BOARDS = tuple(name for name, p in PLATFORMS.items() if p.bare_metal)
# The platform a bundle of each compile target runs on when no board is named.
DEFAULT_PLATFORM = {"cortex-m4": "mps2-an386", "cortex-m7": "mps2-an500", "armv7": "armv7",
                    "rpi-zero": "rpi-zero"}


def get_platform(name: str) -> Platform:
    try:
        return PLATFORMS[name]
    except KeyError:
        raise TargetError(f"unknown board {name!r}; known: {', '.join(PLATFORMS)}") from None


def platform_for(target_name: str, board: Optional[str] = None) -> Platform:
    """The platform that runs a bundle compiled for ``target_name`` (``board`` overrides it)."""
    if board:
        return get_platform(board)
    if target_name not in DEFAULT_PLATFORM:
        raise TargetError(f"target {target_name!r} has no C bundle platform; bundles exist for "
                          f"{', '.join(DEFAULT_PLATFORM)}")
    return get_platform(DEFAULT_PLATFORM[target_name])
