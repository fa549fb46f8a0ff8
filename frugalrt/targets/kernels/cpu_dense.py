"""Dense float32 matrix products for CPUs (x86 SSE2 / AVX2 / AVX-512, AArch64 NEON), without tuning.

TVM 0.27 legalizes ``R.matmul`` into a plain triple loop with no schedule (~1 GMAC/s); these
kernels are what ``frugalrt.targets.kernels.standard`` puts in its place:

* :func:`dense_primfunc`: ``Y[m, N] = X[m, K] @ W[K, N] (+ bias)`` with W a constant. W is repacked
  at compile time into column panels ``Wp[N/nr, K, nr]`` (``nr = nv * lanes`` columns, zero padded),
  so the inner step over k loads ``nv`` whole vectors of one contiguous stream. A register block of
  ``mr`` rows x ``nv`` vectors of accumulators takes ``mr`` broadcasts of X and ``mr * nv`` fused
  multiply-adds per k; K is cut in blocks of ``kc`` so one panel slice stays in L1 while every row
  block of X passes it. The rows left over (``m % mr``, e.g. batch 1) get a block of their own that
  spans several panels at once, so a single row still has ``nv * panels`` independent FMA chains.
* :func:`batch_matmul_primfunc`: ``Y[b, M, N] = A[b, M, K] @ B[b, K, N]`` (or ``@ B[b, N, K]^T``) with
  both operands computed at run time (attention): the same register blocks on a panel copy of
  ``B[b]`` made per batch (K * N copies against M * K * N multiply-adds).
* :func:`conv2d_primfunc`: a 2-D convolution as ``W[O, C*KH*KW] @ taps``, rows = output channels,
  vectors along output pixels; the taps are read in place from phase planes of the padded image
  (:class:`ConvPlan`: every tap is a contiguous run, whatever the stride), no im2col copy.

Register blocks are small global-scope buffers with constant indices (LLVM keeps them in
registers, see tests/targets/test_cpu_kernels.py::test_kernel_scratch_is_not_heap_memory); partial
panels are staged through a separate scratch vector so the accumulators keep constant indices.
Rounding: each output is one float32 dot product in order of k (with FMA), started from the bias.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script import tirx as T


@dataclass(frozen=True)
class DenseConfig:
    """Register block and cache block of one CPU family (see :data:`CONFIGS`)."""

    lanes: int  # float32 per vector register
    mr: int  # rows per register block
    nv: int  # vectors per panel (panel width nr = nv * lanes)
    group: int  # panels per group: a block of left-over rows spans up to this many panels
    kc: int  # k per cache block
    accumulators: int  # vector accumulators a block may use (registers minus loads and broadcasts)

    @property
    def nr(self) -> int:
        return self.nv * self.lanes

    def row_panels(self, rows: int) -> int:
        """Panels spanned by a block of ``rows`` (< mr) left-over rows: a power of two dividing ``group``."""
        p = self.group
        while p > 1 and rows * self.nv * p > self.accumulators:
            p //= 2
        return p


# Family configurations. AVX-512: 32 zmm; AVX2: 16 ymm; SSE2 (x86-64 baseline): 16 xmm, no FMA;
# NEON (AArch64): 32 q registers of 4 floats.
CONFIGS = {
    "avx512": DenseConfig(lanes=16, mr=7, nv=2, group=4, kc=128, accumulators=14),
    "avx2": DenseConfig(lanes=8, mr=6, nv=2, group=4, kc=256, accumulators=12),
    "sse": DenseConfig(lanes=4, mr=4, nv=2, group=2, kc=256, accumulators=8),
    "neon": DenseConfig(lanes=4, mr=8, nv=3, group=2, kc=256, accumulators=24),
}


def pack_panels(w: np.ndarray, nr: int) -> np.ndarray:
    """[K, N] -> [ceil(N / nr), K, nr] float32 column panels, zero padded."""
    k, n = w.shape
    panels = -(-n // nr)
    padded = np.zeros((k, panels * nr), np.float32)
    padded[:, :n] = w
    return np.ascontiguousarray(padded.reshape(k, panels, nr).transpose(1, 0, 2))


def padded_bias(bias: np.ndarray | None, n: int, nr: int) -> np.ndarray:
    out = np.zeros(-(-n // nr) * nr, np.float32)
    if bias is not None:
        out[:n] = bias.reshape(-1)
    return out


def _block_macro(cfg: DenseConfig, rows: int, panels: int, shifted: bool = False, row_bias: bool = False):
    """Macro ``block(X, xrow, Wp, wb, bias, Y, yrow, acc, wv, tmp, k, n, row0, p0, kb)``: rows ``row0 ..
    row0 + rows`` x panels ``p0 .. p0 + panels`` over k block ``kb``. X is addressed ``X[xrow + r, k]``,
    the panels ``Wp[wb + p, k, :]``, Y ``Y[yrow + r, col]`` (buffers flattened to 2-D by the caller).
    ``shifted`` (convolutions): Wp is one flat image and column ``col`` of row ``k`` is ``Wp[wb[k] + col]``
    (``wb`` the per-tap offsets). ``row_bias``: the bias is per row (output channel), not per column."""
    lanes, nv, nr, kc = cfg.lanes, cfg.nv, cfg.nr, cfg.kc
    vecs = panels * nv
    vec = T.ramp(0, 1, lanes)

    @T.macro
    def block(X, xrow, Wp, wb, bias, Y, yrow, acc, wv, tmp, k, n, row0, p0, kb):
        if kb == 0:  # start from the bias (zeros without one)
            for r in T.unroll(rows):
                for j in T.unroll(vecs):
                    if row_bias:
                        acc[r * vecs + j, vec] = T.broadcast(bias[xrow + row0 + r], lanes)
                    else:
                        acc[r * vecs + j, vec] = bias[T.ramp(p0 * nr + j * lanes, 1, lanes)]
        else:  # a later k block: continue from the partial sums in Y
            for r in T.unroll(rows):
                for j in T.unroll(vecs):
                    if p0 * nr + (j + 1) * lanes <= n:
                        acc[r * vecs + j, vec] = Y[yrow + row0 + r, T.ramp(p0 * nr + j * lanes, 1, lanes)]
                    else:
                        for lane in range(lanes):
                            tmp[lane] = T.if_then_else(p0 * nr + j * lanes + lane < n,
                                                       Y[yrow + row0 + r, T.min(p0 * nr + j * lanes + lane, n - 1)],
                                                       T.float32(0))
                        acc[r * vecs + j, vec] = tmp[vec]
        for kk in range(kb * kc, T.min(kb * kc + kc, k)):
            for j in T.unroll(vecs):
                if shifted:
                    wv[j, vec] = Wp[T.ramp(T.Cast("int64", wb[kk]) + p0 * nr + j * lanes, 1, lanes)]
                else:
                    wv[j, vec] = Wp[wb + p0 + j // nv, kk, T.ramp((j % nv) * lanes, 1, lanes)]
            for r in T.unroll(rows):
                for j in T.unroll(vecs):
                    acc[r * vecs + j, vec] = (acc[r * vecs + j, vec]
                                              + T.broadcast(X[xrow + row0 + r, kk], lanes) * wv[j, vec])
        for r in T.unroll(rows):
            for j in T.unroll(vecs):
                if p0 * nr + (j + 1) * lanes <= n:
                    Y[yrow + row0 + r, T.ramp(p0 * nr + j * lanes, 1, lanes)] = acc[r * vecs + j, vec]
                else:
                    tmp[vec] = acc[r * vecs + j, vec]
                    for lane in range(lanes):
                        if p0 * nr + j * lanes + lane < n:
                            Y[yrow + row0 + r, p0 * nr + j * lanes + lane] = tmp[lane]

    return block


def _panels_macro(cfg: DenseConfig, group: int, shifted: bool = False, row_bias: bool = False):
    """Macro ``span(X, xrow, Wp, wb, bias, Y, yrow, acc, wv, tmp, k, n, m, p0)``: all ``m`` rows x panels
    ``p0 .. p0 + group``, k block by k block (``shifted``, ``row_bias``: see :func:`_block_macro`)."""
    mr, kc = cfg.mr, cfg.kc
    full = _block_macro(cfg, mr, 1, shifted, row_bias)

    def left_over(rows: int):
        """Macro for the ``m % mr`` rows left when that is ``rows`` or more (a chain, one test per size)."""
        if rows == mr:
            @T.macro
            def none(X, xrow, Wp, wb, bias, Y, yrow, acc, wv, tmp, k, n, m, p0, kb):
                T.evaluate(0)

            return none
        per = min(group, cfg.row_panels(rows))
        block, rest = _block_macro(cfg, rows, per, shifted, row_bias), left_over(rows + 1)

        @T.macro
        def chain(X, xrow, Wp, wb, bias, Y, yrow, acc, wv, tmp, k, n, m, p0, kb):
            if m % mr == rows:
                for q in range(group // per):
                    block(X, xrow, Wp, wb, bias, Y, yrow, acc, wv, tmp, k, n, m - rows, p0 + q * per, kb)
            else:
                rest(X, xrow, Wp, wb, bias, Y, yrow, acc, wv, tmp, k, n, m, p0, kb)

        return chain

    left = left_over(1)

    @T.macro
    def span(X, xrow, Wp, wb, bias, Y, yrow, acc, wv, tmp, k, n, m, p0):
        for kb in range((k + kc - 1) // kc):
            for q in range(group):  # the panel slice stays in L1 while the row blocks pass
                for mb in range(m // mr):
                    full(X, xrow, Wp, wb, bias, Y, yrow, acc, wv, tmp, k, n, mb * mr, p0 + q, kb)
            left(X, xrow, Wp, wb, bias, Y, yrow, acc, wv, tmp, k, n, m, p0, kb)  # one block spanning panels

    return span


def _kernel_scratch(cfg: DenseConfig):
    """Shapes of the accumulators [rows * vectors, lanes] and of the weight vectors [vectors, lanes]: at
    most ``cfg.accumulators`` vectors and under 1 KiB each, so they stay stack arrays that LLVM keeps in
    registers (TVM puts 1 KiB or more on the heap, TVMBackendAllocWorkspace)."""
    blocks = [(cfg.mr, cfg.nv)] + [(r, cfg.nv * min(cfg.group, cfg.row_panels(r))) for r in range(1, cfg.mr)]
    slots = max(rows * vecs for rows, vecs in blocks)
    assert slots <= cfg.accumulators and slots * cfg.lanes * 4 < 1024, (cfg, slots)
    return (slots, cfg.lanes), (max(vecs for _, vecs in blocks), cfg.lanes)


def _specialize(func, **sizes):
    """``func`` with its trailing int64 parameters named in ``sizes`` (k, n) bound to constants."""
    params = {p.name: p for p in func.params}
    return func.specialize({params[name]: tirx.IntImm("int64", value) for name, value in sizes.items()})


# TVMScript parses a macro again at every call: the kernels are parsed once per configuration with K
# and N as parameters (seconds), then specialized to each layer's sizes (milliseconds).
@functools.lru_cache(maxsize=None)
def _dense_generic(cfg: DenseConfig):
    nr, group = cfg.nr, cfg.group
    span_group, span_one = _panels_macro(cfg, group), _panels_macro(cfg, 1)
    acc_shape, wv_shape = _kernel_scratch(cfg)

    @T.prim_func
    def kernel(x: T.handle, wp: T.handle, b: T.handle, y: T.handle, k: T.int64, n: T.int64):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        X = T.match_buffer(x, (m, k), "float32")
        Wp = T.match_buffer(wp, ((n + nr - 1) // nr, k, nr), "float32")
        bias = T.match_buffer(b, ((n + nr - 1) // nr * nr,), "float32")
        Y = T.match_buffer(y, (m, n), "float32")
        # register blocks: under 1 KiB and global scope, so a stack array that LLVM keeps in
        # registers ("local" scope or more bytes would go to TVMBackendAllocWorkspace, heap memory)
        acc = T.alloc_buffer(acc_shape, "float32")
        wv = T.alloc_buffer(wv_shape, "float32")
        tmp = T.alloc_buffer((cfg.lanes,), "float32")
        for g in range((n + nr - 1) // nr // group):
            span_group(X, 0, Wp, 0, bias, Y, 0, acc, wv, tmp, k, n, m, g * group)
        for p in range((n + nr - 1) // nr // group * group, (n + nr - 1) // nr):
            span_one(X, 0, Wp, 0, bias, Y, 0, acc, wv, tmp, k, n, m, p)

    return kernel


def dense_primfunc(k: int, n: int, cfg: DenseConfig):
    """TIR ``(X[m, K], Wp[ceil(N/nr), K, nr], bias[ceil(N/nr) * nr], Y[m, N])``, m dynamic; Wp from
    :func:`pack_panels`, bias from :func:`padded_bias`."""
    return _specialize(_dense_generic(cfg), k=k, n=n)


@functools.lru_cache(maxsize=None)
def _batch_matmul_generic(cfg: DenseConfig, transpose_b: bool):
    nr, lanes, group = cfg.nr, cfg.lanes, cfg.group
    span_group, span_one = _panels_macro(cfg, group), _panels_macro(cfg, 1)
    acc_shape, wv_shape = _kernel_scratch(cfg)

    @T.macro
    def pack(B, Bp, bi, k, n):
        if transpose_b:  # contiguous reads along k; the writes stay in the (L1-sized) panel copy
            for p, c in T.grid((n + nr - 1) // nr, nr):
                if p * nr + c < n:
                    for kk in range(k):
                        Bp[p, kk, c] = B[bi, p * nr + c, kk]
                else:
                    for kk in range(k):
                        Bp[p, kk, c] = T.float32(0)
        else:
            for p, kk in T.grid((n + nr - 1) // nr, k):
                if (p + 1) * nr <= n:
                    for j in T.unroll(nr // lanes):
                        Bp[p, kk, T.ramp(j * lanes, 1, lanes)] = B[bi, kk, T.ramp(p * nr + j * lanes, 1, lanes)]
                else:
                    for c in range(nr):
                        Bp[p, kk, c] = T.if_then_else(p * nr + c < n, B[bi, kk, T.min(p * nr + c, n - 1)],
                                                      T.float32(0))

    @T.prim_func
    def kernel(a: T.handle, b: T.handle, y: T.handle, k: T.int64, n: T.int64):
        T.func_attr({"tirx.noalias": True})
        batch = T.int64()
        rows = T.int64()
        A = T.match_buffer(a, (batch, rows, k), "float32")
        B = T.match_buffer(b, (batch, n, k) if transpose_b else (batch, k, n), "float32")
        Y = T.match_buffer(y, (batch, rows, n), "float32")
        X2 = T.decl_buffer((batch * rows, k), "float32", data=A.data)
        Y2 = T.decl_buffer((batch * rows, n), "float32", data=Y.data)
        Bp = T.alloc_buffer(((n + nr - 1) // nr, k, nr), "float32")
        zeros = T.alloc_buffer(((n + nr - 1) // nr * nr,), "float32")
        acc = T.alloc_buffer(acc_shape, "float32")
        wv = T.alloc_buffer(wv_shape, "float32")
        tmp = T.alloc_buffer((lanes,), "float32")
        for i in range((n + nr - 1) // nr * nr):
            zeros[i] = T.float32(0)
        for bi in range(batch):
            pack(B, Bp, bi, k, n)
            for g in range((n + nr - 1) // nr // group):
                span_group(X2, bi * rows, Bp, 0, zeros, Y2, bi * rows, acc, wv, tmp, k, n, rows, g * group)
            for p in range((n + nr - 1) // nr // group * group, (n + nr - 1) // nr):
                span_one(X2, bi * rows, Bp, 0, zeros, Y2, bi * rows, acc, wv, tmp, k, n, rows, p)

    return kernel


def batch_matmul_primfunc(k: int, n: int, cfg: DenseConfig, transpose_b: bool = False):
    """TIR ``(A[b, M, K], B[b, K, N], Y[b, M, N])``, or ``B[b, N, K]`` read transposed (``transpose_b``:
    ``A @ B^T`` as in attention scores, no transposed copy). b and M dynamic.
    Each batch's B is copied into zero-padded column panels first, then multiplied as in
    :func:`dense_primfunc` (no bias)."""
    return _specialize(_batch_matmul_generic(cfg, transpose_b), k=k, n=n)


# --- convolution -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvPlan:
    """Geometry of a 2-D convolution (NCHW, OIHW, no groups or dilation) run as a shifted matrix product.

    The zero-padded image is split into ``stride**2`` phase planes of ``hq x wq`` (plane (a, b) holds
    padded pixels (stride*i + a, stride*j + b)), so that tap (c, kh, kw) of output pixel (oh, ow) is
    ``planes[offsets[c, kh, kw] + oh * wq + ow]``: every tap reads a contiguous run of the flat planes.
    The product runs over the "wide" output ``[O, OH * wq]`` (columns ow >= OW are discarded)."""

    c: int
    h: int
    w: int
    o: int
    kh: int
    kw: int
    stride: int
    pads: tuple  # top, left, bottom, right
    oh: int
    ow: int
    hq: int
    wq: int
    offsets: np.ndarray  # [C * KH * KW] int32, the flat plane offset of each tap
    size: int  # floats in the planes buffer (reads of the last partial panel included)


def conv_plan(c: int, h: int, w: int, o: int, kh: int, kw: int, stride: int, pads, nr: int) -> ConvPlan:
    top, left, bottom, right = (int(p) for p in pads)
    oh, ow = (h + top + bottom - kh) // stride + 1, (w + left + right - kw) // stride + 1
    hq = max(-(-(h + top + bottom) // stride), oh + (kh - 1) // stride)
    wq = max(-(-(w + left + right) // stride), ow + (kw - 1) // stride)
    ci, ki, kj = np.meshgrid(np.arange(c), np.arange(kh), np.arange(kw), indexing="ij")
    offsets = (((ci * stride + ki % stride) * stride + kj % stride) * hq * wq
               + (ki // stride) * wq + kj // stride).reshape(-1)
    columns = oh * wq
    size = max(c * stride * stride * hq * wq, int(offsets.max()) + -(-columns // nr) * nr)
    return ConvPlan(c, h, w, o, kh, kw, stride, (top, left, bottom, right), oh, ow, hq, wq,
                    offsets.astype(np.int32), size)


@functools.lru_cache(maxsize=None)
def _conv_generic(cfg: DenseConfig, stride: int):
    nr, group = cfg.nr, cfg.group
    span_group = _panels_macro(cfg, group, shifted=True, row_bias=True)
    span_one = _panels_macro(cfg, 1, shifted=True, row_bias=True)
    acc_shape, wv_shape = _kernel_scratch(cfg)
    s = stride

    @T.prim_func
    def kernel(x: T.handle, w: T.handle, of: T.handle, b: T.handle, y: T.handle, c: T.int64, h: T.int64,
               wd: T.int64, o: T.int64, k: T.int64, pt: T.int64, pl: T.int64, oh: T.int64, ow: T.int64,
               hq: T.int64, wq: T.int64, size: T.int64):
        T.func_attr({"tirx.noalias": True})
        batch = T.int64()
        X = T.match_buffer(x, (batch, c, h, wd), "float32")
        W = T.match_buffer(w, (o, k), "float32")
        offsets = T.match_buffer(of, (k,), "int32")
        bias = T.match_buffer(b, (o,), "float32")
        Y = T.match_buffer(y, (batch, o, oh, ow), "float32")
        planes = T.alloc_buffer((size,), "float32")
        wide = T.alloc_buffer((o, oh * wq), "float32")
        acc = T.alloc_buffer(acc_shape, "float32")
        wv = T.alloc_buffer(wv_shape, "float32")
        tmp = T.alloc_buffer((cfg.lanes,), "float32")
        for i in range(size):  # the padding (and the tail the last panel reads) stays zero
            planes[i] = T.float32(0)
        for bi in range(batch):
            for ci, ih, iw in T.grid(c, h, wd):
                planes[((ci * s + (ih + pt) % s) * s + (iw + pl) % s) * hq * wq + (ih + pt) // s * wq
                       + (iw + pl) // s] = X[bi, ci, ih, iw]
            for g in range((oh * wq + nr - 1) // nr // group):
                span_group(W, 0, planes, offsets, bias, wide, 0, acc, wv, tmp, k, oh * wq, o, g * group)
            for p in range((oh * wq + nr - 1) // nr // group * group, (oh * wq + nr - 1) // nr):
                span_one(W, 0, planes, offsets, bias, wide, 0, acc, wv, tmp, k, oh * wq, o, p)
            for oc, r, col in T.grid(o, oh, ow):
                Y[bi, oc, r, col] = wide[oc, r * wq + col]

    return kernel


def conv2d_primfunc(plan: ConvPlan, cfg: DenseConfig):
    """TIR ``(X[b, C, H, W], W[O, C*KH*KW], offsets[C*KH*KW] int32, bias[O], Y[b, O, OH, OW])``, b dynamic:
    the convolution of :class:`ConvPlan` ``plan`` as the product ``W @ taps``, the taps read straight from
    the phase planes (no im2col copy); rows are output channels, vectors run along output pixels."""
    return _specialize(_conv_generic(cfg, plan.stride), c=plan.c, h=plan.h, wd=plan.w, o=plan.o,
                       k=plan.c * plan.kh * plan.kw, pt=plan.pads[0], pl=plan.pads[1], oh=plan.oh, ow=plan.ow,
                       hq=plan.hq, wq=plan.wq, size=plan.size)
