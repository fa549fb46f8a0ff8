"""Fast CPU kernel of ``ai.frugalrt::BinaryConv``: channel-packed pixels, a popcount GEMM over taps.

The generic kernel packs a whole (c, i, j) window per output pixel, nine times over for 3x3.
Here sign(X) is packed once per pixel along the channel axis into words (u64 with AVX2, u32 with
AVX-512 VPOPCNTDQ) of a zero padded image; each tap (i, j) of an output pixel is then a fixed
offset into it, and the convolution is a GEMM over (i, j, channel word) of ``popcount(x ^ w)``.
Vectors run along output pixels of a row (columns of the padded image are stored split by stride
phase, so a tap's pixels are contiguous for any stride), each weight word is broadcast, and a
block of ``OUTS`` channels x pixel vectors stays in registers. Accumulators thus hold consecutive
pixels of one channel: the NCHW output is written with whole-vector stores.

With VPOPCNTDQ a zmm holds 16 pixels (``vpxord`` + ``vpopcntd`` + ``vpaddd`` per 512 binary MACs,
the taps unrolled so their offsets are constants, 4 channels x 48 pixels in registers), and the
last columns of a row are not left to idle lanes: a vector ending at OW, or, for at most 8 of
them, a vector holding 8 pixels of two channels (the x words loaded once and doubled).

Padded taps: their x words are 0 (sign +1), so the all-taps sum counts ``sum_c sign(w[o, c, i, j])``
for each of them where docs/ops.md wants 0. That error depends only on which taps fall outside
the image, i.e. on (row pattern, column) of the output pixel: a compile-time table
``offset[row pattern, o, column]`` holds the taps minus it, and S = offset - 2 * count is exact;
then the unfused ``S * scale + bias``.

Packed activations (docs/ops.md): a packed X [b, H, W, ceil(C/8)] fills the padded word image straight
from its bytes (no binarization; the bits past C masked). A packed Y [b, OH, OW, ceil(O/8)] replaces the
float transform by one signed compare of the counts with compile-time thresholds per (row pattern,
channel, column) (``packing.count_thresholds``; the weights of negative-scale channels flipped); the
channel blocks of a pixel block then run back to back, OR-ing 32 channels' bits into one u32 lane per
pixel, stored once per pixel (a u32 store where ceil(O/8) is a multiple of 4, else bytes).
"""
from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.script import tirx as T

from frugalrt.runtime.reference import unpack_signs
from frugalrt.targets.kernels import conv_output_shape, taps_inside
from frugalrt.targets.kernels.cpu_binary import byte_popcount, has_avx2, padded_scale_bias
from frugalrt.targets.kernels.cpu_binary_vpopcnt import LANES as WIDE, has_vpopcntdq, output_transform
from frugalrt.targets.kernels.packing import NEVER, UNPACKED, Packing, count_thresholds, sign_thresholds

LANES = 4  # u64 pixels per vector (AVX2); 16 u32 with AVX-512 VPOPCNTDQ (``vpopcntd``)
OUTS = 4  # output channels per register block
PACK = 8  # pixels whose sign bits are packed together (u32 lanes): 16 with AVX-512
FLUSH = 31  # steps before u8 counts (<= 8 per step) could overflow
GROUP = 32 // OUTS  # channel blocks whose output bits share one u32 lane per pixel (a packed Y)


def layout(lanes: int) -> tuple[int, int, int]:
    """(bits per channel word, pixel vectors per register block, pixels packed at a time) of a vector width:
    AVX2 counts u64 words bytewise (4 x 2 accumulators); with ``vpopcntd``, u32 words put 16 pixels in a zmm
    and the counts are already the i32 lanes of the output, 4 x 3 accumulators."""
    return (64, 2, PACK) if lanes == LANES else (32, 3, 2 * PACK)


