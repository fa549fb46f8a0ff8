"""Numpy reference kernels: the single source of truth for every ``ai.frugalrt`` op.

Each kernel implements one op exactly as ``docs/ops.md`` specifies it. The ONNX schema
(`frugalrt.export.schemas`), the ONNX Runtime custom ops, the TVM lowerings and the C
kernels are all checked against these functions.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

DOMAIN = "ai.frugalrt"
OpKey = tuple[str, str, int]  # (domain, op_type, since_version)

REFERENCE_KERNELS: dict[OpKey, Callable[..., np.ndarray]] = {}


def reference(op_type: str, version: int = 1, domain: str = DOMAIN):
    """Register ``fn`` as the reference kernel of ``domain::op_type`` version ``version``."""

    def wrap(fn):
        key = (domain, op_type, version)
        if key in REFERENCE_KERNELS:
            raise ValueError(f"reference kernel for {key} registered twice")
        REFERENCE_KERNELS[key] = fn
        return fn

    return wrap


def get_reference(op_type: str, version: int = 1, domain: str = DOMAIN) -> Callable[..., np.ndarray]:
    try:
        return REFERENCE_KERNELS[(domain, op_type, version)]
    except KeyError:
        raise KeyError(f"no reference kernel for op {domain}::{op_type} version {version}; "
                       f"known: {sorted(REFERENCE_KERNELS)}") from None


# ---------------------------------------------------------------------------------------------
# Bit layout shared by every backend: bit set = negative (sign -1); along the packed axis,
# element k lives in byte k // 8 at bit k % 8 (little-endian bit order); pad bits are 0.
# ---------------------------------------------------------------------------------------------

def sign(x: np.ndarray) -> np.ndarray:
    """sign with sign(0) = +1, as float32 (the binarization used by every frugalrt op)."""
    return np.where(np.asarray(x) >= 0, np.float32(1), np.float32(-1))


def pack_bits(signs_or_values: np.ndarray) -> np.ndarray:
    """Pack the last axis of a real array into uint8 bits (1 = negative), little-endian bit order."""
    neg = np.asarray(signs_or_values) < 0
    return np.packbits(neg, axis=-1, bitorder="little")


def unpack_signs(packed: np.ndarray, length: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: float32 signs (+1/-1) of the first ``length`` elements."""
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1, count=length, bitorder="little")
    return (1 - 2 * bits.astype(np.int32)).astype(np.float32)


def popcount(words: np.ndarray) -> np.ndarray:
    return np.bitwise_count(words)


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------

ACTIVATIONS = ("", "relu", "clip")  # the fused activations (attribute ``activation``; "" = none)
ACTIVATION_DEFAULTS = {"activation": "", "activation_min": -np.inf, "activation_max": np.inf}  # when absent


def activate(y: np.ndarray, activation: str = "", activation_min: float = -np.inf,
             activation_max: float = np.inf) -> np.ndarray:
    """The fused activation of every op's output (docs/ops.md): ONNX Relu, or ONNX Clip with bounds."""
    if activation == "relu":
        return np.maximum(y, np.float32(0))
    if activation == "clip":
        return np.minimum(np.maximum(y, np.float32(activation_min)), np.float32(activation_max))
    if activation:
        raise ValueError(f"unknown activation {activation!r}; known: {', '.join(a for a in ACTIVATIONS if a)}")
    return y


def butterfly_stages(n: int) -> int:
    if n < 2 or n & (n - 1):
        raise ValueError(f"butterfly size N must be a power of two >= 2, got {n}")
    return n.bit_length() - 1


@reference("Butterfly")
def butterfly(x: np.ndarray, twiddles: np.ndarray, bias: Optional[np.ndarray] = None, *,
              out_features: int, **activation) -> np.ndarray:
    """Y = truncate(B_{L-1} ... B_0 pad(X)) + bias, stage s mixing pairs (i, i + 2^s).

    X: [batch, in_features]; twiddles: [L, N/2, 2, 2] with N = 2^L >= in_features, out_features.
    Pair p of stage s (stride h = 2^s) is (i, i + h) with i = (p // h) * 2h + p % h, and
    y[i] = t[s,p,0,0] x[i] + t[s,p,0,1] x[i+h];  y[i+h] = t[s,p,1,0] x[i] + t[s,p,1,1] x[i+h].
    """
    x = np.asarray(x, dtype=np.float32)
    twiddles = np.asarray(twiddles, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"Butterfly: X must be [batch, in_features], got shape {x.shape}")
    stages, half = twiddles.shape[0], twiddles.shape[1]
    n = 2 * half
    if twiddles.shape != (stages, half, 2, 2) or butterfly_stages(n) != stages:
        raise ValueError(f"Butterfly: twiddles must be [log2 N, N/2, 2, 2], got {twiddles.shape}")
    if x.shape[1] > n or out_features > n:
        raise ValueError(f"Butterfly: in={x.shape[1]}, out={out_features} exceed N={n}")
    batch = x.shape[0]
    y = np.zeros((batch, n), dtype=np.float32)
    y[:, : x.shape[1]] = x
    for s in range(stages):
        h = 1 << s
        v = y.reshape(batch, n // (2 * h), 2, h)
        t = twiddles[s].reshape(n // (2 * h), h, 2, 2)
        x0, x1 = v[:, :, 0, :], v[:, :, 1, :]
        y0 = t[None, :, :, 0, 0] * x0 + t[None, :, :, 0, 1] * x1
        y1 = t[None, :, :, 1, 0] * x0 + t[None, :, :, 1, 1] * x1
        y = np.stack([y0, y1], axis=2).reshape(batch, n)
    y = y[:, :out_features]
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float32)
    return np.ascontiguousarray(activate(y.astype(np.float32), **activation), dtype=np.float32)


def _binary_output(counts: np.ndarray, scale: np.ndarray, bias: Optional[np.ndarray], activation: dict) -> np.ndarray:
    """Fused output transform shared by the binary ops: integer sum * scale (+ bias), in float32,
    then the fused activation."""
    y = counts.astype(np.float32) * np.asarray(scale, dtype=np.float32)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float32)
    return activate(y.astype(np.float32), **activation)


