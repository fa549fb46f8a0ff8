"""CUDA kernel of ``ai.frugalrt::Butterfly``: every stage of a block of rows fused in shared memory.

One thread block owns ``rows`` rows: it loads them once (zero-padded to N) into shared memory,
runs all log2 N stages there, ping-ponging between two buffers (in place, TVM's barrier planner
could not prove that no pair is read after another thread wrote it and would put a barrier
after every pair; ping-pong needs one barrier per stage), then stores the first ``out_features`` columns plus
the bias once. Global memory sees one read of X and one write of Y: no per-stage round trips and
no permutation pass. A pair's four coefficients are loaded once per stage and reused for all the
block's rows.

Each product and sum is rounded on its own (``__fmul_rn``/``__fadd_rn``: nvcc may not contract them
into an FMA), so the result is bit-identical to the numpy reference's float32 arithmetic.
"""
from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.script import tirx as T

from frugalrt.runtime.reference import butterfly_stages

SHARED_FLOATS = 4096  # per buffer: two take 32 KiB of the 48 KiB of static shared memory of a block
MAX_ROWS = 8  # rows per block: they share each stage's coefficient loads
MAX_THREADS = 256


def fmul(a, b):
    return T.call_pure_extern("float32", "__fmul_rn", a, b)


def fadd(a, b):
    return T.call_pure_extern("float32", "__fadd_rn", a, b)


def pair_coefficients(own: np.ndarray, other: np.ndarray) -> np.ndarray:
    """[L, N/2, 4]: per stage and pair (i, j = i + 2^s), (weight of x[i] in y[i], of x[j] in y[i],
    of x[j] in y[j], of x[i] in y[j]): the order the kernel reads them."""
    stages, n = own.shape
    p = np.arange(n // 2)
    out = np.empty((stages, n // 2, 4), np.float32)
    for s in range(stages):
        i = ((p >> s) << (s + 1)) | (p & ((1 << s) - 1))
        j = i + (1 << s)
        out[s] = np.stack([own[s, i], other[s, i], own[s, j], other[s, j]], axis=-1)
    return out


def launch_shape(n: int) -> tuple[int, int]:
    """(rows per block, threads per block) for size N."""
    return max(1, min(MAX_ROWS, SHARED_FLOATS // n)), max(1, min(MAX_THREADS, n // 2))


def butterfly_gpu_primfunc(n: int, in_features: int, out_features: int, has_bias: bool):
    """TIR kernel ``(X[batch, in], coef[L, N/2, 4], bias[out], Y[batch, out])`` with thread bindings."""
    stages = butterfly_stages(n)
    rows, threads = launch_shape(n)
    per_thread = max(1, n // threads)  # columns each thread loads / stores
    pairs = max(1, n // 2 // threads)  # pairs each thread mixes per stage

    @T.macro
    def stage(src, dst, s, tx, coef, pairs, threads, rows):  # (constants passed: the macro sees only its arguments)
        for q in T.unroll(pairs):
            p: T.let[T.int32] = q * threads + tx
            i: T.let[T.int32] = T.shift_left(T.shift_right(p, s), s + 1) | (p & (T.shift_left(1, s) - 1))
            j: T.let[T.int32] = i + T.shift_left(1, s)
            a0: T.let[T.float32] = coef[s, p, 0]
            a1: T.let[T.float32] = coef[s, p, 1]
            b0: T.let[T.float32] = coef[s, p, 2]
            b1: T.let[T.float32] = coef[s, p, 3]
            for r in T.unroll(rows):
                xi: T.let[T.float32] = src[r, i]
                xj: T.let[T.float32] = src[r, j]
                dst[r, i] = fadd(fmul(a0, xi), fmul(a1, xj))
                dst[r, j] = fadd(fmul(b0, xj), fmul(b1, xi))
        T.tvm_storage_sync("shared")

    @T.macro
    def store(src, Y, bias, bx, tx, batch):  # the last stage's buffer, truncated, plus the bias: once each
        for r in T.unroll(rows):
            for c in T.unroll(per_thread):
                col: T.let[T.int32] = c * threads + tx
                row: T.let[T.int64] = bx * rows + r
                if row < batch and col < out_features:
                    Y[row, col] = fadd(src[r, col], bias[col]) if has_bias else src[r, col]

    @T.prim_func
    def kernel(x: T.handle, coef: T.Buffer((stages, n // 2, 4), "float32"),
               bias: T.Buffer((out_features,), "float32"), y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch = T.int64()
        X = T.match_buffer(x, (batch, in_features), "float32")
        Y = T.match_buffer(y, (batch, out_features), "float32")
        for bx in T.thread_binding((batch + rows - 1) // rows, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                A = T.alloc_buffer((rows, n), "float32", scope="shared")
                B = T.alloc_buffer((rows, n), "float32", scope="shared")
                for r in T.unroll(rows):
                    for c in T.unroll(per_thread):
                        col: T.let[T.int32] = c * threads + tx
                        row: T.let[T.int64] = bx * rows + r
                        A[r, col] = T.if_then_else(row < batch and col < in_features,
                                                   X[T.min(row, batch - 1), T.min(col, in_features - 1)],
                                                   T.float32(0))
                T.tvm_storage_sync("shared")
                for s2 in T.unroll(stages // 2):  # A -> B -> A: each buffer is only read or only written
                    stage(A, B, 2 * s2, tx, coef, pairs, threads, rows)
                    stage(B, A, 2 * s2 + 1, tx, coef, pairs, threads, rows)
                if stages % 2 == 1:
                    stage(A, B, stages - 1, tx, coef, pairs, threads, rows)
                    store(B, Y, bias, bx, tx, batch)
                else:
                    store(A, Y, bias, bx, tx, batch)

    return kernel


def emit_butterfly_gpu(bb: relax.BlockBuilder, x: relax.Expr, own: np.ndarray, other: np.ndarray,
                       bias: np.ndarray | None, out_features: int, target) -> relax.Expr:
    """Lowering entry (``ButterflyLowering.KERNELS["cuda"]``); N past shared memory: the generic kernel."""
    n = own.shape[1]
    if n > SHARED_FLOATS:
        from frugalrt.targets.kernels.butterfly import emit_generic

        return emit_generic(bb, x, own, other, bias, out_features, target)
    batch, in_features = x.ty.shape.values
    func = butterfly_gpu_primfunc(n, int(in_features), out_features, bias is not None)
    gv = bb.add_func(func.with_attr("op_pattern", 8).without_attr("global_symbol"), "frugalrt_butterfly_gpu")
    bias = np.zeros(out_features, np.float32) if bias is None else bias
    return bb.emit(relax.call_tir(gv, [x, relax.const(pair_coefficients(own, other)), relax.const(bias)],
                                  relax.TensorType((batch, out_features), "float32")))
