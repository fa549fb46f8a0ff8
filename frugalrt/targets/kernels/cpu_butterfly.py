"""Fast CPU kernel of ``ai.frugalrt::Butterfly`` (LLVM x86 / aarch64): few passes, streamed twiddles.

The generic kernel writes the whole ``[batch, N]`` array once per stage. This one works row by
row on two N-float scratch rows that stay in L1 and needs only ``1 + ceil((L - 3) / 3)`` passes:

* stages 0..2 (strides 1, 2, 4) are pre-multiplied at compile time into dense 8x8 blocks, so
  the first pass is 8 vector multiply-adds per 8 outputs (broadcast input x column of the block);
* the other stages go three at a time ("radix 8"): 8 vectors at stride h are loaded, mixed by
  three stages in registers and stored once; every stride is >= 8, so each pair is two whole
  vectors and no shuffles are needed;
* the coefficients are repacked in the exact order the loop reads them, one linear stream.

Rows padded with zeros (``in_features < N``) skip what only mixes padding: a block of positions whose
inputs are all padding stays zero until a stage mixes it with real inputs, so those blocks are
written as zeros (64 -> 256: 3.5 of 8 stages' work).

Rounding differs from the reference only by the order of additions inside the 8x8 blocks and by
FMA contraction (~1e-7 relative).
"""
from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.script import tirx as T

from frugalrt.runtime.reference import butterfly_stages

LANES = 8  # floats per vector (AVX2; LLVM splits it in two on 128-bit NEON)
RADIX_STAGES = 3  # stages fused per pass after the first
ROWS = 8  # rows per tile: they share each coefficient chunk while it is in L1


def plan(n: int) -> tuple[int, int, int]:
    """(stages in the 8x8 block pass, number of radix-8 passes, stages in the final shorter pass)."""
    stages = butterfly_stages(n)
    first = min(3, stages)
    rest = stages - first
    return first, rest // RADIX_STAGES, rest % RADIX_STAGES


def _pair(t, pr):
    """Slots (m0, m1) mixed by pair ``pr`` in stage ``t`` of a pass (slots differ by 2^t); ints or TIR exprs."""
    m0 = ((pr >> t) << (t + 1)) | (pr & ((1 << t) - 1))
    return m0, m0 + (1 << t)


