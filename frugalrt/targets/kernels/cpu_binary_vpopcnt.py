"""``ai.frugalrt::BinaryGemm`` for x86 CPUs with AVX-512 VPOPCNTDQ (Ice Lake / Sapphire Rapids Xeons, Zen 4).

There the plain XNOR-popcount is the fast path: ``vpxorq`` + ``vpopcntq`` + ``vpaddq`` count
512 (row, output, bit) triples in 3 instructions, no tables needed. Weights are repacked at
compile time into ``[N_pad / lanes, words, lanes]`` u64 so the inner loop streams one vector of
``lanes`` outputs per 64-bit word of K; a block of ``ROWS`` rows x ``VECS`` vectors stays in
registers and reuses every weight load ``ROWS`` times. The same TIR with 4 or 8 lanes compiles for
any AVX2 x86-64 (LLVM expands the popcount), which is how the tests check it on AVX2 machines.
"""
from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.script import tirx as T

from frugalrt.targets.kernels import has_cpu_features, pack_words
from frugalrt.targets.kernels.cpu_binary import padded_scale_bias, sign_bytes, unfused

LANES = 8  # u64 per zmm register
VECS = 2  # weight vectors per register block
ROWS = 4  # rows per register block (the remainder goes one row at a time)


def repack_words(w_bytes: np.ndarray, n_pad: int, lanes: int = LANES) -> np.ndarray:
    """[N, ceil(K/8)] packed signs -> [N_pad / lanes, ceil(K/64), lanes] u64, zero pad bits."""
    rows = np.zeros((n_pad, w_bytes.shape[1]), np.uint8)
    rows[: len(w_bytes)] = w_bytes
    w = pack_words(rows, 64)
    return np.ascontiguousarray(w.reshape(n_pad // lanes, lanes, -1).transpose(0, 2, 1))


def vpopcnt_gemm_primfunc(k: int, n: int, n_pad: int, lanes: int = LANES):
    """TIR ``(X[batch, K], Wv[N_pad/lanes, words, lanes], scale[N_pad], bias[N_pad], Y[batch, N])``."""
    words = -(-k // 64)
    blk = lanes * VECS
    pack = sign_bytes(k, words * 8)

    @T.macro
    def block(xw, W, scale, bias, Y, acc, first_row, nrows, ob):
        for r in T.unroll(nrows):
            for v in T.unroll(VECS):
                acc[r, v, T.ramp(0, 1, lanes)] = T.broadcast(T.uint64(0), lanes)
        for q in range(words):
            for r in T.unroll(nrows):
                for v in T.unroll(VECS):
                    acc[r, v, T.ramp(0, 1, lanes)] = acc[r, v, T.ramp(0, 1, lanes)] + T.popcount(
                        T.broadcast(xw[first_row + r, q], lanes) ^ W[ob * VECS + v, q, T.ramp(0, 1, lanes)])
        for r in range(nrows):
            for v in range(VECS):
                for l in range(lanes):
                    if ob * blk + v * lanes + l < n:
                        Y[first_row + r, ob * blk + v * lanes + l] = unfused(T.Cast(
                            "float32", k - 2 * T.Cast("int32", acc[r, v, l])) * scale[ob * blk + v * lanes + l]
                        ) + bias[ob * blk + v * lanes + l]

    @T.prim_func
    def kernel(x: T.handle, W: T.Buffer((n_pad // lanes, words, lanes), "uint64"),
               scale: T.Buffer((n_pad,), "float32"), bias: T.Buffer((n_pad,), "float32"), y: T.handle):
        T.func_attr({"tirx.noalias": True})
        batch = T.int64()
        X = T.match_buffer(x, (batch, k), "float32")
        Y = T.match_buffer(y, (batch, n), "float32")
        xbits = T.alloc_buffer((words * 8,), "uint8")
        xw = T.alloc_buffer((batch, words), "uint64")
        # register blocks: under 1 KiB and global scope, so a stack array that LLVM keeps in
        # registers ("local" scope or more bytes would go to TVMBackendAllocWorkspace, heap memory)
        acc = T.alloc_buffer((ROWS, VECS, lanes), "uint64")
        for row in range(batch):  # sign bytes, then little-endian u64 words
            pack(X, xbits, row, 0)
            for q in range(words):
                xw[row, q] = T.uint64(0)
                for t in T.unroll(8):
                    xw[row, q] = xw[row, q] | (T.Cast("uint64", xbits[q * 8 + t]) << T.uint64(8 * t))
        for ob in range(n_pad // blk):
            for tile in range(batch // ROWS):
                block(xw, W, scale, bias, Y, acc, tile * ROWS, ROWS, ob)
            for row in range(batch - batch % ROWS, batch):
                block(xw, W, scale, bias, Y, acc, row, 1, ob)

    return kernel


def has_vpopcntdq(target) -> bool:
    return has_cpu_features(target, "avx512vpopcntdq")


def emit_binary_gemm_vpopcnt(bb: relax.BlockBuilder, x: relax.Expr, w_bytes: np.ndarray, scale: np.ndarray,
                             bias: np.ndarray | None, k: int) -> relax.Expr:
    """Emit the kernel; ``w_bytes`` is the op's [N, ceil(K/8)] uint8 input."""
    n = w_bytes.shape[0]
    n_pad = -(-n // (LANES * VECS)) * LANES * VECS
    scale_p, bias_p = padded_scale_bias(scale, bias, n_pad)
    func = vpopcnt_gemm_primfunc(k, n, n_pad).with_attr("op_pattern", 8).without_attr("global_symbol")
    gv = bb.add_func(func, "frugalrt_binary_gemm_vpopcnt")
    batch = x.ty.shape.values[0]
    consts = [repack_words(w_bytes, n_pad), scale_p, bias_p]
    return bb.emit(relax.call_tir(gv, [x, *map(relax.const, consts)], relax.TensorType((batch, n), "float32")))
