"""TVM lowerings of ``ai.frugalrt::BinaryGemm`` and ``BinaryConv`` v1 (docs/ops.md; XNOR-Net).

Both binarize and bit-pack the activations inside the kernel (bit set = negative, element k at
bit k % W of word k // W), XOR them with the weight words, count with ``tirx.popcount`` and apply
the fused output transform ``float(S) * scale + bias``. Weights arrive as uint8 bytes and are
repacked at compile time into W-bit words (``word_bits``: u64 on 64-bit targets, u32 otherwise);
pad bits are 0 on both sides of the XOR, and the true K (or the number of in-image taps V, for a
padded convolution) enters the sum: S = K - 2 * popcount(x ^ w).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from tvm import relax, te, tirx

from frugalrt.errors import UnsupportedOpError
from frugalrt.targets.kernels import (conv_output_shape, pack_words, pick_kernel, register_lowering, taps_inside,
                                      word_bits)
from frugalrt.targets.kernels.cpu_binary import emit_binary_gemm_aarch64, emit_binary_gemm_x86
from frugalrt.targets.kernels.cpu_binary_conv import emit_binary_conv_x86
from frugalrt.targets.kernels.schedules import emit_kernel
from frugalrt.targets.tvm_bridge import check_spec


def _output(acc: te.Tensor, taps, scale: te.Tensor, bias: te.Tensor | None, channel_axis: int) -> te.Tensor:
    """Fused transform: S = taps - 2 * popcount, converted to float32, times scale, plus bias."""
    def f(*idx):
        c = idx[channel_axis]
        y = (taps(*idx) - 2 * acc[idx]).astype("float32") * scale[c]
        return y + bias[c] if bias is not None else y

    return te.compute(acc.shape, f, name="scale_bias")


def _bit(negative, r, dtype: str):
    """Word with bit r set when ``negative`` holds."""
    one = tirx.const(1, dtype)
    return tirx.Select(negative, one << tirx.Cast(dtype, r.var), tirx.const(0, dtype))


def binary_gemm_te(x: te.Tensor, w: te.Tensor, scale: te.Tensor, bias: te.Tensor | None, k: int) -> te.Tensor:
    """Generic XNOR-popcount GEMM: pack rows of X into words, popcount(x ^ w) summed over words."""
    batch = x.shape[0]
    n, words = (int(d) for d in w.shape)
    dtype = str(w.dtype)
    bits = int(dtype[4:])
    r = te.reduce_axis((0, bits), name="bit")
    xw = te.compute((batch, words), lambda b, j: te.sum(_bit(
        tirx.if_then_else(j * bits + r.var < k, x[b, j * bits + r.var] < 0, tirx.const(False)), r, dtype), axis=r),
        name="pack_x")
    wi = te.reduce_axis((0, words), name="word")
    acc = te.compute((batch, n), lambda b, o: te.sum(
        tirx.popcount(tirx.bitwise_xor(xw[b, wi], w[o, wi])).astype("int32"), axis=wi), name="popcount")
    return _output(acc, lambda *_: k, scale, bias, 1)


def emit_gemm_generic(bb, x, w_bytes: np.ndarray, scale: np.ndarray, bias: np.ndarray | None,
                      k: int, target) -> relax.Expr:
    args = [x, relax.const(pack_words(w_bytes, word_bits(target))), relax.const(scale)] + ([relax.const(bias)] if bias is not None else [])

    def kernel(x, w, scale, *bias):
        return binary_gemm_te(x, w, scale, bias[0] if bias else None, k)

    return emit_kernel(bb, kernel, args, "frugalrt_binary_gemm", target)


def conv_taps(c: int, h: int, w: int, kh: int, kw: int, strides, pads, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output position: the in-image tap mask as words [OH, OW, words] and the count V [OH, OW]."""
    oh, ow = conv_output_shape(h, w, (kh, kw), strides, pads)
    rows = taps_inside(h, kh, strides[0], pads[0], oh)  # [OH, kh]
    cols = taps_inside(w, kw, strides[1], pads[1], ow)  # [OW, kw]
    inside = rows[:, None, :, None] & cols[None, :, None, :]
    valid = np.broadcast_to(inside[:, :, None], (oh, ow, c, kh, kw)).reshape(oh * ow, c * kh * kw)
    mask = pack_words(np.packbits(valid, axis=-1, bitorder="little"), bits).reshape(oh, ow, -1)
    return mask, valid.sum(axis=1).reshape(oh, ow).astype(np.int32)


