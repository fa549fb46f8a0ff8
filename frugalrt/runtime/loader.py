"""``frugalrt.load(artifact_dir, device="local") -> Session``; the ``local`` device (Relax VM here).

Before ``lib.so`` is opened, the artifact's files are checked against the manifest's sha256
(:meth:`Artifact.verify`) and the x86 ISA extensions the code was compiled for (the manifest's
``cpu_features``) against this CPU (:func:`missing_cpu_features`), so a corrupt
artifact or one built for a newer CPU is a clear error instead of a bus error or SIGILL. This CPU's
flags come from CPUID itself (run through ctypes; emulators such as qemu-user answer it for the CPU
they emulate, while their /proc/cpuinfo is the host's), intersected with /proc/cpuinfo where the
kernel has one (it drops what the OS does not enable).

The local session keeps the hot path lean (:class:`LocalSession`): per call, a dictionary lookup
by input shapes, a copy into a buffer allocated once per shape, then either the artifact's static
plan (its kernels called in order on tensors allocated once per shape, outputs copied out:
``frugalrt.runtime.plan``) or, for an artifact without one, the VM call (large aligned inputs go
through DLPack without a copy) and DLPack views of the outputs.
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import os
import platform
from typing import Any, Iterable, NamedTuple

import numpy as np

from frugalrt.errors import ArtifactError, DeviceError
from frugalrt.runtime.artifact import Artifact
from frugalrt.runtime.devices import Session, open_device, register_device
from frugalrt.runtime.plan import StaticPlan
from frugalrt.targets.registry import X86_FEATURES, X86_LEVELS, is_x86_triple

# shared libraries this x86-64 machine can load (if its CPU has what they were compiled for)
LOCAL_TARGETS = ("host", "x86-64-v1", "x86-64-v3", "x86-64-v4")

# /proc/cpuinfo flag -> (CPUID leaf, subleaf, register index eax=0 ebx=1 ecx=2 edx=3, bit)
_CPUID_BITS: dict[str, tuple[int, int, int, int]] = {
    "cx8": (1, 0, 3, 8), "cmov": (1, 0, 3, 15), "mmx": (1, 0, 3, 23), "sse": (1, 0, 3, 25), "sse2": (1, 0, 3, 26),
    "pni": (1, 0, 2, 0), "pclmulqdq": (1, 0, 2, 1), "ssse3": (1, 0, 2, 9), "fma": (1, 0, 2, 12),
    "cx16": (1, 0, 2, 13), "sse4_1": (1, 0, 2, 19), "sse4_2": (1, 0, 2, 20), "movbe": (1, 0, 2, 22),
    "popcnt": (1, 0, 2, 23), "aes": (1, 0, 2, 25), "avx": (1, 0, 2, 28), "f16c": (1, 0, 2, 29),
    "bmi1": (7, 0, 1, 3), "avx2": (7, 0, 1, 5), "bmi2": (7, 0, 1, 8), "avx512f": (7, 0, 1, 16),
    "avx512dq": (7, 0, 1, 17), "adx": (7, 0, 1, 19), "avx512ifma": (7, 0, 1, 21), "avx512cd": (7, 0, 1, 28),
    "sha_ni": (7, 0, 1, 29), "avx512bw": (7, 0, 1, 30), "avx512vl": (7, 0, 1, 31),
    "avx512vbmi": (7, 0, 2, 1), "avx512_vbmi2": (7, 0, 2, 6), "gfni": (7, 0, 2, 8), "vaes": (7, 0, 2, 9),
    "vpclmulqdq": (7, 0, 2, 10), "avx512_vnni": (7, 0, 2, 11), "avx512_bitalg": (7, 0, 2, 12),
    "avx512_vpopcntdq": (7, 0, 2, 14), "avx512_fp16": (7, 0, 3, 23),
    "avx_vnni": (7, 1, 0, 4), "avx512_bf16": (7, 1, 0, 5),
    "lahf_lm": (0x80000001, 0, 2, 0), "abm": (0x80000001, 0, 2, 5),
}
_YMM_FLAGS = {"avx", "avx2", "fma", "f16c", "vaes", "vpclmulqdq", "avx_vnni"}  # need the OS to save YMM state
# cpuid(leaf=edi, subleaf=esi, out=rdx): push rbx; mov eax,edi; mov ecx,esi; mov r8,rdx; cpuid;
# mov [r8],eax; mov [r8+4],ebx; mov [r8+8],ecx; mov [r8+12],edx; pop rbx; ret
_CPUID_CODE = bytes.fromhex("53 89f8 89f1 4989d0 0fa2 418900 41895804 41894808 4189500c 5b c3")
# xgetbv(ecx=edi) -> rax: mov ecx,edi; xgetbv; shl rdx,32; or rax,rdx; ret
_XGETBV_CODE = bytes.fromhex("89f9 0f01d0 48c1e220 4809d0 c3")


def _cpuid_flags() -> set[str] | None:
    """The /proc/cpuinfo-style flags of ``_CPUID_BITS`` that CPUID reports (AVX and AVX-512 only if
    XGETBV says the OS saves their registers), or None when CPUID cannot be run here."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError, AttributeError):  # W^X policies (SELinux execmem) and non-POSIX systems
        return None
    try:
        page.write(_CPUID_CODE.ljust(64, b"\xcc") + _XGETBV_CODE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(page))
        regs = (ctypes.c_uint32 * 4)()
        cpuid_fn = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)(base)
        xgetbv_fn = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint32)(base + 64)

        def cpuid(leaf: int, sub: int = 0) -> tuple[int, ...]:
            cpuid_fn(leaf, sub, ctypes.addressof(regs))
            return tuple(regs)

        max_leaf, max_ext = cpuid(0)[0], cpuid(0x80000000)[0]
        max_sub7 = cpuid(7, 0)[0] if max_leaf >= 7 else -1
        flags = set()
        for flag, (leaf, sub, reg, bit) in _CPUID_BITS.items():
            if (leaf > 0x80000000 and leaf > max_ext) or (leaf < 0x80000000 and leaf > max_leaf) or \
                    (leaf == 7 and sub > max_sub7):
                continue
            if cpuid(leaf, sub)[reg] >> bit & 1:
                flags.add(flag)
        osxsave = bool(cpuid(1)[2] >> 27 & 1)
        xcr0 = xgetbv_fn(0) if osxsave else 0
        if xcr0 & 0x06 != 0x06:  # SSE + AVX state
            flags -= _YMM_FLAGS | {f for f in flags if f.startswith("avx512")}
        elif xcr0 & 0xE0 != 0xE0:  # opmask + ZMM state
            flags -= {f for f in flags if f.startswith("avx512")}
        del cpuid_fn, xgetbv_fn
        return flags
    finally:
        try:
            page.close()
        except BufferError:  # a ctypes view still holds the page: it goes with the process
            pass


