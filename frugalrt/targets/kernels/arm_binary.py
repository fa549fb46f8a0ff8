"""NEON ``ai.frugalrt::BinaryGemm`` (AArch64 and 32-bit ARMv7) and the NEON pieces the binary conv shares.

NEON counts the bits of every byte of a q register in one instruction (``cnt`` / ``vcnt.8``), so
the plain XNOR-popcount beats table lookups: per 128 (row, output, K) triples ``eor`` + ``cnt`` +
``uadalp`` (``vpadal``: pairwise widening add into u16 lanes), against two ``tbl`` lookups and an
add per 64 in the ``tbl`` kernel of ``cpu_binary``. Sign bits of each row of X are packed once, 4
floats per ``fcmlt`` + ``sri`` (shift right and insert), into 16-byte chunks of K in an order of
their own (:func:`row_packer`) that the weights, repacked at compile time into
``[N_pad / outs, Q, outs, 16]`` bytes (a step's weights of a register block adjacent: ``ldp``),
follow too: popcount(x ^ w) does not see a common permutation. A block of ``rows`` rows x ``outs``
outputs stays in registers; at its end ``addp`` twice and ``uaddlp`` turn 4 accumulators into
the u32 counts of 4 outputs, and the output transform (S = K - 2 * count, float, times scale,
rounded, plus bias) runs on 4 outputs at a time.

Under qemu-aarch64 (Cortex-A72), binary MACs per instruction, this kernel vs the ``tbl`` one:
20.2 vs 13.5 at 1x256x256 (batch x K x N), 30.4 vs 17.5 at 1x1024x1024, 31.1 vs 20.4 at
8x1024x1024. At K = 256 the per-output reduction and output transform (~3 instructions) weigh
against 2 x 3 per 128-bit chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from tvm import relax
from tvm.script import tirx as T

from frugalrt.targets.kernels import has_cpu_features
from frugalrt.targets.kernels.cpu_binary import padded_scale_bias

CHUNK = 16  # bytes per q register
MAX_STEPS = 1023  # 4 u16 lanes (<= 16 per step each) summed by the final ``addp``s stay below 2^16


def _uadalp(acc, counts):
    """AArch64: ``add`` of ``uaddlp`` folds into one ``uadalp``."""
    return acc + T.call_llvm_pure_intrin("uint16x8", "llvm.aarch64.neon.uaddlp", counts)


def _vpadal(acc, counts):
    return T.call_llvm_pure_intrin("uint16x8", "llvm.arm.neon.vpadalu", acc, counts)


def _addp(a, b):
    """u16x8 pairwise sums of ``a`` then ``b``: one AArch64 ``addp``."""
    return T.call_llvm_pure_intrin("uint16x8", "llvm.aarch64.neon.addp", a, b)


def _halve_arm(a, b):
    """ARMv7 ``vpadd`` works on d registers only: de-interleave (``vuzp``) and add."""
    return T.Shuffle([a, b], list(range(0, 16, 2))) + T.Shuffle([a, b], list(range(1, 16, 2)))


@dataclass(frozen=True)
class Neon:
    """What differs between AArch64 (32 q registers) and ARMv7 NEON (16)."""

    registers: int  # q registers
    accumulate: Callable  # (acc u16x8, byte counts u8x16) -> acc + their pairwise sums
    halve: Callable  # (u16x8, u16x8) -> u16x8 pairwise sums of both
    pairwise: str  # pairwise widening add (u8x16 -> u16x8, u16x8 -> u32x4)
    shift_in: Callable  # (bits u32x4, mask u32x4) -> bits >> 1 with the top bit of mask

    def pairs(self, v, dtype: str):
        return T.call_llvm_pure_intrin(dtype, self.pairwise, v)

    def sums4(self, a, b):
        """u32x4: the sums of lanes 0-3 and 4-7 of ``a``, then of ``b``."""
        return self.pairs(self.halve(a, b), "uint32x4")


def _sri(bits, mask):
    """AArch64 ``sri``: unrolled, LLVM would fold the plain expression back into ``and`` + ``orr`` per bit."""
    return T.call_llvm_pure_intrin("uint32x4", "llvm.aarch64.neon.vsri", mask, bits, T.int32(1))


def shift_in(bits, mask, lanes: int = 4):
    """bits >> 1 with the top bit of ``mask`` (any NEON, any width)."""
    return (bits >> T.broadcast(T.uint32(1), lanes)) | (mask & T.broadcast(T.uint32(1 << 31), lanes))


ISAS = {"aarch64": Neon(32, _uadalp, _addp, "llvm.aarch64.neon.uaddlp", _sri),
        "arm": Neon(16, _vpadal, _halve_arm, "llvm.arm.neon.vpaddlu", shift_in)}


def unfused4(product):
    """Keep LLVM from contracting ``product + bias`` into an FMA: docs/ops.md rounds the product first."""
    return T.call_llvm_pure_intrin("float32x4", "llvm.arithmetic.fence", product)


def block_shape(isa: str) -> tuple[int, int]:
    """(rows, outputs) of the main register block: accumulators, a step's weights and rows all in q registers."""
    return (2, 8) if ISAS[isa].registers == 32 else (2, 4)


