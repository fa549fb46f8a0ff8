"""Fast CPU kernel of ``ai.frugalrt::BinaryGemm`` for x86 AVX2: table lookups instead of XOR + popcount.

AVX2 has no vector popcount: LLVM counts bits with two ``vpshufb`` nibble lookups plus masks,
shifts and a ``vpsadbw``, ~9 instructions per 256 weight bits. Here the activations go into the
tables instead (the idea of T-MAC, Wei et al., EuroSys 2025, applied to XNOR-popcount): for each
input row and each group of 4 bits of K, a 16-byte table holds ``popcount(x_nibble ^ v)`` for
every weight nibble v. One ``vpshufb`` then counts 4 bits of K for 32 (output, group) pairs,
indexed directly by the weight nibbles; a ``vpaddb`` accumulates. A table pair depends only on
one activation byte, so all 256 pairs are one constant (:func:`nibble_tables`, 8 KiB); each
block of ``ROWS`` rows copies its pairs into a small buffer that stays in L1 while every weight
block streams past (4 rows x 2 weight vectors in registers).

Weights (constants) are repacked at compile time: one 32-byte vector per 16 outputs and 8 bits
of K, one nibble per byte (``split``, no masking in the inner loop) while they fit in L2, else
two nibbles per byte (half the memory traffic, two extra ops to split them). Byte accumulators
are widened to 16 bits every ``FLUSH`` steps (8 per step at most). The result is the exact
integer S = K - 2 * sum, then the fused output transform of docs/ops.md. Sign bits are packed 8
at a time (``vcmpltps`` + ``vmovmskps``).

Packed activations (docs/ops.md): a packed X is copied as it is into the sign bytes (its last byte
masked), and a packed Y replaces the float transform by one unsigned compare of the u16 counts with
the least count that sets each channel's bit (:func:`packed_output_consts`), 16 bits at a time.

Measured on Zen 3 (single thread, same run): the split layout is 9% faster than the packed one
at 64x1024x1024 and 1.6x slower at 1x4096x4096 (4 MiB of weights). The previous version (tables
built with ``vpshufb`` for every row, packed weights) was 1.14x slower at 64x1024x1024; looking
tables up in the constant inside the inner loop (``movzx`` + shift + load per table) takes 13.7
instead of 9.6 cycles per step in isolation. XOR + LLVM's AVX2 popcount is 1.7x slower, scalar
``popcnt`` on u64 words 2.4x. With AVX-512 VPOPCNTDQ the plain XOR + ``vpopcntd`` kernel
(``cpu_binary_vpopcnt``) is used instead. (AArch64 once ran this kernel with NEON ``tbl``: 4,841
instructions for a 256x256 layer at batch 1 under qemu-aarch64; NEON's own ``cnt`` does it in 3,241,
``arm_binary``.)
"""
from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.script import tirx as T

from frugalrt.targets.kernels import has_cpu_features
from frugalrt.targets.kernels.packing import NEVER, UNPACKED, Packing, count_thresholds, sign_thresholds

OUTS = 16  # outputs per 32-byte weight vector
FLUSH = 31  # q-steps before the u8 accumulators could overflow (8 per step)
ROWS = 4  # rows per register block (the remainder goes one row at a time)
COLS = (2, 4)  # weight vectors per register block with ROWS rows, with one row (a multiple of the first)
SPLIT_MAX_BYTES = 512 << 10  # largest split weights (L2 of one Zen 3 core)
def flip_rows(w_bytes: np.ndarray, k: int, flip: np.ndarray) -> np.ndarray:
    """[N, ceil(K/8)] packed signs with the K real bits of the rows in ``flip`` inverted (pad bits stay 0)."""
    real = np.packbits(np.ones(k, bool), bitorder="little")
    return np.where(np.asarray(flip, bool)[:, None], w_bytes ^ real, w_bytes).astype(np.uint8)


def packed_output_consts(w_bytes: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, k: int,
                         packing: Packing, n_pad: int) -> tuple[np.ndarray, np.ndarray]:
    """A GEMM's packed Y: (its weights, negative-scale rows flipped; thresholds [N_pad] int32, bit =
    count > thr, pad channels never set)."""
    sense, t = sign_thresholds(scale, bias, k, packing.activation)
    thr = np.full(n_pad, NEVER, np.int32)
    thr[: len(scale)] = count_thresholds(k, sense, t, k)
    return flip_rows(w_bytes, k, sense < 0), thr


