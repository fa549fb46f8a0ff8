"""The one place that touches TVM's Relax ONNX frontend internals.

TVM 0.27's frontend looks converters up by ``op_type`` only (domains are ignored) and has no hook
for custom ops. :func:`from_onnx` runs it with extra converters, keyed by op_type names that the
importer makes unique (so a custom op can never shadow a standard one), by wrapping
``onnx_frontend._get_convert_map`` for the duration of one import. When a converter raises, the
frontend's BlockBuilder is left with an open block (TVM then prints "BlockBuilder destroyed with
remaining blocks!" when it is freed): :func:`from_onnx` closes it before the error propagates.
"""
from __future__ import annotations

import contextlib
import io
import sys
import threading
import warnings
from typing import Any, Callable

import numpy as np
import onnx
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend

from frugalrt.errors import FrugalError

# (bb, inputs, attrs) -> relax.Expr
Converter = Callable[[relax.BlockBuilder, list, dict[str, Any]], relax.Expr]

_LOCK = threading.Lock()


def standard_op_types() -> set[str]:
    """ONNX op types the Relax frontend can convert (besides ``Constant`` and ``If``)."""
    return set(onnx_frontend._get_convert_map()) | {"Constant", "If"}


def _converter_class(op_type: str, fn: Converter) -> type:
    def convert(bb, inputs, attr, params):
        attrs = {k: v for k, v in attr.items() if k != "tvm_custom"}
        return fn(bb, list(inputs), attrs)

    # The frontend picks an ``_impl_vN`` by the *default-domain* opset; our versions are resolved
    # by the importer already, so every opset gets the one converter.
    return type(f"FrugalConverter_{op_type}", (onnx_frontend.OnnxOpConverter,),
                {"get_converter": classmethod(lambda cls, opset: convert)})


def from_onnx(model: onnx.ModelProto, converters: dict[str, Converter]) -> tvm.IRModule:
    """``relax.frontend.onnx.from_onnx(model)`` with ``converters`` added to the op map."""
    original = onnx_frontend._get_convert_map
    extra = {op: _converter_class(op, fn) for op, fn in converters.items()}
    builders: list[relax.BlockBuilder] = []

    def convert_map():  # called per node, inside the frontend's ``bb.function(...)``
        bb = relax.BlockBuilder.current()
        if bb is not None and not any(b.same_as(bb) for b in builders):
            builders.append(bb)
        return {**original(), **extra}

    printed = io.StringIO()
    with _LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnx.checker complains about the renamed custom op types
        onnx_frontend._get_convert_map = convert_map
        try:
            with contextlib.redirect_stdout(printed):
                return onnx_frontend.from_onnx(model)
        except BaseException as e:
            for bb in builders:
                _close_open_block(bb)
            if isinstance(e, FrugalError):  # our own one-line error: drop the frontend's echo of it
                printed = io.StringIO("".join(line for line in printed.getvalue().splitlines(True)
                                              if not line.startswith("Error converting operator")))
            raise
        finally:
            onnx_frontend._get_convert_map = original
            sys.stdout.write(printed.getvalue())


def _close_open_block(bb: relax.BlockBuilder) -> None:
    """After an exception left ``bb.function(...)``: its scopes have begun a binding block and a
    variable scope that nothing ends; end them so that freeing ``bb`` prints no warning."""
    try:
        bb._end_block()
        bb.end_scope()
    except Exception:  # noqa: BLE001  (nothing open: nothing to close)
        pass


def static_dims(expr: Any) -> list | None:
    """Dims of a Relax tensor: ints where static, None where symbolic; None if the shape is unknown."""
    try:
        values = expr.ty.shape.values
    except AttributeError:
        return None
    return [v.value if isinstance(v, tvm.tirx.IntImm) else None for v in values]


def check_spec(op_type: str, inputs: list, consts: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """The spec check (:func:`frugalrt.export.spec_check.check_node`) of a node a lowering is about
    to emit: the importer ran it on the whole model already; a lowering called directly gets it here."""
    from frugalrt.errors import UnsupportedOpError
    from frugalrt.export import spec_check

    spec_check.check_node(op_type, spec_check.attributes(op_type, attrs), {"X": static_dims(inputs[0]), **consts},
                          error=UnsupportedOpError)


def constant_value(expr: Any) -> np.ndarray | None:
    """The numpy value of a Relax constant (an ONNX initializer), else None."""
    if isinstance(expr, tvm.ir.GenericConst) and hasattr(expr.value, "numpy"):
        return expr.value.numpy()
    return None
