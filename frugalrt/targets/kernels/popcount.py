"""``tirx.popcount`` for TVM's C codegen, which has no lowering of its own.

The C target emits calls to ``frugalrt_popcount32(uint32_t)`` and ``frugalrt_popcount64(uint64_t)``
(both returning the same unsigned type). They are not ``__builtin_popcount`` because that
prototype would clash; the microcontroller bundle's shim (``frugalrt.targets.cbundle``) defines
them, e.g. as ``static inline`` wrappers of ``__builtin_popcount(l)`` or a SWAR sequence.
"""
from tvm import tirx

HELPERS = {32: "frugalrt_popcount32", 64: "frugalrt_popcount64"}


def _lower_popcount_c(op):
    (arg,) = op.args
    width = arg.ty.dtype.bits
    bits = 64 if width > 32 else 32
    value = arg if width == bits else tirx.Cast(f"uint{bits}", arg)
    return tirx.Cast(op.ty.dtype, tirx.call_pure_extern(f"uint{bits}", HELPERS[bits], value))


tirx.register_intrin_lowering("tirx.popcount", target="c", f=_lower_popcount_c, level=99)
