"""``ai.frugalrt::BinaryGemm`` for x86 CPUs with AVX-512 VPOPCNTDQ (Ice Lake / Sapphire Rapids Xeons, Zen 4).

There the plain XNOR-popcount is the fast path: ``vpxord`` (with the activation word broadcast by
a load) + ``vpopcntd`` + ``vpaddd`` count 512 (row, output, bit) triples in 3 instructions, no
tables needed. K is packed into u32 words, so one zmm holds 16 output columns and
the accumulators are already the i32 lanes of the output transform (u64 words would need a
narrowing shuffle per 8 outputs). Weights are repacked at compile time into
``[N_pad / (lanes * VECS), words, VECS, lanes]``: one register block's weights are one sequential
stream. A block of ``ROWS`` rows x ``VECS`` vectors stays in registers, each weight vector is
reused by ``ROWS`` rows; the output transform ``(K - 2 * count) * scale + bias`` runs on whole
vectors. Sign bits are packed 32 at a time by one vector compare (``vcmpltps`` into a mask
register with AVX-512).

On a Golden Cove core (Sapphire/Emerald Rapids) ``vpopcntd`` issues on port 5 only and the xor
and add on ports 0 or 5: a tight loop of independent triples runs 2/3 of one per cycle, 341
binary MACs per cycle (1.02 T binary MAC/s at the 2.97 GHz of a 2-vCPU Emerald Rapids VM). At
64x1024x1024 the output transform (5 instructions per 16 outputs) and the sign packing add ~7% to
the triples: this kernel ran 894 G (848 G through the Relax VM), a hand-written C version of the
same design 889 G (best of 150 runs each; benchmarks/bench_binary.py prints medians).
The same TIR with 8 lanes compiles for any x86-64 (LLVM expands the popcount), which is how the
tests check it on machines without the feature.

Packed activations (docs/ops.md): a packed X fills the u32 words straight from its bytes (the bits
past K masked), and a packed Y replaces the output transform by one signed compare of the counts
with per-channel thresholds into a mask register (``cpu_binary.packed_output_consts``: the weights of
negative-scale channels are flipped), stored as 2 bytes per 16 outputs.
"""
from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.script import tirx as T

from frugalrt.targets.kernels import has_cpu_features, pack_words
from frugalrt.targets.kernels.cpu_binary import gemm_output_type, packed_output_consts, padded_scale_bias
from frugalrt.targets.kernels.packing import UNPACKED, Packing

WORD = 32  # bits of K per word
LANES = 16  # u32 words per zmm register: output columns per vector
# A register block of ROWS x VECS zmm accumulators must stay under 1 KiB (the stack limit of TVM's CPU lowering):
# 4 x 4 (1 KiB) became heap workspace in Relax builds, stored after every add; 4 x 3, 3 x 5, 5 x 3 ran alike.
VECS = 3  # weight vectors per register block
ROWS = 4  # rows per register block (the remainder goes one row at a time)
UNROLL = 2  # K words per loop iteration


