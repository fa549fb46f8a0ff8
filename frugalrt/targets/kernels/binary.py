"""TVM lowerings of ``ai.frugalrt::BinaryGemm`` and ``BinaryConv`` v1 (docs/ops.md; XNOR-Net).

Both binarize and bit-pack the activations inside the kernel (bit set = negative, element k at
bit k % W of word k // W), XOR them with the weight words, count with ``tirx.popcount`` and apply
the fused output transform ``float(S) * scale + bias``. Weights arrive as uint8 bytes and are
repacked at compile time into W-bit words (``word_bits``: u64 on 64-bit targets, u32 otherwise);
pad bits are 0 on both sides of the XOR, and the true K (or the number of in-image taps V, for a
padded convolution) enters the sum: S = K - 2 * popcount(x ^ w).

Packed activations (attributes ``input_packed``, ``output_packed``; docs/ops.md): a packed X is
read as bytes assembled into words (no binarization), and a packed Y is the sign bits of the float
result, computed exactly as an integer compare of S with per-channel thresholds derived at compile
time (:func:`frugalrt.targets.kernels.packing.sign_thresholds`). The fast kernels of each family
serve them too; where one can't, it hands the node to the generic kernel here.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from tvm import relax, te, tirx

from frugalrt.errors import UnsupportedOpError
from frugalrt.targets.kernels import (conv_output_shape, pack_words, pick_kernel, register_lowering, taps_inside,
                                      word_bits)
from frugalrt.targets.kernels import arm_binary, arm_binary_conv
from frugalrt.targets.kernels.cpu_binary import emit_binary_gemm_x86
from frugalrt.targets.kernels.cpu_binary_conv import emit_binary_conv_x86
from frugalrt.targets.kernels.gpu_binary import emit_binary_conv_gpu, emit_binary_gemm_gpu
from frugalrt.targets.kernels.packing import UNPACKED, Packing, sign_thresholds
from frugalrt.targets.kernels.schedules import emit_kernel
from frugalrt.targets.kernels import target_family
from frugalrt.targets.tvm_bridge import check_spec


def _output(acc: te.Tensor, taps, scale: te.Tensor, bias: te.Tensor | None, channel_axis: int) -> te.Tensor:
    """Fused transform: S = taps - 2 * popcount, converted to float32, times scale, plus bias."""
    def f(*idx):
        c = idx[channel_axis]
        y = (taps(*idx) - 2 * acc[idx]).astype("float32") * scale[c]
        return y + bias[c] if bias is not None else y

    return te.compute(acc.shape, f, name="scale_bias")


def _packed_output(acc: te.Tensor, taps, sense: te.Tensor, thresh: te.Tensor) -> te.Tensor:
    """Packed Y from channel-last counts: bit r of byte j is channel c = 8j + r, set when
    ``sense[c] * S < thresh[c]`` (S = taps - 2 * popcount); pad bits 0."""
    *lead, n = (int(d) if isinstance(d, (int, tirx.IntImm)) else d for d in acc.shape)
    r = te.reduce_axis((0, 8), name="bit")

    def f(*idx):
        c = idx[-1] * 8 + r.var
        cc = tirx.min(c, n - 1)  # (in bounds; the bit is masked below)
        s = taps(*idx[:-1], cc) - 2 * acc[(*idx[:-1], cc)]
        return te.sum(_bit(tirx.all(c < n, s * sense[cc] < thresh[cc]), r, "uint8"), axis=r)

    return te.compute((*lead, (n + 7) // 8), f, name="pack_y")


def _bit(negative, r, dtype: str):
    """Word with bit r set when ``negative`` holds."""
    one = tirx.const(1, dtype)
    return tirx.Select(negative, one << tirx.Cast(dtype, r.var), tirx.const(0, dtype))


def _packed_words(x: te.Tensor, n: int, dtype: str, name: str) -> te.Tensor:
    """Words (``dtype``) of packed sign bytes along X's last axis (n signs: ceil(n/8) bytes), the
    bits past n masked to 0 (so that only the n real signs enter the XOR, as in the reference)."""
    *lead, nbytes = x.shape
    nbytes = int(nbytes)
    step = int(dtype[4:]) // 8
    last = (1 << (n % 8 or 8)) - 1
    r = te.reduce_axis((0, step), name="byte")

    def f(*idx):
        i = idx[-1] * step + r.var
        byte = x[(*idx[:-1], tirx.min(i, nbytes - 1))]
        byte = tirx.Select(i == nbytes - 1, byte & tirx.const(last, "uint8"), byte)
        byte = tirx.Select(i < nbytes, byte, tirx.const(0, "uint8"))
        return te.sum(byte.astype(dtype) << (tirx.Cast(dtype, r.var) * tirx.const(8, dtype)), axis=r)

    return te.compute((*lead, -(-nbytes // step)), f, name=name)




def binary_gemm_te(x: te.Tensor, w: te.Tensor, scale: te.Tensor, bias: te.Tensor | None, k: int,
                   thresholds: tuple[te.Tensor, te.Tensor] | None = None) -> te.Tensor:
    """Generic XNOR-popcount GEMM: pack rows of X into words (or read them: a uint8 X is packed
    already), popcount(x ^ w) summed over words; a packed Y where ``thresholds`` (sense, t) are given."""
    batch = x.shape[0]
    n, words = (int(d) for d in w.shape)
    dtype = str(w.dtype)
    bits = int(dtype[4:])
    if str(x.dtype) == "uint8":
        xw = _packed_words(x, k, dtype, "x_words")
    else:
        r = te.reduce_axis((0, bits), name="bit")
        xw = te.compute((batch, words), lambda b, j: te.sum(_bit(
            tirx.if_then_else(j * bits + r.var < k, x[b, j * bits + r.var] < 0, tirx.const(False)), r, dtype),
            axis=r), name="pack_x")
    wi = te.reduce_axis((0, words), name="word")
    acc = te.compute((batch, n), lambda b, o: te.sum(
        tirx.popcount(tirx.bitwise_xor(xw[b, wi], w[o, wi])).astype("int32"), axis=wi), name="popcount")
    if thresholds is not None:
        return _packed_output(acc, lambda *_: k, *thresholds)
    return _output(acc, lambda *_: k, scale, bias, 1)


def _threshold_consts(scale: np.ndarray, bias: np.ndarray | None, k: int, packing: Packing) -> list:
    """The (sense, t) constants of a packed Y (they replace scale and B), else none."""
    return [relax.const(t) for t in sign_thresholds(scale, bias, k, packing.activation)] if packing.output else []


def emit_gemm_generic(bb, x, w_bytes: np.ndarray, scale: np.ndarray, bias: np.ndarray | None,
                      k: int, target, packing: Packing = UNPACKED) -> relax.Expr:
    thresholds = _threshold_consts(scale, bias, k, packing)
    args = [x, relax.const(pack_words(w_bytes, word_bits(target)))]
    args += thresholds or [relax.const(scale)] + ([relax.const(bias)] if bias is not None else [])

    def kernel(x, w, *rest):
        if thresholds:
            return binary_gemm_te(x, w, None, None, k, tuple(rest))
        return binary_gemm_te(x, w, rest[0], rest[1] if len(rest) > 1 else None, k)

    return emit_kernel(bb, kernel, args, "frugalrt_binary_gemm_packed" if packing.any else "frugalrt_binary_gemm",
                       target)


def conv_taps(c: int, h: int, w: int, kh: int, kw: int, strides, pads, bits: int,
              pad_value: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per output position: the mask of the taps that count as words [OH, OW, words] and their number
    V [OH, OW]: the in-image taps, or all of them with ``pad_value = 1`` (padded taps read +1)."""
    oh, ow = conv_output_shape(h, w, (kh, kw), strides, pads)
    rows = taps_inside(h, kh, strides[0], pads[0], oh) | bool(pad_value)  # [OH, kh]
    cols = taps_inside(w, kw, strides[1], pads[1], ow) | bool(pad_value)  # [OW, kw]
    inside = rows[:, None, :, None] & cols[None, :, None, :]
    valid = np.broadcast_to(inside[:, :, None], (oh, ow, c, kh, kw)).reshape(oh * ow, c * kh * kw)
    mask = pack_words(np.packbits(valid, axis=-1, bitorder="little"), bits).reshape(oh, ow, -1)
    return mask, valid.sum(axis=1).reshape(oh, ow).astype(np.int32)