def repack_weights(w_bytes: np.ndarray, k: int, n_pad: int, outs: int) -> np.ndarray:
    """[N, ceil(K/8)] packed signs -> [N_pad / outs, Q, outs, 16] u8, Q = ceil(K/128), in the order of
    :func:`row_packer` (K index 128 c + 4 m + l at bit m of u32 lane l of chunk c), zero pad bits."""
    n = w_bytes.shape[0]
    q = -(-k // (8 * CHUNK))
    bits = np.zeros((n_pad, q * 8 * CHUNK), np.uint8)
    bits[:n, :k] = np.unpackbits(w_bytes, axis=-1, count=k, bitorder="little")
    lanes = bits.reshape(n_pad // outs, outs, q, 32, 4).transpose(0, 2, 1, 4, 3)  # [blk, q, u, l, m]
    return np.ascontiguousarray(np.packbits(lanes, axis=-1, bitorder="little").reshape(n_pad // outs, q, outs, CHUNK))


def row_packer(k: int, neon: Neon):
    """Macro ``(X, xw, tail, row)``: sign bits of X[row] into the u32 words xw[row, 4 Q] (pad bits 0).
    Chunk c of 128 elements: 32 steps of one 4-float load, ``fcmlt`` and ``sri`` (element 128 c + 4 m + l
    at bit m of lane l), a permutation of K that :func:`repack_weights` applies to the weights too. The
    last, partial chunk is read from ``tail``, a zero-padded copy."""
    full = k // 128

    def negative(v):
        return T.Select(v < T.broadcast(T.float32(0), 4), T.broadcast(T.uint32(0xFFFFFFFF), 4),
                        T.broadcast(T.uint32(0), 4))

    @T.macro
    def pack(X, xw, tail, row):
        for c in range(full):
            xw[row, T.ramp(c * 4, 1, 4)] = T.broadcast(T.uint32(0), 4)
            for m in T.unroll(32):
                xw[row, T.ramp(c * 4, 1, 4)] = neon.shift_in(xw[row, T.ramp(c * 4, 1, 4)],
                                                             negative(X[row, T.ramp(c * 128 + m * 4, 1, 4)]))
        if k % 128 != 0:
            for e in range(128):
                tail[e] = T.if_then_else(full * 128 + e < k, X[row, T.min(full * 128 + e, k - 1)], T.float32(0))
            xw[row, T.ramp(full * 4, 1, 4)] = T.broadcast(T.uint32(0), 4)
            for m in T.unroll(32):
                xw[row, T.ramp(full * 4, 1, 4)] = neon.shift_in(xw[row, T.ramp(full * 4, 1, 4)],
                                                                negative(tail[T.ramp(m * 4, 1, 4)]))

    return pack


def gemm_primfunc(k: int, n: int, n_pad: int, outs: int, rows: int, isa: str = "aarch64"):
    """TIR ``(X[batch, K], W[N_pad / outs, Q, outs, 16], affine[N_pad / 4, 2, 4], Y[batch, N])``, ``affine``:
    scale then bias of 4 outputs (one ``ldp``); ``rows`` x ``outs`` blocks (the remainder rows one at a time),
    ``isa`` a key of :data:`ISAS`."""
    neon = ISAS[isa]
    q_steps = -(-k // (8 * CHUNK))
    pack = row_packer(k, neon)
    vec, quad, eight = T.ramp(0, 1, CHUNK), T.ramp(0, 1, 4), T.ramp(0, 1, 8)

    @T.macro
    def output(Y, sums, affine, out4, row, o, full):
        out4[quad] = unfused4(T.Cast("float32x4", T.broadcast(T.int32(k), 4) - T.Cast("int32x4", sums) * 2)
                              * affine[o // 4, 0, quad]) + affine[o // 4, 1, quad]
        if full:
            Y[row, T.ramp(o, 1, 4)] = out4[quad]
        else:
            for l in range(4):
                if o + l < n:
                    Y[row, o + l] = out4[l]

    def counts(xb, W, row, nb, q, u):
        return T.popcount(T.reinterpret("uint8x16", xb[row, T.ramp(q * 4, 1, 4)]) ^ W[nb, q, u, vec])

    @T.macro
    def block(xw, W, affine, Y, acc, out4, first_row, nrows, nb, full):
        for r in T.unroll(nrows):  # the first step starts the counts (no zeroing)
            for u in T.unroll(outs):
                acc[r, u, T.ramp(0, 1, 8)] = neon.pairs(counts(xw, W, first_row + r, nb, 0, u), "uint16x8")
        for q in range(1, q_steps):
            for r in T.unroll(nrows):
                for u in T.unroll(outs):
                    acc[r, u, T.ramp(0, 1, 8)] = neon.accumulate(acc[r, u, T.ramp(0, 1, 8)],
                                                                 counts(xw, W, first_row + r, nb, q, u))
        for r in range(nrows):
            for g in range(outs // 4):
                output(Y, neon.sums4(neon.halve(acc[r, 4 * g, eight], acc[r, 4 * g + 1, eight]),
                                     neon.halve(acc[r, 4 * g + 2, eight], acc[r, 4 * g + 3, eight])),
                       affine, out4, first_row + r, nb * outs + 4 * g, full)

    @T.macro
    def blocks(xw, W, affine, Y, acc, out4, first_row, nrows):
        for nb in range(n // outs):
            block(xw, W, affine, Y, acc, out4, first_row, nrows, nb, True)
        for nb in range(n // outs, n_pad // outs):
            block(xw, W, affine, Y, acc, out4, first_row, nrows, nb, False)

    @T.prim_func
    def kernel(x: T.handle, W: T.Buffer((n_pad // outs, q_steps, outs, CHUNK), "uint8"),
               affine: T.Buffer((n_pad // 4, 2, 4), "float32"), y: T.handle):
        T.func_attr({"tirx.noalias": True})
        batch = T.int64()
        X = T.match_buffer(x, (batch, k), "float32")
        Y = T.match_buffer(y, (batch, n), "float32")
        xw = T.alloc_buffer((batch, q_steps * 4), "uint32")
        # register blocks: small and global scope, so stack arrays that LLVM keeps in registers
        acc = T.alloc_buffer((rows, outs, 8), "uint16")
        out4 = T.alloc_buffer((4,), "float32")
        tail = T.alloc_buffer((128,), "float32")
        for row in range(batch):
            pack(X, xw, tail, row)
        for tile in range(batch // rows):
            blocks(xw, W, affine, Y, acc, out4, tile * rows, rows)
        for row in range(batch - batch % rows, batch):
            blocks(xw, W, affine, Y, acc, out4, row, 1)

    return kernel


def fits(k: int) -> bool:
    return -(-k // (8 * CHUNK)) <= MAX_STEPS


def kernel_inputs(w_bytes: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, k: int, isa: str):
    """``(primfunc, constant inputs after X)`` of the kernel; ``w_bytes`` is the op's [N, ceil(K/8)] uint8 input."""
    n = w_bytes.shape[0]
    rows, outs = block_shape(isa)
    n_pad = -(-n // outs) * outs
    affine = np.stack(padded_scale_bias(scale, bias, n_pad)).reshape(2, n_pad // 4, 4).transpose(1, 0, 2)
    return gemm_primfunc(k, n, n_pad, outs, rows, isa), [repack_weights(w_bytes, k, n_pad, outs),
                                                          np.ascontiguousarray(affine)]


def emit_binary_gemm_neon(bb: relax.BlockBuilder, x: relax.Expr, w_bytes: np.ndarray, scale: np.ndarray,
                          bias: np.ndarray | None, k: int, isa: str) -> relax.Expr:
    """Emit the kernel; ``w_bytes`` is the op's [N, ceil(K/8)] uint8 input."""
    func, consts = kernel_inputs(w_bytes, scale, bias, k, isa)
    gv = bb.add_func(func.with_attr("op_pattern", 8).without_attr("global_symbol"), "frugalrt_binary_gemm_neon")
    out = relax.TensorType((x.ty.shape.values[0], w_bytes.shape[0]), "float32")
    return bb.emit(relax.call_tir(gv, [x, *map(relax.const, consts)], out))


def _neon_or_generic(isa: str):
    def emit(bb, x, w_bytes, scale, bias, k, target) -> relax.Expr:
        if has_cpu_features(target, "neon") and fits(k):
            return emit_binary_gemm_neon(bb, x, w_bytes, scale, bias, k, isa)
        from frugalrt.targets.kernels.binary import emit_gemm_generic

        return emit_gemm_generic(bb, x, w_bytes, scale, bias, k, target)

    emit.__doc__ = (f"Lowering entry (``BinaryGemmLowering.KERNELS[{isa!r}]``): the NEON kernel when the target has "
                    "NEON (not ARMv6: rpi-zero) and its u16 counts stay exact, else the generic kernel.")
    return emit


emit_binary_gemm_aarch64 = _neon_or_generic("aarch64")
emit_binary_gemm_arm = _neon_or_generic("arm")