def _patterns(size: int, kernel: int, stride: int, pad: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output index: the id of its in-image tap pattern, and the patterns [n, kernel] (bool)."""
    patterns, ids = np.unique(taps_inside(size, kernel, stride, pad, out), axis=0, return_inverse=True)
    return ids.reshape(-1).astype(np.int32), patterns


def repack(w_packed: np.ndarray, c: int, kh: int, kw: int, h: int, w: int, strides, pads, lanes: int = LANES,
           pad_value: int = 0, flip: np.ndarray | None = None):
    """Weights [kh, kw, CW, O_pad] (u64 or u32 words, bit c % bits of word c // bits), row pattern ids [OH]
    and the integer offsets [patterns, O_pad, OW_pad] int32: S = offset - 2 * count, i.e. the taps
    C * kh * kw less what the padded taps add (their zero words count as +1, which ``pad_value = 1``
    wants and 0 does not: docs/ops.md). The words of the channels in ``flip`` hold their real bits
    inverted (the offsets are those of the weights as given)."""
    bits = layout(lanes)[0]
    o = w_packed.shape[0]
    cw = -(-c // bits)
    o_pad = -(-o // OUTS) * OUTS
    signs = unpack_signs(w_packed, c * kh * kw).reshape(o, c, kh, kw)  # +1 / -1
    sign_bits = np.zeros((kh, kw, cw * bits, o_pad), np.uint8)
    negative = signs < 0
    if flip is not None:
        negative ^= np.asarray(flip, bool)[:, None, None, None]
    sign_bits[:, :, :c, :o] = negative.transpose(2, 3, 1, 0)
    words = np.packbits(sign_bits.reshape(kh, kw, cw, bits, o_pad).transpose(0, 1, 2, 4, 3), axis=-1,
                        bitorder="little").view(f"<u{bits // 8}").reshape(kh, kw, cw, o_pad)
    oh, ow = conv_output_shape(h, w, (kh, kw), strides, pads)
    row_ids, rows = _patterns(h, kh, strides[0], pads[0], oh)
    col_ids, cols = _patterns(w, kw, strides[1], pads[1], ow)
    tap_sum = np.zeros((o_pad, kh, kw), np.int64)
    tap_sum[:o] = signs.sum(axis=1)  # what a padded tap wrongly adds: sum_c sign(w) (x = +1)
    outside = ~(rows[:, None, :, None] & cols[col_ids][None, :, None, :])  # [nr, OW, kh, kw]
    offset = np.full((len(rows), o_pad, _ow_pad(ow, lanes)), c * kh * kw, np.int32)
    if not pad_value:
        offset[:, :, :ow] -= np.einsum("rxij,oij->rox", outside.astype(np.int64), tap_sum).astype(np.int32)
    return np.ascontiguousarray(words.astype(f"uint{bits}")), row_ids, offset


def _ow_pad(ow: int, lanes: int) -> int:
    span = lanes * layout(lanes)[1]
    return -(-ow // span) * span


def binary_conv_primfunc(c: int, h: int, w: int, o: int, kh: int, kw: int, strides, pads, n_rows: int,
                         lanes: int = LANES, packing: Packing = UNPACKED):
    """TIR ``(X[b, C, H, W], Wr[kh, kw, CW, O_pad], row_id[OH], offset[nr, O_pad, OW_pad], scale[O_pad],
    bias[O_pad], Y[b, O, OH, OW])``. ``packing.input``: X is [b, H, W, ceil(C/8)] uint8; ``packing.output``:
    the count thresholds ``thr[nr, O_pad, OW_pad]`` (int32, :func:`kernel_inputs`) replace offset, scale and
    bias, and Y is [b, OH, OW, ceil(O/8)] uint8."""
    sh, sw = strides
    pt, pl, pb, pr = pads
    oh, ow = conv_output_shape(h, w, (kh, kw), strides, pads)
    bits, pixel_vecs, pack_width = layout(lanes)
    word = f"uint{bits}"
    cw = -(-c // bits)
    o_pad = -(-o // OUTS) * OUTS
    ow_pad = _ow_pad(ow, lanes)
    hp = h + pt + pb
    wq = max(-(-(w + pl + pr) // sw), ow_pad + (kw - 1) // sw)  # columns per phase: all, and all read
    span = lanes * pixel_vecs
    pack = min(pack_width, w)
    steps = kh * kw * cw
    bytewise = lanes == LANES  # AVX2: count bytes with vpshufb, sum them with vpsadbw every FLUSH steps
    flushes = -(-steps // FLUSH)
    half = lanes // 2
    tail_vecs, leftover = divmod(ow % span, lanes)  # the last block of a row: whole pixel vectors, then
    paired = not bytewise and 0 < leftover <= half  # its last columns as 2 channels x ``half`` pixels per vector
    paired = paired and not packing.output  # (a float Y),
    tail_vecs += leftover > 0 and not paired  # or one more vector ending at OW (overlapping the one before)
    paired_ox = max(ow - half, 0)
    narrow = ow < lanes  # a row narrower than a vector: stored through a buffer
    vec = T.ramp(0, 1, lanes)
    c_bytes, o_bytes = -(-c // 8), -(-o // 8)
    x_shape, x_dtype = ((h, w, c_bytes), "uint8") if packing.input else ((c, h, w), "float32")
    y_shape, y_dtype = ((oh, ow, o_bytes), "uint8") if packing.output else ((o, oh, ow), "float32")
    blocks = o_pad // OUTS
    groups = -(-blocks // GROUP)
    u32_stores = o_bytes % 4 == 0  # a packed Y's pixels are whole u32 words

    def pixel(ox0, pv, clamp: bool):
        """First output column of pixel vector ``pv`` of the block at ``ox0``."""
        return T.min(ox0 + pv * lanes, ow - lanes) if clamp else ox0 + pv * lanes

    def split_step(s):
        """(tap i, tap j, channel word q) of step s."""
        return s // (kw * cw), s // cw % kw, s % cw

    def tap_xor(xb, Wr, b, oy, ox, ob, u, i, j, q):
        """x ^ w of tap (i, j), channel word q, for ``lanes`` pixels from ``ox`` and channel ob * OUTS + u."""
        return xb[b, oy * sh + i, q, j % sw, T.ramp(ox + j // sw, 1, lanes)] ^ T.broadcast(Wr[i, j, q, ob * OUTS + u],
                                                                                           lanes)

    def join_halves(bits32, l):
        """The channel word of pixel ``l`` from its u32 halves."""
        if bits == 32:
            return bits32[0, l]
        return T.Cast(word, bits32[0, l]) | (T.Cast(word, bits32[1, l]) << T.Cast(word, 32))

    def packed_word(X, b, yy, xx, q):
        """Channel word q of pixel (yy, xx) of a packed X: its bytes, those past C (and the bits past C) 0."""
        per_word = bits // 8
        if c % bits == 0:
            return T.reinterpret(word, X[b, yy, xx, T.ramp(q * per_word, 1, per_word)])
        last = (1 << (c % 8 or 8)) - 1
        value = None
        for e in range(per_word):
            i = q * per_word + e
            byte = T.if_then_else(i < c_bytes, X[b, yy, xx, T.min(i, c_bytes - 1)] & T.Select(
                i == c_bytes - 1, T.uint8(last), T.uint8(255)), T.uint8(0))
            term = T.Cast(word, byte) << T.Cast(word, 8 * e)
            value = term if value is None else value | term
        return value

    @T.macro
    def output(Y, acc, offset, row_id, scale, bias, row_buf, b, oy, ox, oc, u, pv, narrow_row):
        """One pixel vector of channel oc; a row narrower than a vector goes through ``row_buf`` (its first OW
        lanes are copied: loads and stores, no arithmetic per lane)."""
        if narrow_row:
            row_buf[vec] = output_transform(offset[row_id[oy], oc, vec], acc[u, pv, vec],
                                            T.broadcast(scale[oc], lanes), T.broadcast(bias[oc], lanes), lanes)
            Y[b, oc, oy, T.ramp(0, 1, ow)] = row_buf[T.ramp(0, 1, ow)]
        else:
            Y[b, oc, oy, T.ramp(ox, 1, lanes)] = output_transform(
                offset[row_id[oy], oc, T.ramp(ox, 1, lanes)], acc[u, pv, vec], T.broadcast(scale[oc], lanes),
                T.broadcast(bias[oc], lanes), lanes)

    @T.macro
    def accumulate(xb, Wr, acc, acc8, b, oy, ox0, ob, nvecs, clamp):
        """The counts of ``nvecs`` pixel vectors x OUTS channels from column ``ox0`` into ``acc``; ``clamp``:
        the last vector ends at OW."""
        for u in T.unroll(OUTS):
            for pv in T.unroll(nvecs):
                acc[u, pv, vec] = T.broadcast(T.Cast(word, 0), lanes)
        if bytewise:
            for f in range(flushes):  # steps s = (i, j, q) flattened
                for u in T.unroll(OUTS):
                    for pv in T.unroll(nvecs):
                        acc8[u, pv, T.ramp(0, 1, 32)] = T.broadcast(T.uint8(0), 32)
                for ss in range(T.min(FLUSH, steps - f * FLUSH)):
                    for u in T.unroll(OUTS):
                        for pv in T.unroll(nvecs):
                            acc8[u, pv, T.ramp(0, 1, 32)] = acc8[u, pv, T.ramp(0, 1, 32)] + byte_popcount(
                                T.reinterpret("uint8x32", tap_xor(xb, Wr, b, oy, pixel(ox0, pv, clamp), ob, u,
                                                                  *split_step(f * FLUSH + ss))))
                for u in T.unroll(OUTS):
                    for pv in T.unroll(nvecs):
                        acc[u, pv, vec] = acc[u, pv, vec] + T.call_llvm_pure_intrin(
                            "uint64x4", "llvm.x86.avx2.psad.bw", acc8[u, pv, T.ramp(0, 1, 32)],
                            T.broadcast(T.uint8(0), 32))
        else:  # taps unrolled: their offsets are constants, only the row and the channel word move
            for i in range(kh):
                for j in T.unroll(kw):
                    for q in range(cw):
                        for u in T.unroll(OUTS):
                            for pv in T.unroll(nvecs):
                                acc[u, pv, vec] = acc[u, pv, vec] + T.popcount(
                                    tap_xor(xb, Wr, b, oy, pixel(ox0, pv, clamp), ob, u, i, j, q))

    @T.macro
    def block(xb, Wr, row_id, offset, scale, bias, Y, acc, acc8, row_buf, b, oy, ox0, ob, nvecs, clamp, lane_stores):
        """``nvecs`` pixel vectors x OUTS channels from column ``ox0``; ``clamp``: the last vector ends at OW;
        ``lane_stores``: a row narrower than a vector (the padded image is wide enough for its loads)."""
        accumulate(xb, Wr, acc, acc8, b, oy, ox0, ob, nvecs, clamp)
        for u in T.unroll(OUTS):
            if ob * OUTS + u < o:
                for pv in T.unroll(nvecs):
                    output(Y, acc, offset, row_id, scale, bias, row_buf, b, oy, pixel(ox0, pv, clamp), ob * OUTS + u,
                           u, pv, lane_stores)

    @T.macro
    def packed_block(xb, Wr, row_id, thr, Y, Yw, acc, acc8, bitbuf, b, oy, ox0, nvecs, clamp, narrow_row):
        """Packed Y of ``nvecs`` pixel vectors from column ``ox0``, every channel: the bits of GROUP channel
        blocks (32 channels) OR-ed into one u32 lane per pixel (count > threshold), then stored per pixel."""
        for g in range(groups):
            for pv in T.unroll(nvecs):
                bitbuf[pv, vec] = T.broadcast(T.uint32(0), lanes)
            for gb in range(T.min(GROUP, blocks - g * GROUP)):
                accumulate(xb, Wr, acc, acc8, b, oy, ox0, g * GROUP + gb, nvecs, clamp)
                for u in T.unroll(OUTS):
                    for pv in T.unroll(nvecs):
                        bitbuf[pv, vec] = bitbuf[pv, vec] | T.Select(
                            T.Cast(f"int32x{lanes}", acc[u, pv, vec])
                            > thr[row_id[oy], (g * GROUP + gb) * OUTS + u, T.ramp(pixel(ox0, pv, clamp), 1, lanes)],
                            T.broadcast(T.uint32(1) << T.Cast("uint32", gb * OUTS + u), lanes),
                            T.broadcast(T.uint32(0), lanes))
            for pv in T.unroll(nvecs):
                for l in range(min(ow, lanes) if narrow_row else lanes):
                    if u32_stores:
                        Yw[((b * oh + oy) * ow + pixel(ox0, pv, clamp) + l) * (o_bytes // 4) + g] = bitbuf[pv, l]
                    else:
                        for e in range(T.min(4, o_bytes - 4 * g)):
                            Y[b, oy, pixel(ox0, pv, clamp) + l, 4 * g + e] = T.Cast(
                                "uint8", bitbuf[pv, l] >> T.Cast("uint32", 8 * e))

    def doubled(a, b, scalars: bool = False):
        """A vector of ``half`` lanes of ``a`` then ``half`` lanes of ``b`` (``half``-lane vectors, or scalars)."""
        if scalars:
            a, b = T.broadcast(a, half), T.broadcast(b, half)
        return T.Shuffle([a, b], list(range(lanes)))

    @T.macro
    def paired_block(xb, Wr, row_id, offset, scale, bias, Y, acc, row_buf, b, oy, ox, ob):
        """The last ``half`` (or OW) columns of a row for OUTS channels, two channels per vector: lanes < half
        belong to channel ob * OUTS + 2p, the others to the next one (each x word loaded once, doubled)."""
        for p in T.unroll(OUTS // 2):
            acc[p, 0, vec] = T.broadcast(T.Cast(word, 0), lanes)
        for i in range(kh):
            for j in T.unroll(kw):
                for q in range(cw):
                    for p in T.unroll(OUTS // 2):
                        acc[p, 0, vec] = acc[p, 0, vec] + T.popcount(doubled(
                            xb[b, oy * sh + i, q, j % sw, T.ramp(ox + j // sw, 1, half)],
                            xb[b, oy * sh + i, q, j % sw, T.ramp(ox + j // sw, 1, half)]) ^ doubled(
                                Wr[i, j, q, ob * OUTS + 2 * p], Wr[i, j, q, ob * OUTS + 2 * p + 1], True))
        for p in T.unroll(OUTS // 2):
            row_buf[vec] = output_transform(
                doubled(offset[row_id[oy], ob * OUTS + 2 * p, T.ramp(ox, 1, half)],
                        offset[row_id[oy], ob * OUTS + 2 * p + 1, T.ramp(ox, 1, half)]),
                acc[p, 0, vec], doubled(scale[ob * OUTS + 2 * p], scale[ob * OUTS + 2 * p + 1], True),
                doubled(bias[ob * OUTS + 2 * p], bias[ob * OUTS + 2 * p + 1], True), lanes)
            for e in T.unroll(2):
                if ob * OUTS + 2 * p + e < o:
                    Y[b, ob * OUTS + 2 * p + e, oy, T.ramp(ox, 1, min(half, ow))] = row_buf[
                        T.ramp(e * half, 1, min(half, ow))]

    @T.macro
    def fill(X, xb, bits32, b):
        """Channel words per pixel of image b into the padded image (pad pixels and pad bits: 0)."""
        for yy in range(hp):
            for q in range(cw):
                for ph in range(sw):
                    for xx in T.vectorized(wq):
                        xb[b, yy, q, ph, xx] = T.Cast(word, 0)
        if packing.input:  # the packed sign bytes as they are
            for yy in range(h):
                for xx in range(w):
                    for q in T.unroll(cw):
                        xb[b, yy + pt, q, (xx + pl) % sw, (xx + pl) // sw] = packed_word(X, b, yy, xx, q)
        else:  # sign bits along C
            for yy in range(h):
                for q in range(cw):
                    for xv in range(-(-w // pack)):  # ``pack`` pixels at a time, channel bits OR-ed in registers
                        for half in range(bits // 32):  # u32 lanes
                            bits32[half, T.ramp(0, 1, pack)] = T.broadcast(T.uint32(0), pack)
                            for t in T.unroll(32):
                                bits32[half, T.ramp(0, 1, pack)] = bits32[half, T.ramp(0, 1, pack)] | T.Select(
                                    T.broadcast(q * bits + half * 32 + t < c, pack) & (X[
                                        b, T.min(q * bits + half * 32 + t, c - 1), yy,
                                        T.ramp(T.min(xv * pack, w - pack), 1, pack)] < T.broadcast(T.float32(0), pack)),
                                    T.broadcast(T.uint32(1) << T.Cast("uint32", t), pack),
                                    T.broadcast(T.uint32(0), pack))
                        for l in range(pack):  # the last group is shifted left to stay inside the row
                            xb[b, yy + pt, q, (T.min(xv * pack, w - pack) + l + pl) % sw,
                               (T.min(xv * pack, w - pack) + l + pl) // sw] = join_halves(bits32, l)

    if packing.output:
        @T.prim_func
        def kernel(x: T.handle, Wr: T.Buffer((kh, kw, cw, o_pad), word), row_id: T.Buffer((oh,), "int32"),
                   thr: T.Buffer((n_rows, o_pad, ow_pad), "int32"), y: T.handle):
            T.func_attr({"tirx.noalias": True})
            batch = T.int64()
            X = T.match_buffer(x, (batch, *x_shape), x_dtype)
            Y = T.match_buffer(y, (batch, *y_shape), y_dtype)
            Yw = T.decl_buffer((batch * (oh * ow * o_bytes // 4),), "uint32", data=Y.data)  # u32_stores only
            xb = T.alloc_buffer((batch, hp, cw, sw, wq), word)  # column xx at [xx % sw, xx // sw]
            # register blocks: under 1 KiB and global scope, so a stack array that LLVM keeps in
            # registers ("local" scope or more bytes would go to TVMBackendAllocWorkspace, heap memory)
            acc = T.alloc_buffer((OUTS, pixel_vecs, lanes), word)
            acc8 = T.alloc_buffer((OUTS, pixel_vecs, 32), "uint8")
            bitbuf = T.alloc_buffer((pixel_vecs, lanes), "uint32")
            bits32 = T.alloc_buffer((bits // 32, pack), "uint32")
            for b in range(batch):
                fill(X, xb, bits32, b)
            for b in range(batch):
                for oy in range(oh):
                    for t in range(ow // span):
                        packed_block(xb, Wr, row_id, thr, Y, Yw, acc, acc8, bitbuf, b, oy, t * span, pixel_vecs,
                                     False, False)
                    if tail_vecs > 0:
                        packed_block(xb, Wr, row_id, thr, Y, Yw, acc, acc8, bitbuf, b, oy, ow // span * span,
                                     tail_vecs, not narrow, narrow)
    else:
        @T.prim_func
        def kernel(x: T.handle, Wr: T.Buffer((kh, kw, cw, o_pad), word), row_id: T.Buffer((oh,), "int32"),
                   offset: T.Buffer((n_rows, o_pad, ow_pad), "int32"), scale: T.Buffer((o_pad,), "float32"),
                   bias: T.Buffer((o_pad,), "float32"), y: T.handle):
            T.func_attr({"tirx.noalias": True})
            batch = T.int64()
            X = T.match_buffer(x, (batch, *x_shape), x_dtype)
            Y = T.match_buffer(y, (batch, *y_shape), y_dtype)
            xb = T.alloc_buffer((batch, hp, cw, sw, wq), word)  # column xx at [xx % sw, xx // sw]
            # register blocks: under 1 KiB and global scope, so a stack array that LLVM keeps in
            # registers ("local" scope or more bytes would go to TVMBackendAllocWorkspace, heap memory)
            acc = T.alloc_buffer((OUTS, pixel_vecs, lanes), word)
            acc8 = T.alloc_buffer((OUTS, pixel_vecs, 32), "uint8")
            bits32 = T.alloc_buffer((bits // 32, pack), "uint32")
            row_buf = T.alloc_buffer((lanes,), "float32")
            for b in range(batch):
                fill(X, xb, bits32, b)
            for b in range(batch):
                for oy in range(oh):
                    for ob in range(o_pad // OUTS):
                        for t in range(ow // span):
                            block(xb, Wr, row_id, offset, scale, bias, Y, acc, acc8, row_buf, b, oy, t * span, ob,
                                  pixel_vecs, False, False)
                        if tail_vecs > 0:
                            block(xb, Wr, row_id, offset, scale, bias, Y, acc, acc8, row_buf, b, oy,
                                  ow // span * span, ob, tail_vecs, not narrow, narrow)
                        if paired:
                            paired_block(xb, Wr, row_id, offset, scale, bias, Y, acc, row_buf, b, oy, paired_ox, ob)

    return kernel


def kernel_inputs(w_packed: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, c: int, h: int, w: int,
                  kernel_shape, strides, pads, lanes: int = LANES, pad_value: int = 0, packing: Packing = UNPACKED):
    """``(primfunc, constant inputs after X)`` of the kernel; ``w_packed`` is the op's [O, ceil(C*kh*kw/8)] uint8
    input. A packed Y takes count thresholds instead of offsets, scale and bias (its weights flipped for
    negative scales; pad channels never set their bit)."""
    kh, kw = kernel_shape
    o, k = w_packed.shape[0], c * kh * kw
    oh, ow = conv_output_shape(h, w, kernel_shape, strides, pads)
    if packing.output:
        sense, t = sign_thresholds(scale, bias, k, packing.activation)
        words, row_ids, offset = repack(w_packed, c, kh, kw, h, w, strides, pads, lanes, pad_value, flip=sense < 0)
        thr = np.full(offset.shape, NEVER, np.int32)
        thr[:, :o] = count_thresholds(offset[:, :o], sense[None, :, None], t[None, :, None], k)
        consts = [words, row_ids, thr]
    else:
        words, row_ids, offset = repack(w_packed, c, kh, kw, h, w, strides, pads, lanes, pad_value)
        consts = [words, row_ids, offset, *padded_scale_bias(scale, bias, words.shape[-1])]
    func = binary_conv_primfunc(c, h, w, o, kh, kw, strides, pads, offset.shape[0], lanes, packing)
    return func, consts


def emit_binary_conv_cpu(bb: relax.BlockBuilder, x: relax.Expr, w_packed: np.ndarray, scale: np.ndarray,
                         bias: np.ndarray | None, c: int, h: int, w: int, kernel_shape, strides, pads,
                         lanes: int = LANES, pad_value: int = 0, packing: Packing = UNPACKED) -> relax.Expr:
    """Emit the kernel; ``w_packed`` is the op's [O, ceil(C*kh*kw/8)] uint8 input."""
    func, consts = kernel_inputs(w_packed, scale, bias, c, h, w, kernel_shape, strides, pads, lanes, pad_value,
                                 packing)
    name = "frugalrt_binary_conv_cpu_packed" if packing.any else "frugalrt_binary_conv_cpu"
    gv = bb.add_func(func.with_attr("op_pattern", 8).without_attr("global_symbol"), name)
    batch, o = x.ty.shape.values[0], w_packed.shape[0]
    oh, ow = conv_output_shape(h, w, kernel_shape, strides, pads)
    out = (relax.TensorType((batch, oh, ow, -(-o // 8)), "uint8") if packing.output
           else relax.TensorType((batch, o, oh, ow), "float32"))
    return bb.emit(relax.call_tir(gv, [x, *map(relax.const, consts)], out))


def emit_binary_conv_x86(bb: relax.BlockBuilder, x: relax.Expr, w_bytes: np.ndarray, scale: np.ndarray,
                         bias: np.ndarray | None, kernel_shape, strides, pads, target, packing: Packing = UNPACKED,
                         in_channels: int | None = None, pad_value: int = 0) -> relax.Expr:
    """Lowering entry (``BinaryConvLowering.KERNELS["x86"]``); ``w_bytes`` is the op's [O, ceil(C*kh*kw/8)] uint8,
    X [batch, C, H, W] float32 or (``packing.input``) [batch, H, W, ceil(C/8)] uint8. 512-bit vectors and
    ``vpopcntd`` with AVX-512 VPOPCNTDQ, byte counts with AVX2 (packed activations too), else the generic kernel."""
    wide = has_vpopcntdq(target)
    if not (wide or has_avx2(target)):
        from frugalrt.targets.kernels.binary import emit_conv_generic

        return emit_conv_generic(bb, x, w_bytes, scale, bias, kernel_shape, strides, pads, target, packing,
                                 in_channels, pad_value)
    dims = [int(d) for d in x.ty.shape.values[1:]]
    (h, w), c = (dims[:2], in_channels) if packing.input else (dims[1:], dims[0])
    lanes = WIDE if wide else LANES
    return emit_binary_conv_cpu(bb, x, w_bytes, scale, bias, c, h, w, kernel_shape, strides, pads, lanes, pad_value,
                                packing)
