"""Row-wise and element-wise float32 kernels for CPUs: softmax, LayerNorm, GELU / erf / tanh-GELU.

TVM 0.27 legalizes ``R.nn.softmax`` / ``R.nn.layer_norm`` / ``R.nn.gelu`` into several unscheduled
loops (one pass over the tensor per stage, scalar ``expf``/``erff`` calls: LLVM scalarizes a vector
``exp`` into 16 libm calls and does not lower a vector ``erf`` at all). Here each op is one kernel
that works row by row while the row stays in L1, with explicit vectors of ``lanes`` floats and
several independent accumulators per reduction:

* softmax: max, then ``exp(x - max)`` stored and summed, then scaled by ``1 / sum`` (3 passes over
  the row in L1; one over memory);
* LayerNorm: mean, then the variance of ``x - mean`` (two-pass, as accurate as numpy), then
  ``(x - mean) * rstd * gamma + beta``;
* GELU: ``x * (0.5 + 0.5 * erf(x / sqrt 2))`` (or the tanh form), one pass.

``exp`` is Cephes' ``expf`` (range reduction by ln 2 in two parts, degree-5 polynomial, scaling by
building the exponent bits); ``erf`` and ``tanh`` are Eigen's float32 rational approximations (those
TVM's own ``fast_erf``/``fast_tanh`` use), all written as TIR expressions so they vectorize on every
ISA (float -> int truncation instead of ``floor``: SSE2 has no vector rounding). Max errors vs float64:
exp 2 ulp, erf 1e-7 absolute, tanh 2e-7 absolute. NaN stays NaN; ``exp(-inf) = 0`` exactly (masked
attention scores).
"""
from __future__ import annotations

import functools

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

LOG2E = 1.44269504088896341
EXP_HI, EXP_LO = 88.3762626647949, -87.3365447504019  # exp overflows above / is denormal below
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 = LN2_HI + LN2_LO (LN2_HI exact in 9 bits)
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
            5.0000001201e-1)
ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
             -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
            -1.42647390514189e-02)
TANH_ALPHA = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
              1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
TANH_BETA = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)
TANH_CLAMP = 7.90531110763549805  # tanh = +-1 in float32 beyond
SQRT_HALF = 0.70710678118654752
SQRT_2_OVER_PI = 0.79788456080286536


# --- vector math as TIR expressions (any lane count, scalars included) ----------------------------
def _dtype(e) -> str:
    """dtype of a TIR expression: ``float32``, ``float32x16`` (0.27 exprs carry a ``ty``)."""
    return str(e.ty)


def _lanes(e) -> int:
    dtype = _dtype(e)
    return int(dtype.split("x")[1]) if "x" in dtype else 1


def _c(value, like, elem: str | None = None) -> tirx.PrimExpr:
    """``value`` as ``elem`` (default: ``like``'s element type), broadcast to ``like``'s lanes."""
    lanes = _lanes(like)
    scalar = tirx.const(value, elem or _dtype(like).split("x")[0])
    return tirx.Broadcast(scalar, lanes) if lanes > 1 else scalar


def _let(value, body, name: str = "t"):
    """``body(v)`` with ``v`` bound once to ``value`` (a TIR Let: no duplicated subexpressions)."""
    var = tirx.Var(name, _dtype(value))
    return tirx.Let(var, value, body(var))


def _horner(x, coefs):
    acc = _c(coefs[0], x)
    for c in coefs[1:]:
        acc = acc * x + _c(c, x)
    return acc


def _select(cond, a, b):
    return tirx.Select(cond, a, b)


def _int_dtype(x) -> str:
    return "int32" if _lanes(x) == 1 else f"int32x{_lanes(x)}"


def exp(x):
    """float32 ``exp`` (Cephes ``expf``), vectorizable; NaN -> NaN, -inf -> 0, +inf -> +inf."""
    def body(x):
        xc = _select(x > _c(EXP_HI, x), _c(EXP_HI, x), _select(x < _c(EXP_LO, x), _c(EXP_LO, x), x))

        def reduced(y):  # y = x * log2 e + 1/2; n = floor(y) by truncation, valid for |y| < 2^31
            def with_n(n):
                def poly(r):  # exp(r) * 2^n, 2^n built in the exponent bits
                    two_n = tirx.reinterpret(_dtype(x), (n + _c(127, x, "int32")) << _c(23, x, "int32"))
                    return _let(r * r, lambda r2: (_horner(r, EXP_POLY) * r2 + r + _c(1.0, r)) * two_n, "r2")

                nf = tirx.Cast(_dtype(x), n)
                return _let(xc - nf * _c(LN2_HI, x) - nf * _c(LN2_LO, x), poly, "r")

            def floor(t):
                return _let(t - _select(y < tirx.Cast(_dtype(x), t), _c(1, x, "int32"), _c(0, x, "int32")), with_n, "n")

            return _let(tirx.Cast(_int_dtype(x), y), floor, "ti")

        value = _let(xc * _c(LOG2E, x) + _c(0.5, x), reduced, "y")
        # exact 0 below the range (exp(-inf) in masked softmax), inf above it, NaN kept
        return _select(x < _c(EXP_LO, x), _c(0.0, x), _select(x > _c(EXP_HI, x), _c(float("inf"), x), value))

    return _let(x, body, "x")


