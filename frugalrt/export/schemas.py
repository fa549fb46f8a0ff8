"""ONNX schemas (with type and shape inference) of the ``ai.frugalrt`` ops, per ``docs/ops.md``.

Importing this module registers them once per process, so that the exporter, ``onnx.checker``
(full check) and ``onnx.shape_inference`` all know the ops. Their shape inference enforces each
op's rules through the one spec check, :mod:`frugalrt.export.spec_check` (on shapes; export,
compile and ONNX Runtime also run it on the model's constant values).
"""
from __future__ import annotations

import re
from typing import Callable

import onnx
from onnx import TensorProto, defs, helper

from frugalrt.export import spec_check
from frugalrt.runtime.reference import DOMAIN, conv_output_size

VERSION = 1
OpSchema = defs.OpSchema
_F = OpSchema.FormalParameterOption


def _dims(type_proto: onnx.TypeProto) -> list | None:
    """Dims of a tensor type as ints (known) or strings/None (symbolic); None if rank unknown."""
    if type_proto is None or not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    out = []
    for d in type_proto.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return out


def _set_output(ctx, dims: list | None, elem_type: int = TensorProto.FLOAT) -> None:
    ctx.set_output_type(0, helper.make_tensor_type_proto(elem_type, dims))


def _known(d) -> bool:
    return isinstance(d, int) and d > 0


def _node_name(ctx) -> str | None:
    """The node's name from onnx's display name ``node BinaryGemm[ai.frugalrt] (NAME)``."""
    match = re.search(r"\((.*)\)$", ctx.get_display_name())
    return match.group(1) if match and match.group(1) else None


def _inference(op_type: str, output_dims: Callable[[dict, dict], list]):
    """Shape inference of ``op_type``: the spec check (``spec_check.check_node`` on shapes), then
    Y's dims from ``output_dims(attributes, dims by input name)``."""

    def infer(ctx) -> None:
        schema = SCHEMAS[op_type][0]
        given = {}
        for name in schema.attributes:
            attr = ctx.get_attribute(name)
            if attr is not None:
                given[name] = helper.get_attribute_value(attr)
        attrs = spec_check.attributes(op_type, given)
        dims = {p.name: _dims(ctx.get_input_type(i))
                for i, p in enumerate(schema.inputs) if i < ctx.get_num_inputs() and ctx.has_input(i)}
        elem = _output_type(attrs)
        if spec_check.is_lenient():
            try:
                _set_output(ctx, output_dims(attrs, dims), elem)
            except Exception:  # noqa: BLE001  (a node that check_model is about to report: Y stays unknown)
                _set_output(ctx, None, elem)
            return
        x_type = ctx.get_input_type(0)
        dtypes = {"X": _DTYPES.get(x_type.tensor_type.elem_type)} if x_type is not None else {}
        spec_check.check_node(op_type, attrs, dims, node=_node_name(ctx),
                              error=onnx.shape_inference.InferenceError, dtypes=dtypes)
        _set_output(ctx, output_dims(attrs, dims), elem)

    return infer


def _batch(dims: dict):
    x = dims.get("X")
    return x[0] if x else None


def _rows(dims: dict):
    w = dims.get("W_packed")
    return w[0] if w else None


def _butterfly_dims(attrs: dict, dims: dict) -> list:
    return [_batch(dims), int(attrs["out_features"])]


def _packed_width(n):
    """ceil(n / 8): the bytes of n packed signs (unknown stays unknown)."""
    return (n + 7) // 8 if _known(n) else None


def _binary_gemm_dims(attrs: dict, dims: dict) -> list:
    n = _rows(dims)
    return [_batch(dims), _packed_width(n) if attrs.get("output_packed") else n]


def _binary_conv_dims(attrs: dict, dims: dict) -> list:
    x = dims.get("X")
    (kh, kw), (sh, sw), (pt, pl, pb, pr) = attrs["kernel_shape"], attrs["strides"], attrs["pads"]
    h, w = (1, 2) if attrs.get("input_packed") else (2, 3)  # packed X is [batch, H, W, ceil(C/8)]
    oh = conv_output_size(x[h], kh, sh, pt, pb) if x and _known(x[h]) else None
    ow = conv_output_size(x[w], kw, sw, pl, pr) if x and _known(x[w]) else None
    o = _rows(dims)
    return [_batch(dims), oh, ow, _packed_width(o)] if attrs.get("output_packed") else [_batch(dims), o, oh, ow]


def _output_type(attrs: dict) -> int:
    return TensorProto.UINT8 if attrs.get("output_packed") else TensorProto.FLOAT


def _float(name: str, doc: str, optional: bool = False, type_str: str = "T") -> OpSchema.FormalParameter:
    return OpSchema.FormalParameter(name, type_str, doc, param_option=_F.Optional if optional else _F.Single)


_PACKED = OpSchema.FormalParameter("W_packed", "tensor(uint8)",
                                   "sign bits, 1 = negative, little-endian bit order along K")
