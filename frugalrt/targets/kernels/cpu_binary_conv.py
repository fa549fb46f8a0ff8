"""Fast CPU kernel of ``ai.frugalrt::BinaryConv``: channel-packed pixels, a popcount GEMM over taps.

The generic kernel packs a whole (c, i, j) window per output pixel, nine times over for 3x3.
Here sign(X) is packed once per pixel along the channel axis into 64-bit words of a zero padded
image; each tap (i, j) of an output pixel is then a fixed offset into it, and the convolution is
a GEMM over (i, j, channel word) of ``popcount(x ^ w)``. Vectors run along output pixels of a
row (columns of the padded image are stored split by stride phase, so a tap's pixels are
contiguous for any stride), each weight word is broadcast, and a block of ``OUTS`` channels x
``PIXEL_VECS`` vectors stays in registers. Accumulators thus hold consecutive pixels of one
channel: the NCHW output is written with whole-vector stores.

Padded taps: their x words are 0 (sign +1), so the all-taps sum counts ``sum_c sign(w[o, c, i, j])``
for each of them where docs/ops.md wants 0. That error depends only on which taps fall outside
the image, i.e. on (row pattern, column) of the output pixel: it is subtracted from a
compile-time table ``corr[row pattern, o, column]`` (zero inside). Exact integer S, then the
unfused ``S * scale + bias``.
"""
from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.script import tirx as T

from frugalrt.runtime.reference import unpack_signs
from frugalrt.targets.kernels import conv_output_shape, taps_inside
from frugalrt.targets.kernels.cpu_binary import byte_popcount, has_avx2, padded_scale_bias, unfused
from frugalrt.targets.kernels.cpu_binary_vpopcnt import LANES as WIDE, has_vpopcntdq

LANES = 4  # u64 pixels per vector (AVX2); 8 with AVX-512 VPOPCNTDQ (``vpopcntq``)
PIXEL_VECS = 2  # pixel vectors per register block
OUTS = 4  # output channels per register block
PACK = 8  # pixels whose sign bits are packed together (u32 lanes)
FLUSH = 31  # steps before u8 counts (<= 8 per step) could overflow


