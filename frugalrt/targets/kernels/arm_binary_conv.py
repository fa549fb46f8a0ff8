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
offset, S = offset[row pattern, o, column] - 2 * count (``pad_value = 1``: the zero words are what
a padded tap reads, and the offset is C*kh*kw). Then ``float(S) * scale`` rounded before ``+ bias``.

Packed activations (docs/ops.md). A packed X [b, H, W, ceil(C/8)] fills the padded, phase-split image
straight from its bytes (8 per u64 word, the bits past C masked to 0): no binarization pass. A packed
Y [b, OH, OW, ceil(O/8)] replaces the float transform by one signed compare of the count (``cmgt``)
with a threshold per (row pattern, channel, column) that folds the offset and the per-channel
threshold of :func:`sign_thresholds` (``packing.count_thresholds``; negative scales: weights stored
inverted, so the compare is always ``count > thr``); ``sri`` shifts each channel's 4-pixel mask into
the top of a u32 per pixel, and the 8 channels of an output byte (two blocks of 4) end as its top byte.

Under qemu-aarch64 (Cortex-A72), binary MACs per instruction of the kernel (generic TE kernel
before): 28.7 (1.4) for 64->64 at 32x32, 27.4 (2.3) for 64->128 stride 2 at 32x32, 32.2 (2.3) for
128->128 at 16x16, 30.6 (3.3) for 128->256 stride 2 at 16x16, 35.6 (4.2) for 256->256 at 8x8, 25.1
(1.5) for 64->64 stride 2 at 8x8 (two output rows per block there). Packed X and Y: 32.7 for 64->64
at 32x32 (30.2 with X packed only, 31.0 with Y only), 34.2 for 128->128 at 16x16 (32.9, 33.6).
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
from frugalrt.targets.kernels.packing import NEVER, UNPACKED, Packing, count_thresholds, sign_thresholds

LANES = 2  # u64 pixel words per q register
PACK = 4  # pixels whose sign bits are packed together (u32x4)
MAX_STEPS = 2047  # u16 lanes gain <= 16 per step; the final ``addp`` sums 2 of them


def block_shape(ow: int, isa: str) -> tuple[int, int, int]:
    """(output channels, output rows, pixel vectors per row) of a register block: narrow outputs take
    two rows instead of idle lanes."""
    pixel_vecs = 4 if ISAS[isa].registers == 32 else 2
    rows = 2 if ow <= 2 * LANES and pixel_vecs == 4 else 1
    return ISAS[isa].registers // 2 // pixel_vecs, rows, pixel_vecs // rows