def _proc_cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=1)
def host_cpu_flags() -> frozenset[str] | None:
    """This CPU's /proc/cpuinfo-style flags (see the module docstring), None when unknown."""
    by_cpuid, by_kernel = _cpuid_flags(), _proc_cpuinfo_flags()
    if by_cpuid is None or by_kernel is None:
        flags = by_cpuid if by_kernel is None else by_kernel
        return None if flags is None else frozenset(flags)
    return frozenset(by_cpuid & by_kernel)


def _llvm_target(manifest: dict[str, Any]) -> dict[str, Any]:
    llvm = manifest.get("llvm_target")
    return llvm if isinstance(llvm, dict) else {}


def missing_cpu_features(manifest: dict[str, Any], cpu_flags: Iterable[str] | None = None) -> list[str]:
    """The ISA extensions (LLVM names, sorted) that an x86 artifact's code may use (its manifest's
    ``cpu_features``) and the CPU lacks; a name frugalrt does not know counts as lacking.

    ``cpu_flags``: the CPU's /proc/cpuinfo flag names (default: this CPU, :func:`host_cpu_flags`).
    Empty for non-x86 artifacts and when this CPU's flags cannot be read.
    """
    if not is_x86_triple(str(_llvm_target(manifest).get("triple", ""))):
        return []
    flags = host_cpu_flags() if cpu_flags is None else frozenset(cpu_flags)
    if flags is None:
        return []
    return sorted(f for f in manifest.get("cpu_features") or [] if X86_FEATURES.get(f, f) not in flags)


