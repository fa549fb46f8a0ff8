"""Dense -> butterfly: the hierarchical butterfly factorization (rank-one approximations).

Zheng, Riccietti & Gribonval, *Efficient identification of butterfly sparse matrix
factorizations*, SIAM J. Math. Data Sci. 2023. A product of butterfly factors X_1 ... X_L (X_l has
support I_{2^(l-1)} (x) 1_{2x2} (x) I_{N/2^l}) is split into a left and a right partial product;
with those two supports every entry of the product is a *single* term, so the best two-factor
approximation decomposes into independent rank-one approximations of N submatrices (one batched
SVD). Splitting level by level along a balanced tree recovers exact butterflies exactly and costs
O(N^2) overall.

frugalrt's convention (docs/ops.md): dense = B_{L-1} ... B_0, stage s pairs (i, i + 2^s). Its
leftmost factor B_{L-1} has stride N/2 like X_1, so X_l = B_{L-l}: the paper's ordering matches
frugalrt's once stages are read right to left (checked by rebuilding the matrix).

A partial product with support I_A (x) 1_{b x b} (x) I_D is stored as ``[A, D, b, b]`` dense blocks
(block (a, d) holds rows/cols a*b*D + beta*D + d); a butterfly factor is the case b = 2, i.e.
``[2^(l-1), N/2^l, 2, 2]`` = frugalrt's ``twiddles[s]`` reshaped to ``[N/2, 2, 2]``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from frugalrt.nn import ops
from frugalrt.nn.butterfly import ButterflyLinear, next_power_of_two


def _split(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best factorization of ``[A, D, b, b]`` blocks into left ``[A, b2*D, b1, b1]`` and right
    ``[A*b1, D, b2, b2]`` partial products (b = b1 * b2, b1 = the larger half): one rank-one
    approximation per (a, d, middle index), by the leading singular triplet."""
    a, d, b, _ = blocks.shape
    b2 = 1 << ((b.bit_length() - 1) // 2)
    b1 = b // b2
    # entry (i1, i2), (k1, k2) of a block = left[(i1, i2), (k1, i2)] * right[(k1, i2), (k1, k2)]:
    # for fixed (k1, i2) the b1 x b2 matrix over (i1, k2) has rank one.
    t = blocks.reshape(a, d, b1, b2, b1, b2)  # a, d, i1, i2, k1, k2
    sub = t.transpose(0, 1, 4, 3, 2, 5)  # a, d, k1, i2 | i1, k2
    u, s, vh = np.linalg.svd(sub, full_matrices=False)
    root = np.sqrt(s[..., 0])
    col = u[..., :, 0] * root[..., None]  # a, d, k1, i2, i1
    row = vh[..., 0, :] * root[..., None]  # a, d, k1, i2, k2
    # left[a, (i2, d)][i1, k1] and right[(a, k1), d][i2, k2]
    left = col.transpose(0, 3, 1, 4, 2).reshape(a, b2 * d, b1, b1)
    right = row.transpose(0, 2, 1, 3, 4).reshape(a * b1, d, b2, b2)
    return left, right


def _factor(blocks: np.ndarray) -> list[np.ndarray]:
    """Butterfly factors (left to right, X_1 first) of a partial product, balanced tree."""
    if blocks.shape[2] == 2:
        return [blocks]
    left, right = _split(blocks)
    return _factor(left) + _factor(right)


def hierarchical_factorization(matrix: np.ndarray) -> np.ndarray:
    """Twiddles ``[L, N/2, 2, 2]`` (frugalrt layout) of the butterfly approximation of an N x N matrix."""
    n = matrix.shape[0]
    if matrix.shape != (n, n) or n < 2 or n & (n - 1):
        raise ValueError(f"hierarchical_factorization needs an N x N matrix with N a power of two >= 2, "
                         f"got shape {matrix.shape}")
    factors = _factor(matrix.reshape(1, 1, n, n))  # X_1 (stride N/2) ... X_L (stride 1)
    return np.stack([f.reshape(n // 2, 2, 2) for f in reversed(factors)])  # stage s = L - l


def bit_reversal(n: int) -> np.ndarray:
    """Bit-reversal permutation of ``range(n)`` (n a power of two): the DFT with columns permuted by it,
    ``dft[:, bit_reversal(n)]``, is a butterfly (Cooley-Tukey), so :func:`factorize` recovers it exactly."""
    bits = n.bit_length() - 1
    return np.array([int(format(i, f"0{bits}b")[::-1], 2) for i in range(n)])


def butterfly_to_dense(twiddles: np.ndarray) -> np.ndarray:
    """The N x N matrix B_{L-1} ... B_0 of any-dtype twiddles (float64, complex128), via the torch path."""
    tw = torch.from_numpy(np.ascontiguousarray(twiddles))
    n = 2 * tw.shape[1]
    eye = torch.eye(n, dtype=tw.dtype)
    return ops.butterfly_dense_path(eye, tw, None, n).T.numpy()


@dataclass
class FactorizationResult:
    """Butterfly approximation of a dense ``[out, in]`` matrix (zero-padded to ``N x N``).

    ``relative_error`` is ||W - B||_F / ||W||_F on the ``[out, in]`` block that the layer uses (the
    padding rows/columns are discarded at run time). A matrix that is not a butterfly gets a large
    error (a random Gaussian matrix: ~0.99); it is reported, never hidden.
    """

    twiddles: np.ndarray  # [log2 N, N/2, 2, 2], frugalrt's stage order
    in_features: int
    out_features: int
    relative_error: float
    seconds: float
    bias: Optional[np.ndarray] = None

    @property
    def n(self) -> int:
        return 2 * self.twiddles.shape[1]

    def to_dense(self) -> np.ndarray:
        """The ``[out, in]`` matrix the twiddles represent (float64 or complex128)."""
        return butterfly_to_dense(self.twiddles)[: self.out_features, : self.in_features]

    def to_linear(self, dtype: torch.dtype = torch.float32) -> ButterflyLinear:
        """A :class:`ButterflyLinear` holding these twiddles (and the bias, if any)."""
        if np.iscomplexobj(self.twiddles):
            if np.abs(self.twiddles.imag).max(initial=0.0) > 1e-12 * max(1.0, np.abs(self.twiddles).max()):
                raise ValueError("complex butterfly twiddles (e.g. a DFT) cannot become a real ButterflyLinear")
        layer = ButterflyLinear(self.in_features, self.out_features, bias=self.bias is not None).to(dtype)
        with torch.no_grad():
            layer.twiddles.copy_(torch.from_numpy(np.ascontiguousarray(self.twiddles.real)))
            if self.bias is not None:
                layer.bias.copy_(torch.from_numpy(np.asarray(self.bias)))
        return layer


def factorize(linear_or_matrix: Union[nn.Linear, torch.Tensor, np.ndarray]) -> FactorizationResult:
    """Hierarchical butterfly factorization of an ``nn.Linear`` (its ``[out, in]`` weight) or a matrix.

    Computed in float64 (complex128 for complex input, e.g. a DFT); a non-square or non-power-of-two
    matrix is zero-padded to ``N x N``, N = next power of two >= max(out, in), as ButterflyLinear does.
    """
    bias = None
    if isinstance(linear_or_matrix, nn.Linear):
        weight = linear_or_matrix.weight.detach().cpu().double().numpy()
        if linear_or_matrix.bias is not None:
            bias = linear_or_matrix.bias.detach().cpu().float().numpy().copy()
    elif isinstance(linear_or_matrix, torch.Tensor):
        weight = linear_or_matrix.detach().cpu().numpy()
    else:
        weight = np.asarray(linear_or_matrix)
    if weight.ndim != 2 or 0 in weight.shape:
        raise ValueError(f"factorize needs a 2-D [out, in] matrix, got shape {weight.shape}")
    weight = weight.astype(np.complex128 if np.iscomplexobj(weight) else np.float64)
    out_f, in_f = weight.shape
    n = next_power_of_two(max(out_f, in_f))
    padded = np.zeros((n, n), dtype=weight.dtype)
    padded[:out_f, :in_f] = weight
    start = time.perf_counter()
    twiddles = hierarchical_factorization(padded)
    seconds = time.perf_counter() - start
    result = FactorizationResult(twiddles, in_f, out_f, 0.0, seconds, bias)
    norm = np.linalg.norm(weight)
    result.relative_error = float(np.linalg.norm(weight - result.to_dense()) / norm) if norm else 0.0
    return result