def repack(w_packed: np.ndarray, c: int, kh: int, kw: int, h: int, w: int, strides, pads, outs: int, span: int,
           pad_value: int = 0, flip: np.ndarray | None = None, o_pad: int | None = None):
    """Weights [O_pad / outs, kh, kw, CW, outs, LANES] u64 (bit c % 64 of word c // 64; each word stored
    ``LANES`` times: a step's weights of a block are plain vector loads, ``ldp``), row pattern ids [OH]
    and the integer offsets [patterns, O_pad, OW_pad] int32 of S = offset - 2 * popcount: C*kh*kw less
    what padded taps add (sum_c sign(w), their x words being 0), unless ``pad_value = 1`` wants that.
    The words of the channels in ``flip`` hold their real bits inverted (the offsets are those of the
    weights as given); ``o_pad``: a multiple of ``outs``, by default the least >= O."""
    o = w_packed.shape[0]
    cw = -(-c // 64)
    o_pad = o_pad or -(-o // outs) * outs
    signs = unpack_signs(w_packed, c * kh * kw).reshape(o, c, kh, kw)
    bits = np.zeros((o_pad, kh, kw, cw * 64), np.uint8)
    negative = signs < 0
    if flip is not None:
        negative ^= np.asarray(flip, bool)[:, None, None, None]
    bits[:o, :, :, :c] = negative.transpose(0, 2, 3, 1)
    words = np.packbits(bits, axis=-1, bitorder="little").view("<u8").reshape(o_pad // outs, outs, kh, kw, cw)
    oh, ow = conv_output_shape(h, w, (kh, kw), strides, pads)
    row_ids, rows = _patterns(h, kh, strides[0], pads[0], oh)
    col_ids, cols = _patterns(w, kw, strides[1], pads[1], ow)
    tap_sum = np.zeros((o_pad, kh, kw), np.int64)
    tap_sum[:o] = signs.sum(axis=1)
    outside = ~(rows[:, None, :, None] & cols[col_ids][None, :, None, :])  # [nr, OW, kh, kw]
    offset = np.full((len(rows), o_pad, -(-ow // span) * span), c * kh * kw, np.int32)
    if not pad_value:
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


def byte_filler(c: int, h: int, w: int, pt: int, pl: int, sw: int):
    """Macro ``(X, xb, b)``: the u64 words of the padded, phase-split image ``xb`` straight from the packed
    sign bytes X[b, H, W, ceil(C/8)] (docs/ops.md: the same bit order), 8 bytes per full word; the
    last word of a C that is no multiple of 64 from its bytes, the bits past C masked to 0."""
    full, rest, nbytes = c // 64, c % 64, -(-c // 8)
    partial = rest != 0

    def tail_word(X, b, yy, xx):
        word = T.uint64(0)
        for i in range(nbytes - 8 * full):
            word = word | (T.Cast("uint64", X[b, yy, xx, 8 * full + i]) << T.uint64(8 * i))
        return word & T.uint64((1 << rest) - 1)

    @T.macro
    def fill(X, xb, b):
        for yy, xx in T.grid(h, w):
            for q in range(full):
                xb[b, yy + pt, q, (xx + pl) % sw, (xx + pl) // sw] = T.reinterpret(
                    "uint64", X[b, yy, xx, T.ramp(q * 8, 1, 8)])
            if partial:
                xb[b, yy + pt, full, (xx + pl) % sw, (xx + pl) // sw] = tail_word(X, b, yy, xx)

    return fill


def binary_conv_primfunc(c: int, h: int, w: int, o: int, kh: int, kw: int, strides, pads, n_rows: int,
                         isa: str = "aarch64", packing: Packing = UNPACKED):
    """TIR ``(X, Wr[O_pad / outs, kh, kw, CW, outs, LANES], row_id[OH], table[nr, O_pad, OW_pad], [affine[O_pad,
    2, 4],] Y)``, ``isa`` a key of :data:`ISAS`. X: [b, C, H, W] float32, or with ``packing.input`` [b, H, W,
    ceil(C/8)] uint8 packed signs. Y: [b, O, OH, OW] float32 with ``table`` the offsets of S (:func:`repack`)
    and ``affine[o]`` scale and bias, each 4 times (plain vector loads); with ``packing.output`` [b, OH, OW,
    ceil(O/8)] uint8 sign bits, ``table`` the count thresholds (:func:`packing.count_thresholds`),
    O_pad a multiple of 8 and no ``affine``."""
    neon = ISAS[isa]
    sh, sw = strides
    pt, pl, pb, pr = pads
    oh, ow = conv_output_shape(h, w, (kh, kw), strides, pads)
    outs, rows, vecs = block_shape(ow, isa)
    span = LANES * vecs
    cw = -(-c // 64)
    o_pad = -(-o // (8 if packing.output else outs)) * (8 if packing.output else outs)
    ow_pad = -(-ow // span) * span
    hp = max(h + pt + pb, (-(-oh // rows) * rows - 1) * sh + kh)  # rows: all, and all read
    wq = max(-(-(w + pl + pr) // sw), ow_pad + (kw - 1) // sw)  # columns per phase: all, and all read
    packed_in, packed_out = packing.input, packing.output
    fill_image = byte_filler(c, h, w, pt, pl, sw) if packed_in else sign_packer(c, h, w, cw, pt, pl, sw, isa)
    x_dims, x_dtype = ((h, w, -(-c // 8)), "uint8") if packed_in else ((c, h, w), "float32")
    y_dims, y_dtype = ((oh, ow, -(-o // 8)), "uint8") if packed_out else ((o, oh, ow), "float32")
    halves = 8 // outs  # blocks of one output byte (packed Y)
    groups = rows * vecs // 2  # 4-pixel groups of a block
    quad = T.ramp(0, 1, 4)
    assert 8 % outs == 0 and vecs % 2 == 0

    @T.macro
    def accumulate(xb, Wr, acc, b, oy0, ox0, ob):
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

    @T.macro
    def block(xb, Wr, row_id, offset, affine, Y, acc, row, out4, b, oy0, ox0, ob, full):
        accumulate(xb, Wr, acc, b, oy0, ox0, ob)
        for r in range(rows):
            if oy0 + r < oh:
                row[0] = row_id[oy0 + r]  # in a stack array (a register): not loaded again after each store to Y
                for u in range(outs):
                    if ob * outs + u < o:
                        for pp in range(vecs // 2):
                            out4[quad] = unfused4(T.Cast("float32x4", offset[
                                row[0], ob * outs + u, T.ramp(ox0 + pp * 4, 1, 4)] - T.Cast("int32x4", neon.sums4(
                                    acc[u, r * vecs + 2 * pp, T.ramp(0, 1, 8)],
                                    acc[u, r * vecs + 2 * pp + 1, T.ramp(0, 1, 8)])) * 2)
                                * affine[ob * outs + u, 0, quad]) + affine[ob * outs + u, 1, quad]
                            if full:
                                Y[b, ob * outs + u, oy0 + r, T.ramp(ox0 + pp * 4, 1, 4)] = out4[quad]
                            else:
                                for l in range(4):
                                    if ox0 + pp * 4 + l < ow:
                                        Y[b, ob * outs + u, oy0 + r, ox0 + pp * 4 + l] = out4[l]

    @T.macro
    def packed_block(xb, Wr, row_id, thr, Y, acc, row, bits, b, oy0, ox0, byte, full):
        # the 8 channels of output byte ``byte`` (``halves`` blocks of ``outs``): per channel and 4 pixels a
        # signed compare of the counts with the thresholds, the mask shifted in at the top of ``bits``
        for g in T.unroll(groups):  # (8 shifts push any earlier bits out; zeroed: no read of undefined memory)
            bits[g, quad] = T.broadcast(T.uint32(0), 4)
        for half in range(halves):
            accumulate(xb, Wr, acc, b, oy0, ox0, byte * halves + half)
            for r in range(rows):
                if oy0 + r < oh:
                    row[0] = row_id[oy0 + r]
                    for pp in T.unroll(vecs // 2):  # unrolled: the accumulators stay in registers
                        for u in T.unroll(outs):
                            bits[r * (vecs // 2) + pp, quad] = neon.shift_in(
                                bits[r * (vecs // 2) + pp, quad], T.Select(
                                    T.reinterpret("int32x4", neon.sums4(acc[u, r * vecs + 2 * pp, T.ramp(0, 1, 8)],
                                                                        acc[u, r * vecs + 2 * pp + 1, T.ramp(0, 1, 8)]))
                                    > thr[row[0], (byte * halves + half) * outs + u, T.ramp(ox0 + pp * 4, 1, 4)],
                                    T.broadcast(T.uint32(0xFFFFFFFF), 4), T.broadcast(T.uint32(0), 4)))
        for r in range(rows):  # after 8 channels, channel 8 byte + k sits at bit 24 + k
            if oy0 + r < oh:
                for pp in range(vecs // 2):
                    for l in T.unroll(4):
                        if full or ox0 + pp * 4 + l < ow:
                            Y[b, oy0 + r, ox0 + pp * 4 + l, byte] = T.Cast(
                                "uint8", bits[r * (vecs // 2) + pp, l] >> T.uint32(24))

    @T.macro
    def body(X, Y, Wr, row_id, table, affine, batch):
        xb = T.alloc_buffer((batch, hp, cw, sw, wq), "uint64")  # column xx at [xx % sw, xx // sw]
        # register blocks: small and global scope, so stack arrays that LLVM keeps in registers
        acc = T.alloc_buffer((outs, rows * vecs, 8), "uint16")
        bits = T.alloc_buffer((2, PACK), "uint32")
        out4 = T.alloc_buffer((4,), "float32")
        row = T.alloc_buffer((1,), "int32")
        ybits = T.alloc_buffer((groups, 4), "uint32")
        for b in range(batch):
            for yy, q, ph in T.grid(hp, cw, sw):
                for xx in T.vectorized(wq):
                    xb[b, yy, q, ph, xx] = T.uint64(0)
            if packed_in:
                fill_image(X, xb, b)
            else:
                fill_image(X, xb, bits, b)
        # (one call site per macro: TVMScript parses each call again; ``full``: not the last, partial block)
        if packed_out:
            for b, ty, byte, t in T.grid(batch, -(-oh // rows), o_pad // 8, ow_pad // span):
                packed_block(xb, Wr, row_id, table, Y, acc, row, ybits, b, ty * rows, t * span, byte, t < ow // span)
        else:
            for b, ty, ob, t in T.grid(batch, -(-oh // rows), o_pad // outs, ow_pad // span):
                block(xb, Wr, row_id, table, affine, Y, acc, row, out4, b, ty * rows, t * span, ob, t < ow // span)

    if packed_out:
        @T.prim_func
        def kernel(x: T.handle, Wr: T.Buffer((o_pad // outs, kh, kw, cw, outs, LANES), "uint64"),
                   row_id: T.Buffer((oh,), "int32"), thr: T.Buffer((n_rows, o_pad, ow_pad), "int32"), y: T.handle):
            T.func_attr({"tirx.noalias": True})
            batch = T.int64()
            X = T.match_buffer(x, (batch, x_dims[0], x_dims[1], x_dims[2]), x_dtype)
            Y = T.match_buffer(y, (batch, y_dims[0], y_dims[1], y_dims[2]), y_dtype)
            body(X, Y, Wr, row_id, thr, thr, batch)
    else:
        @T.prim_func
        def kernel(x: T.handle, Wr: T.Buffer((o_pad // outs, kh, kw, cw, outs, LANES), "uint64"),
                   row_id: T.Buffer((oh,), "int32"), offset: T.Buffer((n_rows, o_pad, ow_pad), "int32"),
                   affine: T.Buffer((o_pad, 2, 4), "float32"), y: T.handle):
            T.func_attr({"tirx.noalias": True})
            batch = T.int64()
            X = T.match_buffer(x, (batch, x_dims[0], x_dims[1], x_dims[2]), x_dtype)
            Y = T.match_buffer(y, (batch, y_dims[0], y_dims[1], y_dims[2]), y_dtype)
            body(X, Y, Wr, row_id, offset, affine, batch)

    return kernel


def fits(c: int, kh: int, kw: int) -> bool:
    """u16 accumulator lanes stay exact (and their ``addp`` pairs: half a pixel's count each)."""
    return kh * kw * -(-c // 64) <= MAX_STEPS


def kernel_inputs(w_packed: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, c: int, h: int, w: int,
                  kernel_shape, strides, pads, isa: str, pad_value: int = 0, packing: Packing = UNPACKED):
    """``(primfunc, constant inputs after X)`` of the kernel; ``w_packed`` is the op's [O, ceil(C*kh*kw/8)] uint8.
    A packed Y takes the count thresholds of :func:`count_thresholds` instead of scale and bias (its weights
    flipped for negative scales, O padded to a multiple of 8 with channels that never set their bit)."""
    kh, kw = kernel_shape
    o = w_packed.shape[0]
    _, ow = conv_output_shape(h, w, (kh, kw), strides, pads)
    outs, _, vecs = block_shape(ow, isa)
    func = functools.partial(binary_conv_primfunc, c, h, w, o, kh, kw, strides, pads, isa=isa, packing=packing)
    if packing.output:
        sense, t = sign_thresholds(scale, bias, c * kh * kw, packing.activation)
        words, row_ids, offset = repack(w_packed, c, kh, kw, h, w, strides, pads, outs, LANES * vecs, pad_value,
                                        flip=sense < 0, o_pad=-(-o // 8) * 8)
        thr = np.full(offset.shape, NEVER, np.int32)
        thr[:, :o, :ow] = count_thresholds(offset[:, :o, :ow], sense[None, :, None], t[None, :, None], c * kh * kw)
        return func(n_rows=offset.shape[0]), [words, row_ids, thr]
    words, row_ids, offset = repack(w_packed, c, kh, kw, h, w, strides, pads, outs, LANES * vecs, pad_value)
    affine = np.repeat(np.stack(padded_scale_bias(scale, bias, offset.shape[1]), axis=1)[:, :, None], 4, axis=2)
    return func(n_rows=offset.shape[0]), [words, row_ids, offset, affine]


def emit_binary_conv_neon(bb: relax.BlockBuilder, x: relax.Expr, w_packed: np.ndarray, scale: np.ndarray,
                          bias: np.ndarray | None, c: int, kernel_shape, strides, pads, isa: str,
                          pad_value: int = 0, packing: Packing = UNPACKED) -> relax.Expr:
    """Emit the kernel; ``w_packed`` is the op's [O, ceil(C*kh*kw/8)] uint8 input, X [batch, C, H, W] float32
    or (``packing.input``) [batch, H, W, ceil(C/8)] uint8."""
    dims = [int(d) for d in x.ty.shape.values[1:]]
    h, w = dims[:2] if packing.input else dims[1:]
    func, consts = kernel_inputs(w_packed, scale, bias, c, h, w, kernel_shape, strides, pads, isa, pad_value,
                                 packing)
    name = "frugalrt_binary_conv_neon_packed" if packing.any else "frugalrt_binary_conv_neon"
    gv = bb.add_func(func.with_attr("op_pattern", 8).without_attr("global_symbol"), name)
    o = w_packed.shape[0]
    oh, ow = conv_output_shape(h, w, kernel_shape, strides, pads)
    out = relax.TensorType((x.ty.shape.values[0], oh, ow, -(-o // 8)) if packing.output
                           else (x.ty.shape.values[0], o, oh, ow), "uint8" if packing.output else "float32")
    return bb.emit(relax.call_tir(gv, [x, *map(relax.const, consts)], out))


def _neon_or_generic(isa: str):
    def emit(bb, x, w_bytes, scale, bias, kernel_shape, strides, pads, target, packing: Packing = UNPACKED,
             in_channels: int | None = None, pad_value: int = 0) -> relax.Expr:
        c = in_channels if in_channels is not None else int(x.ty.shape.values[1])
        if has_cpu_features(target, "neon") and fits(c, *kernel_shape):
            return emit_binary_conv_neon(bb, x, w_bytes, scale, bias, c, kernel_shape, strides, pads, isa, pad_value,
                                         packing)
        from frugalrt.targets.kernels.binary import emit_conv_generic

        return emit_conv_generic(bb, x, w_bytes, scale, bias, kernel_shape, strides, pads, target, packing,
                                 in_channels, pad_value)

    emit.__doc__ = (f"Lowering entry (``BinaryConvLowering.KERNELS[{isa!r}]``): the NEON kernel (packed activations "
                    "included) when the target has NEON (not ARMv6: rpi-zero) and its u16 counts stay exact, else "
                    "the generic kernel.")
    return emit


emit_binary_conv_aarch64 = _neon_or_generic("aarch64")
emit_binary_conv_arm = _neon_or_generic("arm")