def portable_target_for(cpu_flags: Iterable[str] | None = None) -> str:
    """The best registered portable x86-64 target that a CPU with ``cpu_flags`` runs (default: this CPU)."""
    flags = host_cpu_flags() if cpu_flags is None else frozenset(cpu_flags)
    for name, features in X86_LEVELS.items():
        if flags is not None and all(X86_FEATURES[f] in flags for f in features):
            return name
    return "x86-64-v1"


def check_cpu(artifact: Artifact, cpu_flags: Iterable[str] | None = None) -> None:
    """DeviceError naming the missing ISA extensions when ``artifact`` was compiled for a CPU with more
    than this one (or the one with ``cpu_flags``), suggesting the portable target to recompile for."""
    llvm = _llvm_target(artifact.manifest)
    if not llvm or "cpu_features" not in artifact.manifest:
        raise ArtifactError(f"{artifact.path / 'manifest.json'}: no llvm_target/cpu_features (written by an older "
                            "frugalrt); recompile it with `frugalrt compile MODEL.onnx --target T --out DIR`")
    missing = missing_cpu_features(artifact.manifest, cpu_flags)
    if missing:
        raise DeviceError(f"{artifact.path}: compiled for {llvm.get('mcpu')} ({artifact.target}), this CPU lacks "
                          f"{', '.join(missing)}; recompile with --target {portable_target_for(cpu_flags)} "
                          "(or --target host on this machine)")


