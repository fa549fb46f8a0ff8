"""Standard ONNX ops at library speed without tuning: :func:`lower_standard_ops`.

TVM 0.27 legalizes the standard Relax ops into plain loops with no schedule on CPUs (``R.matmul``
at ~1 GMAC/s, scalar ``expf``/``erff`` calls in softmax and GELU). Before legalization this pass
rewrites, per target family (:data:`ISAS`, looked up like the frugal kernels' tables with
:func:`frugalrt.targets.kernels.pick_kernel`), the calls that frugal models contain into
``call_tir`` of the kernels in ``cpu_dense`` and ``cpu_norm``:

==============================================  ================================================
Relax (from ONNX)                               kernel
==============================================  ================================================
``matmul(x[..., K], W)``, W constant [K, N]     ``cpu_dense.dense_primfunc``: W packed in panels at
(also ``permute_dims(W^T)``: Gemm transB,       compile time; a following ``add`` of a constant
MultiheadAttention projections)                 [N] bias (Gemm C, Linear bias) is fused
``matmul(a[..., M, K], b[..., K, N])``          ``cpu_dense.batch_matmul_primfunc`` (b may be a
both computed (attention)                       ``permute_dims`` swapping its last two axes: read
                                                transposed, no copy)
``nn.conv2d`` NCHW, constant OIHW weight,       ``cpu_dense.conv2d_primfunc``: the same register
one stride, no groups/dilation (+ constant      blocks over output channels x output pixels, taps
bias add: ONNX Conv's B)                        read from phase planes of the padded image
``nn.softmax`` (last axis)                      ``cpu_norm.softmax_primfunc``
``nn.layer_norm`` (trailing axes)               ``cpu_norm.layer_norm_primfunc``
``nn.gelu``, ``nn.gelu_tanh``, ``erf``          ``cpu_norm.elementwise_primfunc``
==============================================  ================================================

float32 only, static reduction lengths (K, N, the normalized axis, C/H/W of an image), any leading
(batch) dims.
Everything else, and every target without an entry (32-bit ARM, microcontrollers, the C target,
CUDA), keeps TVM's default legalization.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.sym.analyzer import Analyzer

from frugalrt.targets.kernels import has_cpu_features, pick_kernel
from frugalrt.targets.kernels.cpu_dense import (CONFIGS, DenseConfig, batch_matmul_primfunc, conv2d_primfunc,
                                                conv_plan, dense_primfunc, pack_panels, padded_bias)
from frugalrt.targets.kernels.cpu_norm import elementwise_primfunc, layer_norm_primfunc, softmax_primfunc
from frugalrt.targets.tvm_bridge import constant_value

_OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps leaves the kernels alone


@dataclass(frozen=True)
class Isa:
    """The vector ISA the standard-op kernels are generated for."""

    name: str
    lanes: int  # float32 per vector (softmax, LayerNorm, GELU)
    dense: DenseConfig


def _x86(target) -> Isa | None:
    if has_cpu_features(target, "avx512f"):
        return Isa("avx512", 16, CONFIGS["avx512"])
    if has_cpu_features(target, "avx2", "fma"):
        return Isa("avx2", 8, CONFIGS["avx2"])
    return Isa("sse", 4, CONFIGS["sse"])  # x86-64 baseline: SSE2, no FMA


def _aarch64(target) -> Isa | None:
    return Isa("neon", 4, CONFIGS["neon"]) if has_cpu_features(target, "neon") else None


# target family -> the ISA of its kernels (None: TVM's default legalization), as in the frugal ops' tables
ISAS: dict[str, Callable] = {"x86": _x86, "aarch64": _aarch64, "generic": lambda target: None}


def target_isa(target) -> Isa | None:
    """The ISA :func:`lower_standard_ops` generates kernels for on ``target``; None: none (default lowering)."""
    return pick_kernel(ISAS, target)(target)


def lower_standard_ops(mod: tvm.IRModule, target) -> tvm.IRModule:
    """Rewrite the standard ops of ``mod``'s Relax functions into ``call_tir`` of this target family's
    kernels (a no-op where the family has none). Call it before ``tvm.compile`` (i.e. before LegalizeOps)."""
    isa = target_isa(target)
    if isa is None:
        return mod
    rewriter = _Rewriter(mod, isa)
    changed = []
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.uses = _use_counts(func)
            new = rewriter.visit_expr(func)
            if not new.same_as(func):
                changed.append(gv)
            rewriter.builder_.update_func(gv, new)
    out = rewriter.builder_.finalize()
    for gv in changed:  # drop what the kernels replaced (the matmul before a fused bias, permuted constants)
        out[gv] = relax.analysis.remove_all_unused(out[gv])
    return out


# --- helpers --------------------------------------------------------------------------------------
def _use_counts(func: relax.Function) -> dict:
    counts: dict = {}

    @relax.expr_functor.visitor
    class Counter(relax.PyExprVisitor):
        def visit_var_(self, var):
            counts[var] = counts.get(var, 0) + 1

        def visit_dataflow_var_(self, var):
            counts[var] = counts.get(var, 0) + 1

    Counter().visit_expr(func)
    return counts


def _tensor(expr, ndim_min: int = 1):
    """(shape values, dtype) of a Relax tensor with known shape and rank >= ``ndim_min``, else None."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    dims = list(ty.shape.values)
    return (dims, ty.dtype) if len(dims) >= ndim_min else None