_T = [("T", ["tensor(float)"], "float32 activations and parameters")]
_DTYPES = {TensorProto.FLOAT: "float32", TensorProto.UINT8: "uint8"}  # elem type -> dtype the spec check names
# BinaryGemm/BinaryConv: X and Y are float32, or bit-packed signs (attributes input_packed,
# output_packed; docs/ops.md, "Packed activations"); the spec check ties each to its attribute
_T_BINARY = _T + [("T1", ["tensor(float)", "tensor(uint8)"], "X: float32, or uint8 packed signs (input_packed)"),
                  ("T2", ["tensor(float)", "tensor(uint8)"], "Y: float32, or uint8 packed signs (output_packed)")]
_Attr = OpSchema.Attribute
_AT = OpSchema.AttrType

# every op's fused activation (docs/ops.md, "Fused activation"), set by the compile-time rewrite;
# no defaults, so that exported files carry none of them (absent = reference.ACTIVATION_DEFAULTS)
_ACTIVATION = [_Attr("activation", _AT.STRING, "fused activation of Y: 'relu' or 'clip' (absent: none)",
                     required=False),
               _Attr("activation_min", _AT.FLOAT, "clip's lower bound (absent: -inf)", required=False),
               _Attr("activation_max", _AT.FLOAT, "clip's upper bound (absent: inf)", required=False)]
# the binary ops' packed activations (docs/ops.md), set by the compile-time rewrite; absent = 0
_PACKING = [_Attr("input_packed", _AT.INT, "1: X holds packed sign bits (uint8), absent/0: float32",
                  required=False),
            _Attr("output_packed", _AT.INT, "1: Y holds the packed sign bits of the result (uint8), absent/0: "
                  "float32", required=False)]

SCHEMAS: dict[str, tuple[OpSchema, Callable]] = {
    "Butterfly": (OpSchema(
        "Butterfly", DOMAIN, VERSION,
        "Y = truncate(B_{L-1}...B_0 pad(X)) + B: log2 N butterfly stages of 2x2 blocks (docs/ops.md).",
        inputs=[_float("X", "[batch, in_features]"), _float("twiddles", "[L, N/2, 2, 2]"),
                _float("B", "[out_features] bias", optional=True)],
        outputs=[_float("Y", "[batch, out_features]")],
        type_constraints=_T,
        attributes=[_Attr("out_features", _AT.INT, "output width (<= N)", required=True), *_ACTIVATION],
    ), _inference("Butterfly", _butterfly_dims)),
    "BinaryGemm": (OpSchema(
        "BinaryGemm", DOMAIN, VERSION,
        "Y = scale * (sign(X) . sign(W)^T) + B with bit-packed W: XNOR-popcount GEMM (docs/ops.md).",
        inputs=[_float("X", "[batch, K] (packed: [batch, ceil(K/8)])", type_str="T1"), _PACKED,
                _float("scale", "[N]"), _float("B", "[N] bias", optional=True)],
        outputs=[_float("Y", "[batch, N] (packed: [batch, ceil(N/8)])", type_str="T2")],
        type_constraints=_T_BINARY,
        attributes=[_Attr("in_features", _AT.INT, "K, the unpacked reduction length", required=True), *_ACTIVATION,
                    *_PACKING],
    ), _inference("BinaryGemm", _binary_gemm_dims)),
    "BinaryConv": (OpSchema(
        "BinaryConv", DOMAIN, VERSION,
        "NCHW convolution of sign(X) (padded taps contribute 0, or read +1 with pad_value = 1) with "
        "bit-packed sign(W), times a per-channel scale, plus B (docs/ops.md).",
        inputs=[_float("X", "[batch, C, H, W] (packed: [batch, H, W, ceil(C/8)])", type_str="T1"), _PACKED,
                _float("scale", "[O]"), _float("B", "[O] bias", optional=True)],
        outputs=[_float("Y", "[batch, O, OH, OW] (packed: [batch, OH, OW, ceil(O/8)])", type_str="T2")],
        type_constraints=_T_BINARY,
        attributes=[_Attr("in_channels", _AT.INT, "C", required=True),
                    _Attr("kernel_shape", _AT.INTS, "[kh, kw]", required=True),
                    _Attr("strides", helper.make_attribute("strides", [1, 1]), "[sh, sw]"),
                    _Attr("pads", helper.make_attribute("pads", [0, 0, 0, 0]), "[top, left, bottom, right]"),
                    # no schema default (absent = 0), so that files without one-padding carry none
                    _Attr("pad_value", _AT.INT, "what a padded tap reads: absent/0: 0 (contributes 0), "
                          "1: +1 (Larq's one-padding)", required=False),
                    *_ACTIVATION, *_PACKING],
    ), _inference("BinaryConv", _binary_conv_dims)),
}


def register() -> None:
    """Register every ``ai.frugalrt`` schema (idempotent)."""
    for name, (schema, infer) in SCHEMAS.items():
        if defs.has(name, VERSION, DOMAIN):
            continue
        schema.set_type_and_shape_inference_function(infer)
        defs.register_schema(schema)


register()
