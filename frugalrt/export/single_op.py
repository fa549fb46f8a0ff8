"""One-node (and one-op chain) ``ai.frugalrt`` ONNX models: the units that op tests, kernels and
benchmarks compile and run.

Built by hand (no PyTorch) so that a test of one op depends on the schema alone, not on the exporter.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from frugalrt.export.schemas import SCHEMAS, VERSION
from frugalrt.runtime.reference import DOMAIN


def single_op_model(op_type: str, x_dims: list, consts: dict[str, np.ndarray], attrs: dict,
                    opset: int = 18) -> onnx.ModelProto:
    """``Y = op_type(X, *consts)`` with X of shape ``["batch", *x_dims]`` (symbolic batch).

    ``consts`` become initializers named after the schema's inputs (``twiddles``, ``W_packed``,
    ``scale``, ``B``); an optional input left out of ``consts`` is omitted from the node. Y's shape
    is the schema's inferred one. X and Y are float32, or uint8 packed signs where ``attrs`` say
    ``input_packed`` / ``output_packed`` (docs/ops.md). The model passes
    ``onnx.checker.check_model(full_check=True)``.
    """
    params = [p.name for p in SCHEMAS[op_type][0].inputs[1:]]
    unknown = set(consts) - set(params)
    if unknown:
        raise ValueError(f"{DOMAIN}::{op_type} has no input(s) {sorted(unknown)}; its inputs: X, {params}")
    names = [p if p in consts else "" for p in params]
    while names and not names[-1]:  # trailing optional inputs are dropped, inner ones stay as ""
        names.pop()
    node = helper.make_node(op_type, ["X", *names], ["Y"], domain=DOMAIN, **attrs)
    graph = helper.make_graph(
        [node], op_type, [helper.make_tensor_value_info("X", _elem_type(attrs, "input_packed"), ["batch", *x_dims])],
        [helper.make_tensor_value_info("Y", _elem_type(attrs, "output_packed"), None)],
        [numpy_helper.from_array(np.asarray(consts[n]), n) for n in names if n])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(DOMAIN, VERSION)])
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def _elem_type(attrs: dict, packed: str) -> int:
    return TensorProto.UINT8 if attrs.get(packed) else TensorProto.FLOAT


def chain_model(op_type: str, x_dims: list, layers: list[tuple[dict, dict[str, np.ndarray]]],
                opset: int = 18) -> onnx.ModelProto:
    """``X -> op_type -> op_type -> ...``: node ``n<i>`` of layer ``i`` = (attributes, constants by
    schema input name, given in input order; initializers named ``<input><i>``), output ``y<i>``."""
    nodes, inits, x = [], [], "X"
    for i, (attrs, consts) in enumerate(layers):
        inits += [numpy_helper.from_array(np.asarray(v), f"{name}{i}") for name, v in consts.items()]
        nodes.append(helper.make_node(op_type, [x, *(f"{n}{i}" for n in consts)], [f"y{i}"], domain=DOMAIN,
                                      name=f"n{i}", **attrs))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", *x_dims])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(DOMAIN, VERSION)])
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