def _conv_output(count, batch, o: int, taps: te.Tensor, scale, bias, thresholds) -> te.Tensor:
    """Y from the popcounts ``count(b, f, y, z)``: float32 [batch, O, OH, OW], or packed sign bits
    [batch, OH, OW, ceil(O/8)] where ``thresholds`` are given (counted channel-last)."""
    oh, ow = (int(d) for d in taps.shape)
    if thresholds is not None:
        acc = te.compute((batch, oh, ow, o), lambda b, y, z, f: count(b, f, y, z), name="popcount")
        return _packed_output(acc, lambda b, y, z, f: taps[y, z], *thresholds)
    acc = te.compute((batch, o, oh, ow), count, name="popcount")
    return _output(acc, lambda b, f, y, z: taps[y, z], scale, bias, 1)


def binary_conv_te(x: te.Tensor, w: te.Tensor, scale: te.Tensor, mask: te.Tensor | None, taps: te.Tensor,
                   bias: te.Tensor | None, kernel_shape, strides, pads,
                   thresholds: tuple[te.Tensor, te.Tensor] | None = None) -> te.Tensor:
    """Generic binary conv: per output position, pack the (c, i, j) window of sign bits into words;
    a packed Y where ``thresholds`` (sense, t) are given."""
    batch, c, h, wd = x.shape
    o, words = (int(d) for d in w.shape)
    oh, ow = (int(d) for d in taps.shape)
    kh, kw = kernel_shape
    sh, sw = strides
    pt, pl = pads[0], pads[1]
    dtype = str(w.dtype)
    bits = int(dtype[4:])
    kdim = int(c) * kh * kw
    r = te.reduce_axis((0, bits), name="bit")

    def window_bit(b, y, z, j):
        t = j * bits + r.var
        ch, i, jj = t // (kh * kw), t // kw % kh, t % kw
        row, col = y * sh + i - pt, z * sw + jj - pl
        inside = tirx.all(t < kdim, row >= 0, row < h, col >= 0, col < wd)
        return _bit(tirx.if_then_else(inside, x[b, ch, row, col] < 0, tirx.const(False)), r, dtype)

    xw = te.compute((batch, oh, ow, words), lambda b, y, z, j: te.sum(window_bit(b, y, z, j), axis=r),
                    name="pack_window")
    wi = te.reduce_axis((0, words), name="word")

    def count(b, f, y, z):
        diff = tirx.bitwise_xor(xw[b, y, z, wi], w[f, wi])
        if mask is not None:
            diff = tirx.bitwise_and(diff, mask[y, z, wi])
        return te.sum(tirx.popcount(diff).astype("int32"), axis=wi)

    return _conv_output(count, batch, o, taps, scale, bias, thresholds)


