"""Run ``ai.frugalrt`` models in ONNX Runtime, each custom op backed by its numpy reference kernel.

onnxruntime-extensions Python ops have a fixed input count and only int/float/string attributes,
so the session runs a rewritten copy of the model: a node without the optional bias becomes the
``<Op>NoBias`` variant, a binary op with packed activations (uint8 X or Y: ``input_packed``,
``output_packed``) the ``<Op>PackedIn`` / ``PackedOut`` / ``PackedInPackedOut`` variant (suffixes
in that order, e.g. ``BinaryGemmPackedOutNoBias``; the variant carries those flags), and int-list
and string attributes (BinaryConv's ``kernel_shape``, ``strides``, ``pads``, every op's
``activation``) become JSON strings; absent attributes get their defaults (e.g. BinaryConv's
``pad_value`` 0). These ops serve validation, not speed.

A malformed model never reaches ONNX Runtime: :func:`make_session` checks every ``ai.frugalrt``
node against its spec first (:func:`frugalrt.export.spec_check.check_model`). An exception that
escapes a Python custom op would abort the whole process (onnxruntime-extensions rethrows it as a
C++ exception nothing catches), so the ops never raise: they check their actual inputs with the
same spec check, record what fails and return an empty tensor; the session's ``run`` then raises
the first failure as a :class:`frugalrt.errors.ArtifactError` naming the node (found by op type,
attributes and constant shapes: the ops themselves are not told their node's name).
"""
from __future__ import annotations

import json
import os
import threading
from typing import NamedTuple, Sequence, Union

import numpy as np
import onnx
import onnxruntime as ort
from onnx import defs, helper
from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

from frugalrt.errors import ArtifactError
from frugalrt.export import schemas, spec_check
from frugalrt.runtime.reference import ACTIVATION_DEFAULTS, DOMAIN, get_reference

ModelOrPath = Union[onnx.ModelProto, str, os.PathLike]
_F, _U8, _I, _S = PyCustomOpDef.dt_float, PyCustomOpDef.dt_uint8, PyCustomOpDef.dt_int64, PyCustomOpDef.dt_string
# op type -> (input types without the bias, attribute types)
_ACTIVATION = {"activation": _S, "activation_min": _F, "activation_max": _F}  # every op's fused activation
_SIGNATURES = {
    "Butterfly": ([_F, _F], {"out_features": _I, **_ACTIVATION}),
    "BinaryGemm": ([_F, _U8, _F], {"in_features": _I, **_ACTIVATION}),
    "BinaryConv": ([_F, _U8, _F], {"in_channels": _I, "kernel_shape": _S, "strides": _S, "pads": _S,
                                   "pad_value": _I, **_ACTIVATION}),
}
# attributes without a schema default (so that exported files carry none), and their value when absent
_DEFAULTS = {**ACTIVATION_DEFAULTS, "pad_value": 0}
NO_BIAS = "NoBias"
PACKED_IN, PACKED_OUT = "PackedIn", "PackedOut"
_VARIANTS: dict[str, str] = {}  # custom op type of every declared variant -> the ai.frugalrt op it runs
_FAILED = threading.local()  # .errors: [_Failure] the custom ops hit in the current run() on this thread


class _Failure(NamedTuple):
    op_type: str
    attrs: dict
    shapes: tuple  # shapes of the inputs after X (the node's constants)
    problem: str


def _variant(op_type: str, with_bias: bool, input_packed: bool = False, output_packed: bool = False) -> str:
    """Custom op type of ``op_type`` with these input/output types and inputs (module docstring)."""
    return (op_type + (PACKED_IN if input_packed else "") + (PACKED_OUT if output_packed else "")
            + ("" if with_bias else NO_BIAS))


def _declare(op_type: str, with_bias: bool, input_packed: bool = False, output_packed: bool = False) -> None:
    inputs, attrs = _SIGNATURES[op_type]
    inputs = [_U8 if input_packed else _F, *inputs[1:]]
    out = (_U8, np.uint8) if output_packed else (_F, np.float32)
    kernel = get_reference(op_type)
    names = [p.name for p in schemas.SCHEMAS[op_type][0].inputs][:len(inputs) + with_bias]
    # the variant carries the packing flags (they are not attributes of the session's node)
    flags = {"input_packed": int(input_packed), "output_packed": int(output_packed)} \
        if op_type in spec_check.PACKABLE else {}

    def body(*arrays, **attributes):
        kwargs = {}
        try:
            kwargs = {k: json.loads(v) if attrs[k] == _S else v for k, v in attributes.items()}
            problem = spec_check.node_problem(op_type, {**kwargs, **flags}, dict(zip(names, arrays)))
            if problem is None:
                return kernel(*arrays, *(() if with_bias else (None,)), **kwargs, **flags)
        except Exception as e:  # noqa: BLE001  (raising here would abort the process: see the module docstring)
            text = str(e).strip()
            problem = f"the reference kernel fails: {type(e).__name__}: {text.splitlines()[0] if text else ''}"
        failure = _Failure(op_type, kwargs, tuple(tuple(a.shape) for a in arrays[1:]), problem)
        if getattr(_FAILED, "errors", None) is None:
            _FAILED.errors = []
        _FAILED.errors.append(failure)
        return np.zeros(0, out[1])

    name = _variant(op_type, with_bias, input_packed, output_packed)
    _VARIANTS[name] = op_type
    onnx_op(op_type=f"{DOMAIN}::{name}", inputs=inputs + ([_F] if with_bias else []), outputs=[out[0]],
            attrs=attrs)(body)


