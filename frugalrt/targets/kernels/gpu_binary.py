"""CUDA kernels of ``ai.frugalrt::BinaryGemm`` and ``BinaryConv``: XOR + popcount on 64-bit words.

Two kernels per op. A packing kernel (TE, scheduled by dlight's GPU rules) turns float activations into sign words once (bit t of word
w set when element 64 w + t is negative; for a convolution, the (c, i, j) window of each output
position, zero bits outside the image: a bit-level im2col, 32x smaller than the floats). The
popcount GEMM (:func:`popcount_gemm`) then multiplies two word matrices tile by tile through
shared memory, each thread keeping a TM x TN register tile of counts (``__popcll`` of
``a ^ b``, ANDed with the in-image mask for a padded convolution), and ends with the fused
transform of docs/ops.md: ``S = taps - 2 * count`` converted to float32, ``__fmul_rn`` by the
channel's scale, ``__fadd_rn`` of its bias (nvcc may not contract them into an FMA: bit-identical
to the reference). The GEMM writes each output once and never reads it back, so the fused
activation (``kernels/activation.py``) applies to it.

A convolution is the GEMM with weights as rows and output positions (batch x OH x OW) as
columns: threads that neighbour along a row store neighbouring pixels of ``Y[b, o]`` (coalesced).
"""
from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx
from tvm.script import tirx as T

from frugalrt.targets.kernels import conv_output_shape, pack_words
from frugalrt.targets.kernels.gpu_butterfly import fadd, fmul
from frugalrt.targets.kernels.packing import UNPACKED, Packing

THREADS = 16  # threads per block along each of the two output dimensions
BK = 8  # words per K step in shared memory


def register_tile(extent: int | None) -> int:
    """Outputs per thread along a dimension of static ``extent`` (None: dynamic, assumed large)."""
    return 8 if extent is None or extent >= 128 else 4 if extent >= 64 else 1


def _bit(negative, r) -> tirx.PrimExpr:
    """uint64 word with bit r set when ``negative`` holds (a reduction term of the packing kernels)."""
    return tirx.Select(negative, tirx.const(1, "uint64") << tirx.Cast("uint64", r.var), tirx.const(0, "uint64"))