def binary_conv_packed_te(x: te.Tensor, w: te.Tensor, scale: te.Tensor, taps: te.Tensor, bias: te.Tensor | None,
                          c: int, kernel_shape, strides, pads,
                          thresholds: tuple[te.Tensor, te.Tensor] | None = None, pad_value: int = 0) -> te.Tensor:
    """Generic binary conv of a packed X [batch, H, W, ceil(C/8)] with weights [O, kh, kw, words]
    (each tap's C signs in words): S = V - 2 * sum over the counted taps of popcount(x ^ w), a padded
    tap's x word being 0 (+1) with ``pad_value = 1`` and the tap skipped otherwise."""
    batch, h, wd, _ = x.shape
    o, kh, kw, words = (int(d) for d in w.shape)
    sh, sw = strides
    pt, pl = pads[0], pads[1]
    xw = _packed_words(x, c, str(w.dtype), "x_words")  # [batch, H, W, words]
    i, j, wi = (te.reduce_axis((0, n), name=name) for n, name in ((kh, "i"), (kw, "j"), (words, "word")))

    def count(b, f, y, z):
        row, col = y * sh + i - pt, z * sw + j - pl
        inside = tirx.all(row >= 0, row < h, col >= 0, col < wd)
        if pad_value:
            word = tirx.if_then_else(inside, xw[b, row, col, wi], tirx.const(0, xw.dtype))
            return te.sum(tirx.popcount(tirx.bitwise_xor(word, w[f, i, j, wi])).astype("int32"), axis=[i, j, wi])
        ones = tirx.popcount(tirx.bitwise_xor(xw[b, row, col, wi], w[f, i, j, wi])).astype("int32")
        return te.sum(tirx.if_then_else(inside, ones, tirx.const(0, "int32")), axis=[i, j, wi])

    return _conv_output(count, batch, o, taps, scale, bias, thresholds)