def repack(own: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-position coefficients (``stage_coefficients``) -> (8x8 blocks [N/8, c, r], pass stream).

    ``own[s, i]`` weighs x[i] and ``other[s, i]`` weighs x[i ^ 2^s] in stage s.
    """
    stages, n = own.shape
    first, radix8, tail = plan(n)
    b0 = 1 << first
    pos = np.arange(n)
    cols = np.zeros((b0, n), np.float64)  # column c of every block at once: x = e_c in each block
    for c in range(b0):
        cols[c, c::b0] = 1.0
    for s in range(first):
        cols = own[s] * cols + other[s] * cols[:, pos ^ (1 << s)]
    blocks = cols.reshape(b0, n // b0, b0).transpose(1, 0, 2)  # [g, c, r] = M_g[r, c]
    streams = []
    s0 = first
    for q in [RADIX_STAGES] * radix8 + ([tail] if tail else []):
        h, r = 1 << s0, 1 << q
        g, kk, lane = np.ix_(np.arange(n // (r * h)), np.arange(h // LANES), np.arange(LANES))
        per_pair = []
        for t in range(q):
            for pr in range(r // 2):
                m0, m1 = _pair(t, pr)
                i0 = g * r * h + m0 * h + kk * LANES + lane
                i1 = i0 + (h << t)
                s = s0 + t
                per_pair.append(np.stack([own[s][i0], other[s][i0], other[s][i1], own[s][i1]], axis=-2))
        # [g, kk, (t, pr), coef, lane]: the order of the kernel's loops
        streams.append(np.stack(per_pair, axis=2).reshape(-1))
        s0 += q
    stream = np.concatenate(streams) if streams else np.zeros(LANES)
    return blocks.astype(np.float32), stream.astype(np.float32)


def butterfly_primfunc(n: int, in_features: int, out_features: int):
    """TIR kernel ``(X[batch, in], blocks, stream, bias[out], Y[batch, out])`` for size N."""
    first, radix8, tail = plan(n)
    b0 = 1 << first
    chunks = n // (LANES * 8)  # radix-8 pass iterations per row
    tail_h, tail_r = 1 << (first + RADIX_STAGES * radix8), 1 << tail
    tail_at = radix8 * 6 * n  # stream offset of the shorter final pass
    src_last = (radix8 + (1 if tail else 0)) % 2  # scratch row holding the result
    stream_len = max(LANES, (radix8 * RADIX_STAGES + tail) * 2 * n)
    out_vec = out_features - out_features % LANES
    live_blocks = -(-in_features // b0)  # first-pass blocks that read X; the rest are zero padding

    @T.prim_func
    def kernel(x: T.handle, blocks: T.Buffer((n // b0, b0, b0), "float32"),
               stream: T.Buffer((stream_len,), "float32"), bias: T.Buffer((out_features,), "float32"),
               y: T.handle):
        T.func_attr({"tirx.noalias": True})
        batch = T.int64()
        X = T.match_buffer(x, (batch, in_features), "float32")
        Y = T.match_buffer(y, (batch, out_features), "float32")
        S = T.alloc_buffer((ROWS, 2, n), "float32")
        # register blocks: under 1 KiB and global scope, so a stack array that LLVM keeps in
        # registers ("local" scope or more bytes would go to TVMBackendAllocWorkspace, heap memory)
        acc = T.alloc_buffer((b0,), "float32")
        v = T.alloc_buffer((2, 8, LANES), "float32")
        for tile in range((batch + ROWS - 1) // ROWS):
            rows: T.let[T.int64] = T.min(batch - tile * ROWS, ROWS)
            for g in range(live_blocks):  # stages 0..first-1: dense b0 x b0 blocks
                for r in range(rows):
                    acc[T.ramp(0, 1, b0)] = T.broadcast(T.float32(0), b0)
                    for c in T.unroll(b0):
                        acc[T.ramp(0, 1, b0)] = acc[T.ramp(0, 1, b0)] + blocks[g, c, T.ramp(0, 1, b0)] * T.broadcast(
                            T.if_then_else(g * b0 + c < in_features, X[tile * ROWS + r, g * b0 + c], T.float32(0)), b0)
                    S[r, 0, T.ramp(g * b0, 1, b0)] = acc[T.ramp(0, 1, b0)]
            for g in range(live_blocks, n // b0):  # blocks of zero padding stay zero
                for r in range(rows):
                    S[r, 0, T.ramp(g * b0, 1, b0)] = T.broadcast(T.float32(0), b0)
            for p in range(radix8):  # three stages per pass, h = 2^(first + 3p) >= 8
                for i in range(chunks):
                    for r in range(rows):  # the rows of a tile share this chunk's coefficients (in L1)
                        lh: T.let[T.int32] = first + 3 * p
                        block: T.let[T.int32] = (i >> (lh - 3)) << (lh + 3)  # the 2^(lh+3) positions mixed
                        base: T.let[T.int32] = block + (i & ((1 << (lh - 3)) - 1)) * LANES
                        if block >= in_features:  # only zero padding mixed so far: stays zero
                            for m in T.unroll(8):
                                S[r, 1 - p % 2, T.ramp(base + (m << lh), 1, LANES)] = T.broadcast(T.float32(0), LANES)
                            continue
                        for m in T.unroll(8):
                            v[0, m, T.ramp(0, 1, LANES)] = S[r, p % 2, T.ramp(base + (m << lh), 1, LANES)]
                        for t in T.unroll(3):
                            for pr in T.unroll(4):
                                m0: T.let[T.int32] = _pair(t, pr)[0]
                                m1: T.let[T.int32] = _pair(t, pr)[1]
                                off: T.let[T.int32] = p * 6 * n + i * 384 + (t * 4 + pr) * 32
                                a: T.let[T.float32x8] = v[t % 2, m0, T.ramp(0, 1, LANES)]
                                c: T.let[T.float32x8] = v[t % 2, m1, T.ramp(0, 1, LANES)]
                                v[(t + 1) % 2, m0, T.ramp(0, 1, LANES)] = (
                                    stream[T.ramp(off, 1, LANES)] * a + stream[T.ramp(off + 8, 1, LANES)] * c)
                                v[(t + 1) % 2, m1, T.ramp(0, 1, LANES)] = (
                                    stream[T.ramp(off + 16, 1, LANES)] * a + stream[T.ramp(off + 24, 1, LANES)] * c)
                        for m in T.unroll(8):
                            S[r, 1 - p % 2, T.ramp(base + (m << lh), 1, LANES)] = v[1, m, T.ramp(0, 1, LANES)]
            if tail > 0:  # the last 1 or 2 stages
                for g in range(n // (tail_r * tail_h)):
                    for kk in range(tail_h // LANES):
                        for r in range(rows):
                            base: T.let[T.int32] = g * tail_r * tail_h + kk * LANES
                            for m in T.unroll(tail_r):
                                v[0, m, T.ramp(0, 1, LANES)] = S[r, radix8 % 2, T.ramp(base + m * tail_h, 1, LANES)]
                            for t in T.unroll(tail):
                                for pr in T.unroll(tail_r // 2):
                                    m0: T.let[T.int32] = _pair(t, pr)[0]
                                    m1: T.let[T.int32] = _pair(t, pr)[1]
                                    off: T.let[T.int32] = tail_at + ((g * (tail_h // LANES) + kk) * tail * (tail_r // 2)
                                                                     + t * (tail_r // 2) + pr) * 32
                                    a: T.let[T.float32x8] = v[t % 2, m0, T.ramp(0, 1, LANES)]
                                    c: T.let[T.float32x8] = v[t % 2, m1, T.ramp(0, 1, LANES)]
                                    v[(t + 1) % 2, m0, T.ramp(0, 1, LANES)] = (
                                        stream[T.ramp(off, 1, LANES)] * a + stream[T.ramp(off + 8, 1, LANES)] * c)
                                    v[(t + 1) % 2, m1, T.ramp(0, 1, LANES)] = (
                                        stream[T.ramp(off + 16, 1, LANES)] * a
                                        + stream[T.ramp(off + 24, 1, LANES)] * c)
                            for m in T.unroll(tail_r):
                                S[r, 1 - radix8 % 2, T.ramp(base + m * tail_h, 1, LANES)] = v[
                                    tail % 2, m, T.ramp(0, 1, LANES)]
            for r in range(rows):  # truncate to out_features, add bias
                for o in range(out_vec // LANES):
                    Y[tile * ROWS + r, T.ramp(o * LANES, 1, LANES)] = S[r, src_last, T.ramp(o * LANES, 1, LANES)] + bias[
                        T.ramp(o * LANES, 1, LANES)]
                for o in range(out_vec, out_features):
                    Y[tile * ROWS + r, o] = S[r, src_last, o] + bias[o]

    return kernel


def emit_butterfly_cpu(bb: relax.BlockBuilder, x: relax.Expr, own: np.ndarray, other: np.ndarray,
                       bias: np.ndarray | None, out_features: int, target) -> relax.Expr:
    """Lowering entry (``ButterflyLowering.KERNELS``): add the kernel and call it on constant coefficients."""
    n = own.shape[1]
    if n < LANES:  # too small to vectorize: the generic kernel is as good
        from frugalrt.targets.kernels.butterfly import emit_generic

        return emit_generic(bb, x, own, other, bias, out_features, target)
    blocks, stream = repack(own, other)
    batch, in_features = x.ty.shape.values
    func = butterfly_primfunc(n, int(in_features), out_features).with_attr("op_pattern", 8).without_attr(
        "global_symbol")  # opaque; Relax names it after its GlobalVar
    gv = bb.add_func(func, "frugalrt_butterfly_cpu")
    bias = np.zeros(out_features, np.float32) if bias is None else bias
    return bb.emit(relax.call_tir(gv, [x, relax.const(blocks), relax.const(stream), relax.const(bias)],
                                  relax.TensorType((batch, out_features), "float32")))
