"""NEON ``ai.frugalrt::BinaryGemm`` (AArch64 and 32-bit ARMv7) and the NEON pieces the binary conv shares.

NEON counts the bits of every byte of a q register in one instruction (``cnt`` / ``vcnt.8``), so
the plain XNOR-popcount beats table lookups: per 128 (row, output, K) triples ``eor`` + ``cnt`` +
a byte ``add`` (K <= 896: the bytes stay exact; larger K ``uadalp`` / ``vpadal``, a pairwise widening
add into u16 lanes), against two ``tbl`` lookups and an add per 64 in the ``tbl`` kernel of
``cpu_binary``. Sign bits of each row of X are packed once, 4 floats per ``fcmlt`` + ``sri`` (shift
right and insert; a chunk's 32 in one expression, kept in a register), into 16-byte chunks of K in an
order of their own (:func:`row_packer`) that the weights, repacked at compile time into
``[N_pad / outs, Q, outs, 16]`` bytes (a step's weights of a register block adjacent: ``ldp``),
follow too: popcount(x ^ w) does not see a common permutation. A block of ``rows`` rows x ``outs``
outputs stays in registers; at its end ``addp`` twice and ``uaddlp`` (twice for byte counts) turn
4 accumulators into the u32 counts of 4 outputs, and the output transform (S = K - 2 * count, float,
times scale, rounded, plus bias) runs on 4 outputs at a time.

Packed activations (docs/ops.md) are served here too. A packed X is copied 16 bytes per chunk into the
row words (no binarization), the weights then kept in the bytes' natural order; its bits past K are
masked to 0. A packed Y is one signed compare of the count per output (``cmgt``) with a per-channel
threshold fixed at compile time (:func:`count_thresholds`, from :func:`sign_thresholds`); a negative
scale's direction flip is folded into its weights, stored inverted, so every channel compares
``count > thr``. The 4-output masks are ANDed with their bit values and ORed into the output byte.
Packed X and Y, binary MACs per instruction under qemu-aarch64: 24.2 at 1x256x256, 28.6 at 8x256x256,
31.8 at 1x1024x1024, 32.3 at 8x1024x1024.

Under qemu-aarch64 (Cortex-A72), binary MACs per instruction, this kernel (float X and Y) vs the
``tbl`` one: 22.2 vs 13.5 at 1x256x256 (batch x K x N), 26.3 at 8x256x256, 30.7 vs 17.5 at
1x1024x1024, 31.4 vs 20.4 at 8x1024x1024. K = 256 stays below 30: per 8 outputs of a row, 32
``eor`` + ``cnt``, 8 ``ldp`` of weights, 18 to reduce 16 byte vectors to 8 counts, 14 to transform
(packed Y: 12 to compare and pack a byte), ~5 of loop; the call's argument checks (~250) and a row's packing
(~165) weigh on 65536 MACs.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import Callable

import numpy as np
from tvm import relax
from tvm.script import tirx as T

from frugalrt.targets.kernels import has_cpu_features
from frugalrt.targets.kernels.cpu_binary import padded_scale_bias
from frugalrt.targets.kernels.packing import NEVER, UNPACKED, Packing, count_thresholds, sign_thresholds

CHUNK = 16  # bytes per q register
MAX_STEPS = 1023  # 4 u16 lanes (<= 16 per step each) summed by the final ``addp``s stay below 2^16


def _uadalp(acc, counts):
    """AArch64: ``add`` of ``uaddlp`` folds into one ``uadalp``."""
    return acc + T.call_llvm_pure_intrin("uint16x8", "llvm.aarch64.neon.uaddlp", counts)


def _vpadal(acc, counts):
    return T.call_llvm_pure_intrin("uint16x8", "llvm.arm.neon.vpadalu", acc, counts)


def _addp(a, b, dtype="uint16x8"):
    """Pairwise sums of ``a`` then ``b`` (``dtype``: u8x16 or u16x8): one AArch64 ``addp``."""
    return T.call_llvm_pure_intrin(dtype, "llvm.aarch64.neon.addp", a, b)


def _halve_arm(a, b, dtype="uint16x8"):
    """ARMv7 ``vpadd`` works on d registers only: de-interleave (``vuzp``) and add."""
    lanes = 2 * int(dtype.split("x")[1])
    return T.Shuffle([a, b], list(range(0, lanes, 2))) + T.Shuffle([a, b], list(range(1, lanes, 2)))


@dataclass(frozen=True)
class Neon:
    """What differs between AArch64 (32 q registers) and ARMv7 NEON (16)."""

    registers: int  # q registers
    accumulate: Callable  # (acc u16x8, byte counts u8x16) -> acc + their pairwise sums
    halve: Callable  # (a, b[, dtype: u16x8 or u8x16]) -> pairwise sums of both
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


def _vsri_arm(bits, mask):
    """ARMv7 ``vsri`` (LLVM's ``vshiftins`` with a negative shift); the plain expression takes 3 instructions."""
    return T.call_llvm_pure_intrin("uint32x4", "llvm.arm.neon.vshiftins", mask, bits, T.broadcast(T.int32(-1), 4))


def shift_in(bits, mask, lanes: int = 4):
    """bits >> 1 with the top bit of ``mask`` (any NEON, any width)."""
    return (bits >> T.broadcast(T.uint32(1), lanes)) | (mask & T.broadcast(T.uint32(1 << 31), lanes))


ISAS = {"aarch64": Neon(32, _uadalp, _addp, "llvm.aarch64.neon.uaddlp", _sri),
        "arm": Neon(16, _vpadal, _halve_arm, "llvm.arm.neon.vpaddlu", _vsri_arm)}


def unfused4(product):
    """Keep LLVM from contracting ``product + bias`` into an FMA: docs/ops.md rounds the product first."""
    return T.call_llvm_pure_intrin("float32x4", "llvm.arithmetic.fence", product)


def block_shape(isa: str) -> tuple[int, int]:
    """(rows, outputs) of the main register block: accumulators, a step's weights and rows all in q registers."""
    return (2, 8) if ISAS[isa].registers == 32 else (2, 4)


def repack_weights(w_bytes: np.ndarray, k: int, n_pad: int, outs: int, natural: bool = False,
                   flip: np.ndarray | None = None) -> np.ndarray:
    """[N, ceil(K/8)] packed signs -> [N_pad / outs, Q, outs, 16] u8, Q = ceil(K/128), in the order of
    :func:`row_packer` (K index 128 c + 4 m + l at bit m of u32 lane l of chunk c) or, ``natural``, in
    that of the packed bytes (those of a packed X); zero pad bits; the real bits of the rows in ``flip``
    inverted."""
    n = w_bytes.shape[0]
    q = -(-k // (8 * CHUNK))
    bits = np.zeros((n_pad, q * 8 * CHUNK), np.uint8)
    bits[:n, :k] = np.unpackbits(w_bytes, axis=-1, count=k, bitorder="little")
    if flip is not None:
        bits[:n, :k] ^= np.asarray(flip, np.uint8)[:, None]
    if natural:
        chunks = np.packbits(bits, axis=-1, bitorder="little").reshape(n_pad // outs, outs, q, CHUNK)
        return np.ascontiguousarray(chunks.transpose(0, 2, 1, 3))
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

    def word(src, row, base):  # one expression: stored step by step, xw would go through memory 32 times
        def load(m):
            at = T.ramp(base + m * 4, 1, 4)
            return src[row, at] if len(src.shape) == 2 else src[at]

        return reduce(lambda bits, m: neon.shift_in(bits, negative(load(m))), range(32), T.broadcast(T.uint32(0), 4))

    @T.macro
    def pack(X, xw, tail, row):
        for c in range(full):
            xw[row, T.ramp(c * 4, 1, 4)] = word(X, row, c * 128)
        if k % 128 != 0:
            for e in range(128):
                tail[e] = T.if_then_else(full * 128 + e < k, X[row, T.min(full * 128 + e, k - 1)], T.float32(0))
            xw[row, T.ramp(full * 4, 1, 4)] = word(tail, row, 0)

    return pack


def byte_copier(k: int):
    """Macro ``(X, xw, tail, row)``: the packed sign bytes X[row] (natural order) into the u32 words
    xw[row, 4 Q], 16 bytes per chunk; the last, partial chunk through ``tail`` (16 bytes), the bits
    past K masked to 0."""
    full, nbytes = k // 128, -(-k // 8)
    last = (1 << (k % 8 or 8)) - 1  # real bits of the last byte
    partial = k % 128 != 0

    @T.macro
    def copy(X, xw, tail, row):
        for c in range(full):
            xw[row, T.ramp(c * 4, 1, 4)] = T.reinterpret("uint32x4", X[row, T.ramp(c * 16, 1, 16)])
        if partial:
            for e in range(CHUNK):
                tail[e] = T.if_then_else(full * 16 + e < nbytes, X[row, T.min(full * 16 + e, nbytes - 1)]
                                         & T.if_then_else(full * 16 + e == nbytes - 1, T.uint8(last), T.uint8(0xFF)),
                                         T.uint8(0))
            xw[row, T.ramp(full * 4, 1, 4)] = T.reinterpret("uint32x4", tail[T.ramp(0, 1, CHUNK)])

    return copy


def gemm_primfunc(k: int, n: int, n_pad: int, outs: int, rows: int, isa: str = "aarch64",
                  packing: Packing = UNPACKED):
    """TIR ``(X, W[N_pad / outs, Q, outs, 16], table, Y)``; ``rows`` x ``outs`` blocks (the remainder rows one
    at a time), ``isa`` a key of :data:`ISAS`. X: [batch, K] float32, or (``packing.input``) [batch,
    ceil(K/8)] uint8 packed signs (W then in their natural order, :func:`repack_weights`). Y: [batch, N]
    float32 with ``table`` = affine[N_pad / 4, 2, 4], scale then bias of 4 outputs (one ``ldp``); or
    (``packing.output``) [batch, ceil(N/8)] uint8 sign bits with ``table`` = the count thresholds
    [N_pad] int32 (:func:`count_thresholds`), N_pad a multiple of 8."""
    neon = ISAS[isa]
    q_steps = -(-k // (8 * CHUNK))
    packed_in, packed_out = packing.input, packing.output
    pack = byte_copier(k) if packed_in else row_packer(k, neon)
    x_cols, x_dtype = (-(-k // 8), "uint8") if packed_in else (k, "float32")
    y_cols, y_dtype = (-(-n // 8), "uint8") if packed_out else (n, "float32")
    tail_shape, tail_dtype = ((CHUNK,), "uint8") if packed_in else ((128,), "float32")
    halves = 8 // outs if outs < 8 else 1  # blocks per output byte (packed Y)
    table_shape, table_dtype = ((n_pad,), "int32") if packed_out else ((n_pad // 4, 2, 4), "float32")
    vec, quad, eight = T.ramp(0, 1, CHUNK), T.ramp(0, 1, 4), T.ramp(0, 1, 8)

    # bytes (<= 8 per step) add up exactly over q_steps <= 7 (x 4 by 2 ``addp`` in ``sums``): ``add`` per
    # step, the first none; else ``uadalp`` into u16 lanes
    narrow = q_steps <= 7
    acc_shape, acc_dtype, lanes = ((CHUNK,), "uint8", vec) if narrow else ((8,), "uint16", eight)
    acc_vec = f"{acc_dtype}x{acc_shape[0]}"

    def counts(xb, W, row, nb, q, u):
        return T.popcount(T.reinterpret("uint8x16", xb[row, T.ramp(q * 4, 1, 4)]) ^ W[nb, q, u, vec])

    def start(c):
        return c if narrow else neon.pairs(c, "uint16x8")

    def add(acc, c):
        return acc + c if narrow else neon.accumulate(acc, c)

    def sums(acc, r, g):  # u32x4: the counts of outputs 4 g .. 4 g + 3 of row r of the block
        four = neon.halve(neon.halve(acc[r, 4 * g, lanes], acc[r, 4 * g + 1, lanes], acc_vec),
                          neon.halve(acc[r, 4 * g + 2, lanes], acc[r, 4 * g + 3, lanes], acc_vec), acc_vec)
        return neon.pairs(neon.pairs(four, "uint16x8") if narrow else four, "uint32x4")

    # (few macro call sites: TVMScript parses a macro again at each one, slowly under pytest)
    @T.macro
    def accumulate(xw, W, acc, first_row, nrows, nb):
        for r in T.unroll(nrows):  # the first step starts the counts (no zeroing)
            for u in T.unroll(outs):
                acc[r, u, lanes] = start(counts(xw, W, first_row + r, nb, 0, u))
        for q in range(1, q_steps):
            for r in T.unroll(nrows):
                for u in T.unroll(outs):
                    acc[r, u, lanes] = add(acc[r, u, lanes], counts(xw, W, first_row + r, nb, q, u))

    def first(nb, g):  # the first of the 4 outputs of group g of block nb (an expression: a TIR assignment
        return nb * outs + 4 * g  # would be a mutable variable, i.e. memory)

    @T.macro
    def block(xw, W, affine, Y, acc, out4, first_row, nrows, nb):
        accumulate(xw, W, acc, first_row, nrows, nb)
        for r, g in T.grid(nrows, outs // 4):
            out4[quad] = unfused4(T.Cast("float32x4", T.broadcast(T.int32(k), 4) - T.Cast("int32x4", sums(acc, r, g))
                                         * 2) * affine[first(nb, g) // 4, 0, quad]) + affine[first(nb, g) // 4, 1, quad]
            if nb < n // outs:
                Y[first_row + r, T.ramp(first(nb, g), 1, 4)] = out4[quad]
            else:  # the last block: pad outputs
                for l in range(4):
                    if first(nb, g) + l < n:
                        Y[first_row + r, first(nb, g) + l] = out4[l]

    @T.macro
    def byte_block(xw, W, thr, Y, acc, ybits, first_row, nrows, byte):
        for r in T.unroll(nrows):
            ybits[r, quad] = T.broadcast(T.uint32(0), 4)
        for half in range(halves):
            accumulate(xw, W, acc, first_row, nrows, byte * halves + half)
            for r, g in T.grid(nrows, outs // 4):  # bit o % 8 of the byte: count > threshold (lanes ORed below)
                ybits[r, quad] = ybits[r, quad] | (T.Select(
                    T.reinterpret("int32x4", sums(acc, r, g)) > thr[T.ramp(first(byte * halves + half, g), 1, 4)],
                    T.broadcast(T.uint32(0xFFFFFFFF), 4), T.broadcast(T.uint32(0), 4))
                    & T.shift_left(T.broadcast(T.uint32(1), 4),
                                   T.Cast("uint32x4", T.ramp(half * outs % 8 + 4 * g, 1, 4))))
        for r in range(nrows):
            Y[first_row + r, byte] = T.Cast("uint8", (ybits[r, 0] | ybits[r, 1]) | (ybits[r, 2] | ybits[r, 3]))

    @T.prim_func
    def kernel(x: T.handle, W: T.Buffer((n_pad // outs, q_steps, outs, CHUNK), "uint8"),
               table: T.Buffer(table_shape, table_dtype), y: T.handle):
        T.func_attr({"tirx.noalias": True})
        batch = T.int64()
        X = T.match_buffer(x, (batch, x_cols), x_dtype)
        Y = T.match_buffer(y, (batch, y_cols), y_dtype)
        xw = T.alloc_buffer((batch, q_steps * 4), "uint32")
        # register blocks: small and global scope, so stack arrays that LLVM keeps in registers
        acc = T.alloc_buffer((rows, outs, *acc_shape), acc_dtype)
        out4 = T.alloc_buffer((4,), "float32")
        ybits = T.alloc_buffer((rows, 4), "uint32")
        tail = T.alloc_buffer(tail_shape, tail_dtype)
        for row in range(batch):
            pack(X, xw, tail, row)
        if packed_out:  # tiles of ``rows`` rows, then the remainder rows one at a time
            for tile, byte in T.grid(batch // rows, n_pad // 8):
                byte_block(xw, W, table, Y, acc, ybits, tile * rows, rows, byte)
            for row in range(batch - batch % rows, batch):
                for byte in range(n_pad // 8):
                    byte_block(xw, W, table, Y, acc, ybits, row, 1, byte)
        else:
            for tile, nb in T.grid(batch // rows, n_pad // outs):
                block(xw, W, table, Y, acc, out4, tile * rows, rows, nb)
            for row in range(batch - batch % rows, batch):
                for nb in range(n_pad // outs):
                    block(xw, W, table, Y, acc, out4, row, 1, nb)

    return kernel


def fits(k: int) -> bool:
    return -(-k // (8 * CHUNK)) <= MAX_STEPS


def kernel_inputs(w_bytes: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, k: int, isa: str,
                  packing: Packing = UNPACKED):
    """``(primfunc, constant inputs after X)`` of the kernel; ``w_bytes`` is the op's [N, ceil(K/8)] uint8 input.
    A packed Y takes the count thresholds of :func:`count_thresholds` instead of scale and bias (the weights
    flipped for negative scales, N padded to a multiple of 8 with outputs that never set their bit)."""
    n = w_bytes.shape[0]
    rows, outs = block_shape(isa)
    n_pad = -(-n // max(outs, 8)) * max(outs, 8) if packing.output else -(-n // outs) * outs
    func = gemm_primfunc(k, n, n_pad, outs, rows, isa, packing)
    if packing.output:
        sense, t = sign_thresholds(scale, bias, k, packing.activation)
        thr = np.full(n_pad, NEVER, np.int32)
        thr[:n] = count_thresholds(k, sense, t, k)
        return func, [repack_weights(w_bytes, k, n_pad, outs, packing.input, flip=sense < 0), thr]
    affine = np.stack(padded_scale_bias(scale, bias, n_pad)).reshape(2, n_pad // 4, 4).transpose(1, 0, 2)
    return func, [repack_weights(w_bytes, k, n_pad, outs, packing.input), np.ascontiguousarray(affine)]


def emit_binary_gemm_neon(bb: relax.BlockBuilder, x: relax.Expr, w_bytes: np.ndarray, scale: np.ndarray,
                          bias: np.ndarray | None, k: int, isa: str, packing: Packing = UNPACKED) -> relax.Expr:
    """Emit the kernel; ``w_bytes`` is the op's [N, ceil(K/8)] uint8 input."""
    func, consts = kernel_inputs(w_bytes, scale, bias, k, isa, packing)
    name = "frugalrt_binary_gemm_neon_packed" if packing.any else "frugalrt_binary_gemm_neon"
    gv = bb.add_func(func.with_attr("op_pattern", 8).without_attr("global_symbol"), name)
    n = w_bytes.shape[0]
    out = relax.TensorType((x.ty.shape.values[0], -(-n // 8) if packing.output else n),
                           "uint8" if packing.output else "float32")
    return bb.emit(relax.call_tir(gv, [x, *map(relax.const, consts)], out))


def _neon_or_generic(isa: str):
    def emit(bb, x, w_bytes, scale, bias, k, target, packing: Packing = UNPACKED) -> relax.Expr:
        if has_cpu_features(target, "neon") and fits(k):
            return emit_binary_gemm_neon(bb, x, w_bytes, scale, bias, k, isa, packing)
        from frugalrt.targets.kernels.binary import emit_gemm_generic

        return emit_gemm_generic(bb, x, w_bytes, scale, bias, k, target, packing)

    emit.__doc__ = (f"Lowering entry (``BinaryGemmLowering.KERNELS[{isa!r}]``): the NEON kernel (packed activations "
                    "included) when the target has NEON (not ARMv6: rpi-zero) and its u16 counts stay exact, else "
                    "the generic kernel.")
    return emit


emit_binary_gemm_aarch64 = _neon_or_generic("aarch64")
emit_binary_gemm_arm = _neon_or_generic("arm")