def pack_rows_te(x: te.Tensor, k: int) -> te.Tensor:
    """[batch, ceil(K/64)] uint64 sign words of X's rows (scheduled by dlight's GPU rules)."""
    words = -(-k // 64)
    r = te.reduce_axis((0, 64), name="bit")
    return te.compute((x.shape[0], words), lambda b, j: te.sum(_bit(tirx.if_then_else(
        j * 64 + r.var < k, x[b, j * 64 + r.var] < 0, tirx.const(False)), r), axis=r), name="pack_rows")


def pack_windows_te(x: te.Tensor, kernel_shape, strides, pads) -> te.Tensor:
    """[batch * OH * OW, words] uint64: each output position's (c, i, j) window of sign bits, 0 outside
    the image (the popcount GEMM masks those taps out)."""
    batch, c, h, w = x.shape
    c, h, w = int(c), int(h), int(w)
    kh, kw = kernel_shape
    (sh, sw), (pt, pl) = strides, pads[:2]
    oh, ow = conv_output_shape(h, w, kernel_shape, strides, pads)
    kdim, pix = c * kh * kw, oh * ow
    r = te.reduce_axis((0, 64), name="bit")

    def bit(q, j):
        t = j * 64 + r.var
        row, col = q % pix // ow * sh + t // kw % kh - pt, q % ow * sw + t % kw - pl
        inside = tirx.all(t < kdim, row >= 0, row < h, col >= 0, col < w)
        return _bit(tirx.if_then_else(inside, x[q // pix, t // (kh * kw), row, col] < 0, tirx.const(False)), r)

    return te.compute((batch * pix, -(-kdim // 64)), lambda q, j: te.sum(bit(q, j), axis=r), name="pack_windows")


def popcount_gemm(words: int, rows: int | None, cols: int | None, conv: tuple | None, masked: bool,
                  has_bias: bool):
    """The popcount GEMM: ``count[r, c] = sum_w popc((A[r, w] ^ B[c, w]) (& M[c % P, w]))``, then
    ``Y = float(taps - 2 count) * scale[ch] + bias[ch]``.

    GEMM (``conv`` None): A = packed X [batch, words] (rows dynamic), B = weights [N, words],
    taps = K, channel = column, ``Y[batch, N]``. Conv (``conv = (O, OH, OW)``): A = weights
    [O, words], B = packed windows [batch * OH * OW, words] (columns dynamic), taps[pixel],
    mask[pixel, words] when padded, channel = row, ``Y[batch, O, OH, OW]``.
    """
    tm, tn = register_tile(rows), register_tile(cols)
    bm, bn = THREADS * tm, THREADS * tn
    bk = min(BK, words)
    steps = -(-words // bk)
    o, oh, ow = conv or (1, 1, 1)
    pix = oh * ow
    n_out = cols if conv is None else o
    a_loads, b_loads = -(-bm * bk // (THREADS * THREADS)), -(-bn * bk // (THREADS * THREADS))

    @T.prim_func
    def gemm(a: T.handle, b: T.handle, mask: T.Buffer((pix, words), "uint64"), taps: T.Buffer((pix,), "int32"),
             scale: T.Buffer((n_out,), "float32"), bias: T.Buffer((n_out,), "float32"), y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        dyn = T.int64()  # the dynamic dimension: batch (GEMM), batch * OH * OW (conv)
        batch = T.int64()
        A = T.match_buffer(a, (dyn if rows is None else rows, words), "uint64")
        B = T.match_buffer(b, (dyn if cols is None else cols, words), "uint64")
        Y = T.match_buffer(y, (dyn, n_out) if conv is None else (batch, o, oh, ow), "float32")
        m_rows: T.let[T.int64] = dyn if rows is None else T.int64(rows)
        n_cols: T.let[T.int64] = dyn if cols is None else T.int64(cols)
        for by in T.thread_binding((m_rows + bm - 1) // bm, thread="blockIdx.y"):
            for bx in T.thread_binding((n_cols + bn - 1) // bn, thread="blockIdx.x"):
                for ty in T.thread_binding(THREADS, thread="threadIdx.y"):
                    for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                        As = T.alloc_buffer((bk, bm), "uint64", scope="shared")
                        Bs = T.alloc_buffer((bk, bn), "uint64", scope="shared")
                        Ms = T.alloc_buffer((bk, bn), "uint64", scope="shared")
                        acc = T.alloc_buffer((tm, tn), "int32", scope="local")
                        av = T.alloc_buffer((tm,), "uint64", scope="local")
                        bv = T.alloc_buffer((tn,), "uint64", scope="local")
                        mv = T.alloc_buffer((tn,), "uint64", scope="local")
                        for i in T.unroll(tm):
                            for j in T.unroll(tn):
                                acc[i, j] = 0
                        for step in T.serial(steps):
                            for u in T.unroll(a_loads):
                                e: T.let[T.int32] = u * THREADS * THREADS + ty * THREADS + tx
                                r: T.let[T.int64] = by * bm + e // bk
                                kk: T.let[T.int32] = step * bk + e % bk
                                if e < bm * bk:
                                    As[e % bk, e // bk] = T.if_then_else(
                                        r < m_rows and kk < words, A[T.min(r, m_rows - 1), T.min(kk, words - 1)],
                                        T.uint64(0))
                            for u in T.unroll(b_loads):
                                e: T.let[T.int32] = u * THREADS * THREADS + ty * THREADS + tx
                                cc: T.let[T.int64] = bx * bn + e // bk
                                kk: T.let[T.int32] = step * bk + e % bk
                                if e < bn * bk:
                                    Bs[e % bk, e // bk] = T.if_then_else(
                                        cc < n_cols and kk < words, B[T.min(cc, n_cols - 1), T.min(kk, words - 1)],
                                        T.uint64(0))
                                    if masked:
                                        Ms[e % bk, e // bk] = T.if_then_else(
                                            cc < n_cols and kk < words,
                                            mask[T.min(cc, n_cols - 1) % pix, T.min(kk, words - 1)], T.uint64(0))
                            T.tvm_storage_sync("shared")
                            for kk in T.unroll(bk):
                                for i in T.unroll(tm):
                                    av[i] = As[kk, ty + THREADS * i]
                                for j in T.unroll(tn):
                                    bv[j] = Bs[kk, tx + THREADS * j]
                                    if masked:
                                        mv[j] = Ms[kk, tx + THREADS * j]
                                for i in T.unroll(tm):
                                    for j in T.unroll(tn):
                                        if masked:
                                            acc[i, j] = acc[i, j] + T.Cast("int32", T.popcount(
                                                T.bitwise_and(T.bitwise_xor(av[i], bv[j]), mv[j])))
                                        else:
                                            acc[i, j] = acc[i, j] + T.Cast("int32", T.popcount(
                                                T.bitwise_xor(av[i], bv[j])))
                            T.tvm_storage_sync("shared")
                        for i in T.unroll(tm):
                            for j in T.unroll(tn):
                                r: T.let[T.int64] = by * bm + ty + THREADS * i
                                cc: T.let[T.int64] = bx * bn + tx + THREADS * j
                                if r < m_rows and cc < n_cols:
                                    if conv is None:
                                        s_gemm: T.let[T.float32] = fmul(T.Cast("float32", taps[0] - 2 * acc[i, j]),
                                                                        scale[cc])
                                        Y[r, cc] = fadd(s_gemm, bias[cc]) if has_bias else s_gemm
                                    else:
                                        p: T.let[T.int64] = cc % pix
                                        s_conv: T.let[T.float32] = fmul(T.Cast("float32", taps[p] - 2 * acc[i, j]),
                                                                        scale[r])
                                        Y[cc // pix, r, p // ow, p % ow] = fadd(s_conv, bias[r]) if has_bias else s_conv

    return gemm


def _add(bb: relax.BlockBuilder, func, name: str):
    return bb.add_func(func.with_attr("op_pattern", 8).without_attr("global_symbol"), name)


def emit_binary_gemm_gpu(bb: relax.BlockBuilder, x: relax.Expr, w_bytes: np.ndarray, scale: np.ndarray,
                         bias: np.ndarray | None, k: int, target, packing: Packing = UNPACKED) -> relax.Expr:
    """Lowering entry (``BinaryGemmLowering.KERNELS["cuda"]``); packed activations: the generic kernel."""
    if packing.any:
        from frugalrt.targets.kernels.binary import emit_gemm_generic

        return emit_gemm_generic(bb, x, w_bytes, scale, bias, k, target, packing)
    batch = x.ty.shape.values[0]
    n = w_bytes.shape[0]
    w = pack_words(w_bytes, 64)
    words = w.shape[1]
    xb = bb.emit_te(pack_rows_te, x, k, primfunc_name_hint="frugalrt_binary_pack_gpu")
    gemm = popcount_gemm(words, None, n, None, False, bias is not None)
    consts = [np.zeros((1, words), np.uint64), np.array([k], np.int32), scale,
              np.zeros(n, np.float32) if bias is None else bias]
    return bb.emit(relax.call_tir(_add(bb, gemm, "frugalrt_binary_gemm_gpu"),
                                  [xb, relax.const(w)] + [relax.const(c) for c in consts],
                                  relax.TensorType((batch, n), "float32")))


def emit_binary_conv_gpu(bb: relax.BlockBuilder, x: relax.Expr, w_bytes: np.ndarray, scale: np.ndarray,
                         bias: np.ndarray | None, kernel_shape, strides, pads, target, packing: Packing = UNPACKED,
                         in_channels: int | None = None, pad_value: int = 0) -> relax.Expr:
    """Lowering entry (``BinaryConvLowering.KERNELS["cuda"]``): bit im2col (a padded tap's bit is 0,
    i.e. +1), then the popcount GEMM; packed activations: the generic kernel."""
    from frugalrt.targets.kernels.binary import conv_taps, emit_conv_generic

    if packing.any:
        return emit_conv_generic(bb, x, w_bytes, scale, bias, kernel_shape, strides, pads, target, packing,
                                 in_channels, pad_value)

    batch = x.ty.shape.values[0]
    c, h, wd = (int(d) for d in x.ty.shape.values[1:])
    o = w_bytes.shape[0]
    oh, ow = conv_output_shape(h, wd, kernel_shape, strides, pads)
    w = pack_words(w_bytes, 64)
    words = w.shape[1]
    mask, taps = conv_taps(c, h, wd, *kernel_shape, strides, pads, 64, pad_value)
    masked = any(pads) and not pad_value
    xb = bb.emit_te(pack_windows_te, x, kernel_shape, strides, pads, primfunc_name_hint="frugalrt_binary_im2col_gpu")
    gemm = popcount_gemm(words, o, None, (o, oh, ow), masked, bias is not None)
    consts = [mask.reshape(oh * ow, words), taps.reshape(-1), scale, np.zeros(o, np.float32) if bias is None else bias]
    return bb.emit(relax.call_tir(_add(bb, gemm, "frugalrt_binary_conv_gpu"),
                                  [relax.const(w), xb] + [relax.const(c) for c in consts],
                                  relax.TensorType((batch, o, oh, ow), "float32")))
