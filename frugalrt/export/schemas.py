"""ONNX schemas (with type and shape inference) of the ``ai.frugalrt`` ops, per ``docs/ops.md``.

Importing this module registers them once per process, so that the exporter, ``onnx.checker``
(full check) and ``onnx.shape_inference`` all know the ops.
"""
from __future__ import annotations

from typing import Callable

import onnx
from onnx import TensorProto, defs, helper

from frugalrt.runtime.reference import DOMAIN, conv_output_size

VERSION = 1
OpSchema = defs.OpSchema
_F = OpSchema.FormalParameterOption


def _dims(type_proto: onnx.TypeProto) -> list | None:
    """Dims of a tensor type as ints (known) or strings/None (symbolic); None if rank unknown."""
    if not type_proto.tensor_type.HasField("shape"):
        return None
    out = []
    for d in type_proto.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return out


def _set_output(ctx, dims: list, elem_type: int = TensorProto.FLOAT) -> None:
    shape = [d if d is not None else None for d in dims]
    ctx.set_output_type(0, helper.make_tensor_type_proto(elem_type, shape))


def _attr_i(ctx, name: str, default=None):
    a = ctx.get_attribute(name)
    return default if a is None else helper.get_attribute_value(a)


def _known(d) -> bool:
    return isinstance(d, int) and d > 0


def _infer_butterfly(ctx) -> None:
    x, tw = _dims(ctx.get_input_type(0)), _dims(ctx.get_input_type(1))
    out = int(_attr_i(ctx, "out_features"))
    if x is not None and len(x) != 2:
        raise onnx.shape_inference.InferenceError(f"Butterfly: X must have rank 2, got rank {len(x)}")
    if tw is not None:
        if len(tw) != 4 or tw[2:] != [2, 2]:
            raise onnx.shape_inference.InferenceError(f"Butterfly: twiddles must be [L, N/2, 2, 2], got {tw}")
        if _known(tw[1]) and out > 2 * tw[1]:
            raise onnx.shape_inference.InferenceError(f"Butterfly: out_features={out} > N={2 * tw[1]}")
        if _known(tw[0]) and _known(tw[1]) and 2 * tw[1] != 1 << tw[0]:
            raise onnx.shape_inference.InferenceError(f"Butterfly: twiddles {tw}: N/2 must be 2^(L-1)")
    _set_output(ctx, [x[0] if x else None, out])


def _infer_binary_gemm(ctx) -> None:
    x, w = _dims(ctx.get_input_type(0)), _dims(ctx.get_input_type(1))
    k = int(_attr_i(ctx, "in_features"))
    if x is not None and (len(x) != 2 or (_known(x[1]) and x[1] != k)):
        raise onnx.shape_inference.InferenceError(f"BinaryGemm: X must be [batch, {k}], got {x}")
    if w is not None and (len(w) != 2 or (_known(w[1]) and w[1] != (k + 7) // 8)):
        raise onnx.shape_inference.InferenceError(
            f"BinaryGemm: packed weights must be [N, {(k + 7) // 8}], got {w}")
    _set_output(ctx, [x[0] if x else None, w[0] if w else None])


def _infer_binary_conv(ctx) -> None:
    x, w = _dims(ctx.get_input_type(0)), _dims(ctx.get_input_type(1))
    c = int(_attr_i(ctx, "in_channels"))
    kh, kw = _attr_i(ctx, "kernel_shape")
    sh, sw = _attr_i(ctx, "strides", [1, 1])
    pt, pl, pb, pr = _attr_i(ctx, "pads", [0, 0, 0, 0])
    if x is not None and (len(x) != 4 or (_known(x[1]) and x[1] != c)):
        raise onnx.shape_inference.InferenceError(f"BinaryConv: X must be [batch, {c}, H, W], got {x}")
    if w is not None and (len(w) != 2 or (_known(w[1]) and w[1] != (c * kh * kw + 7) // 8)):
        raise onnx.shape_inference.InferenceError(
            f"BinaryConv: packed weights must be [O, {(c * kh * kw + 7) // 8}], got {w}")
    oh = conv_output_size(x[2], kh, sh, pt, pb) if x and _known(x[2]) else None
    ow = conv_output_size(x[3], kw, sw, pl, pr) if x and _known(x[3]) else None
    _set_output(ctx, [x[0] if x else None, w[0] if w else None, oh, ow])


def _float(name: str, doc: str, optional: bool = False) -> OpSchema.FormalParameter:
    return OpSchema.FormalParameter(name, "T", doc, param_option=_F.Optional if optional else _F.Single)


_PACKED = OpSchema.FormalParameter("W_packed", "tensor(uint8)",
                                   "sign bits, 1 = negative, little-endian bit order along K")
_T = [("T", ["tensor(float)"], "float32 activations and parameters")]
_Attr = OpSchema.Attribute
_AT = OpSchema.AttrType

SCHEMAS: dict[str, tuple[OpSchema, Callable]] = {
    "Butterfly": (OpSchema(
        "Butterfly", DOMAIN, VERSION,
        "Y = truncate(B_{L-1}...B_0 pad(X)) + B: log2 N butterfly stages of 2x2 blocks (docs/ops.md).",
        inputs=[_float("X", "[batch, in_features]"), _float("twiddles", "[L, N/2, 2, 2]"),
                _float("B", "[out_features] bias", optional=True)],
        outputs=[_float("Y", "[batch, out_features]")],
        type_constraints=_T,
        attributes=[_Attr("out_features", _AT.INT, "output width (<= N)", required=True)],
    ), _infer_butterfly),
    "BinaryGemm": (OpSchema(
        "BinaryGemm", DOMAIN, VERSION,
        "Y = scale * (sign(X) . sign(W)^T) + B with bit-packed W: XNOR-popcount GEMM (docs/ops.md).",
        inputs=[_float("X", "[batch, K]"), _PACKED, _float("scale", "[N]"),
                _float("B", "[N] bias", optional=True)],
        outputs=[_float("Y", "[batch, N]")],
        type_constraints=_T,
        attributes=[_Attr("in_features", _AT.INT, "K, the unpacked reduction length", required=True)],
    ), _infer_binary_gemm),
    "BinaryConv": (OpSchema(
        "BinaryConv", DOMAIN, VERSION,
        "NCHW convolution of sign(X) (zero padding contributes 0) with bit-packed sign(W), "
        "times a per-channel scale, plus B (docs/ops.md).",
        inputs=[_float("X", "[batch, C, H, W]"), _PACKED, _float("scale", "[O]"),
                _float("B", "[O] bias", optional=True)],
        outputs=[_float("Y", "[batch, O, OH, OW]")],
        type_constraints=_T,
        attributes=[_Attr("in_channels", _AT.INT, "C", required=True),
                    _Attr("kernel_shape", _AT.INTS, "[kh, kw]", required=True),
                    _Attr("strides", helper.make_attribute("strides", [1, 1]), "[sh, sw]"),
                    _Attr("pads", helper.make_attribute("pads", [0, 0, 0, 0]), "[top, left, bottom, right]")],
    ), _infer_binary_conv),
}


def register() -> None:
    """Register every ``ai.frugalrt`` schema (idempotent)."""
    for name, (schema, infer) in SCHEMAS.items():
        if defs.has(name, VERSION, DOMAIN):
            continue
        schema.set_type_and_shape_inference_function(infer)
        defs.register_schema(schema)


register()
