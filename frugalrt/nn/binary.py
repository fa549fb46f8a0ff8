"""Binarized layers: sign weights with a per-output-channel scale, sign activations (XNOR-Net).

Training uses float weights and the straight-through estimator; :meth:`freeze` swaps the float
weights for bit-packed signs and routes forward through the opaque ``frugalrt::binary_*`` ops,
which export as ``ai.frugalrt::BinaryGemm`` / ``BinaryConv`` (docs/ops.md). Frozen and training
forward passes are bit-identical: both compute integer sums of signs, then scale, then bias.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from frugalrt.nn import ops


class SignSTE(torch.autograd.Function):
    """Forward ``sign(x)`` (sign(0) = +1); backward the clipped straight-through estimator
    ``grad * 1{|x| <= 1}`` (Hubara et al. 2016; larq's ``ste_sign``)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return ops.sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def sign_ste(x: Tensor) -> Tensor:
    return SignSTE.apply(x)


class _Binary(nn.Module):
    """Shared parameters and freezing of the binary layers; ``weight`` is [out, ...]."""

    frozen: bool = False

    def _init_params(self, weight_shape: Sequence[int], fan_in: int, bias: bool) -> None:
        self.weight = nn.Parameter(torch.empty(*weight_shape))
        self.bias = nn.Parameter(torch.empty(weight_shape[0])) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def weight_scale(self) -> Tensor:
        """Per-output-channel scale alpha = mean |W| (XNOR-Net, Rastegari et al. 2016)."""
        return self.weight.abs().flatten(1).mean(dim=1)

    @torch.no_grad()
    def freeze(self) -> None:
        """Replace the float weights by packed sign bits and a float scale (inference only)."""
        if self.frozen:
            return
        packed, scale = ops.pack_bits(self.weight.flatten(1)), self.weight_scale()
        del self.weight
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_scale_", scale.detach().clone())
        self.frozen = True

    def binary_weight_bytes(self) -> int:
        """Bytes of the packed weights plus their float32 scales, as stored on export."""
        out = self.weight_packed.shape[0] if self.frozen else self.weight.shape[0]
        k = self.weight_packed.shape[1] * 8 if self.frozen else self.weight[0].numel()
        return out * math.ceil(k / 8) + 4 * out


class BinaryLinear(_Binary):
    """``y = alpha * (sign(x) . sign(W)^T) + b``; exact oracle: ``nn.Linear`` on signs times alpha."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_params((self.out_features, self.in_features), self.in_features, bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"BinaryLinear expects [..., {self.in_features}] inputs, got {tuple(x.shape)}")
        lead, x2 = x.shape[:-1], x.reshape(-1, self.in_features)
        if self.frozen:
            y = ops.binary_gemm(x2, self.weight_packed, self.weight_scale_, self.bias, self.in_features)
        else:
            y = F.linear(sign_ste(x2), sign_ste(self.weight)) * self.weight_scale()
            y = y + self.bias if self.bias is not None else y
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, frozen={self.frozen}"


def _pair(v: Union[int, Sequence[int]]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class BinaryConv2d(_Binary):
    """Binary 2-D convolution (NCHW, no groups/dilation).

    Padding semantics: the input is binarized first, then padded. With ``pad_value=0`` a padded
    position contributes 0 to the sum (it is neither +1 nor -1) — exactly ``conv2d(sign(x),
    sign(W))`` with zero padding. With ``pad_value=1`` it reads +1 (Larq Compute Engine's default:
    every tap is a sign, so kernels need no border mask) — ``conv2d(F.pad(sign(x), value=1),
    sign(W))``. Every backend (reference, ONNX Runtime, TVM, C) implements the same rule.
    """

    pad_value: int = 0  # (also for layers pickled before the attribute existed)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, Sequence[int]],
                 stride: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int]] = 0, bias: bool = True,
                 pad_value: int = 0):
        super().__init__()
        if pad_value not in (0, 1):
            raise ValueError(f"BinaryConv2d: pad_value must be 0 or 1, got {pad_value!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)
        self.pad_value = int(pad_value)
        kh, kw = self.kernel_size
        self._init_params((self.out_channels, self.in_channels, kh, kw), self.in_channels * kh * kw, bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"BinaryConv2d expects [batch, {self.in_channels}, H, W] inputs, got {tuple(x.shape)}")
        ph, pw = self.padding
        if self.frozen:
            return ops.binary_conv(x, self.weight_packed, self.weight_scale_, self.bias, self.in_channels,
                                   list(self.kernel_size), list(self.stride), [ph, pw, ph, pw], self.pad_value)
        if self.pad_value:  # pad the signs with +1 (a constant border: no gradient flows to it)
            y = F.conv2d(F.pad(sign_ste(x), (pw, pw, ph, ph), value=1.0), sign_ste(self.weight), stride=self.stride)
        else:
            y = F.conv2d(sign_ste(x), sign_ste(self.weight), stride=self.stride, padding=self.padding)
        y = y * self.weight_scale().reshape(1, -1, 1, 1)
        return y + self.bias.reshape(1, -1, 1, 1) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, pad_value={self.pad_value}, frozen={self.frozen}")


def freeze(model: nn.Module) -> nn.Module:
    """Freeze every binary layer of ``model`` in place (for export); returns ``model``."""
    for m in model.modules():
        if isinstance(m, _Binary):
            m.freeze()
    return model