@reference("BinaryGemm")
def binary_gemm(x: np.ndarray, w_packed: np.ndarray, scale: np.ndarray,
                bias: Optional[np.ndarray] = None, *, in_features: int, input_packed: int = 0,
                output_packed: int = 0, **activation) -> np.ndarray:
    """Y[b, n] = scale[n] * sum_k sign(X[b, k]) sign(W[n, k]) + bias[n]  (XNOR-popcount GEMM).

    X: [batch, K] float32, or (``input_packed``) its signs packed, [batch, ceil(K/8)] uint8;
    w_packed: [N, ceil(K/8)] uint8 (bit layout above); scale, bias: [N]. Y: [batch, N] float32, or
    (``output_packed``) [batch, ceil(N/8)] uint8 sign bits of that float result.
    Equivalently sum_k ... = K - 2 * popcount(xbits XOR wbits) over the K real bits.
    """
    k = int(in_features)
    width = (k + 7) // 8 if input_packed else k
    if np.ndim(x) != 2 or np.shape(x)[1] != width:
        raise ValueError(f"BinaryGemm: X must be [batch, {width}], got shape {np.shape(x)}")
    if w_packed.ndim != 2 or w_packed.shape[1] != (k + 7) // 8:
        raise ValueError(f"BinaryGemm: packed weights must be [N, {(k + 7) // 8}], got {w_packed.shape}")
    xs = unpack_signs(x, k) if input_packed else sign(np.asarray(x, dtype=np.float32))
    ws = unpack_signs(w_packed, k).astype(np.int32)
    y = _binary_output(xs.astype(np.int32) @ ws.T, scale, bias, activation)
    return pack_bits(y) if output_packed else y


def conv_output_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int) -> int:
    return (size + pad_begin + pad_end - kernel) // stride + 1


@reference("BinaryConv")
def binary_conv(x: np.ndarray, w_packed: np.ndarray, scale: np.ndarray,
                bias: Optional[np.ndarray] = None, *, in_channels: int, kernel_shape: Sequence[int],
                strides: Sequence[int] = (1, 1), pads: Sequence[int] = (0, 0, 0, 0), input_packed: int = 0,
                output_packed: int = 0, pad_value: int = 0, **activation) -> np.ndarray:
    """2-D binary convolution (NCHW): sign(X) padded, correlated with sign(W), times scale.

    w_packed: [O, ceil(C*kh*kw/8)] uint8 packing W[o] flattened in (c, i, j) order.
    pads: [top, left, bottom, right]. ``pad_value`` 0: a padded position contributes 0 (it is
    neither +1 nor -1), exactly like ``conv2d(sign(x), sign(w), padding)`` in PyTorch; 1: it reads
    +1 (Larq Compute Engine's one-padding), ``conv2d(F.pad(sign(x), value=1), sign(w))``.
    ``input_packed``: X is [batch, H, W, ceil(C/8)] uint8, each pixel's channel signs packed;
    ``output_packed``: Y is [batch, OH, OW, ceil(O/8)] uint8, the sign bits of the float result.
    """
    kh, kw = (int(v) for v in kernel_shape)
    sh, sw = (int(v) for v in strides)
    pt, pl, pb, pr = (int(v) for v in pads)
    c = int(in_channels)
    if pad_value not in (0, 1):
        raise ValueError(f"BinaryConv: pad_value must be 0 or 1, got {pad_value!r}")
    if input_packed:
        if np.ndim(x) != 4 or np.shape(x)[3] != (c + 7) // 8:
            raise ValueError(f"BinaryConv: packed X must be [batch, H, W, {(c + 7) // 8}], got shape {np.shape(x)}")
        signs = unpack_signs(x, c).transpose(0, 3, 1, 2)
    else:
        if np.ndim(x) != 4 or np.shape(x)[1] != c:
            raise ValueError(f"BinaryConv: X must be [batch, {c}, H, W], got shape {np.shape(x)}")
        signs = sign(np.asarray(x, dtype=np.float32))
    kdim = c * kh * kw
    if w_packed.ndim != 2 or w_packed.shape[1] != (kdim + 7) // 8:
        raise ValueError(f"BinaryConv: packed weights must be [O, {(kdim + 7) // 8}], got {w_packed.shape}")
    b, _, h, w = signs.shape
    oh, ow = conv_output_size(h, kh, sh, pt, pb), conv_output_size(w, kw, sw, pl, pr)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"BinaryConv: empty output {oh}x{ow} for input {h}x{w}, kernel {kh}x{kw}")
    xs = np.full((b, c, h + pt + pb, w + pl + pr), int(pad_value), dtype=np.int32)
    xs[:, :, pt:pt + h, pl:pl + w] = signs
    cols = np.empty((b, oh, ow, c, kh, kw), dtype=np.int32)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, :, i, j] = xs[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw].transpose(0, 2, 3, 1)
    ws = unpack_signs(w_packed, kdim).astype(np.int32)  # [O, kdim]
    counts = cols.reshape(b, oh, ow, kdim) @ ws.T  # [b, oh, ow, O]
    y = _binary_output(counts, scale, bias, activation)  # channels last: the packed layout
    return pack_bits(y) if output_packed else np.ascontiguousarray(y.transpose(0, 3, 1, 2))
