"""Opaque ``frugalrt::*`` torch custom ops, one per ``ai.frugalrt`` ONNX op (docs/ops.md).

They are opaque so that ``torch.export``/the dynamo ONNX exporter keep each structured layer as
one node instead of tracing into it; the exporter's translation table maps them to ONNX.
The eager implementations are plain torch and mirror ``frugalrt.runtime.reference`` exactly.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def butterfly_dense_path(x: Tensor, twiddles: Tensor, bias: Optional[Tensor], out_features: int) -> Tensor:
    """Differentiable torch butterfly: pad, log2 N stages of 2x2 mixes (stride 2^s), truncate."""
    stages, half = twiddles.shape[0], twiddles.shape[1]
    n = 2 * half
    batch = x.shape[0]
    y = F.pad(x, (0, n - x.shape[1]))
    for s in range(stages):
        h = 1 << s
        v = y.reshape(batch, n // (2 * h), 2, h)
        t = twiddles[s].reshape(n // (2 * h), h, 2, 2)
        x0, x1 = v[:, :, 0, :], v[:, :, 1, :]
        y0 = t[:, :, 0, 0] * x0 + t[:, :, 0, 1] * x1
        y1 = t[:, :, 1, 0] * x0 + t[:, :, 1, 1] * x1
        y = torch.stack([y0, y1], dim=2).reshape(batch, n)
    y = y[:, :out_features]
    return y + bias if bias is not None else y


@torch.library.custom_op("frugalrt::butterfly", mutates_args=())
def butterfly(x: Tensor, twiddles: Tensor, bias: Optional[Tensor], out_features: int) -> Tensor:
    return butterfly_dense_path(x, twiddles, bias, out_features).contiguous()


@butterfly.register_fake
def _(x, twiddles, bias, out_features):
    return x.new_empty((x.shape[0], out_features))


def _butterfly_setup(ctx, inputs, output):
    x, twiddles, bias, out_features = inputs
    ctx.save_for_backward(x, twiddles, bias)
    ctx.out_features = out_features


def _butterfly_backward(ctx, grad):
    x, twiddles, bias = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.requires_grad) if t is not None else None
                  for t in (x, twiddles, bias)]
        y = butterfly_dense_path(leaves[0], leaves[1], leaves[2], ctx.out_features)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, grad) if wanted else ())
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in leaves) + (None,)


butterfly.register_autograd(_butterfly_backward, setup_context=_butterfly_setup)


def unpack_signs(packed: Tensor, length: int) -> Tensor:
    """float32 +1/-1 signs from uint8 bits (1 = negative, little-endian bit order), first ``length``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    bits = bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :length]
    return 1.0 - 2.0 * bits.to(torch.float32)


def pack_bits(values: Tensor) -> Tensor:
    """uint8 sign bits of the last axis (1 = negative), little-endian bit order, zero pad bits."""
    neg = (values < 0).to(torch.uint8)
    pad = (-neg.shape[-1]) % 8
    neg = F.pad(neg, (0, pad)).reshape(*neg.shape[:-1], -1, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=values.device)
    return (neg << shifts).sum(dim=-1, dtype=torch.uint8) if neg.numel() else neg.sum(-1).to(torch.uint8)


def sign(x: Tensor) -> Tensor:
    """sign with sign(0) = +1 (the binarization of every frugalrt op)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def _binary_out(counts: Tensor, scale: Tensor, bias: Optional[Tensor], channel_dim: int) -> Tensor:
    shape = [1] * counts.dim()
    shape[channel_dim] = -1
    y = counts * scale.reshape(shape)
    return y + bias.reshape(shape) if bias is not None else y


@torch.library.custom_op("frugalrt::binary_gemm", mutates_args=())
def binary_gemm(x: Tensor, w_packed: Tensor, scale: Tensor, bias: Optional[Tensor], in_features: int) -> Tensor:
    w = unpack_signs(w_packed, in_features)
    return _binary_out(F.linear(sign(x), w), scale, bias, 1).contiguous()


@binary_gemm.register_fake
def _(x, w_packed, scale, bias, in_features):
    return x.new_empty((x.shape[0], w_packed.shape[0]))


@torch.library.custom_op("frugalrt::binary_conv", mutates_args=())
def binary_conv(x: Tensor, w_packed: Tensor, scale: Tensor, bias: Optional[Tensor], in_channels: int,
                kernel_shape: list[int], strides: list[int], pads: list[int], pad_value: int = 0) -> Tensor:
    if pad_value not in (0, 1):
        raise ValueError(f"binary_conv: pad_value must be 0 or 1, got {pad_value}")
    kh, kw = kernel_shape
    w = unpack_signs(w_packed, in_channels * kh * kw).reshape(-1, in_channels, kh, kw)
    # pad AFTER sign: a zero tap contributes 0, a one tap (pad_value = 1) reads +1
    xs = F.pad(sign(x), (pads[1], pads[3], pads[0], pads[2]), value=float(pad_value))
    return _binary_out(F.conv2d(xs, w, stride=tuple(strides)), scale, bias, 1).contiguous()


@binary_conv.register_fake
def _(x, w_packed, scale, bias, in_channels, kernel_shape, strides, pads, pad_value=0):
    oh = (x.shape[2] + pads[0] + pads[2] - kernel_shape[0]) // strides[0] + 1
    ow = (x.shape[3] + pads[1] + pads[3] - kernel_shape[1]) // strides[1] + 1
    return x.new_empty((x.shape[0], w_packed.shape[0], oh, ow))
