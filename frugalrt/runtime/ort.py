"""Run ``ai.frugalrt`` models in ONNX Runtime, each custom op backed by its numpy reference kernel.

onnxruntime-extensions Python ops have a fixed input count and only int/float/string attributes,
so the session runs a rewritten copy of the model: a node without the optional bias becomes the
``<Op>NoBias`` variant, and int-list attributes (BinaryConv's ``kernel_shape``, ``strides``,
``pads``, schema defaults filled in) become JSON strings. These ops serve validation, not speed.
"""
from __future__ import annotations

import json
import os
from typing import Sequence, Union

import numpy as np
import onnx
import onnxruntime as ort
from onnx import defs, helper
from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

from frugalrt.export import schemas
from frugalrt.runtime.reference import DOMAIN, get_reference

ModelOrPath = Union[onnx.ModelProto, str, os.PathLike]
_F, _U8, _I, _S = PyCustomOpDef.dt_float, PyCustomOpDef.dt_uint8, PyCustomOpDef.dt_int64, PyCustomOpDef.dt_string
# op type -> (input types without the bias, attribute types)
_SIGNATURES = {
    "Butterfly": ([_F, _F], {"out_features": _I}),
    "BinaryGemm": ([_F, _U8, _F], {"in_features": _I}),
    "BinaryConv": ([_F, _U8, _F], {"in_channels": _I, "kernel_shape": _S, "strides": _S, "pads": _S}),
}
NO_BIAS = "NoBias"


def _declare(op_type: str, with_bias: bool) -> None:
    inputs, attrs = _SIGNATURES[op_type]
    kernel = get_reference(op_type)

    def body(*arrays, **attributes):
        kwargs = {k: json.loads(v) if attrs[k] == _S else v for k, v in attributes.items()}
        return kernel(*arrays, *(() if with_bias else (None,)), **kwargs)

    onnx_op(op_type=f"{DOMAIN}::{op_type}{'' if with_bias else NO_BIAS}",
            inputs=inputs + ([_F] if with_bias else []), outputs=[_F], attrs=attrs)(body)


for _op in _SIGNATURES:
    for _with_bias in (True, False):
        _declare(_op, _with_bias)


def session_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` rewritten for the Python custom ops (see the module docstring)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        if node.op_type not in _SIGNATURES:
            raise onnx.checker.ValidationError(f"ONNX Runtime check: no custom op for {DOMAIN}::{node.op_type}")
        inputs, attr_types = _SIGNATURES[node.op_type]
        if len(node.input) <= len(inputs) or not node.input[len(inputs)]:
            del node.input[len(inputs):]
            node.op_type += NO_BIAS
        schema = defs.get_schema(node.op_type.removesuffix(NO_BIAS), schemas.VERSION, DOMAIN)
        given = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        del node.attribute[:]
        for name, kind in attr_types.items():
            value = given.get(name, helper.get_attribute_value(schema.attributes[name].default_value))
            node.attribute.append(helper.make_attribute(name, json.dumps(list(value)) if kind == _S else value))
    return model


def make_session(model_or_path: ModelOrPath) -> ort.InferenceSession:
    """An ONNX Runtime CPU session that runs standard ops natively and ``ai.frugalrt`` ops through
    the numpy reference kernels."""
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(os.fspath(model_or_path))
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    options.log_severity_level = 3
    return ort.InferenceSession(session_model(model).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def run(model_or_path: ModelOrPath | ort.InferenceSession, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Outputs of the model on ``inputs`` (graph inputs in order)."""
    session = model_or_path if isinstance(model_or_path, ort.InferenceSession) else make_session(model_or_path)
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: np.asarray(x, dtype=np.float32) for n, x in zip(names, inputs)})