def _patterns(size: int, kernel: int, stride: int, pad: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output index: the id of its in-image tap pattern, and the patterns [n, kernel] (bool)."""
    patterns, ids = np.unique(taps_inside(size, kernel, stride, pad, out), axis=0, return_inverse=True)
    return ids.reshape(-1).astype(np.int32), patterns


def repack(w_packed: np.ndarray, c: int, kh: int, kw: int, h: int, w: int, strides, pads, lanes: int = LANES):
    """Weights [kh, kw, CW, O_pad] u64 (bit c % 64 of word c // 64), row pattern ids [OH] and
    the padding corrections [patterns, O_pad, OW_pad] int32."""
    o = w_packed.shape[0]
    cw = -(-c // 64)
    o_pad = -(-o // OUTS) * OUTS
    signs = unpack_signs(w_packed, c * kh * kw).reshape(o, c, kh, kw)  # +1 / -1
    bits = np.zeros((kh, kw, cw * 64, o_pad), np.uint8)
    bits[:, :, :c, :o] = (signs < 0).transpose(2, 3, 1, 0)
    words = np.packbits(bits.reshape(kh, kw, cw, 64, o_pad).transpose(0, 1, 2, 4, 3), axis=-1,
                        bitorder="little").view("<u8").reshape(kh, kw, cw, o_pad)
    oh, ow = conv_output_shape(h, w, (kh, kw), strides, pads)
    row_ids, rows = _patterns(h, kh, strides[0], pads[0], oh)
    col_ids, cols = _patterns(w, kw, strides[1], pads[1], ow)
    tap_sum = np.zeros((o_pad, kh, kw), np.int64)
    tap_sum[:o] = signs.sum(axis=1)  # what a padded tap wrongly adds: sum_c sign(w) (x = +1)
    outside = ~(rows[:, None, :, None] & cols[col_ids][None, :, None, :])  # [nr, OW, kh, kw]
    corr = np.zeros((len(rows), o_pad, _ow_pad(ow, lanes)), np.int32)
    corr[:, :, :ow] = np.einsum("rxij,oij->rox", outside.astype(np.int64), tap_sum)
    return np.ascontiguousarray(words), row_ids, corr


def _ow_pad(ow: int, lanes: int) -> int:
    return -(-ow // (lanes * PIXEL_VECS)) * lanes * PIXEL_VECS


def binary_conv_primfunc(c: int, h: int, w: int, o: int, kh: int, kw: int, strides, pads, n_rows: int,
                         lanes: int = LANES):
    """TIR ``(X[b, C, H, W], Wr[kh, kw, CW, O_pad], row_id[OH], corr[nr, O_pad, OW_pad], scale[O_pad],
    bias[O_pad], Y[b, O, OH, OW])``."""
    sh, sw = strides
    pt, pl, pb, pr = pads
    oh, ow = conv_output_shape(h, w, (kh, kw), strides, pads)
    cw = -(-c // 64)
    o_pad = -(-o // OUTS) * OUTS
    ow_pad = _ow_pad(ow, lanes)
    hp = h + pt + pb
    wq = max(-(-(w + pl + pr) // sw), ow_pad + (kw - 1) // sw)  # columns per phase: all, and all read
    span = lanes * PIXEL_VECS
    pack = min(PACK, w)
    steps = kh * kw * cw
    bytewise = lanes == 4  # AVX2: count bytes with vpshufb, sum them with vpsadbw every ``flush`` steps
    flush = FLUSH if bytewise else steps
    flushes = -(-steps // flush)
    taps = c * kh * kw

    @T.macro
    def output(Y, acc, corr, row_id, scale, bias, b, oy, ox0, oc, u, pv, l):
        Y[b, oc, oy, ox0 + pv * lanes + l] = unfused(T.Cast("float32", taps - 2 * T.Cast("int32", acc[u, pv, l])
                                                            - corr[row_id[oy], oc, ox0 + pv * lanes + l])
                                                     * scale[oc]) + bias[oc]

    def tap_xor(xb, Wr, b, oy, ox0, ob, u, pv, s):
        """x ^ w of step s = (tap i, tap j, channel word q) for ``lanes`` pixels and channel ob * OUTS + u."""
        i, j, q = s // (kw * cw), s // cw % kw, s % cw
        return (xb[b, oy * sh + i, q, j % sw, T.ramp(ox0 + pv * lanes + j // sw, 1, lanes)]
                ^ T.broadcast(Wr[i, j, q, ob * OUTS + u], lanes))

    @T.macro
    def block(xb, Wr, row_id, corr, scale, bias, Y, acc, acc8, b, oy, ox0, ob, full):
        for u in T.unroll(OUTS):
            for pv in T.unroll(PIXEL_VECS):
                acc[u, pv, T.ramp(0, 1, lanes)] = T.broadcast(T.uint64(0), lanes)
        for f in range(flushes):  # steps s = (i, j, q) flattened
            for u in T.unroll(OUTS):
                for pv in T.unroll(PIXEL_VECS):
                    acc8[u, pv, T.ramp(0, 1, 32)] = T.broadcast(T.uint8(0), 32)
            for ss in range(T.min(flush, steps - f * flush)):
                for u in T.unroll(OUTS):
                    for pv in T.unroll(PIXEL_VECS):
                        if bytewise:
                            acc8[u, pv, T.ramp(0, 1, 32)] = acc8[u, pv, T.ramp(0, 1, 32)] + byte_popcount(
                                T.reinterpret("uint8x32", tap_xor(xb, Wr, b, oy, ox0, ob, u, pv, f * flush + ss)))
                        else:
                            acc[u, pv, T.ramp(0, 1, lanes)] = acc[u, pv, T.ramp(0, 1, lanes)] + T.popcount(
                                tap_xor(xb, Wr, b, oy, ox0, ob, u, pv, f * flush + ss))
            if bytewise:
                for u in T.unroll(OUTS):
                    for pv in T.unroll(PIXEL_VECS):
                        acc[u, pv, T.ramp(0, 1, lanes)] = acc[u, pv, T.ramp(0, 1, lanes)] + T.call_llvm_pure_intrin(
                            "uint64x4", "llvm.x86.avx2.psad.bw", acc8[u, pv, T.ramp(0, 1, 32)],
                            T.broadcast(T.uint8(0), 32))
        for u in range(OUTS):
            if ob * OUTS + u < o:
                for pv in range(PIXEL_VECS):
                    if full:
                        for l in T.vectorized(lanes):
                            output(Y, acc, corr, row_id, scale, bias, b, oy, ox0, ob * OUTS + u, u, pv, l)
                    else:
                        for l in range(lanes):
                            if ox0 + pv * lanes + l < ow:
                                output(Y, acc, corr, row_id, scale, bias, b, oy, ox0, ob * OUTS + u, u, pv, l)

    @T.prim_func
    def kernel(x: T.handle, Wr: T.Buffer((kh, kw, cw, o_pad), "uint64"), row_id: T.Buffer((oh,), "int32"),
               corr: T.Buffer((n_rows, o_pad, ow_pad), "int32"), scale: T.Buffer((o_pad,), "float32"),
               bias: T.Buffer((o_pad,), "float32"), y: T.handle):
        T.func_attr({"tirx.noalias": True})
        batch = T.int64()
        X = T.match_buffer(x, (batch, c, h, w), "float32")
        Y = T.match_buffer(y, (batch, o, oh, ow), "float32")
        xb = T.alloc_buffer((batch, hp, cw, sw, wq), "uint64")  # column xx at [xx % sw, xx // sw]
        # register blocks: under 1 KiB and global scope, so a stack array that LLVM keeps in
        # registers ("local" scope or more bytes would go to TVMBackendAllocWorkspace, heap memory)
        acc = T.alloc_buffer((OUTS, PIXEL_VECS, lanes), "uint64")
        acc8 = T.alloc_buffer((OUTS, PIXEL_VECS, 32), "uint8")
        bits = T.alloc_buffer((2, pack), "uint32")
        for b in range(batch):  # sign bits along C per pixel (pad pixels and pad bits: 0)
            for yy in range(hp):
                for q in range(cw):
                    for ph in range(sw):
                        for xx in T.vectorized(wq):
                            xb[b, yy, q, ph, xx] = T.uint64(0)
            for yy in range(h):
                for q in range(cw):
                    for xv in range(-(-w // pack)):  # ``pack`` pixels at a time, channel bits OR-ed in registers
                        for half in range(2):  # u32 lanes: 8 per AVX2 vector
                            bits[half, T.ramp(0, 1, pack)] = T.broadcast(T.uint32(0), pack)
                            for t in T.unroll(32):
                                bits[half, T.ramp(0, 1, pack)] = bits[half, T.ramp(0, 1, pack)] | T.Select(
                                    T.broadcast(q * 64 + half * 32 + t < c, pack) & (X[
                                        b, T.min(q * 64 + half * 32 + t, c - 1), yy,
                                        T.ramp(T.min(xv * pack, w - pack), 1, pack)] < T.broadcast(T.float32(0), pack)),
                                    T.broadcast(T.uint32(1) << T.Cast("uint32", t), pack),
                                    T.broadcast(T.uint32(0), pack))
                        for l in range(pack):  # the last group is shifted left to stay inside the row
                            xb[b, yy + pt, q, (T.min(xv * pack, w - pack) + l + pl) % sw,
                               (T.min(xv * pack, w - pack) + l + pl) // sw] = T.Cast("uint64", bits[0, l]) | (
                                   T.Cast("uint64", bits[1, l]) << T.uint64(32))
        for b in range(batch):
            for oy in range(oh):
                for ob in range(o_pad // OUTS):
                    for t in range(ow // span):
                        block(xb, Wr, row_id, corr, scale, bias, Y, acc, acc8, b, oy, t * span, ob, True)
                    for t in range(ow // span, ow_pad // span):  # the last, partial block
                        block(xb, Wr, row_id, corr, scale, bias, Y, acc, acc8, b, oy, t * span, ob, False)

    return kernel


def emit_binary_conv_cpu(bb: relax.BlockBuilder, x: relax.Expr, w_packed: np.ndarray, scale: np.ndarray,
                         bias: np.ndarray | None, c: int, h: int, w: int, kernel_shape, strides, pads,
                         lanes: int = LANES) -> relax.Expr:
    """Emit the kernel; ``w_packed`` is the op's [O, ceil(C*kh*kw/8)] uint8 input."""
    o = w_packed.shape[0]
    kh, kw = kernel_shape
    words, row_ids, corr = repack(w_packed, c, kh, kw, h, w, strides, pads, lanes)
    o_pad = words.shape[-1]
    scale_p, bias_p = padded_scale_bias(scale, bias, o_pad)
    func = binary_conv_primfunc(c, h, w, o, kh, kw, strides, pads, corr.shape[0], lanes)
    gv = bb.add_func(func.with_attr("op_pattern", 8).without_attr("global_symbol"), "frugalrt_binary_conv_cpu")
    batch = x.ty.shape.values[0]
    oh, ow = conv_output_shape(h, w, (kh, kw), strides, pads)
    consts = [words, row_ids, corr, scale_p, bias_p]
    return bb.emit(relax.call_tir(gv, [x, *map(relax.const, consts)], relax.TensorType((batch, o, oh, ow), "float32")))


def emit_binary_conv_x86(bb: relax.BlockBuilder, x: relax.Expr, w_bytes: np.ndarray, scale: np.ndarray,
                         bias: np.ndarray | None, kernel_shape, strides, pads, target) -> relax.Expr:
    """Lowering entry (``BinaryConvLowering.KERNELS["x86"]``); ``w_bytes`` is the op's [O, ceil(C*kh*kw/8)] uint8.
    512-bit vectors and ``vpopcntq`` with AVX-512 VPOPCNTDQ, byte counts with AVX2, else the generic kernel."""
    wide = has_vpopcntdq(target)
    if not (wide or has_avx2(target)):
        from frugalrt.targets.kernels.binary import emit_conv_generic

        return emit_conv_generic(bb, x, w_bytes, scale, bias, kernel_shape, strides, pads, target)
    c, h, w = (int(d) for d in x.ty.shape.values[1:])
    lanes = WIDE if wide else LANES
    return emit_binary_conv_cpu(bb, x, w_bytes, scale, bias, c, h, w, kernel_shape, strides, pads, lanes)