def nibble_tables() -> np.ndarray:
    """[256, 32] uint8: row b is the table pair of activation byte b. Lane l < 16 holds
    ``popcount((b & 15) ^ l)``, lane l >= 16 ``popcount((b >> 4) ^ (l - 16))``."""
    lane = np.arange(32)[None, :]
    nibble = np.where(lane < 16, np.arange(256)[:, None] & 15, np.arange(256)[:, None] >> 4)
    return np.bitwise_count(nibble ^ (lane % 16)).astype(np.uint8)


def repack_weights(w_bytes: np.ndarray, n_pad: int, split: bool = True) -> np.ndarray:
    """[N, ceil(K/8)] packed signs -> [N_pad/16, Q, 2, 32] (``split``) or [N_pad/16, Q, 32] uint8, Q = ceil(K/16).

    Lane l of slice (q, h) belongs to output 16 * block + l % 16 and holds the K-bits of group
    4q + 2h + l // 16 (group g = bits 4g..4g+3), i.e. one nibble of activation byte 2q + h.
    Split: one nibble per byte (h = 0, 1 in two vectors); packed: h = 0 low, h = 1 high nibble.
    """
    n, nbytes = w_bytes.shape
    q = -(-nbytes // 2)
    padded = np.zeros((n_pad, 2 * q), np.uint8)
    padded[:n, :nbytes] = w_bytes
    pairs = padded.reshape(n_pad // OUTS, OUTS, q, 2)  # byte 2q: groups 4q, 4q+1; byte 2q+1: 4q+2, 4q+3
    lo = np.concatenate([pairs[..., 0] & 15, pairs[..., 0] >> 4], axis=1)  # [blk, 32, q]: lane = l // 16
    hi = np.concatenate([pairs[..., 1] & 15, pairs[..., 1] >> 4], axis=1)
    if split:
        return np.ascontiguousarray(np.stack([lo, hi], axis=2).transpose(0, 3, 2, 1))
    return np.ascontiguousarray((lo | (hi << 4)).transpose(0, 2, 1))


def _lookup(table, index):
    """Byte lookups in 16-entry tables: ``vpshufb`` (32 lanes, one table per 128-bit lane)."""
    return T.call_llvm_pure_intrin("uint8x32", "llvm.x86.avx2.pshuf.b", table, index)


def _iota16():
    """Lane l: l % 16 (every 4-bit value, once per 128-bit lane)."""
    return T.Cast("uint8x32", T.ramp(0, 1, 32)) & T.broadcast(T.uint8(15), 32)


def _pop4():
    """Lane l: popcount(l % 16), the 4-bit popcount table (a constant LLVM folds)."""
    return T.popcount(_iota16())


def byte_popcount(v):
    """Per-byte popcount of a uint8x32 vector: two ``vpshufb`` nibble lookups."""
    return (_lookup(_pop4(), v & T.broadcast(T.uint8(15), 32))
            + _lookup(_pop4(), v >> T.broadcast(T.uint8(4), 32)))


def sign_bytes(k: int, nbytes: int):
    """Macro ``(X, xbits, row, base)``: sign bits of row ``row`` of X[., K] into ``xbits[base:base + nbytes]``
    (bit set = negative, pad bits 0). Whole bytes: ``vcmpltps`` + ``vmovmskps``."""
    def byte(X, row, i):
        negative = X[row, T.ramp(i * 8, 1, 8)] < T.broadcast(T.float32(0), 8)
        return T.call_llvm_pure_intrin("int32", "llvm.x86.avx.movmsk.ps.256", T.reinterpret(
            "float32x8", T.Select(negative, T.broadcast(T.int32(-1), 8), T.broadcast(T.int32(0), 8))))

    @T.macro
    def pack(X, xbits, row, base):
        for i in range(k // 8):
            xbits[base + i] = T.Cast("uint8", byte(X, row, i))
        for i in range(k // 8, nbytes):
            xbits[base + i] = T.uint8(0)
            for t in T.unroll(8):
                xbits[base + i] = xbits[base + i] | T.Cast("uint8", T.if_then_else(
                    i * 8 + t < k, T.Cast("uint8", X[row, T.min(i * 8 + t, k - 1)] < T.float32(0)),
                    T.uint8(0)) << T.uint8(t))

    return pack


def copy_bytes(k: int, nbytes: int):
    """Macro ``(X, xbits, row, base)``: packed sign bytes X[row, :ceil(K/8)] into ``xbits[base:base + nbytes]``,
    the bits past K masked to 0 and the bytes past them 0."""
    given = -(-k // 8)
    last = (1 << (k % 8 or 8)) - 1

    @T.macro
    def copy(X, xbits, row, base):
        for i in range(given - 1):
            xbits[base + i] = X[row, i]
        xbits[base + given - 1] = X[row, given - 1] & T.uint8(last)
        for i in range(given, nbytes):
            xbits[base + i] = T.uint8(0)

    return copy


def unfused(product):
    """Keep LLVM from contracting ``product + bias`` into an FMA: docs/ops.md rounds the product first."""
    return T.call_llvm_pure_intrin("float32", "llvm.arithmetic.fence", product)


def binary_gemm_primfunc(k: int, n: int, n_pad: int, split: bool = True, packing: Packing = UNPACKED):
    """TIR kernel ``(X[batch, K], W, tables[256, 32], scale[N_pad], bias[N_pad], Y[batch, N])``,
    W from :func:`repack_weights` (``split`` chooses its layout), tables from :func:`nibble_tables`.
    ``packing.input``: X is [batch, ceil(K/8)] uint8; ``packing.output``: the least counts that set a bit,
    ``least[N_pad]`` (uint16, :func:`kernel_inputs`), replace scale and bias, and Y is [batch, ceil(N/8)] uint8."""
    q_steps = -(-k // 16)
    nbytes = 2 * q_steps
    blocks = n_pad // OUTS
    tile_cols, row_cols = (c if blocks % c == 0 else 1 for c in COLS)  # weight vectors per register block
    flushes = -(-q_steps // FLUSH)
    pack = copy_bytes(k, nbytes) if packing.input else sign_bytes(k, nbytes)
    x_shape, x_dtype = ((-(-k // 8),), "uint8") if packing.input else ((k,), "float32")
    y_bytes = -(-n // 8)
    unit = max(tile_cols, row_cols)
    w_shape = (blocks, q_steps, 2, 32) if split else (blocks, q_steps, 32)
    vec, half = T.ramp(0, 1, 32), T.ramp(0, 1, 16)

    @T.macro
    def load_weights(W, wlo, whi, b, c, q):
        if split:
            wlo[c, vec] = W[b, q, 0, vec]
            whi[c, vec] = W[b, q, 1, vec]
        else:
            wlo[c, vec] = W[b, q, vec] & T.broadcast(T.uint8(15), 32)
            whi[c, vec] = W[b, q, vec] >> T.broadcast(T.uint8(4), 32)

    @T.macro
    def output(Y, acc16, scale, bias, row, r, c, base, j):
        Y[row, base + j] = unfused(T.Cast("float32", k - 2 * T.Cast("int32", acc16[r, c, j]))
                                   * scale[base + j]) + bias[base + j]

    def bits16(acc16, least, r, c, base):
        """Output bits of the 16 columns from ``base``: u16 count >= least (``vpmaxuw`` + ``vpcmpeqw``)."""
        return T.reinterpret("uint16", T.Cast("uint1x16", acc16[r, c, half] >= least[T.ramp(base, 1, OUTS)]))

    @T.macro
    def store(Y, acc16, scale, bias, row, r, c, base):
        """Columns ``base`` .. ``base + 16`` of row ``row`` (a packed Y: ``scale`` holds the least counts)."""
        if packing.output:
            for e in T.unroll(2):
                if base // 8 + e < y_bytes:
                    Y[row, base // 8 + e] = T.Cast("uint8", bits16(acc16, scale, r, c, base) >> T.uint16(8 * e))
        elif base + OUTS <= n:
            for j in T.vectorized(OUTS):
                output(Y, acc16, scale, bias, row, r, c, base, j)
        else:
            for j in range(OUTS):
                if base + j < n:
                    output(Y, acc16, scale, bias, row, r, c, base, j)

    @T.macro
    def rows_block(W, tab, xbits, rtab, scale, bias, Y, acc8, acc16, wlo, whi, first_row, nrows, cols):
        for r, q in T.grid(nrows, q_steps):  # the rows' tables, copied once into a small (L1) buffer
            for h in T.unroll(2):
                rtab[r, q, h, vec] = tab[T.Cast("int32", xbits[first_row + r, 2 * q + h]), vec]
        for nb in range(blocks // cols):  # in units of ``cols`` weight vectors
            for r in T.unroll(nrows):
                for c in T.unroll(cols):
                    acc16[r, c, half] = T.broadcast(T.uint16(0), 16)
            for f in range(flushes):
                for r in T.unroll(nrows):
                    for c in T.unroll(cols):
                        acc8[r, c, vec] = T.broadcast(T.uint8(0), 32)
                for q in range(f * FLUSH, T.min(q_steps, f * FLUSH + FLUSH)):  # no ``q = ...``: a local var
                    for c in T.unroll(cols):
                        load_weights(W, wlo, whi, nb * cols + c, c, q)
                    for r in T.unroll(nrows):
                        for c in T.unroll(cols):
                            acc8[r, c, vec] = (acc8[r, c, vec] + _lookup(rtab[r, q, 0, vec], wlo[c, vec])
                                               + _lookup(rtab[r, q, 1, vec], whi[c, vec]))
                for r in T.unroll(nrows):  # widen; the two lanes hold two K groups of the same 16 outputs
                    for c in T.unroll(cols):
                        acc16[r, c, half] = (acc16[r, c, half] + T.Cast("uint16x16", acc8[r, c, half])
                                             + T.Cast("uint16x16", acc8[r, c, T.ramp(16, 1, 16)]))
            for r in range(nrows):
                for c in range(cols):
                    store(Y, acc16, scale, bias, first_row + r, r, c, (nb * cols + c) * OUTS)

    @T.macro
    def body(X, W, tab, scale, bias, Y, batch):
        xbits = T.alloc_buffer((batch, nbytes), "uint8")
        xflat = T.decl_buffer((batch * nbytes,), "uint8", data=xbits.data)
        rtab = T.alloc_buffer((ROWS, q_steps, 2, 32), "uint8")
        # register blocks: under 1 KiB and global scope, so a stack array that LLVM keeps in
        # registers ("local" scope or more bytes would go to TVMBackendAllocWorkspace, heap memory)
        acc8 = T.alloc_buffer((ROWS, unit, 32), "uint8")
        acc16 = T.alloc_buffer((ROWS, unit, 16), "uint16")
        wlo = T.alloc_buffer((unit, 32), "uint8")
        whi = T.alloc_buffer((unit, 32), "uint8")
        for row in range(batch):  # sign bits: bit set = negative, pad bits 0
            pack(X, xflat, row, row * nbytes)
        for tile in range(batch // ROWS):
            rows_block(W, tab, xbits, rtab, scale, bias, Y, acc8, acc16, wlo, whi, tile * ROWS, ROWS, tile_cols)
        for row in range(batch - batch % ROWS, batch):
            rows_block(W, tab, xbits, rtab, scale, bias, Y, acc8, acc16, wlo, whi, row, 1, row_cols)

    if packing.output:
        @T.prim_func
        def kernel(x: T.handle, W: T.Buffer(w_shape, "uint8"), tab: T.Buffer((256, 32), "uint8"),
                   least: T.Buffer((n_pad,), "uint16"), y: T.handle):
            T.func_attr({"tirx.noalias": True})
            batch = T.int64()
            X = T.match_buffer(x, (batch, *x_shape), x_dtype)
            Y = T.match_buffer(y, (batch, y_bytes), "uint8")
            body(X, W, tab, least, least, Y, batch)  # (the thresholds take the float output's places)
    else:
        @T.prim_func
        def kernel(x: T.handle, W: T.Buffer(w_shape, "uint8"), tab: T.Buffer((256, 32), "uint8"),
                   scale: T.Buffer((n_pad,), "float32"), bias: T.Buffer((n_pad,), "float32"), y: T.handle):
            T.func_attr({"tirx.noalias": True})
            batch = T.int64()
            X = T.match_buffer(x, (batch, *x_shape), x_dtype)
            Y = T.match_buffer(y, (batch, n), "float32")
            body(X, W, tab, scale, bias, Y, batch)

    return kernel


def splits_weights(k: int, n_pad: int) -> bool:
    """Split layout (one nibble per byte: no masking in the inner loop) while the weights stay in L2;
    above that the kernel streams its weights and the packed layout halves the traffic."""
    return n_pad // OUTS * -(-k // 16) * 64 <= SPLIT_MAX_BYTES


def kernel_inputs(w_bytes: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, k: int,
                  packing: Packing = UNPACKED):
    """``(primfunc, constant inputs after X)`` of the kernel for ``w_bytes``, the op's [N, ceil(K/8)] uint8 input."""
    n = w_bytes.shape[0]
    n_pad = -(-n // OUTS) * OUTS
    split = splits_weights(k, n_pad)
    if packing.output:
        w_bytes, thr = packed_output_consts(w_bytes, scale, bias, k, packing, n_pad)
        out = [np.clip(thr.astype(np.int64) + 1, 0, 0xFFFF).astype(np.uint16)]  # count > thr: count >= thr + 1
    else:
        out = [*padded_scale_bias(scale, bias, n_pad)]
    consts = [repack_weights(w_bytes, n_pad, split), nibble_tables(), *out]
    return binary_gemm_primfunc(k, n, n_pad, split, packing), consts


def gemm_output_type(x: relax.Expr, n: int, packing: Packing) -> relax.TensorType:
    """Y of a BinaryGemm: [batch, N] float32, or [batch, ceil(N/8)] uint8 (packed)."""
    batch = x.ty.shape.values[0]
    return relax.TensorType((batch, -(-n // 8)), "uint8") if packing.output else relax.TensorType((batch, n), "float32")


def emit_binary_gemm_cpu(bb: relax.BlockBuilder, x: relax.Expr, w_bytes: np.ndarray, scale: np.ndarray,
                         bias: np.ndarray | None, k: int, packing: Packing = UNPACKED) -> relax.Expr:
    func, consts = kernel_inputs(w_bytes, scale, bias, k, packing)
    name = "frugalrt_binary_gemm_cpu_packed" if packing.any else "frugalrt_binary_gemm_cpu"
    gv = bb.add_func(func.with_attr("op_pattern", 8).without_attr("global_symbol"), name)  # opaque; Relax names it
    return bb.emit(relax.call_tir(gv, [x, *map(relax.const, consts)], gemm_output_type(x, w_bytes.shape[0], packing)))


def padded_scale_bias(scale: np.ndarray, bias: np.ndarray | None, n_pad: int) -> tuple[np.ndarray, np.ndarray]:
    """scale and bias (zeros if None) zero-padded to ``n_pad`` float32 entries."""
    out = np.zeros((2, n_pad), np.float32)
    out[0, : len(scale)] = scale
    if bias is not None:
        out[1, : len(bias)] = bias
    return out[0], out[1]


def fits_u16_counts(k: int) -> bool:
    """The table kernel's u16 counters gather up to 16 per 16 bits of K: exact while 16*ceil(K/16) < 2^16."""
    return 16 * -(-k // 16) <= 0xFFFF


def has_avx2(target) -> bool:
    return has_cpu_features(target, "avx2")


def emit_binary_gemm_x86(bb: relax.BlockBuilder, x: relax.Expr, w_bytes: np.ndarray, scale: np.ndarray,
                         bias: np.ndarray | None, k: int, target, packing: Packing = UNPACKED) -> relax.Expr:
    """Lowering entry (``BinaryGemmLowering.KERNELS["x86"]``): XOR + ``vpopcntq`` with AVX-512 VPOPCNTDQ,
    else the table-lookup kernel with AVX2 (``vpshufb`` on 256 bits) while its u16 counters cannot
    overflow, else the generic kernel; each with packed activations too."""
    from frugalrt.targets.kernels import cpu_binary_vpopcnt  # imports this module

    if cpu_binary_vpopcnt.has_vpopcntdq(target):
        return cpu_binary_vpopcnt.emit_binary_gemm_vpopcnt(bb, x, w_bytes, scale, bias, k, packing)
    if has_avx2(target) and fits_u16_counts(k):
        return emit_binary_gemm_cpu(bb, x, w_bytes, scale, bias, k, packing)
    from frugalrt.targets.kernels.binary import emit_gemm_generic

    return emit_gemm_generic(bb, x, w_bytes, scale, bias, k, target, packing)
