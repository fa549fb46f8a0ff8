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

def butterfly_stages(n: int) -> int:
    if n < 2 or n & (n - 1):
        raise ValueError(f"butterfly size N must be a power of two >= 2, got {n}")
    return n.bit_length() - 1


@reference("Butterfly")
def butterfly(x: np.ndarray, twiddles: np.ndarray, bias: Optional[np.ndarray] = None, *,
              out_features: int) -> np.ndarray:
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
    return np.ascontiguousarray(y, dtype=np.float32)


def _binary_output(counts: np.ndarray, scale: np.ndarray, bias: Optional[np.ndarray]) -> np.ndarray:
    """Fused output transform shared by the binary ops: integer sum * scale (+ bias), in float32."""
    y = counts.astype(np.float32) * np.asarray(scale, dtype=np.float32)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float32)
    return y.astype(np.float32)


@reference("BinaryGemm")
def binary_gemm(x: np.ndarray, w_packed: np.ndarray, scale: np.ndarray,
                bias: Optional[np.ndarray] = None, *, in_features: int) -> np.ndarray:
    """Y[b, n] = scale[n] * sum_k sign(X[b, k]) sign(W[n, k]) + bias[n]  (XNOR-popcount GEMM).

    X: [batch, K] float32; w_packed: [N, ceil(K/8)] uint8 (bit layout above); scale, bias: [N].
    Equivalently sum_k ... = K - 2 * popcount(xbits XOR wbits) over the K real bits.
    """
    x = np.asarray(x, dtype=np.float32)
    k = int(in_features)
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"BinaryGemm: X must be [batch, {k}], got shape {x.shape}")
    if w_packed.ndim != 2 or w_packed.shape[1] != (k + 7) // 8:
        raise ValueError(f"BinaryGemm: packed weights must be [N, {(k + 7) // 8}], got {w_packed.shape}")
    xs = sign(x).astype(np.int32)
    ws = unpack_signs(w_packed, k).astype(np.int32)
    return _binary_output(xs @ ws.T, scale, bias)


def conv_output_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int) -> int:
    return (size + pad_begin + pad_end - kernel) // stride + 1


@reference("BinaryConv")
def binary_conv(x: np.ndarray, w_packed: np.ndarray, scale: np.ndarray,
                bias: Optional[np.ndarray] = None, *, in_channels: int, kernel_shape: Sequence[int],
                strides: Sequence[int] = (1, 1), pads: Sequence[int] = (0, 0, 0, 0)) -> np.ndarray:
    """2-D binary convolution (NCHW): sign(X) zero-padded, correlated with sign(W), times scale.

    w_packed: [O, ceil(C*kh*kw/8)] uint8 packing W[o] flattened in (c, i, j) order.
    pads: [top, left, bottom, right]. A padded position contributes 0 (it is neither +1 nor -1),
    exactly like ``conv2d(sign(x), sign(w), padding)`` in PyTorch.
    """
    x = np.asarray(x, dtype=np.float32)
    kh, kw = (int(v) for v in kernel_shape)
    sh, sw = (int(v) for v in strides)
    pt, pl, pb, pr = (int(v) for v in pads)
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"BinaryConv: X must be [batch, {in_channels}, H, W], got shape {x.shape}")
    kdim = in_channels * kh * kw
    if w_packed.ndim != 2 or w_packed.shape[1] != (kdim + 7) // 8:
        raise ValueError(f"BinaryConv: packed weights must be [O, {(kdim + 7) // 8}], got {w_packed.shape}")
    b, c, h, w = x.shape
    oh, ow = conv_output_size(h, kh, sh, pt, pb), conv_output_size(w, kw, sw, pl, pr)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"BinaryConv: empty output {oh}x{ow} for input {h}x{w}, kernel {kh}x{kw}")
    xs = np.zeros((b, c, h + pt + pb, w + pl + pr), dtype=np.int32)
    xs[:, :, pt:pt + h, pl:pl + w] = sign(x)
    cols = np.empty((b, oh, ow, c, kh, kw), dtype=np.int32)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, :, i, j] = xs[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw].transpose(0, 2, 3, 1)
    ws = unpack_signs(w_packed, kdim).astype(np.int32)  # [O, kdim]
    counts = cols.reshape(b, oh, ow, kdim) @ ws.T  # [b, oh, ow, O]
    y = _binary_output(counts, scale, bias)
    return np.ascontiguousarray(y.transpose(0, 3, 1, 2))
