"""NEON kernel of ``ai.frugalrt::BinaryConv`` (AArch64 and 32-bit ARMv7): ``cnt`` on channel-packed pixels.

Same plan as the x86 kernel (``cpu_binary_conv``): sign(X) is packed once per pixel along
channels into u64 words of a zero-padded image whose columns are split by stride phase, so the
convolution is an im2col-free GEMM over steps (tap i, tap j, channel word q) and a tap's output
pixels are contiguous. A q register holds the words of 2 adjacent output pixels; weights are
stored twice (plain ``ldp`` loads, no broadcast). A block of ``outs`` channels x ``rows`` output
rows x ``2 * vecs`` pixels stays in registers (two rows when the output is narrow); per step and
accumulator ``eor`` + ``cnt`` (per-byte popcount) + ``uadalp`` (pairwise widening add into u16
lanes): 3 instructions per 128 binary MACs. At the end ``addp`` + ``uaddlp`` turn two accumulators
into the u32 counts of 4 consecutive pixels, so the output transform and the NCHW stores work
on 4 pixels at a time.

Padded taps read zero words (sign +1): as in the x86 kernel, a compile-time table per in-image tap
pattern removes what they add (docs/ops.md: they contribute 0); here it holds the whole integer
offset, S = offset[row pattern, o, column] - 2 * count. Then ``float(S) * scale`` rounded before
``+ bias``.

Under qemu-aarch64 (Cortex-A72), binary MACs per instruction of the kernel (generic TE kernel
before): 28.7 (1.4) for 64->64 at 32x32, 27.4 (2.3) for 64->128 stride 2 at 32x32, 32.2 (2.3) for
128->128 at 16x16, 30.6 (3.3) for 128->256 stride 2 at 16x16, 35.6 (4.2) for 256->256 at 8x8, 25.1
(1.5) for 64->64 stride 2 at 8x8 (two output rows per block there).
"""
from __future__ import annotations

import functools

import numpy as np
from tvm import relax
from tvm.script import tirx as T

from frugalrt.runtime.reference import unpack_signs
from frugalrt.targets.kernels import conv_output_shape, has_cpu_features
from frugalrt.targets.kernels.arm_binary import ISAS, shift_in, unfused4
from frugalrt.targets.kernels.cpu_binary import padded_scale_bias
from frugalrt.targets.kernels.cpu_binary_conv import _patterns

LANES = 2  # u64 pixel words per q register
PACK = 4  # pixels whose sign bits are packed together (u32x4)
MAX_STEPS = 2047  # u16 lanes gain <= 16 per step; the final ``addp`` sums 2 of them


def block_shape(ow: int, isa: str) -> tuple[int, int, int]:
    """(output channels, output rows, pixel vectors per row) of a register block: narrow outputs take
    two rows instead of idle lanes."""
    pixel_vecs = 4 if ISAS[isa].registers == 32 else 2
    rows = 2 if ow <= 2 * LANES and pixel_vecs == 4 else 1
    return ISAS[isa].registers // 2 // pixel_vecs, rows, pixel_vecs // rows