def _static(dim) -> int | None:
    return int(dim.value) if isinstance(dim, tirx.IntImm) else None


def _product(dims):
    out = tirx.IntImm("int64", 1)
    for d in dims:
        out = out * d
    return Analyzer().simplify(out)


def _same(a: list, b: list) -> bool:
    """Whether two shapes (ints or TIR expressions) are the same."""
    def norm(d):
        return _static(d) if isinstance(d, tirx.IntImm) else d

    return len(a) == len(b) and all(
        x == y if isinstance(x, int) and isinstance(y, int) else tvm_ffi.structural_equal(x, y)
        for x, y in ((norm(x), norm(y)) for x, y in zip(a, b)))


def _axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


def _attr_axes(call) -> list[int]:
    return [int(a) for a in call.attrs.axes] if call.attrs.axes is not None else []


class _Reject(Exception):
    """This call keeps the default lowering."""


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, isa: Isa):
        super().__init__(mod)
        self.isa = isa
        self.uses: dict = {}
        self.dense_funcs: set = set()  # GlobalVars of the dense kernels added (bias fusion looks for them)
        self.conv_funcs: set = set()  # and of the convolutions (per-channel bias)
        self.handlers = {
            "relax.matmul": self._matmul, "relax.add": self._add, "relax.nn.conv2d": self._conv2d,
            "relax.nn.softmax": self._softmax,
            "relax.nn.layer_norm": self._layer_norm, "relax.nn.gelu": self._elementwise("gelu"),
            "relax.nn.gelu_tanh": self._elementwise("gelu_tanh"), "relax.erf": self._elementwise("erf"),
        }

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        handler = self.handlers.get(call.op.name) if isinstance(call.op, tvm.ir.Op) else None
        if handler is not None:
            try:
                return handler(call)
            except _Reject:
                pass
        return super().visit_call_(call)

    # -- plumbing --
    def _value(self, expr):
        """The (remapped) expression bound to ``expr`` if it is a bound variable, else ``expr``."""
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            if bound is not None:
                return bound
        return expr

    def _const(self, expr) -> np.ndarray | None:
        """numpy value of a constant, also through bindings of permute_dims / reshape / multiply of constants."""
        expr = self._value(self.visit_expr(expr)) if isinstance(expr, relax.Var) else expr
        value = constant_value(expr)
        if value is not None:
            return value
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            name = expr.op.name
            if name == "relax.permute_dims":
                value = self._const(expr.args[0])
                if value is None:
                    return None
                axes = _attr_axes(expr) or list(range(value.ndim))[::-1]
                return np.transpose(value, axes)
            if name == "relax.reshape" and _tensor(expr) and all(_static(d) is not None for d in _tensor(expr)[0]):
                value = self._const(expr.args[0])
                return None if value is None else value.reshape([_static(d) for d in _tensor(expr)[0]])
            if name == "relax.multiply":
                a, b = self._const(expr.args[0]), self._const(expr.args[1])
                return None if a is None or b is None else (a * b).astype(np.result_type(a, b))
        return None

    def _kernel(self, func: tirx.PrimFunc, name: str) -> tvm.ir.GlobalVar:
        return self.builder_.add_func(func.with_attr("op_pattern", _OPAQUE).without_attr("global_symbol"), name)

    def _emit(self, expr) -> relax.Var:
        return self.builder_.emit(expr)

    def _call(self, gv, args: list, shape: list) -> relax.Expr:
        return relax.call_tir(gv, args, relax.TensorType(shape, "float32"))

    def _reshape(self, expr, shape: list):
        """``expr`` (a bound value) reshaped to ``shape``: a new binding unless it has that shape already."""
        return expr if _same(_tensor(expr)[0], shape) else self._emit(relax.op.reshape(expr, shape))

    def _restore(self, out, out_shape: list, dims: list):
        """The kernel call ``out`` (of shape ``out_shape``), returned with shape ``dims``."""
        return out if _same(out_shape, dims) else relax.op.reshape(self._emit(out), dims)

    # -- matmul --
    def _matmul(self, call):
        a_info, b_info = _tensor(call.args[0]), _tensor(call.args[1])
        if a_info is None or b_info is None or call.ty.dtype != "float32" or a_info[1] != "float32" \
                or b_info[1] != "float32":
            raise _Reject
        weight = self._const(call.args[1])
        if weight is not None and weight.ndim == 2:
            return self._dense(call, self.visit_expr(call.args[0]), weight.astype(np.float32), None)
        if self._const(call.args[0]) is not None:
            raise _Reject  # constant A, computed B: rare, default lowering
        return self._batch_matmul(call)

    def _dense(self, call, x, weight: np.ndarray, bias: np.ndarray | None) -> relax.Expr:
        dims, _ = _tensor(x)
        k, n = weight.shape
        if _static(dims[-1]) != k:
            raise _Reject
        cfg = self._dense_config(n)
        gv = self._kernel(dense_primfunc(k, n, cfg), "frugalrt_dense_cpu")
        self.dense_funcs.add(gv)
        rows = _product(dims[:-1])
        x2 = self._reshape(x, [rows, k])
        out = self._call(gv, [x2, relax.const(pack_panels(weight, cfg.nr)), relax.const(padded_bias(bias, n, cfg.nr))],
                         [rows, n])
        return self._restore(out, [rows, n], [*dims[:-1], n])

    def _dense_config(self, n: int) -> DenseConfig:
        """The family's configuration, with panels no wider than N needs (e.g. a 10-class head)."""
        cfg = self.isa.dense
        nv = max(1, min(cfg.nv, -(-n // cfg.lanes)))
        return cfg if nv == cfg.nv else DenseConfig(cfg.lanes, cfg.mr, nv, cfg.group, cfg.kc, cfg.accumulators)

    def _add(self, call):
        """``add(dense(x), bias)`` with a constant bias over N, or ``add(conv(x), bias)`` with a constant bias
        per output channel ([1, O, 1, 1], as ONNX Conv's B is imported): fold the bias into the kernel."""
        for mm, c in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
            if not isinstance(mm, relax.Var) or self.uses.get(mm, 0) != 1:
                continue
            bias = self._const(c)
            if bias is None or bias.dtype != np.float32:
                continue
            found = self._kernel_call(self.visit_expr(mm))
            if found is None:
                continue
            ct, reshape_to, conv = found
            gv, args = ct.args[0], list(ct.args[1].fields)
            out_shape = _tensor(ct)[0]
            n = _static(out_shape[1])
            if conv:  # one value per output channel, broadcast over the pixels: [O], [O, 1, 1] or [1, O, 1, 1]
                if bias.size != n or bias.ndim > 4 or (bias.ndim >= 3 and bias.shape[-3] != n) \
                        or (bias.ndim < 3 and bias.size > 1):
                    continue
            elif bias.size != n or bias.shape[-1] != n or bias.ndim > len(_tensor(mm)[0]):
                continue  # a bias over N only: the sum keeps the matmul's shape
            new_bias = constant_value(args[-1]).copy()
            new_bias[:n] += bias.reshape(-1)
            out = self._call(gv, [*args[:-1], relax.const(new_bias)], out_shape)
            return out if reshape_to is None else relax.op.reshape(self._emit(out), reshape_to)
        raise _Reject

    def _kernel_call(self, var):
        """(call_tir, shape it is reshaped to or None, whether a convolution) if ``var`` is bound to the
        result of a dense or convolution kernel added here (their bias is their last argument)."""
        value = self._value(var)
        reshape_to = None
        if isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.reshape")):
            reshape_to = _tensor(value)[0] if _tensor(value) else None
            value = self._value(value.args[0])
            if reshape_to is None:
                return None
        if isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.call_tir")):
            if any(value.args[0].same_as(gv) for gv in self.dense_funcs):
                return value, reshape_to, False
            if reshape_to is None and any(value.args[0].same_as(gv) for gv in self.conv_funcs):
                return value, None, True
        return None

    # -- convolution --
    def _conv2d(self, call):
        attrs = call.attrs
        if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or str(attrs.out_layout) not in ("NCHW", "") \
                or int(attrs.groups) != 1 or any(int(d) != 1 for d in attrs.dilation) \
                or len({int(v) for v in attrs.strides}) != 1 or call.ty.dtype != "float32":
            raise _Reject
        x = self.visit_expr(call.args[0])
        weight = self._const(call.args[1])
        info = _tensor(x)
        if weight is None or weight.ndim != 4 or info is None or info[1] != "float32" or len(info[0]) != 4:
            raise _Reject
        batch, c, h, w = info[0]
        c, h, w = _static(c), _static(h), _static(w)
        o, wc, kh, kw = weight.shape
        if None in (c, h, w) or wc != c:
            raise _Reject
        cfg = self.isa.dense
        plan = conv_plan(c, h, w, o, kh, kw, int(attrs.strides[0]), [int(p) for p in attrs.padding], cfg.nr)
        if plan.oh < 1 or plan.ow < 1:
            raise _Reject
        gv = self._kernel(conv2d_primfunc(plan, cfg), "frugalrt_conv2d_cpu")
        self.conv_funcs.add(gv)
        return self._call(gv, [x, relax.const(np.ascontiguousarray(weight.reshape(o, -1), np.float32)),
                               relax.const(plan.offsets), relax.const(np.zeros(o, np.float32))],
                          [batch, o, plan.oh, plan.ow])

    def _batch_matmul(self, call):
        a, b = self.visit_expr(call.args[0]), self.visit_expr(call.args[1])
        if _tensor(a, 2) is None or _tensor(b, 2) is None:
            raise _Reject  # a vector operand: default lowering
        (adims, _), (bdims, _) = _tensor(a, 2), _tensor(b, 2)
        transpose_b = False
        bv = self._value(b)
        if isinstance(bv, relax.Call) and bv.op.same_as(tvm.ir.Op.get("relax.permute_dims")) \
                and _tensor(bv.args[0], 2) is not None:
            nd = len(bdims)
            axes = _attr_axes(bv) or list(range(nd))[::-1]
            if axes == list(range(nd - 2)) + [nd - 1, nd - 2]:
                b, transpose_b = bv.args[0], True
        k, n = _static(adims[-1]), _static(bdims[-1] if not transpose_b else _tensor(b)[0][-2])
        if k is None or n is None or _static(bdims[-2] if not transpose_b else _tensor(b)[0][-1]) != k:
            raise _Reject
        if len(bdims) == 2:  # a[..., K] @ b[K, N]: every row of a against one matrix
            batch, m = [], _product(adims[:-1])
        elif len(adims) == len(bdims) and all(tvm_ffi.structural_equal(x, y) for x, y in zip(adims[:-2], bdims[:-2])):
            batch, m = adims[:-2], adims[-2]
        else:
            raise _Reject  # broadcasting batch dims: default lowering
        nb = _product(batch)
        gv = self._kernel(batch_matmul_primfunc(k, n, self._dense_config(n), transpose_b),
                          "frugalrt_batch_matmul_cpu")
        b_shape = [nb, n, k] if transpose_b else [nb, k, n]
        out = self._call(gv, [self._reshape(a, [nb, m, k]), self._reshape(b, b_shape)], [nb, m, n])
        return self._restore(out, [nb, m, n], [*batch, m, n] if batch else [*adims[:-1], n])

    # -- softmax, LayerNorm, element-wise --
    def _row_lanes(self, n: int) -> int:
        """Vector width for rows of ``n``: the ISA's, halved (down to 4) while a row holds no whole vector
        (e.g. 8 lanes for 12 attention scores on AVX-512)."""
        lanes = self.isa.lanes
        while lanes > 4 and lanes > n:
            lanes //= 2
        return lanes

    def _rows(self, call, x, n_axes: int):
        """(x as [rows, n], n, dims): the last ``n_axes`` axes flattened into a static n."""
        info = _tensor(x)
        if info is None or info[1] != "float32":
            raise _Reject
        dims = info[0]
        tail = [_static(d) for d in dims[len(dims) - n_axes:]]
        if len(dims) < n_axes or any(d is None for d in tail):
            raise _Reject
        n = int(np.prod(tail))
        rows = _product(dims[: len(dims) - n_axes])
        return self._reshape(x, [rows, n]), n, dims

    def _softmax(self, call):
        x = self.visit_expr(call.args[0])
        if _tensor(x) is None or _axis(int(call.attrs.axis), len(_tensor(x)[0])) != len(_tensor(x)[0]) - 1:
            raise _Reject
        x2, n, dims = self._rows(call, x, 1)
        gv = self._kernel(softmax_primfunc(n, self._row_lanes(n)), "frugalrt_softmax_cpu")
        return self._restore(self._call(gv, [x2], _tensor(x2)[0]), _tensor(x2)[0], dims)

    def _layer_norm(self, call):
        x = self.visit_expr(call.args[0])
        if _tensor(x) is None:
            raise _Reject
        nd = len(_tensor(x)[0])
        axes = sorted(_axis(a, nd) for a in _attr_axes(call))
        if not axes or axes != list(range(nd - len(axes), nd)):
            raise _Reject
        x2, n, dims = self._rows(call, x, len(axes))
        params = []
        for arg, use, default in ((call.args[1], call.attrs.scale, 1.0), (call.args[2], call.attrs.center, 0.0)):
            info = _tensor(arg)
            if not use:
                params.append(relax.const(np.full(n, default, np.float32)))
            elif info is None or info[1] != "float32" or [_static(d) for d in info[0]] != [
                    _static(d) for d in dims[nd - len(axes):]]:
                raise _Reject
            else:
                params.append(self._reshape(self.visit_expr(arg), [n]))
        gv = self._kernel(layer_norm_primfunc(n, self._row_lanes(n), float(call.attrs.epsilon)),
                          "frugalrt_layer_norm_cpu")
        return self._restore(self._call(gv, [x2, *params], _tensor(x2)[0]), _tensor(x2)[0], dims)

    def _elementwise(self, kind: str):
        def handler(call):
            x = self.visit_expr(call.args[0])
            info = _tensor(x)
            if info is None or info[1] != "float32" or call.ty.dtype != "float32":
                raise _Reject
            size = _product(info[0])
            gv = self._kernel(elementwise_primfunc(kind, self.isa.lanes), f"frugalrt_{kind}_cpu")
            return self._restore(self._call(gv, [self._reshape(x, [size])], [size]), [size], info[0])

        return handler
