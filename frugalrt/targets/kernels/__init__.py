"""TVM lowerings of the ``ai.frugalrt`` ops, found by ``(domain, op_type, version)``.

A lowering turns one ONNX node into Relax (usually one ``call_tir`` of a TE/TIR kernel). Its
constant inputs (twiddles, packed weights, scale, bias) arrive as numpy arrays so it can repack
them at compile time. Each lowering picks its kernel builder from a small per-target-family
table (:data:`FAMILIES`, see :func:`pick_kernel`): generic kernels here, PERF's fast CPU kernels
(`kernels/cpu_*.py`) go into those tables under ``"x86"``, ``"aarch64"``, ``"arm"`` or ``"cpu"``.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol

import numpy as np

from frugalrt.errors import UnsupportedOpError
from frugalrt.runtime.reference import DOMAIN, conv_output_size

OpKey = tuple[str, str, int]


class Lowering(Protocol):
    def emit(self, bb, inputs: list, consts: dict[str, np.ndarray], attrs: dict[str, Any], target) -> Any:
        """Emit the op into ``bb`` (a ``relax.BlockBuilder``) and return its Relax result."""


LOWERINGS: dict[OpKey, Lowering] = {}


def register_lowering(op_type: str, version: int = 1, domain: str = DOMAIN):
    """Class decorator: register an instance of the class as the lowering of ``domain::op_type`` v``version``."""

    def wrap(cls):
        key = (domain, op_type, version)
        if key in LOWERINGS:
            raise ValueError(f"lowering for {key} registered twice")
        LOWERINGS[key] = cls()
        return cls

    return wrap


def get_lowering(domain: str, op_type: str, version: int) -> Lowering:
    _load_builtin_kernels()
    try:
        return LOWERINGS[(domain, op_type, version)]
    except KeyError:
        raise UnsupportedOpError(
            f"no TVM lowering for op {domain}::{op_type} version {version}; known: "
            + ", ".join(f"{d}::{o} v{v}" for d, o, v in sorted(LOWERINGS))) from None


def known_ops(domain: str = DOMAIN) -> dict[str, list[int]]:
    """``{op_type: [versions]}`` of the registered lowerings of ``domain``."""
    _load_builtin_kernels()
    ops: dict[str, list[int]] = {}
    for d, op, v in sorted(LOWERINGS):
        if d == domain:
            ops.setdefault(op, []).append(v)
    return ops


def _load_builtin_kernels() -> None:
    for name in ("butterfly", "binary", "popcount"):
        importlib.import_module(f"{__name__}.{name}")


# --- target families ---------------------------------------------------------------------------
# Lookup order of each family in a lowering's kernel table: the first key present wins.
FAMILIES: dict[str, tuple[str, ...]] = {
    "x86": ("x86", "cpu", "generic"),
    "aarch64": ("aarch64", "cpu", "generic"),
    "arm": ("arm", "cpu", "generic"),       # 32-bit ARM Linux (armv7, armv6)
    "mcu": ("mcu", "generic"),               # LLVM for thumb (no OS, no threads)
    "c": ("c", "generic"),                   # TVM's C codegen (microcontroller bundles)
    "cuda": ("cuda", "gpu", "generic"),
}


def target_family(target) -> str:
    """Family of a ``tvm.target.Target``: the key used in the per-family kernel tables."""
    kind = target.kind.name
    if kind in ("c", "cuda"):
        return kind
    triple = str(target.attrs.get("mtriple", "")) or _system_triple()
    if triple.startswith(("thumb", "arm")) and "none" in triple:
        return "mcu"
    if triple.startswith(("aarch64", "arm64")):
        return "aarch64"
    if triple.startswith(("arm", "thumb")):
        return "arm"
    return "x86"


def _system_triple() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_triple())


def pick_kernel(table: dict[str, Callable], target) -> Callable:
    """The entry of ``table`` (family -> kernel builder) that serves ``target``'s family."""
    for key in FAMILIES[target_family(target)]:
        if key in table:
            return table[key]
    raise UnsupportedOpError(f"no kernel for target family {target_family(target)!r} in {sorted(table)}")


def word_bits(target) -> int:
    """Width of the packed-bit words: 64 on 64-bit CPUs and GPUs, 32 on 32-bit ARM and the C target."""
    return 64 if target_family(target) in ("x86", "aarch64", "cuda") else 32


def pack_words(packed_bytes: np.ndarray, bits: int) -> np.ndarray:
    """[rows, ceil(K/8)] uint8 -> [rows, ceil(K/bits)] uint{bits}: same bit order, zero pad bits."""
    rows, nbytes = packed_bytes.shape
    step = bits // 8
    padded = np.zeros((rows, -(-nbytes // step) * step), np.uint8)
    padded[:, :nbytes] = packed_bytes
    return padded.view(f"<u{step}").astype(f"uint{bits}")


def has_cpu_features(target, *names: str) -> bool:
    """Whether LLVM ``target`` (its ``-mcpu``/``-mattr``, else the host) has all CPU features ``names``."""
    from tvm.target import codegen

    with target:
        return bool(codegen.llvm_cpu_has_features(list(names), target))


def conv_output_shape(h: int, w: int, kernel_shape, strides, pads) -> tuple[int, int]:
    """(OH, OW) of a convolution with ``pads = [top, left, bottom, right]`` (docs/ops.md, BinaryConv)."""
    return (conv_output_size(h, kernel_shape[0], strides[0], pads[0], pads[2]),
            conv_output_size(w, kernel_shape[1], strides[1], pads[1], pads[3]))


def taps_inside(size: int, kernel: int, stride: int, pad: int, out: int) -> np.ndarray:
    """[out, kernel] bool along one axis: whether tap t of output index o reads an in-image position."""
    pos = np.arange(out)[:, None] * stride - pad + np.arange(kernel)[None, :]
    return (pos >= 0) & (pos < size)
