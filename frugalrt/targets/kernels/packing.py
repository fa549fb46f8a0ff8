"""Packed activations of the binary ops (docs/ops.md, "Packed activations"), shared by every kernel.

A node's :class:`Packing` says whether its X arrives as packed sign bytes and whether its Y leaves as
the sign bits of the float result; :func:`sign_thresholds` turns ``scale``, ``B`` and the fused
activation into the exact per-channel integer compare that yields those bits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from frugalrt.runtime.reference import activate


@dataclass(frozen=True)
class Packing:
    """A binary node's packed activations (docs/ops.md): X as packed sign bytes (``input``), Y as
    the packed sign bits (``output``) of the float result after the fused ``activation``."""
    input: bool = False
    output: bool = False
    activation: dict = field(default_factory=dict)  # the node's activation attributes (folded into Y's bits)

    @classmethod
    def of(cls, attrs: dict[str, Any]) -> "Packing":
        act = {k: attrs[k] for k in ("activation", "activation_min", "activation_max") if k in attrs}
        act = {k: v.decode() if isinstance(v, bytes) else v for k, v in act.items()}
        return cls(bool(attrs.get("input_packed", 0)), bool(attrs.get("output_packed", 0)), act)

    @property
    def any(self) -> bool:
        return self.input or self.output


UNPACKED = Packing()


def sign_thresholds(scale: np.ndarray, bias: np.ndarray | None, k: int,
                    activation: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per channel ``(sense, t)`` (int32) such that, for every integer S in [-k, k],
    ``sense * S < t`` exactly when the float32 result ``act(fl(fl(S * scale) + B))`` is < 0.

    That result is monotone in S (rounding, a positive or negative factor, the addition and the
    activations all are), nondecreasing in ``sense * S`` with ``sense = -1`` for a negative scale
    (the direction flip) and +1 otherwise (a zero scale gives a constant), so the negative S form
    a prefix in ``sense * S``; a vectorized binary search finds its end t in [-k, k + 1] by
    evaluating the very float32 expression of the spec.
    """
    scale = np.asarray(scale, np.float32)
    sense = np.where(scale < 0, -1, 1).astype(np.int32)

    def negative(s: np.ndarray) -> np.ndarray:  # s: sense * S per channel
        with np.errstate(over="ignore"):  # +-inf is the float32 result there, and its sign is right
            y = (sense * s).astype(np.float32) * scale
            y = y + np.asarray(bias, np.float32) if bias is not None else y
        return activate(y.astype(np.float32), **activation) < 0

    lo, hi = np.full(scale.shape, -k, np.int64), np.full(scale.shape, k + 1, np.int64)
    while np.any(lo < hi):  # invariant: negative below lo, not negative from hi on (up to k)
        mid = (lo + hi) // 2
        neg = negative(np.minimum(mid, k))
        open_ = lo < hi
        lo, hi = np.where(open_ & neg, mid + 1, lo), np.where(open_ & ~neg, mid, hi)
    return sense, lo.astype(np.int32)


NEVER = 1 << 30  # a count threshold above any count (a packed Y): the bits of pad channels stay 0


def count_thresholds(offset, sense: np.ndarray, t: np.ndarray, k: int) -> np.ndarray:
    """Packed Y as one signed compare of a popcount: ``thr`` (int32), bit = ``count > thr``. S is
    ``offset - 2 * popcount(x ^ w)`` (``offset``: K for a GEMM, the conv's per-pixel offsets), over ``k``
    real weight bits; ``count`` is that popcount, or for channels with ``sense < 0`` (negative scale) the
    popcount against their real weight bits flipped (``k - popcount``: the kernels store those weights inverted). Then
    ``sense * S < t`` (:func:`sign_thresholds`) exactly when ``count > thr``. ``sense`` and ``t`` broadcast
    against ``offset``."""
    offset = np.asarray(offset, np.int64)
    up = (offset - t) // 2  # S < t  <=>  2 popcount > offset - t
    down = k + (-offset - t) // 2  # -S < t  <=>  2 popcount < offset + t  <=>  k - popcount > k - (offset + t) / 2
    return np.where(sense < 0, down, up).astype(np.int32)
