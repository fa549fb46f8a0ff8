"""The one place that touches TVM's Relax ONNX frontend internals.

TVM 0.27's frontend looks converters up by ``op_type`` only (domains are ignored) and has no hook
for custom ops. :func:`from_onnx` runs it with extra converters, keyed by op_type names that the
importer makes unique (so a custom op can never shadow a standard one), by wrapping
``onnx_frontend._get_convert_map`` for the duration of one import.
"""
from __future__ import annotations

import threading
import warnings
from typing import Any, Callable

import numpy as np
import onnx
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend

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
    with _LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnx.checker complains about the renamed custom op types
        onnx_frontend._get_convert_map = lambda: {**original(), **extra}
        try:
            return onnx_frontend.from_onnx(model)
        finally:
            onnx_frontend._get_convert_map = original


def constant_value(expr: Any) -> np.ndarray | None:
    """The numpy value of a Relax constant (an ONNX initializer), else None."""
    if isinstance(expr, tvm.ir.GenericConst) and hasattr(expr.value, "numpy"):
        return expr.value.numpy()
    return None