def repack(w_packed: np.ndarray, c: int, kh: int, kw: int, h: int, w: int, strides, pads, outs: int, span: int):
    """Weights [O_pad / outs, kh, kw, CW, outs, LANES] u64 (bit c % 64 of word c // 64; each word stored
    ``LANES`` times: a step's weights of a block are plain vector loads, ``ldp``), row pattern ids [OH]
    and the integer offsets [patterns, O_pad, OW_pad] int32 of S = offset - 2 * popcount: C*kh*kw less
    what padded taps wrongly add (sum_c sign(w), their x words being 0)."""
    o = w_packed.shape[0]
    cw = -(-c // 64)
    o_pad = -(-o // outs) * outs
    signs = unpack_signs(w_packed, c * kh * kw).reshape(o, c, kh, kw)
    bits = np.zeros((o_pad, kh, kw, cw * 64), np.uint8)
    bits[:o, :, :, :c] = (signs < 0).transpose(0, 2, 3, 1)
    words = np.packbits(bits, axis=-1, bitorder="little").view("<u8").reshape(o_pad // outs, outs, kh, kw, cw)
    oh, ow = conv_output_shape(h, w, (kh, kw), strides, pads)
    row_ids, rows = _patterns(h, kh, strides[0], pads[0], oh)
    col_ids, cols = _patterns(w, kw, strides[1], pads[1], ow)
    tap_sum = np.zeros((o_pad, kh, kw), np.int64)
    tap_sum[:o] = signs.sum(axis=1)
    outside = ~(rows[:, None, :, None] & cols[col_ids][None, :, None, :])  # [nr, OW, kh, kw]
    offset = np.full((len(rows), o_pad, -(-ow // span) * span), c * kh * kw, np.int32)
    offset[:, :, :ow] -= np.einsum("rxij,oij->rox", outside.astype(np.int64), tap_sum).astype(np.int32)
    return np.ascontiguousarray(np.repeat(words.transpose(0, 2, 3, 4, 1)[..., None], LANES, -1)), row_ids, offset


def sign_packer(c: int, h: int, w: int, cw: int, pt: int, pl: int, sw: int, isa: str):
    """Macro ``(X, xb, bits, b)``: sign bits of image ``b`` along C into the u64 words of the padded,
    phase-split image ``xb`` (pad pixels and pad bits stay 0), ``PACK`` pixels per compare."""
    pack = min(PACK, w)
    push = ISAS[isa].shift_in if pack == PACK else functools.partial(shift_in, lanes=pack)

    @T.macro
    def pack_image(X, xb, bits, b):
        for yy in range(h):
            for q in range(cw):
                for xv in range(-(-w // pack)):  # the last group is shifted left to stay inside the row
                    for half in range(2):
                        bits[half, T.ramp(0, 1, pack)] = T.broadcast(T.uint32(0), pack)
                        for t in T.unroll(32):  # shifted in at the top: channel t ends at bit t
                            bits[half, T.ramp(0, 1, pack)] = push(bits[half, T.ramp(0, 1, pack)], T.Select(
                                T.broadcast(q * 64 + half * 32 + t < c, pack) & (X[
                                    b, T.min(q * 64 + half * 32 + t, c - 1), yy,
                                    T.ramp(T.min(xv * pack, w - pack), 1, pack)] < T.broadcast(T.float32(0), pack)),
                                T.broadcast(T.uint32(0xFFFFFFFF), pack), T.broadcast(T.uint32(0), pack)))
                    for l in range(pack):
                        xb[b, yy + pt, q, (T.min(xv * pack, w - pack) + l + pl) % sw,
                           (T.min(xv * pack, w - pack) + l + pl) // sw] = T.Cast("uint64", bits[0, l]) | (
                               T.Cast("uint64", bits[1, l]) << T.uint64(32))

    return pack_image


def binary_conv_primfunc(c: int, h: int, w: int, o: int, kh: int, kw: int, strides, pads, n_rows: int,
                         isa: str = "aarch64"):
    """TIR ``(X[b, C, H, W], Wr[O_pad / outs, kh, kw, CW, outs, LANES], row_id[OH], offset[nr, O_pad, OW_pad],
    affine[O_pad, 2, 4], Y[b, O, OH, OW])``, ``isa`` a key of :data:`ISAS`; ``affine[o]``: scale and bias, each
    4 times (plain vector loads)."""
    neon = ISAS[isa]
    sh, sw = strides
    pt, pl, pb, pr = pads
    oh, ow = conv_output_shape(h, w, (kh, kw), strides, pads)
    outs, rows, vecs = block_shape(ow, isa)
    span = LANES * vecs
    cw = -(-c // 64)
    o_pad = -(-o // outs) * outs
    ow_pad = -(-ow // span) * span
    hp = max(h + pt + pb, (-(-oh // rows) * rows - 1) * sh + kh)  # rows: all, and all read
    wq = max(-(-(w + pl + pr) // sw), ow_pad + (kw - 1) // sw)  # columns per phase: all, and all read
    pack_image = sign_packer(c, h, w, cw, pt, pl, sw, isa)
    quad = T.ramp(0, 1, 4)

    @T.macro
    def output(Y, sums, offset, row, affine, out4, b, oy, ox, oc, full):
        out4[quad] = unfused4(T.Cast("float32x4", offset[row[0], oc, T.ramp(ox, 1, 4)] - T.Cast("int32x4", sums) * 2)
                              * affine[oc, 0, quad]) + affine[oc, 1, quad]
        if full:
            Y[b, oc, oy, T.ramp(ox, 1, 4)] = out4[quad]
        else:
            for l in range(4):
                if ox + l < ow:
                    Y[b, oc, oy, ox + l] = out4[l]

    @T.macro
    def block(xb, Wr, row_id, offset, affine, Y, acc, row, out4, b, oy0, ox0, ob, full):
        for u in T.unroll(outs):
            for pv in T.unroll(rows * vecs):
                acc[u, pv, T.ramp(0, 1, 8)] = T.broadcast(T.uint16(0), 8)
        for i, j, q in T.grid(kh, kw, cw):
            for u in T.unroll(outs):
                for r in T.unroll(rows):
                    for v in T.unroll(vecs):
                        acc[u, r * vecs + v, T.ramp(0, 1, 8)] = neon.accumulate(
                            acc[u, r * vecs + v, T.ramp(0, 1, 8)], T.popcount(T.reinterpret("uint8x16", xb[
                                b, (oy0 + r) * sh + i, q, j % sw, T.ramp(ox0 + v * LANES + j // sw, 1, LANES)]
                                ^ Wr[ob, i, j, q, u, T.ramp(0, 1, LANES)])))
        for r in range(rows):
            if oy0 + r < oh:
                row[0] = row_id[oy0 + r]  # in a stack array (a register): not loaded again after each store to Y
                for u in range(outs):
                    if ob * outs + u < o:
                        for pp in range(vecs // 2):
                            output(Y, neon.sums4(acc[u, r * vecs + 2 * pp, T.ramp(0, 1, 8)],
                                                 acc[u, r * vecs + 2 * pp + 1, T.ramp(0, 1, 8)]),
                                   offset, row, affine, out4, b, oy0 + r, ox0 + pp * 4, ob * outs + u, full)

    @T.prim_func
    def kernel(x: T.handle, Wr: T.Buffer((o_pad // outs, kh, kw, cw, outs, LANES), "uint64"),
               row_id: T.Buffer((oh,), "int32"), offset: T.Buffer((n_rows, o_pad, ow_pad), "int32"),
               affine: T.Buffer((o_pad, 2, 4), "float32"), y: T.handle):
        T.func_attr({"tirx.noalias": True})
        batch = T.int64()
        X = T.match_buffer(x, (batch, c, h, w), "float32")
        Y = T.match_buffer(y, (batch, o, oh, ow), "float32")
        xb = T.alloc_buffer((batch, hp, cw, sw, wq), "uint64")  # column xx at [xx % sw, xx // sw]
        # register blocks: small and global scope, so stack arrays that LLVM keeps in registers
        acc = T.alloc_buffer((outs, rows * vecs, 8), "uint16")
        bits = T.alloc_buffer((2, PACK), "uint32")
        out4 = T.alloc_buffer((4,), "float32")
        row = T.alloc_buffer((1,), "int32")
        for b in range(batch):
            for yy, q, ph in T.grid(hp, cw, sw):
                for xx in T.vectorized(wq):
                    xb[b, yy, q, ph, xx] = T.uint64(0)
            pack_image(X, xb, bits, b)
        for b, ty, ob in T.grid(batch, -(-oh // rows), o_pad // outs):
            for t in range(ow // span):
                block(xb, Wr, row_id, offset, affine, Y, acc, row, out4, b, ty * rows, t * span, ob, True)
            for t in range(ow // span, ow_pad // span):  # the last, partial block
                block(xb, Wr, row_id, offset, affine, Y, acc, row, out4, b, ty * rows, t * span, ob, False)

    return kernel


def fits(c: int, kh: int, kw: int) -> bool:
    """u16 accumulator lanes stay exact (and their ``addp`` pairs: half a pixel's count each)."""
    return kh * kw * -(-c // 64) <= MAX_STEPS


def kernel_inputs(w_packed: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, c: int, h: int, w: int,
                  kernel_shape, strides, pads, isa: str):
    """``(primfunc, constant inputs after X)`` of the kernel; ``w_packed`` is the op's [O, ceil(C*kh*kw/8)] uint8."""
    kh, kw = kernel_shape
    _, ow = conv_output_shape(h, w, (kh, kw), strides, pads)
    outs, _, vecs = block_shape(ow, isa)
    words, row_ids, offset = repack(w_packed, c, kh, kw, h, w, strides, pads, outs, LANES * vecs)
    affine = np.repeat(np.stack(padded_scale_bias(scale, bias, offset.shape[1]), axis=1)[:, :, None], 4, axis=2)
    func = binary_conv_primfunc(c, h, w, w_packed.shape[0], kh, kw, strides, pads, offset.shape[0], isa)
    return func, [words, row_ids, offset, affine]


def emit_binary_conv_neon(bb: relax.BlockBuilder, x: relax.Expr, w_packed: np.ndarray, scale: np.ndarray,
                          bias: np.ndarray | None, kernel_shape, strides, pads, isa: str) -> relax.Expr:
    """Emit the kernel; ``w_packed`` is the op's [O, ceil(C*kh*kw/8)] uint8 input."""
    c, h, w = (int(d) for d in x.ty.shape.values[1:])
    func, consts = kernel_inputs(w_packed, scale, bias, c, h, w, kernel_shape, strides, pads, isa)
    gv = bb.add_func(func.with_attr("op_pattern", 8).without_attr("global_symbol"), "frugalrt_binary_conv_neon")
    oh, ow = conv_output_shape(h, w, kernel_shape, strides, pads)
    out = relax.TensorType((x.ty.shape.values[0], w_packed.shape[0], oh, ow), "float32")
    return bb.emit(relax.call_tir(gv, [x, *map(relax.const, consts)], out))


def _neon_or_generic(isa: str):
    def emit(bb, x, w_bytes, scale, bias, kernel_shape, strides, pads, target) -> relax.Expr:
        c = int(x.ty.shape.values[1])
        if has_cpu_features(target, "neon") and fits(c, *kernel_shape):
            return emit_binary_conv_neon(bb, x, w_bytes, scale, bias, kernel_shape, strides, pads, isa)
        from frugalrt.targets.kernels.binary import emit_conv_generic

        return emit_conv_generic(bb, x, w_bytes, scale, bias, kernel_shape, strides, pads, target)

    emit.__doc__ = (f"Lowering entry (``BinaryConvLowering.KERNELS[{isa!r}]``): the NEON kernel when the target "
                    "has NEON (not ARMv6: rpi-zero) and its u16 counts stay exact, else the generic kernel.")
    return emit


emit_binary_conv_aarch64 = _neon_or_generic("aarch64")
emit_binary_conv_arm = _neon_or_generic("arm")
