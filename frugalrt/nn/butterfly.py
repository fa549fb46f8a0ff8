"""ButterflyLinear: a product of log2 N sparse 2x2-block factors, O(N log N) parameters and FLOPs."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from frugalrt.nn import ops


def next_power_of_two(n: int) -> int:
    return 1 << max(1, (int(n) - 1).bit_length())


class ButterflyLinear(nn.Module):
    """Drop-in for ``nn.Linear`` whose weight is a butterfly (Dao et al., ICML 2019).

    N = next power of two >= max(in, out); the input is zero-padded to N, mixed by log2 N stages
    (stage s pairs (i, i + 2^s) with its own 2x2 block, ``twiddles[s, p]``), truncated to ``out``.
    Exported as one ``ai.frugalrt::Butterfly`` node (docs/ops.md).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.n = next_power_of_two(max(self.in_features, self.out_features))
        self.stages = self.n.bit_length() - 1
        self.twiddles = nn.Parameter(torch.empty(self.stages, self.n // 2, 2, 2))
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default init gives Var(y) = Var(x) / 3. Each stage multiplies the variance by
        # 2 sigma^2 and zero padding by in/N, so pick sigma^2 = (N / (3 in))^(1/L) / 2.
        var = 0.5 * (self.n / (3.0 * self.in_features)) ** (1.0 / self.stages)
        nn.init.normal_(self.twiddles, 0.0, math.sqrt(var))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"ButterflyLinear expects [..., {self.in_features}] inputs, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        y = ops.butterfly(x.reshape(-1, self.in_features), self.twiddles, self.bias, self.out_features)
        return y.reshape(*lead, self.out_features)

    @torch.no_grad()
    def to_dense(self) -> Tensor:
        """The equivalent ``[out, in]`` matrix W (so that forward(x) = x W^T + bias)."""
        eye = torch.eye(self.in_features, dtype=self.twiddles.dtype, device=self.twiddles.device)
        return ops.butterfly_dense_path(eye, self.twiddles, None, self.out_features).T.contiguous()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, N={self.n}, bias={self.bias is not None}"
