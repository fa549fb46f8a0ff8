"""Device targets: one entry per board family, with its TVM target dict and the tools it needs.

Target dicts are the ones verified to compile with TVM 0.27 (`/work/shared/notes/tvm-0.27.md`);
TVM itself is only imported by :func:`tvm_target` and :func:`llvm_target_info`, so listing targets
stays cheap. :data:`X86_FEATURES` names the x86 ISA extensions an artifact records (LLVM's name ->
the Linux ``/proc/cpuinfo`` flag) and :data:`X86_LEVELS` the portable x86-64 targets, from which the
loader picks the one to suggest when a CPU lacks what an artifact was compiled for.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from frugalrt.errors import TargetError

Artifact = Literal["shared-lib", "c-bundle", "cuda-lib"]
# none: compile only here; adb: only the static runner runs it (no TVM runtime wheel for the target)
Runner = Literal["local", "rpc", "qemu-arm", "qemu-system", "adb", "cuda", "none"]


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
    DeviceTarget("x86-64-v3", "x86-64 CPUs with AVX2, FMA, BMI2 (Haswell, Zen 1 and later)",
                 _llvm("x86_64-linux-gnu", "x86-64-v3"), needs=("g++",)),
    DeviceTarget("x86-64-v4", "x86-64 CPUs with AVX-512 F/BW/CD/DQ/VL (Skylake-X, Zen 4; no VPOPCNTDQ)",
                 _llvm("x86_64-linux-gnu", "x86-64-v4"), needs=("g++",)),
    DeviceTarget("rpi4", "Raspberry Pi 4 (AArch64 Cortex-A72, NEON)",
                 _llvm("aarch64-linux-gnu", "cortex-a72", "+neon"), cross_cc=_AARCH64_CC, runner="rpc",
                 needs=(_AARCH64_CC, "qemu-aarch64")),
    DeviceTarget("rpi3", "Raspberry Pi 3 (AArch64 Cortex-A53, NEON)",
                 _llvm("aarch64-linux-gnu", "cortex-a53", "+neon"), cross_cc=_AARCH64_CC, runner="rpc",
                 needs=(_AARCH64_CC, "qemu-aarch64")),
    DeviceTarget("android-arm64", "Android phone (AArch64 Cortex-A57, NEON; linked without libc)",
                 _llvm("aarch64-linux-android", "cortex-a57", "+neon"), cross_cc=_AARCH64_CC, runner="rpc",
                 needs=(_AARCH64_CC,)),
    DeviceTarget("android-armv7", "32-bit Android phone (ARMv7-A Cortex-A9, NEON; armeabi-v7a soft-float ABI)",
                 _llvm("armv7a-linux-androideabi", "cortex-a9", "+neon", "+vfp3", **{"mfloat-abi": "soft"}),
                 cross_cc=_ARMHF_CC, runner="adb", needs=(_ARMHF_CC, "qemu-arm")),
    DeviceTarget("armv7", "32-bit ARM Linux (ARMv7-A Cortex-A7, NEON, hard float)",
                 _llvm("armv7a-linux-gnueabihf", "cortex-a7", "+neon", "+vfp4", **_ARMHF),
                 cross_cc=_ARMHF_CC, runner="qemu-arm", needs=(_ARMHF_CC, "qemu-arm")),
    DeviceTarget("rpi-zero", "Raspberry Pi Zero / 1 (ARMv6 ARM1176JZF-S, VFP, hard float)",
                 _llvm("armv6kz-linux-gnueabihf", "arm1176jzf-s", **_ARMHF),
                 cross_cc=_ARMHF_CC, runner="qemu-arm",
                 needs=(_ARMHF_CC, "arm-none-eabi-gcc", "arm-linux-gnueabi-gcc", "qemu-arm")),
    DeviceTarget("cortex-m4", "Cortex-M4F microcontroller (C bundle, no OS)",
                 {"kind": "c"}, artifact="c-bundle", runner="qemu-system",
                 needs=("arm-none-eabi-gcc", "qemu-system-arm")),
    DeviceTarget("cortex-m7", "Cortex-M7 microcontroller (C bundle, no OS)",
                 {"kind": "c"}, artifact="c-bundle", runner="qemu-system",
                 needs=("arm-none-eabi-gcc", "qemu-system-arm")),
    # cuda-lib: lib.so with an nvcc fatbin for the archs of frugalrt.targets.cuda_build.CUDA_ARCHS
    DeviceTarget("cuda", "NVIDIA GPU, sm_75 and newer (x86-64 host; SASS sm_75..sm_90, PTX for newer)",
                 {"kind": "cuda", "arch": "sm_75"}, artifact="cuda-lib", host={"kind": "llvm"},
                 runner="cuda", needs=("nvcc", "g++")),
    DeviceTarget("cuda-sm90", "NVIDIA Hopper GPU, H100 / H200 (x86-64 host; SASS and PTX sm_90)",
                 {"kind": "cuda", "arch": "sm_90"}, artifact="cuda-lib", host={"kind": "llvm"},
                 runner="cuda", needs=("nvcc", "g++")),
    DeviceTarget("jetson-orin", "NVIDIA Jetson AGX/NX/Nano Orin (AArch64 Cortex-A78AE host, GPU sm_87)",
                 {"kind": "cuda", "arch": "sm_87"}, artifact="cuda-lib",
                 host=_llvm("aarch64-linux-gnu", "cortex-a78", "+neon"), cross_cc=_AARCH64_CC,
                 runner="cuda", needs=("nvcc", _AARCH64_CC)),
]}


def get_target(name: str) -> DeviceTarget:
    """The registered target ``name``; an unknown name raises TargetError listing the known ones."""
    try:
        return TARGETS[name]
    except KeyError:
        raise TargetError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)} "
                          "(see `frugalrt targets`)") from None


def target_spec(target: DeviceTarget | str) -> dict[str, Any]:
    """The TVM target dict actually compiled for: ``host`` gets the CPU LLVM detects here as ``mcpu``."""
    target = get_target(target) if isinstance(target, str) else target
    spec = dict(target.tvm)
    if target.name == "host":
        from tvm.target import codegen

        spec["mcpu"] = str(codegen.llvm_get_system_cpu())
    return spec


def tvm_target(target: DeviceTarget | str):
    """The ``tvm.target.Target`` of a DeviceTarget; ``host`` gets the CPU LLVM detects here."""
    import tvm

    target = get_target(target) if isinstance(target, str) else target
    spec = target_spec(target)
    return tvm.target.Target(spec, host=target.host) if target.host else tvm.target.Target(spec)


# LLVM x86 feature -> /proc/cpuinfo flag, for the user-level ISA extensions that compiled kernels
# may contain (LLVM's tuning flags such as "fast-gather" and system features such as "xsave" are
# left out: they are not instructions a kernel executes).
X86_FEATURES: dict[str, str] = {
    "cmov": "cmov", "cx8": "cx8", "cx16": "cx16", "mmx": "mmx", "sahf": "lahf_lm",
    "sse": "sse", "sse2": "sse2", "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2",
    "popcnt": "popcnt", "lzcnt": "abm", "bmi": "bmi1", "bmi2": "bmi2", "movbe": "movbe", "adx": "adx",
    "aes": "aes", "pclmul": "pclmulqdq", "sha": "sha_ni", "gfni": "gfni", "vaes": "vaes",
    "vpclmulqdq": "vpclmulqdq", "f16c": "f16c", "fma": "fma", "avx": "avx", "avx2": "avx2",
    "avxvnni": "avx_vnni", "avx512f": "avx512f", "avx512cd": "avx512cd", "avx512dq": "avx512dq",
    "avx512bw": "avx512bw", "avx512vl": "avx512vl", "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2", "avx512vnni": "avx512_vnni", "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
}

_V1 = ("cmov", "cx8", "mmx", "sse", "sse2")
_V2 = _V1 + ("cx16", "sahf", "popcnt", "sse3", "ssse3", "sse4.1", "sse4.2")
_V3 = _V2 + ("avx", "avx2", "bmi", "bmi2", "f16c", "fma", "lzcnt", "movbe")
_V4 = _V3 + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
# The registered portable x86-64 targets, best first, with the LLVM features (x86-64 psABI levels)
# a CPU needs to run them.
X86_LEVELS: dict[str, tuple[str, ...]] = {"x86-64-v4": _V4, "x86-64-v3": _V3, "x86-64-v1": _V1}


def is_x86_triple(triple: str) -> bool:
    return triple.startswith(("x86_64", "i386", "i486", "i586", "i686", "amd64"))


def llvm_target_info(target: DeviceTarget | str) -> dict[str, Any] | None:
    """What an artifact's manifest records of the LLVM target it was compiled for, None for the C and
    CUDA targets: ``triple`` (LLVM's default triple when the target names none), ``mcpu``, ``mattr``
    and ``cpu_features``: on x86 the ISA extensions (LLVM names, sorted, those in X86_FEATURES) that
    mcpu + mattr enable, i.e. that the code may use; elsewhere the mattr list without its ``+``."""
    target = get_target(target) if isinstance(target, str) else target
    if target.tvm.get("kind") != "llvm":
        return None
    import tvm
    from tvm.target import codegen

    spec = target_spec(target)
    triple = str(spec.get("mtriple") or codegen.llvm_get_system_triple())
    mattr = [str(a) for a in spec.get("mattr", [])]
    if is_x86_triple(triple):
        with tvm.target.Target(spec) as tvm_spec:
            enabled = codegen.llvm_get_cpu_features(tvm_spec)
        features = sorted(str(f) for f in enabled if str(f) in X86_FEATURES)
    else:
        features = sorted(a[1:] for a in mattr if a.startswith("+"))
    return {"triple": triple, "mcpu": str(spec.get("mcpu", "generic")), "mattr": mattr, "cpu_features": features}
