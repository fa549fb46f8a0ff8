"""TVM lowering of ``ai.frugalrt::Butterfly`` v1 (docs/ops.md; Dao et al., ICML 2019).

The [L, N/2, 2, 2] twiddles are repacked at compile time into two [L, N] coefficient rows, so
each stage is one element-wise pass: ``y[i] = self[s, i] * x[i] + other[s, i] * x[i ^ 2^s]``
(position i's own weight and its partner's weight). That is the reference's arithmetic term for
term (a + b == b + a in IEEE), up to LLVM contracting a multiply-add into an FMA.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from tvm import relax, te, tirx

from frugalrt.errors import UnsupportedOpError
from frugalrt.targets.kernels import pick_kernel, register_lowering
from frugalrt.targets.kernels.cpu_butterfly import emit_butterfly_cpu
from frugalrt.targets.kernels.gpu_butterfly import emit_butterfly_gpu
from frugalrt.targets.kernels.schedules import emit_kernel
from frugalrt.targets.tvm_bridge import check_spec


def stage_coefficients(twiddles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([L, N] weight of x[i], [L, N] weight of x[i ^ 2^s]) for every stage s and position i."""
    stages, half = twiddles.shape[:2]
    n = 2 * half
    pos = np.arange(n)
    own = np.empty((stages, n), np.float32)
    other = np.empty((stages, n), np.float32)
    for s in range(stages):
        h = 1 << s
        pair = (pos // (2 * h)) * h + pos % h
        upper = (pos & h) == 0
        t = twiddles[s, pair]
        own[s] = np.where(upper, t[:, 0, 0], t[:, 1, 1])
        other[s] = np.where(upper, t[:, 0, 1], t[:, 1, 0])
    return own, other


def butterfly_te(x: te.Tensor, own: te.Tensor, other: te.Tensor, bias: te.Tensor | None,
                 out_features: int) -> te.Tensor:
    """Generic TE kernel: zero-pad, log2 N element-wise stages, truncate, add bias."""
    batch, width = x.shape
    stages, n = (int(d) for d in own.shape)
    y = te.compute((batch, n), lambda b, i: tirx.if_then_else(i < width, x[b, i], tirx.const(0, "float32")),
                   name="pad")
    for s in range(stages):
        y = _stage(y, own, other, s)
    if bias is None:
        return te.compute((batch, out_features), lambda b, o: y[b, o], name="truncate")
    return te.compute((batch, out_features), lambda b, o: y[b, o] + bias[o], name="bias")


def _stage(y: te.Tensor, own: te.Tensor, other: te.Tensor, s: int) -> te.Tensor:
    h = 1 << s  # closure factory: te.compute's fcompute may not take default arguments
    return te.compute(y.shape, lambda b, i: own[s, i] * y[b, i] + other[s, i] * y[b, tirx.bitwise_xor(i, h)],
                      name=f"stage{s}")


def emit_generic(bb: relax.BlockBuilder, x: relax.Expr, own: np.ndarray, other: np.ndarray,
                 bias: np.ndarray | None, out_features: int, target) -> relax.Expr:
    args = [x, relax.const(own), relax.const(other)] + ([relax.const(bias)] if bias is not None else [])

    def kernel(x, own, other, *bias):
        return butterfly_te(x, own, other, bias[0] if bias else None, out_features)

    return emit_kernel(bb, kernel, args, "frugalrt_butterfly", target)


@register_lowering("Butterfly", 1)
class ButterflyLowering:
    """Y = truncate(B_{L-1} ... B_0 pad(X)) + B; twiddles (and B) must be initializers."""

    # target family -> kernel: emit(bb, x, own, other, bias, out_features, target) -> relax.Expr.
    # PERF: put fast CPU kernels (kernels/cpu_*.py) here under "x86" / "aarch64" / "arm" / "cpu".
    KERNELS = {"generic": emit_generic, "x86": emit_butterfly_cpu, "aarch64": emit_butterfly_cpu,
               "cuda": emit_butterfly_gpu}

    def emit(self, bb, inputs: list, consts: dict[str, np.ndarray], attrs: dict[str, Any], target):
        if "twiddles" not in consts or (len(inputs) > 2 and inputs[2] is not None and "B" not in consts):
            raise UnsupportedOpError("ai.frugalrt::Butterfly v1: twiddles and B must be constant "
                                     "initializers (re-export the model with its parameters)")
        twiddles = consts["twiddles"].astype(np.float32)
        width, out = inputs[0].ty.shape.values[-1], int(attrs["out_features"])
        n = 2 * twiddles.shape[1] if twiddles.ndim == 4 else None
        if n is not None and (out > n or (isinstance(width, tirx.IntImm) and width.value > n)):
            raise UnsupportedOpError(f"ai.frugalrt::Butterfly v1: in_features={width}, out_features={out} "
                                     f"exceed N={n} of twiddles {list(twiddles.shape)}")
        # the whole of docs/ops.md (the importer checked the model already): N = 2^L, B, X, finite
        check_spec("Butterfly", inputs, consts, attrs)
        own, other = stage_coefficients(twiddles)
        bias = consts.get("B")
        kernel = pick_kernel(self.KERNELS, target)
        return kernel(bb, inputs[0], own, other, None if bias is None else bias.astype(np.float32),
                      int(attrs["out_features"]), target)
