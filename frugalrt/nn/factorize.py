"""Dense -> butterfly: sequential rank-one factorization with orthonormal left factors.

A product of butterfly factors X_1 ... X_L (X_l has support I_{2^(l-1)} (x) 1_{2x2} (x) I_{N/2^l})
splits into a left and a right part whose supports make every entry of the product a *single* term,
so the best two-part approximation is N independent rank-one approximations (one batched SVD; Zheng,
Riccietti & Gribonval, *Efficient identification of butterfly sparse matrix factorizations*, SIAM
J. Math. Data Sci. 2023).

``method="left-to-right"`` (default) peels one factor at a time: X_1 takes the unit-norm left
singular vectors and the rest, singular value times right vector, is factorized the same way. With
orthonormal left factors the errors of the steps add in squares and each is at most the best
butterfly error, so the result is within sqrt(L - 1) of the best L-factor butterfly (Le, Zheng,
Riccietti & Gribonval, *Butterfly factorization with error guarantees*, arXiv:2411.04506, 2024). On
a butterfly plus noise it is optimal to first order: error = noise * sqrt(1 - N (L + 1) / N^2), with
N (L + 1) the butterflies' degrees of freedom (measured 0.9946 x noise at N = 1024). ``method="balanced"``
is the older balanced tree (sqrt(s) on each side, no guarantee, 1.04 x noise at N = 1024), kept as the
benchmark's baseline.

Sizes that are not powers of two. The layer uses the ``[out, in]`` block of an N x N butterfly. The
butterflies are closed under scaling rows and columns (by 0 too: it folds into X_1 and X_L), so for
any butterfly B, D_rows B D_cols is a butterfly with the same error on the block and zeros elsewhere:
fitting the zero-padded matrix *is* fitting the block alone (the best errors are equal; the unused
entries are free but no better value exists for them). The algorithm keeps zero rows and columns
zero, so hard-impute refinement (refitting with the unused entries filled by the fit) is a fixed point.

The DFT is a butterfly only with its columns bit-reversed (``dft[:, bit_reversal(n)]``, recovered
exactly); the plain DFT is nearly orthogonal to them (relative error 0.98 at N = 256, 0.995 at N = 1024).

frugalrt's convention (docs/ops.md): dense = B_{L-1} ... B_0, stage s pairs (i, i + 2^s), so X_l =
B_{L-l}. A partial product with support I_A (x) 1_{b x b} (x) I_D is stored as ``[A, D, b, b]``
dense blocks (block (a, d) holds rows/cols a*b*D + beta*D + d); a factor is the case b = 2, i.e.
``[2^(l-1), N/2^l, 2, 2]`` = frugalrt's ``twiddles[s]`` reshaped to ``[N/2, 2, 2]``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal, Optional, Union

import numpy as np
import torch
from torch import nn

from frugalrt.nn import ops
from frugalrt.nn.butterfly import ButterflyLinear, next_power_of_two

Method = Literal["left-to-right", "balanced"]
METHODS: tuple[str, ...] = ("left-to-right", "balanced")


def _split(blocks: np.ndarray, b1: int, orthonormal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Best factorization of ``[A, D, b, b]`` blocks into left ``[A, b2*D, b1, b1]`` and right
    ``[A*b1, D, b2, b2]`` partial products (b = b1 * b2): one rank-one approximation per (a, d, middle
    index), by the leading singular triplet. ``orthonormal``: unit left vectors (the singular value
    goes right), else sqrt(s) on each side."""
    a, d, b, _ = blocks.shape
    b2 = b // b1
    # entry (i1, i2), (k1, k2) of a block = left[(i1, i2), (k1, i2)] * right[(k1, i2), (k1, k2)]:
    # for fixed (k1, i2) the b1 x b2 matrix over (i1, k2) has rank one.
    t = blocks.reshape(a, d, b1, b2, b1, b2)  # a, d, i1, i2, k1, k2
    sub = t.transpose(0, 1, 4, 3, 2, 5)  # a, d, k1, i2 | i1, k2
    u, s, vh = np.linalg.svd(sub, full_matrices=False)
    sv = s[..., 0]
    left_scale, right_scale = (np.ones_like(sv), sv) if orthonormal else (np.sqrt(sv), np.sqrt(sv))
    col = u[..., :, 0] * left_scale[..., None]  # a, d, k1, i2, i1
    row = vh[..., 0, :] * right_scale[..., None]  # a, d, k1, i2, k2
    # left[a, (i2, d)][i1, k1] and right[(a, k1), d][i2, k2]
    left = col.transpose(0, 3, 1, 4, 2).reshape(a, b2 * d, b1, b1)
    right = row.transpose(0, 2, 1, 3, 4).reshape(a * b1, d, b2, b2)
    return left, right