def binary_conv_te(x: te.Tensor, w: te.Tensor, scale: te.Tensor, mask: te.Tensor | None, taps: te.Tensor,
                   bias: te.Tensor | None, kernel_shape, strides, pads) -> te.Tensor:
    """Generic binary conv: per output position, pack the (c, i, j) window of sign bits into words."""
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

    acc = te.compute((batch, o, oh, ow), count, name="popcount")
    return _output(acc, lambda b, f, y, z: taps[y, z], scale, bias, 1)


def emit_conv_generic(bb, x, w_bytes, scale, bias, kernel_shape, strides, pads, target):
    c, h, wd = (int(d) for d in x.ty.shape.values[1:])
    bits = word_bits(target)
    mask, taps = conv_taps(c, h, wd, *kernel_shape, strides, pads, bits)
    mask = mask if any(pads) else None
    args = [x, relax.const(pack_words(w_bytes, bits)), relax.const(scale), relax.const(taps)]
    args += [relax.const(mask)] if mask is not None else []
    args += [relax.const(bias)] if bias is not None else []

    def kernel(x, w, scale, taps, *rest):
        rest = list(rest)
        m = rest.pop(0) if mask is not None else None
        return binary_conv_te(x, w, scale, m, taps, rest[0] if rest else None, kernel_shape, strides, pads)

    return emit_kernel(bb, kernel, args, "frugalrt_binary_conv", target)


def _binary_consts(op: str, inputs: list, consts: dict[str, np.ndarray]):
    if "W_packed" not in consts or "scale" not in consts or (
            len(inputs) > 3 and inputs[3] is not None and "B" not in consts):
        raise UnsupportedOpError(f"ai.frugalrt::{op} v1: W_packed, scale and B must be constant "
                                 "initializers (re-export the model with its parameters)")
    bias = consts.get("B")
    return (consts["W_packed"].astype(np.uint8), consts["scale"].astype(np.float32),
            None if bias is None else bias.astype(np.float32))


@register_lowering("BinaryGemm", 1)
class BinaryGemmLowering:
    """Y = scale * (K - 2 popcount(sign bits of X ^ W)) + B."""

    # target family -> kernel: emit(bb, x, w_packed, scale, bias, k, target) -> relax.Expr, with the
    # op's [N, ceil(K/8)] uint8 weights (each kernel repacks them for itself).
    # PERF: put fast CPU kernels (kernels/cpu_*.py) here under "x86" / "aarch64" / "arm" / "cpu".
    KERNELS = {"generic": emit_gemm_generic, "x86": emit_binary_gemm_x86, "aarch64": emit_binary_gemm_aarch64}

    def emit(self, bb, inputs: list, consts: dict[str, np.ndarray], attrs: dict[str, Any], target):
        w, scale, bias = _binary_consts("BinaryGemm", inputs, consts)
        k = int(attrs["in_features"])
        if w.shape[1] != (k + 7) // 8:
            raise UnsupportedOpError(f"ai.frugalrt::BinaryGemm v1: W_packed {w.shape} does not fit in_features={k}")
        check_spec("BinaryGemm", inputs, consts, attrs)  # the whole of docs/ops.md: scale, B, X, pad bits, NaN
        kernel = pick_kernel(self.KERNELS, target)
        return kernel(bb, inputs[0], w, scale, bias, k, target)


@register_lowering("BinaryConv", 1)
class BinaryConvLowering:
    """NCHW conv of sign(X), zero padding contributing 0: S = V - 2 popcount((x ^ w) & in-image)."""

    # target family -> kernel: emit(bb, x, w_packed, scale, bias, kernel_shape, strides, pads, target)
    # -> relax.Expr, w_packed as for BinaryGemm. PERF: fast CPU kernels go here, as for BinaryGemm.
    KERNELS = {"generic": emit_conv_generic, "x86": emit_binary_conv_x86}

    def emit(self, bb, inputs: list, consts: dict[str, np.ndarray], attrs: dict[str, Any], target):
        w, scale, bias = _binary_consts("BinaryConv", inputs, consts)
        shape = inputs[0].ty.shape
        dims = [d.value if isinstance(d, tirx.IntImm) else None for d in shape.values[1:]] if shape else []
        if len(dims) != 3 or None in dims:
            raise UnsupportedOpError(f"ai.frugalrt::BinaryConv v1 needs static C, H, W; got input shape {shape}")
        c, h, wd = dims
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
        kernel = pick_kernel(self.KERNELS, target)
        return kernel(bb, inputs[0], w, scale, bias, kernel_shape, strides, pads, target)