def _declare_all() -> None:
    for op_type in _SIGNATURES:
        packable = op_type in spec_check.PACKABLE
        packings = [(i, o) for i in (False, True) for o in (False, True)] if packable else [(False, False)]
        for with_bias in (True, False):
            for packing in packings:
                _declare(op_type, with_bias, *packing)


_declare_all()


def session_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` rewritten for the Python custom ops (see the module docstring)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        if node.op_type not in _SIGNATURES:
            raise onnx.checker.ValidationError(f"ONNX Runtime check: no custom op for {DOMAIN}::{node.op_type}")
        inputs, attr_types = _SIGNATURES[node.op_type]
        schema = defs.get_schema(node.op_type, schemas.VERSION, DOMAIN)
        given = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        with_bias = len(node.input) > len(inputs) and bool(node.input[len(inputs)])
        del node.input[len(inputs) + with_bias:]
        node.op_type = _variant(node.op_type, with_bias, bool(given.get("input_packed")),
                                bool(given.get("output_packed")))
        del node.attribute[:]
        for name, kind in attr_types.items():
            value = given.get(name, _DEFAULTS.get(name))
            if value is None:
                value = helper.get_attribute_value(schema.attributes[name].default_value)
            if kind == _S:  # int lists and strings travel as JSON
                value = value.decode() if isinstance(value, bytes) else value
                value = json.dumps(value if isinstance(value, str) else list(value))
            node.attribute.append(helper.make_attribute(name, value))
    return model


class Session(ort.InferenceSession):
    """An ``InferenceSession`` whose ``run`` raises what the ``ai.frugalrt`` custom ops hit (one
    :class:`ArtifactError` naming the node) instead of returning their placeholder outputs."""

    frugal_nodes: Sequence[tuple] = ()  # (name, op_type, attributes as the custom ops get them, constant shapes)

    def run(self, output_names, input_feed, run_options=None):
        _FAILED.errors = []
        try:
            outputs = super().run(output_names, input_feed, run_options)
        except Exception as e:
            if _FAILED.errors:  # a later op choked on the placeholder: the custom op's failure is the cause
                raise self._error(_FAILED.errors[0]) from e
            raise
        finally:
            errors, _FAILED.errors = _FAILED.errors, []
        if errors:
            raise self._error(errors[0])
        return outputs

    def _error(self, failure: _Failure) -> ArtifactError:
        names = [name for name, op_type, attrs, shapes in self.frugal_nodes
                 if op_type == failure.op_type and attrs == failure.attrs
                 and all(s is None or s == f for s, f in zip(shapes, failure.shapes))]
        label = names[0] if len(names) == 1 else "one of " + ", ".join(names) if names else "?"
        return ArtifactError(f"node {label} ({failure.op_type}): {failure.problem}")


def _frugal_nodes(model: onnx.ModelProto) -> list:
    """(name, op_type, attributes, constant input shapes) of each custom node of a session model."""
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    nodes = []
    for index, node in enumerate(model.graph.node):
        if node.domain == DOMAIN:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            attrs = {k: json.loads(v) if isinstance(v, bytes) else v for k, v in attrs.items()}
            nodes.append((node.name or f"#{index}", _VARIANTS[node.op_type], attrs,
                          tuple(dims.get(name) for name in node.input[1:])))
    return nodes


def make_session(model_or_path: ModelOrPath) -> Session:
    """An ONNX Runtime CPU session that runs standard ops natively and ``ai.frugalrt`` ops through
    the numpy reference kernels. Raises :class:`ArtifactError` (one line naming the node, input,
    expected and found) for a model whose ``ai.frugalrt`` nodes break their spec or hold NaN/Inf."""
    if isinstance(model_or_path, onnx.ModelProto):
        model = model_or_path
    else:
        try:
            model = onnx.load(os.fspath(model_or_path))
        except Exception as e:  # noqa: BLE001  (missing file, truncated or not protobuf)
            raise ArtifactError(f"cannot read ONNX model {model_or_path}: {e}") from e
    spec_check.check_model(model, error=ArtifactError)
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    options.log_severity_level = 3
    rewritten = session_model(model)
    session = Session(rewritten.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.frugal_nodes = _frugal_nodes(rewritten)
    return session


def run(model_or_path: ModelOrPath | ort.InferenceSession, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Outputs of the model on ``inputs`` (graph inputs in order)."""
    session = model_or_path if isinstance(model_or_path, ort.InferenceSession) else make_session(model_or_path)
    feeds = {i.name: np.asarray(x, dtype=_NUMPY.get(i.type, np.float32)) for i, x in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


_NUMPY = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8}  # graph input types run() feeds