def tap_major_words(w_bytes: np.ndarray, c: int, kh: int, kw: int, bits: int) -> np.ndarray:
    """[O, ceil(C*kh*kw/8)] weights in (c, i, j) order -> [O, kh, kw, ceil(C/bits)] words, each tap's
    C signs packed on their own (the layout of a packed X pixel), pad bits 0."""
    o = w_bytes.shape[0]
    bits_ = np.unpackbits(w_bytes, axis=-1, count=c * kh * kw, bitorder="little").reshape(o, c, kh, kw)
    per_tap = np.packbits(bits_.transpose(0, 2, 3, 1), axis=-1, bitorder="little")  # [O, kh, kw, ceil(C/8)]
    return pack_words(per_tap.reshape(o * kh * kw, -1), bits).reshape(o, kh, kw, -1)


def emit_conv_generic(bb, x, w_bytes, scale, bias, kernel_shape, strides, pads, target,
                      packing: Packing = UNPACKED, in_channels: int | None = None, pad_value: int = 0):
    """``in_channels``: C, needed for a packed X ([batch, H, W, ceil(C/8)]); else X's dims give it."""
    dims = [int(d) for d in x.ty.shape.values[1:]]
    c, h, wd = (in_channels, dims[0], dims[1]) if packing.input else dims
    bits = word_bits(target)
    mask, taps = conv_taps(c, h, wd, *kernel_shape, strides, pads, bits, pad_value)
    mask = mask if any(pads) and not packing.input and not pad_value else None
    thresholds = _threshold_consts(scale, bias, c * kernel_shape[0] * kernel_shape[1], packing)
    weights = tap_major_words(w_bytes, c, *kernel_shape, bits) if packing.input else pack_words(w_bytes, bits)
    args = [x, relax.const(weights), relax.const(taps)]
    args += [relax.const(mask)] if mask is not None else []
    args += thresholds or [relax.const(scale)] + ([relax.const(bias)] if bias is not None else [])

    def kernel(x, w, taps, *rest):
        rest = list(rest)
        m = rest.pop(0) if mask is not None else None
        scale_, bias_ = (None, None) if thresholds else (rest[0], rest[1] if len(rest) > 1 else None)
        th = tuple(rest) if thresholds else None
        if packing.input:
            return binary_conv_packed_te(x, w, scale_, taps, bias_, c, kernel_shape, strides, pads, th, pad_value)
        return binary_conv_te(x, w, scale_, m, taps, bias_, kernel_shape, strides, pads, th)

    name = "frugalrt_binary_conv_packed" if packing.any else "frugalrt_binary_conv"
    return emit_kernel(bb, kernel, args, name, target)


# Target families whose binary kernels take packed activations (docs/ops.md, rewrite 5): every CPU
# family, fast kernels included. CUDA's kernels want float32 activations, so the importer unpacks
# there (:func:`frugalrt.export.fold.unpack_between_binary`).
PACKED_IO_FAMILIES = ("x86", "aarch64", "arm", "mcu", "c")


def packs_activations(target) -> bool:
    """Whether the binary ops compiled for ``target`` pass each other packed sign bits."""
    return target_family(target) in PACKED_IO_FAMILIES


def _binary_consts(op: str, inputs: list, consts: dict[str, np.ndarray]):
    if "W_packed" not in consts or "scale" not in consts or (
            len(inputs) > 3 and inputs[3] is not None and "B" not in consts):
        raise UnsupportedOpError(f"ai.frugalrt::{op} v1: W_packed, scale and B must be constant "
                                 "initializers (re-export the model with its parameters)")
    bias = consts.get("B")
    return (consts["W_packed"].astype(np.uint8), consts["scale"].astype(np.float32),
            None if bias is None else bias.astype(np.float32))


def _packing(op: str, x, attrs: dict[str, Any]) -> Packing:
    """The node's packed activations, with X's dtype checked against ``input_packed``."""
    packing = Packing.of(attrs)
    dtype, want = str(x.ty.dtype), "uint8" if packing.input else "float32"
    if dtype != want:
        raise UnsupportedOpError(f"ai.frugalrt::{op} v1: input X has dtype {dtype}, expected {want} "
                                 f"(input_packed = {int(packing.input)})")
    return packing


