"""How each ``frugalrt::*`` torch op becomes ONNX: one translation per (mode, op).

``custom`` mode emits one ``ai.frugalrt`` node per op (attributes per docs/ops.md); ``portable``
mode emits the same arithmetic in standard ONNX ops (opset 18) so any runtime can run the file:
binary weights stay bit-packed in the file and are unpacked with BitShift/BitwiseAnd/Cast, a
butterfly becomes log2 N stages of Reshape/Slice/Mul/Add. Both modes compute exactly what the
reference kernels compute (same products, same summation order), so outputs are bit-identical
up to the runtimes' own float kernels.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from onnxscript import ir
from onnxscript import opset18 as op
from onnxscript.values import Opset

from frugalrt.nn import ops  # noqa: F401  (registers torch.ops.frugalrt.*)
from frugalrt.runtime.reference import DOMAIN

frugal = Opset(DOMAIN, 1)
MODES = ("custom", "portable")
TRANSLATIONS: dict[tuple[str, str], Callable] = {}


def translation(mode: str, torch_op: str):
    """Register ``fn`` as the ONNX translation of ``torch.ops.frugalrt.<torch_op>`` in ``mode``."""

    def wrap(fn):
        assert mode in MODES and (mode, torch_op) not in TRANSLATIONS, (mode, torch_op)
        TRANSLATIONS[(mode, torch_op)] = fn
        return fn

    return wrap


def translation_table(portable: bool = False) -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``."""
    mode = "portable" if portable else "custom"
    return {getattr(torch.ops.frugalrt, name).default: fn
            for (m, name), fn in TRANSLATIONS.items() if m == mode}


def _present(*values):
    """Inputs up to the last one given: an absent optional bias is omitted, not passed empty."""
    return tuple(v for v in values if v is not None)


# --- custom mode: one ai.frugalrt node per op ----------------------------------------------------

@translation("custom", "butterfly")
def _butterfly(x, twiddles, bias=None, out_features: int = 0):
    return frugal.Butterfly(*_present(x, twiddles, bias), out_features=out_features)


@translation("custom", "binary_gemm")
def _binary_gemm(x, w_packed, scale, bias=None, in_features: int = 0):
    return frugal.BinaryGemm(*_present(x, w_packed, scale, bias), in_features=in_features)


@translation("custom", "binary_conv")
def _binary_conv(x, w_packed, scale, bias=None, in_channels: int = 0, kernel_shape=(), strides=(1, 1),
                 pads=(0, 0, 0, 0), pad_value: int = 0):
    one_padding = {"pad_value": int(pad_value)} if pad_value else {}  # absent = 0: older files stay identical
    return frugal.BinaryConv(*_present(x, w_packed, scale, bias), in_channels=in_channels,
                             kernel_shape=list(kernel_shape), strides=list(strides), pads=list(pads), **one_padding)


# --- portable mode: standard ONNX ops only --------------------------------------------------------

def _ints(*values: int):
    return op.Constant(value_ints=[int(v) for v in values])


def _slice(x, start: int, end: int, axis: int):
    return op.Slice(x, _ints(start), _ints(end), _ints(axis))


@translation("portable", "butterfly")
def _butterfly_portable(x, twiddles, bias=None, out_features: int = 0):
    stages, half = int(twiddles.shape[0]), int(twiddles.shape[1])
    n, width = 2 * half, int(x.shape[1])
    y = op.Pad(x, _ints(0, 0, 0, n - width)) if n > width else x
    for s in range(stages):
        h = 1 << s
        groups = n // (2 * h)
        # t[s] as [group, out row r, in col c, h]: y_r = t[., r, 0] * x_0 + t[., r, 1] * x_1
        t = op.Transpose(op.Reshape(op.Gather(twiddles, _ints(s), axis=0), _ints(groups, h, 2, 2)),
                         perm=[0, 2, 3, 1])
        coef = [op.Reshape(_slice(t, c, c + 1, 2), _ints(groups, 2, h)) for c in (0, 1)]
        v = op.Reshape(y, _ints(-1, groups, 2, h))
        pair = [_slice(v, c, c + 1, 2) for c in (0, 1)]  # [batch, group, 1, h], broadcast over r
        y = op.Reshape(op.Add(op.Mul(coef[0], pair[0]), op.Mul(coef[1], pair[1])), _ints(-1, n))
    y = _slice(y, 0, out_features, 1) if out_features < n else y
    return op.Add(y, bias) if bias is not None else y


def _unpacked_signs(w_packed, length: int):
    """[rows, ceil(K/8)] uint8 -> [rows, K] float32 +1/-1 (bit set = -1, little-endian bits)."""
    rows, nbytes = int(w_packed.shape[0]), int(w_packed.shape[1])
    shifts = op.Constant(value=ir.tensor(np.arange(8, dtype=np.uint8)))
    one = op.Constant(value=ir.tensor(np.array(1, dtype=np.uint8)))
    bits = op.BitwiseAnd(op.BitShift(op.Unsqueeze(w_packed, _ints(2)), shifts, direction="RIGHT"), one)
    bits = op.Reshape(bits, _ints(rows, nbytes * 8))
    bits = op.Cast(_slice(bits, 0, length, 1) if length < nbytes * 8 else bits, to=1)
    return op.Sub(op.Constant(value_float=1.0), op.Mul(op.Constant(value_float=2.0), bits))


def _sign(x):
    return op.Where(op.GreaterOrEqual(x, op.Constant(value_float=0.0)),
                    op.Constant(value_float=1.0), op.Constant(value_float=-1.0))


def _scale_bias(counts, scale, bias, channel_shape: tuple[int, ...]):
    """counts * scale + bias in this order (docs/ops.md): the sums of signs are exact floats."""
    y = op.Mul(counts, op.Reshape(scale, _ints(*channel_shape)))
    return op.Add(y, op.Reshape(bias, _ints(*channel_shape))) if bias is not None else y


@translation("portable", "binary_gemm")
def _binary_gemm_portable(x, w_packed, scale, bias=None, in_features: int = 0):
    w = _unpacked_signs(w_packed, in_features)
    return _scale_bias(op.MatMul(_sign(x), op.Transpose(w, perm=[1, 0])), scale, bias, (1, -1))


@translation("portable", "binary_conv")
def _binary_conv_portable(x, w_packed, scale, bias=None, in_channels: int = 0, kernel_shape=(), strides=(1, 1),
                          pads=(0, 0, 0, 0), pad_value: int = 0):
    kh, kw = (int(v) for v in kernel_shape)
    pt, pl, pb, pr = (int(v) for v in pads)
    w = op.Reshape(_unpacked_signs(w_packed, in_channels * kh * kw), _ints(-1, in_channels, kh, kw))
    xs = _sign(x)
    if pad_value:  # padded taps read +1: pad sign(x) with ones, then an unpadded Conv
        xs = op.Pad(xs, _ints(0, 0, pt, pl, 0, 0, pb, pr), op.Constant(value_float=1.0))
        pt = pl = pb = pr = 0
    # otherwise Conv's own zero padding pads sign(x), so padded taps contribute 0, as the spec requires.
    counts = op.Conv(xs, w, kernel_shape=[kh, kw], strides=[int(v) for v in strides], pads=[pt, pl, pb, pr])
    return _scale_bias(counts, scale, bias, (1, -1, 1, 1))