def erf(x):
    """float32 ``erf`` (Eigen's rational approximation on [-4, 4], +-1 beyond), vectorizable."""
    def body(x):
        xc = _select(x > _c(4.0, x), _c(4.0, x), _select(x < _c(-4.0, x), _c(-4.0, x), x))
        return _let(xc, lambda xc: _let(xc * xc, lambda x2: xc * _horner(x2, ERF_ALPHA) / _horner(x2, ERF_BETA),
                                        "x2"), "xc")

    return _let(x, body, "x")


def tanh(x):
    """float32 ``tanh`` (Eigen's rational approximation), vectorizable."""
    def body(x):
        xc = _select(x > _c(TANH_CLAMP, x), _c(TANH_CLAMP, x),
                     _select(x < _c(-TANH_CLAMP, x), _c(-TANH_CLAMP, x), x))
        return _let(xc, lambda xc: _let(xc * xc, lambda x2: xc * _horner(x2, TANH_ALPHA) / _horner(x2, TANH_BETA),
                                        "x2"), "xc")

    return _let(x, body, "x")


def gelu(x):
    """``x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))``."""
    return _let(x, lambda x: x * (_c(0.5, x) + _c(0.5, x) * erf(x * _c(SQRT_HALF, x))), "g")


def gelu_tanh(x):
    """``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    return _let(x, lambda x: x * (_c(0.5, x) + _c(0.5, x) * tanh(
        _c(SQRT_2_OVER_PI, x) * (x + _c(0.044715, x) * x * x * x))), "g")


ELEMENTWISE = {"gelu": gelu, "gelu_tanh": gelu_tanh, "erf": erf}


def hreduce(v, op):
    """Reduce the lanes of vector expression ``v`` with ``op`` (a halving tree) to a scalar."""
    lanes = _lanes(v)
    while lanes > 1:
        lanes //= 2
        half = f"float32x{lanes}" if lanes > 1 else "float32"
        v = _let(v, lambda t, half=half: op(T.vectorlow(half, t), T.vectorhigh(half, t)), "h")
    return v


def _max(a, b):
    return _select(a > b, a, b)  # NaN in ``b`` (the new values) propagates


def _add(a, b):
    return a + b


# --- kernels -------------------------------------------------------------------------------------
# ONE_INPUT: Relax's RewriteDataflowReshape (in tvm.compile) asks every one-input call_tir's PrimFunc
# whether it is a reshape, which fails unless its body is a block: the one-input kernels (softmax,
# element-wise) are s_tir functions whose loops sit in an explicit root block.
def _unroll(n: int, lanes: int) -> int:
    """Independent vector accumulators for a row of ``n``: up to 4 (latency of max/add ~4 cycles)."""
    return max(1, min(4, n // lanes))


def _row_reduce(n: int, lanes: int, op, init: float, term, store: bool = False):
    """Macro ``reduce(X, Y, row, acc, s, i0)``: ``s[i0] = op``-reduction over the row of ``term(X, row, cols, s)``
    (``cols`` a vector ramp, or a scalar column for the ``n % lanes`` tail), stored to ``Y[row, cols]`` first
    if ``store``. ``acc``: [4, lanes] scratch (constant indices: registers)."""
    u = _unroll(n, lanes)
    chunks, vec_rest, tail0 = n // (u * lanes), (n // lanes) % u, n // lanes * lanes
    vec = T.ramp(0, 1, lanes)

    @T.macro
    def step(X, Y, row, acc, s, a, cols):
        if store:
            Y[row, cols] = term(X, row, cols, s)
            acc[a, vec] = op(acc[a, vec], Y[row, cols])
        else:
            acc[a, vec] = op(acc[a, vec], term(X, row, cols, s))

    @T.macro
    def reduce(X, Y, row, acc, s, i0):
        for a in T.unroll(u):
            acc[a, vec] = T.broadcast(T.float32(init), lanes)
        for c in range(chunks):
            for a in T.unroll(u):
                step(X, Y, row, acc, s, a, T.ramp((c * u + a) * lanes, 1, lanes))
        for a in T.unroll(vec_rest):
            step(X, Y, row, acc, s, a, T.ramp((chunks * u + a) * lanes, 1, lanes))
        for a in T.unroll(1, u):
            acc[0, vec] = op(acc[0, vec], acc[a, vec])
        s[i0] = hreduce(acc[0, vec], op)
        for i in range(tail0, n):
            if store:
                Y[row, i] = term(X, row, i, s)
                s[i0] = op(s[i0], Y[row, i])
            else:
                s[i0] = op(s[i0], term(X, row, i, s))

    return reduce


def _bcast(value, cols):
    """``value`` (a scalar) broadcast like ``cols`` (a vector ramp or a scalar index)."""
    return T.broadcast(value, cols.lanes) if isinstance(cols, tirx.Ramp) else value


@functools.lru_cache(maxsize=None)
def softmax_primfunc(n: int, lanes: int):
    """TIR ``(X[rows, n], Y[rows, n])``: softmax over the last axis, rows dynamic."""
    vecs = n // lanes
    row_max = _row_reduce(n, lanes, _max, float("-inf"), lambda X, row, cols, s: X[row, cols])
    exp_sum = _row_reduce(n, lanes, _add, 0.0, lambda X, row, cols, s: exp(X[row, cols] - _bcast(s[0], cols)),
                          store=True)

    @T.prim_func(s_tir=True)
    def kernel(x: T.handle, y: T.handle):
        T.func_attr({"tirx.noalias": True})
        rows = T.int64()
        X = T.match_buffer(x, (rows, n), "float32")
        Y = T.match_buffer(y, (rows, n), "float32")
        with T.sblock("root"):  # see ONE_INPUT
            acc = T.alloc_buffer((4, lanes), "float32")
            s = T.alloc_buffer((2,), "float32")  # row max, then 1 / row sum
            for row in range(rows):
                row_max(X, Y, row, acc, s, 0)
                exp_sum(X, Y, row, acc, s, 1)  # exp(x - max), stored and summed
                s[1] = T.float32(1) / s[1]
                for i in range(vecs):
                    Y[row, T.ramp(i * lanes, 1, lanes)] = Y[row, T.ramp(i * lanes, 1, lanes)] * T.broadcast(
                        s[1], lanes)
                for i in range(vecs * lanes, n):
                    Y[row, i] = Y[row, i] * s[1]

    return kernel


@functools.lru_cache(maxsize=None)
def layer_norm_primfunc(n: int, lanes: int, epsilon: float):
    """TIR ``(X[rows, n], gamma[n], beta[n], Y[rows, n])``: LayerNorm over the last axis, rows dynamic."""
    vecs = n // lanes
    row_sum = _row_reduce(n, lanes, _add, 0.0, lambda X, row, cols, s: X[row, cols])
    row_var = _row_reduce(n, lanes, _add, 0.0,
                          lambda X, row, cols, s: _let(X[row, cols] - _bcast(s[0], cols), lambda d: d * d, "d"))

    @T.prim_func
    def kernel(x: T.handle, gamma: T.Buffer((n,), "float32"), beta: T.Buffer((n,), "float32"), y: T.handle):
        T.func_attr({"tirx.noalias": True})
        rows = T.int64()
        X = T.match_buffer(x, (rows, n), "float32")
        Y = T.match_buffer(y, (rows, n), "float32")
        acc = T.alloc_buffer((4, lanes), "float32")
        s = T.alloc_buffer((2,), "float32")  # sum -> mean, sum of squared deviations -> 1 / std
        for row in range(rows):
            row_sum(X, Y, row, acc, s, 0)
            s[0] = s[0] * T.float32(1.0 / n)
            row_var(X, Y, row, acc, s, 1)
            s[1] = T.float32(1) / T.sqrt(s[1] * T.float32(1.0 / n) + T.float32(epsilon))
            for i in range(vecs):
                Y[row, T.ramp(i * lanes, 1, lanes)] = (
                    (X[row, T.ramp(i * lanes, 1, lanes)] - T.broadcast(s[0], lanes)) * T.broadcast(s[1], lanes)
                    * gamma[T.ramp(i * lanes, 1, lanes)] + beta[T.ramp(i * lanes, 1, lanes)])
            for i in range(vecs * lanes, n):
                Y[row, i] = (X[row, i] - s[0]) * s[1] * gamma[i] + beta[i]

    return kernel


@functools.lru_cache(maxsize=None)
def elementwise_primfunc(kind: str, lanes: int):
    """TIR ``(X[size], Y[size])`` of :data:`ELEMENTWISE` ``kind`` on a flattened tensor, size dynamic."""
    fn = ELEMENTWISE[kind]
    unroll = 4

    @T.prim_func(s_tir=True)
    def kernel(x: T.handle, y: T.handle):
        T.func_attr({"tirx.noalias": True})
        size = T.int64()
        X = T.match_buffer(x, (size,), "float32")
        Y = T.match_buffer(y, (size,), "float32")
        with T.sblock("root"):  # see ONE_INPUT
            for i in range(size // (lanes * unroll)):
                for u in T.unroll(unroll):
                    Y[T.ramp((i * unroll + u) * lanes, 1, lanes)] = fn(
                        X[T.ramp((i * unroll + u) * lanes, 1, lanes)])
            for i in range(size // (lanes * unroll) * unroll, size // lanes):
                Y[T.ramp(i * lanes, 1, lanes)] = fn(X[T.ramp(i * lanes, 1, lanes)])
            for i in range(size // lanes * lanes, size):
                Y[i] = fn(X[i])

    return kernel


def reference_gelu(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    """float64 GELU (numpy oracle for the tests and benchmarks)."""
    from math import erf as _erf

    x = x.astype(np.float64)
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + np.vectorize(_erf)(x / np.sqrt(2)))