@register_lowering("BinaryGemm", 1)
class BinaryGemmLowering:
    """Y = scale * (K - 2 popcount(sign bits of X ^ W)) + B."""

    # target family -> kernel: emit(bb, x, w_packed, scale, bias, k, target, packing) -> relax.Expr, with
    # the op's [N, ceil(K/8)] uint8 weights (each kernel repacks them for itself; a fast kernel hands
    # what it does not serve, e.g. packed activations, to the generic one).
    KERNELS = {"generic": emit_gemm_generic, "x86": emit_binary_gemm_x86,
               "aarch64": arm_binary.emit_binary_gemm_aarch64, "arm": arm_binary.emit_binary_gemm_arm,
               "cuda": emit_binary_gemm_gpu}

    def emit(self, bb, inputs: list, consts: dict[str, np.ndarray], attrs: dict[str, Any], target):
        w, scale, bias = _binary_consts("BinaryGemm", inputs, consts)
        k = int(attrs["in_features"])
        if w.shape[1] != (k + 7) // 8:
            raise UnsupportedOpError(f"ai.frugalrt::BinaryGemm v1: W_packed {w.shape} does not fit in_features={k}")
        check_spec("BinaryGemm", inputs, consts, attrs)  # the whole of docs/ops.md: scale, B, X, pad bits, NaN
        packing = _packing("BinaryGemm", inputs[0], attrs)
        return pick_kernel(self.KERNELS, target)(bb, inputs[0], w, scale, bias, k, target, packing)


@register_lowering("BinaryConv", 1)
class BinaryConvLowering:
    """NCHW conv of sign(X), a padded tap contributing 0 (S = V - 2 popcount((x ^ w) & in-image)) or,
    with ``pad_value = 1``, +1 (S = C kh kw - 2 popcount(x ^ w), padded x bits 0)."""

    # target family -> kernel: emit(bb, x, w_packed, scale, bias, kernel_shape, strides, pads, target,
    # packing, in_channels, pad_value) -> relax.Expr, w_packed and the fallback as for BinaryGemm.
    KERNELS = {"generic": emit_conv_generic, "x86": emit_binary_conv_x86,
               "aarch64": arm_binary_conv.emit_binary_conv_aarch64, "arm": arm_binary_conv.emit_binary_conv_arm,
               "cuda": emit_binary_conv_gpu}

    def emit(self, bb, inputs: list, consts: dict[str, np.ndarray], attrs: dict[str, Any], target):
        w, scale, bias = _binary_consts("BinaryConv", inputs, consts)
        packing = _packing("BinaryConv", inputs[0], attrs)
        shape = inputs[0].ty.shape
        dims = [d.value if isinstance(d, tirx.IntImm) else None for d in shape.values[1:]] if shape else []
        if len(dims) != 3 or None in dims:
            raise UnsupportedOpError(f"ai.frugalrt::BinaryConv v1 needs static C, H, W; got input shape {shape}")
        c, h, wd = dims
        if packing.input:  # [batch, H, W, ceil(C/8)]
            (h, wd, nbytes), c = dims, int(attrs["in_channels"])
            if nbytes != (c + 7) // 8:
                raise UnsupportedOpError(f"ai.frugalrt::BinaryConv v1: packed input [batch, {h}, {wd}, {nbytes}] "
                                         f"does not fit in_channels={c} (expects {(c + 7) // 8} bytes per pixel)")
        kernel_shape = [int(v) for v in attrs["kernel_shape"]]
        strides = [int(v) for v in attrs.get("strides", (1, 1))]
        pads = [int(v) for v in attrs.get("pads", (0, 0, 0, 0))]
        kdim = c * kernel_shape[0] * kernel_shape[1]
        oh, ow = conv_output_shape(h, wd, kernel_shape, strides, pads)
        if int(attrs["in_channels"]) != c or w.shape[1] != (kdim + 7) // 8 or oh <= 0 or ow <= 0:
            raise UnsupportedOpError(
                f"ai.frugalrt::BinaryConv v1: input [batch, {c}, {h}, {wd}], in_channels={attrs['in_channels']}, "
                f"W_packed {w.shape} (expects [O, {(kdim + 7) // 8}]), kernel {kernel_shape}, strides {strides}, "
                f"pads {pads} -> output {oh}x{ow}: inconsistent")
        check_spec("BinaryConv", inputs, consts, attrs)  # the whole of docs/ops.md: scale, B, pad bits, NaN
        return pick_kernel(self.KERNELS, target)(bb, inputs[0], w, scale, bias, kernel_shape, strides, pads,
                                                 target, packing, c, int(attrs.get("pad_value", 0)))