class LocalSession:
    """A Relax VM over ``lib.so`` on this machine's CPU, with a lean call path.

    Per input shape and dtype, once: the inputs are checked against the manifest (and the batch
    against its ``batch_bound``, the largest the statically planned ``main`` takes), an aligned TVM
    buffer and a numpy view of it are allocated per input, and two calls tell whether each call
    allocates its outputs afresh (else, e.g. an output that is an input, outputs are copied).
    Per call: each input is copied into its buffer (``view[...] = x``). With the artifact's static
    plan (manifest ``plan``), the plan's kernels then run on tensors bound once per shape and the
    outputs are copied out. Without one, inputs of ``ZERO_COPY_BYTES`` or more that are
    C-contiguous and 64-byte aligned are passed through DLPack without a copy, ``main`` runs on the
    VM, and the outputs come back as numpy views of the VM's output tensors (``np.from_dlpack``).
    """

    ZERO_COPY_BYTES = 1 << 16  # below this, copying (~0.5 us) beats checking the alignment

    def __init__(self, artifact: Artifact):
        if artifact.kind != "shared-lib" or artifact.target not in LOCAL_TARGETS:
            raise DeviceError(f"{artifact.path}: a {artifact.target} {artifact.kind} cannot run on this machine "
                              f"(device local runs {', '.join(LOCAL_TARGETS)}); use --device rpc://HOST:PORT, "
                              "qemu or qemu:BOARD")
        artifact.verify()  # every file intact (a truncated lib.so would be a bus error in dlopen)
        check_cpu(artifact)  # before dlopen: code for a CPU with more features would be a SIGILL
        if not artifact.lib_path.is_file():
            raise ArtifactError(f"{artifact.lib_path} is missing; recompile the artifact")
        self.artifact = artifact
        import tvm
        from tvm import relax

        try:
            module = tvm.runtime.load_module(str(artifact.lib_path))
            self.vm = relax.VirtualMachine(module, tvm.cpu())
            plan = artifact.manifest.get("plan")
            self.static_plan = StaticPlan(module, self.vm, plan) if plan else None
        except Exception as e:  # noqa: BLE001  (TVM raises its own error types for a corrupt library)
            raise ArtifactError(f"{artifact.lib_path}: cannot load ({e}); recompile the artifact") from e
        self._main = self.vm["main"]
        bound = artifact.manifest.get("batch_bound")
        self._bound = bound if isinstance(bound, int) and bound > 0 else None
        self._plans: dict[tuple, _CallPlan] = {}
        self._tvm = tvm

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        try:
            key = ((inputs[0].shape, inputs[0].dtype),) if len(inputs) == 1 else \
                tuple([(x.shape, x.dtype) for x in inputs])
        except AttributeError:  # not numpy arrays: the full check names what is wrong
            self.artifact.check_inputs(inputs)
            raise
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(key, inputs)
        if plan.run is not None:
            for view, x in zip(plan.views, inputs):
                view[...] = x
            return plan.run()
        if plan.small:  # every input is copied (dtype and shape are the key's: no conversion)
            for view, x in zip(plan.views, inputs):
                view[...] = x
            result = self._main(*plan.buffers)
        else:
            result = self._main(*[self._large(x, buffer, view)
                                     for x, buffer, view in zip(inputs, plan.buffers, plan.views)])
        if plan.copy:
            return [r.numpy() for r in result] if plan.tuple_output else [result.numpy()]
        return [np.from_dlpack(r) for r in result] if plan.tuple_output else [np.from_dlpack(result)]

    def _large(self, x: np.ndarray, buffer, view):
        """``x`` itself through DLPack when TVM can take it (C-contiguous, 64-byte aligned), else a copy."""
        if x.nbytes >= self.ZERO_COPY_BYTES and x.flags.c_contiguous and \
                x.__array_interface__["data"][0] % 64 == 0:
            return self._tvm.runtime.from_dlpack(x)
        view[...] = x
        return buffer

    def _plan(self, key: tuple, inputs: tuple) -> "_CallPlan":
        self.artifact.check_inputs(inputs)  # raises with the input's name, shape and dtype
        batch = max((shape[0] for (shape, _), spec in zip(key, self.artifact.inputs)
                     if shape and spec["shape"][:1] == ["batch"]), default=0)
        if self._bound is not None and batch > self._bound:
            raise ArtifactError(f"{self.artifact.path}: batch {batch} exceeds the artifact's batch_bound "
                                f"{self._bound} (its memory is planned for at most that many rows); split the "
                                f"batch, or recompile with frugalrt.compile(..., batch_bound={batch}) "
                                "(0: no bound, dynamic allocation)")
        buffers = [self._tvm.runtime.empty(shape, str(dtype)) for shape, dtype in key]
        views = [np.from_dlpack(b) for b in buffers]
        if self.static_plan is not None:
            plan = self._plans[key] = _CallPlan(buffers, views, True, False, True, self.static_plan.bind(buffers, batch))
            return plan
        for view, x in zip(views, inputs):
            view[...] = x
        first, second = self._main(*buffers), self._main(*buffers)
        tuple_output = not hasattr(first, "numpy")
        firsts, seconds = (list(first), list(second)) if tuple_output else ([first], [second])
        owned = {b.data_ptr() for b in buffers}
        # an output a call allocates afresh differs from the one before it, which is still alive
        copy = any(a.data_ptr() == b.data_ptr() or a.data_ptr() in owned for a, b in zip(firsts, seconds))
        small = all(v.nbytes < self.ZERO_COPY_BYTES for v in views)
        plan = self._plans[key] = _CallPlan(buffers, views, small, tuple_output, copy)
        return plan

    def close(self) -> None:
        self._plans.clear()


class _CallPlan(NamedTuple):
    buffers: list  # per input: TVM tensor allocated once (64-byte aligned)
    views: list  # per input: numpy view of that buffer
    small: bool  # every input under ZERO_COPY_BYTES: always copied
    tuple_output: bool
    copy: bool  # outputs alias memory that outlives the call: copy them out
    run: Any = None  # the static plan bound to ``buffers`` (then the VM is not called)


def _open_local(artifact: Artifact, device: str) -> Session:
    return LocalSession(artifact)


register_device("local", _open_local)


def load(artifact_dir: str | os.PathLike, device: str = "local") -> Session:
    """Open the compiled artifact in ``artifact_dir`` on ``device`` (see ``frugalrt.runtime.devices``)."""
    return open_device(Artifact(artifact_dir), device)