def repack_words(w_bytes: np.ndarray, n_pad: int, lanes: int = LANES) -> np.ndarray:
    """[N, ceil(K/8)] packed signs -> [N_pad / (lanes * VECS), ceil(K/32), VECS, lanes] u32, zero pad bits."""
    rows = np.zeros((n_pad, w_bytes.shape[1]), np.uint8)
    rows[: len(w_bytes)] = w_bytes
    w = pack_words(rows, WORD)
    return np.ascontiguousarray(w.reshape(n_pad // (lanes * VECS), VECS, lanes, -1).transpose(0, 3, 1, 2))


def output_transform(total, count, scale, bias, lanes: int):
    """docs/ops.md's output of ``lanes`` columns: S = total - 2 * count (total: the taps, K for a GEMM), to
    float32, times scale, rounded (a fence keeps LLVM from contracting it into an FMA), plus bias."""
    def typed(t: str) -> str:
        return f"{t}x{lanes}" if lanes > 1 else t

    two = T.broadcast(T.int32(2), lanes) if lanes > 1 else T.int32(2)
    product = T.Cast(typed("float32"), total - T.Cast(typed("int32"), count) * two) * scale
    return T.call_llvm_pure_intrin(typed("float32"), "llvm.arithmetic.fence", product) + bias


def sign_words(k: int):
    """Macro ``(X, xw, row)``: sign bits of X[row, :K] into u32 words ``xw[row, :]`` (bit set = negative,
    pad bits 0): one 32-lane compare per whole word (a mask register with AVX-512), bit by bit for the tail."""
    whole, tail = divmod(k, WORD)

    @T.macro
    def pack(X, xw, row):
        for q in range(whole):
            xw[row, q] = T.reinterpret("uint32", T.Cast(f"uint1x{WORD}", X[row, T.ramp(q * WORD, 1, WORD)]
                                                         < T.broadcast(T.float32(0), WORD)))  # bool is a byte
        if tail > 0:
            xw[row, whole] = T.uint32(0)
            for t in range(tail):
                xw[row, whole] = xw[row, whole] | (
                    T.Cast("uint32", X[row, whole * WORD + t] < T.float32(0)) << T.Cast("uint32", t))

    return pack


def read_words(k: int):
    """Macro ``(X, xw, row)``: packed sign bytes X[row, :ceil(K/8)] into u32 words ``xw[row, :]``, the bits
    past K masked to 0: whole words as they are, the tail word byte by byte."""
    whole, tail = divmod(k, WORD)
    nbytes = -(-k // 8)

    @T.macro
    def read(X, xw, row):
        for q in range(whole):
            xw[row, q] = T.reinterpret("uint32", X[row, T.ramp(q * 4, 1, 4)])
        if tail > 0:
            xw[row, whole] = T.uint32(0)
            for e in T.unroll(nbytes - whole * 4):
                xw[row, whole] = xw[row, whole] | (T.Cast("uint32", X[row, whole * 4 + e]) << T.uint32(8 * e))
            xw[row, whole] = xw[row, whole] & T.uint32((1 << tail) - 1)

    return read


def vpopcnt_gemm_primfunc(k: int, n: int, n_pad: int, lanes: int = LANES, packing: Packing = UNPACKED):
    """TIR ``(X[batch, K], Wv[N_pad/(lanes*VECS), words, VECS, lanes], scale[N_pad], bias[N_pad], Y[batch, N])``.
    ``packing.input``: X is [batch, ceil(K/8)] uint8; ``packing.output``: ``thr[N_pad]`` (int32,
    ``cpu_binary.packed_output_consts``) replaces scale and bias, and Y is [batch, ceil(N/8)] uint8."""
    words = -(-k // WORD)
    blk = lanes * VECS
    vec = T.ramp(0, 1, lanes)
    pack = read_words(k) if packing.input else sign_words(k)
    x_shape, x_dtype = ((-(-k // 8),), "uint8") if packing.input else ((k,), "float32")
    y_bytes = -(-n // 8)
    bits = f"uint{lanes}"
    whole_blocks, rest = divmod(n, blk)  # the last block, if any, has ``rest`` columns:
    rest_vecs, rest_cols = divmod(rest, lanes)  # whole vectors, then single columns

    @T.macro
    def step(xw, W, acc, row0, nrows, nb, nv, q):
        for r in T.unroll(nrows):
            for v in T.unroll(nv):
                acc[r, v, vec] = acc[r, v, vec] + T.popcount(T.broadcast(xw[row0 + r, q], lanes) ^ W[nb, q, v, vec])

    @T.macro
    def store_bits(Y, acc, thr, row0, nrows, nb, nvecs, ncols):
        """Packed Y: count > threshold into a mask, ``lanes // 8`` bytes per vector (a partial vector's
        pad channels never set their bit; bytes past ceil(N/8) are not stored)."""
        for r in T.unroll(nrows):
            for v in T.unroll(nvecs + (ncols > 0)):
                for e in T.unroll(lanes // 8):
                    if (nb * blk + v * lanes) // 8 + e < y_bytes:
                        Y[row0 + r, (nb * blk + v * lanes) // 8 + e] = T.Cast("uint8", T.reinterpret(
                            bits, T.Cast(f"uint1x{lanes}", T.reinterpret(f"int32x{lanes}", acc[r, v, vec])
                                         > thr[T.ramp(nb * blk + v * lanes, 1, lanes)])) >> T.Cast(bits, 8 * e))

    @T.macro
    def store_floats(Y, acc, scale, bias, row0, nrows, nb, nvecs, ncols):
        for r in T.unroll(nrows):
            for v in T.unroll(nvecs):
                Y[row0 + r, T.ramp(nb * blk + v * lanes, 1, lanes)] = output_transform(
                    T.broadcast(T.int32(k), lanes), acc[r, v, vec], scale[T.ramp(nb * blk + v * lanes, 1, lanes)],
                    bias[T.ramp(nb * blk + v * lanes, 1, lanes)], lanes)
            if ncols > 0:
                for c in T.unroll(ncols):
                    Y[row0 + r, nb * blk + nvecs * lanes + c] = output_transform(
                        T.int32(k), acc[r, nvecs, c], scale[nb * blk + nvecs * lanes + c],
                        bias[nb * blk + nvecs * lanes + c], 1)

    @T.macro
    def block(xw, W, scale, bias, Y, acc, row0, nrows, nb, nvecs, ncols):
        """Rows row0.. of column block nb: ``nvecs`` whole output vectors, then ``ncols`` single columns."""
        for r in T.unroll(nrows):
            for v in T.unroll(nvecs + (ncols > 0)):
                acc[r, v, vec] = T.broadcast(T.uint32(0), lanes)
        for qq in range(words // UNROLL):  # unrolled: fewer scalar loop instructions competing for ports 0 and 5
            for e in T.unroll(UNROLL):
                step(xw, W, acc, row0, nrows, nb, nvecs + (ncols > 0), qq * UNROLL + e)
        for q in range(words - words % UNROLL, words):
            step(xw, W, acc, row0, nrows, nb, nvecs + (ncols > 0), q)
        if packing.output:
            store_bits(Y, acc, scale, row0, nrows, nb, nvecs, ncols)
        else:
            store_floats(Y, acc, scale, bias, row0, nrows, nb, nvecs, ncols)

    @T.macro
    def column_block(xw, W, scale, bias, Y, acc, batch, nb, nvecs, ncols):
        for tile in range(batch // ROWS):
            block(xw, W, scale, bias, Y, acc, tile * ROWS, ROWS, nb, nvecs, ncols)
        for row in range(batch - batch % ROWS, batch):
            block(xw, W, scale, bias, Y, acc, row, 1, nb, nvecs, ncols)

    @T.macro
    def body(X, W, scale, bias, Y, batch):
        xw = T.alloc_buffer((batch, words), "uint32")
        # register blocks: under 1 KiB and global scope, so a stack array that LLVM keeps in
        # registers ("local" scope or more bytes would go to TVMBackendAllocWorkspace, heap memory)
        acc = T.alloc_buffer((ROWS, VECS, lanes), "uint32")
        for row in range(batch):
            pack(X, xw, row)
        for nb in range(whole_blocks):
            column_block(xw, W, scale, bias, Y, acc, batch, nb, VECS, 0)
        if rest > 0:
            column_block(xw, W, scale, bias, Y, acc, batch, whole_blocks, rest_vecs, rest_cols)

    w_shape = (n_pad // blk, words, VECS, lanes)
    if packing.output:
        @T.prim_func
        def kernel(x: T.handle, W: T.Buffer(w_shape, "uint32"), thr: T.Buffer((n_pad,), "int32"), y: T.handle):
            T.func_attr({"tirx.noalias": True})
            batch = T.int64()
            X = T.match_buffer(x, (batch, *x_shape), x_dtype)
            Y = T.match_buffer(y, (batch, y_bytes), "uint8")
            body(X, W, thr, thr, Y, batch)  # (the thresholds take the float output's places)
    else:
        @T.prim_func
        def kernel(x: T.handle, W: T.Buffer(w_shape, "uint32"), scale: T.Buffer((n_pad,), "float32"),
                   bias: T.Buffer((n_pad,), "float32"), y: T.handle):
            T.func_attr({"tirx.noalias": True})
            batch = T.int64()
            X = T.match_buffer(x, (batch, *x_shape), x_dtype)
            Y = T.match_buffer(y, (batch, n), "float32")
            body(X, W, scale, bias, Y, batch)

    return kernel


def has_vpopcntdq(target) -> bool:
    return has_cpu_features(target, "avx512vpopcntdq")


def kernel_inputs(w_bytes: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, k: int, lanes: int = LANES,
                  packing: Packing = UNPACKED):
    """``(primfunc, constant inputs after X)`` of the kernel for ``w_bytes``, the op's [N, ceil(K/8)] uint8 input."""
    n = w_bytes.shape[0]
    n_pad = -(-n // (lanes * VECS)) * lanes * VECS
    if packing.output:
        w_bytes, thr = packed_output_consts(w_bytes, scale, bias, k, packing, n_pad)
        out = [thr]
    else:
        out = [*padded_scale_bias(scale, bias, n_pad)]
    return vpopcnt_gemm_primfunc(k, n, n_pad, lanes, packing), [repack_words(w_bytes, n_pad, lanes), *out]


def emit_binary_gemm_vpopcnt(bb: relax.BlockBuilder, x: relax.Expr, w_bytes: np.ndarray, scale: np.ndarray,
                             bias: np.ndarray | None, k: int, packing: Packing = UNPACKED) -> relax.Expr:
    """Emit the kernel; ``w_bytes`` is the op's [N, ceil(K/8)] uint8 input."""
    func, consts = kernel_inputs(w_bytes, scale, bias, k, packing=packing)
    name = "frugalrt_binary_gemm_vpopcnt_packed" if packing.any else "frugalrt_binary_gemm_vpopcnt"
    gv = bb.add_func(func.with_attr("op_pattern", 8).without_attr("global_symbol"), name)
    return bb.emit(relax.call_tir(gv, [x, *map(relax.const, consts)], gemm_output_type(x, w_bytes.shape[0], packing)))