def _left_to_right(blocks: np.ndarray) -> list[np.ndarray]:
    """Butterfly factors (X_1 first) of a partial product, peeling one orthonormal factor at a time."""
    factors = []
    while blocks.shape[2] > 2:
        left, blocks = _split(blocks, 2, orthonormal=True)
        factors.append(left)
    return factors + [blocks]


def _balanced(blocks: np.ndarray) -> list[np.ndarray]:
    """Butterfly factors (X_1 first) of a partial product, balanced tree (larger half on the left)."""
    b = blocks.shape[2]
    if b == 2:
        return [blocks]
    left, right = _split(blocks, b >> ((b.bit_length() - 1) // 2), orthonormal=False)
    return _balanced(left) + _balanced(right)


def hierarchical_factorization(matrix: np.ndarray, method: Method = "left-to-right") -> np.ndarray:
    """Twiddles ``[L, N/2, 2, 2]`` (frugalrt layout) of the butterfly approximation of an N x N matrix,
    by ``method`` (module docstring: ``left-to-right`` has the error guarantee)."""
    n = matrix.shape[0]
    if matrix.shape != (n, n) or n < 2 or n & (n - 1):
        raise ValueError(f"hierarchical_factorization needs an N x N matrix with N a power of two >= 2, "
                         f"got shape {matrix.shape}")
    if method not in METHODS:
        raise ValueError(f"unknown factorization method {method!r}; use one of {', '.join(METHODS)}")
    blocks = np.asarray(matrix).reshape(1, 1, n, n)
    factors = _left_to_right(blocks) if method == "left-to-right" else _balanced(blocks)
    return np.stack([f.reshape(n // 2, 2, 2) for f in reversed(factors)])  # stage s = L - l


def bit_reversal(n: int) -> np.ndarray:
    """Bit-reversal permutation of ``range(n)`` (n a power of two): the DFT with columns permuted by it,
    ``dft[:, bit_reversal(n)]``, is a butterfly (Cooley-Tukey), so :func:`factorize` recovers it exactly."""
    bits = n.bit_length() - 1
    return np.array([int(format(i, f"0{bits}b")[::-1], 2) for i in range(n)])


def butterfly_to_dense(twiddles: np.ndarray, shape: Optional[tuple[int, int]] = None) -> np.ndarray:
    """The matrix B_{L-1} ... B_0 of any-dtype twiddles (float64, complex128), via the torch path: N x N,
    or only its top-left ``shape = (out, in)`` block (cheaper: in columns, not N)."""
    tw = torch.from_numpy(np.ascontiguousarray(twiddles))
    n = 2 * tw.shape[1]
    out_f, in_f = shape or (n, n)
    eye = torch.eye(in_f, dtype=tw.dtype)
    return ops.butterfly_dense_path(eye, tw, None, out_f).T.numpy()


@dataclass
class FactorizationResult:
    """Butterfly approximation of a dense ``[out, in]`` matrix: the ``[out, in]`` block of an N x N butterfly.

    ``relative_error`` is ||W - B||_F / ||W||_F on that block, the only part the layer uses. A matrix
    that is not a butterfly gets a large error (a random Gaussian matrix: ~0.99); it is reported,
    never hidden. ``error_lower_bound`` (left-to-right method only) is what the guarantee implies:
    no butterfly has a relative error below it.
    """

    twiddles: np.ndarray  # [log2 N, N/2, 2, 2], frugalrt's stage order
    in_features: int
    out_features: int
    relative_error: float
    seconds: float
    bias: Optional[np.ndarray] = None
    method: str = "left-to-right"

    @property
    def n(self) -> int:
        return 2 * self.twiddles.shape[1]

    @property
    def error_lower_bound(self) -> Optional[float]:
        """relative_error / sqrt(L - 1): the best butterfly's relative error is at least this (L = log2 N)."""
        if self.method != "left-to-right":
            return None
        return self.relative_error / math.sqrt(max(1, self.twiddles.shape[0] - 1))

    def to_dense(self) -> np.ndarray:
        """The ``[out, in]`` matrix the twiddles represent (float64 or complex128)."""
        return butterfly_to_dense(self.twiddles, (self.out_features, self.in_features))

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


def factorize(linear_or_matrix: Union[nn.Linear, torch.Tensor, np.ndarray],
              method: Method = "left-to-right") -> FactorizationResult:
    """Butterfly factorization of an ``nn.Linear`` (its ``[out, in]`` weight) or a matrix of any shape.

    Computed in float64 (complex128 for complex input, e.g. a DFT). The matrix becomes the top-left
    block of an N x N butterfly, N = next power of two >= max(out, in), as in ButterflyLinear; the
    rest is zero-padded, which loses nothing (module docstring).
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
    twiddles = hierarchical_factorization(padded, method)
    seconds = time.perf_counter() - start
    result = FactorizationResult(twiddles, in_f, out_f, 0.0, seconds, bias, method)
    norm = np.linalg.norm(weight)
    result.relative_error = float(np.linalg.norm(weight - result.to_dense()) / norm) if norm else 0.0
    return result
