"""ONNX Runtime with the ai.frugalrt Python custom ops, on hand-built models (no exporter involved)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from frugalrt.runtime.ort import compare, make_session, run, session_model
from frugalrt.runtime.reference import get_reference, pack_bits

rng = np.random.default_rng(0)


def _model(op, x_shape, y_shape, consts, **attrs):
    """One ai.frugalrt node whose non-X inputs are initializers (None = omitted optional input)."""
    names = [f"c{i}" for i, c in enumerate(consts) if c is not None]
    node = helper.make_node(op, ["x", *names], ["y"], domain="ai.frugalrt", **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(c, n) for n, c in zip(names, [c for c in consts if c is not None])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.frugalrt", 1)])


def _f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


W = _f32(9, 13)
CW = _f32(4, 3, 3, 2)
# (name, op, x, constants, attributes given, attributes the reference kernel gets)
ROWS = [
    ("butterfly with bias", "Butterfly", _f32(5, 20), [_f32(5, 16, 2, 2), _f32(13)], {"out_features": 13}, None),
    ("butterfly no bias", "Butterfly", _f32(5, 20), [_f32(5, 16, 2, 2)], {"out_features": 13}, None),
    ("gemm with bias", "BinaryGemm", _f32(5, 13), [pack_bits(W), np.abs(W).mean(1), _f32(9)], {"in_features": 13}, None),
    ("gemm no bias", "BinaryGemm", _f32(5, 13), [pack_bits(W), np.abs(W).mean(1)], {"in_features": 13}, None),
    ("conv all attributes", "BinaryConv", _f32(2, 3, 6, 7), [pack_bits(CW.reshape(4, -1)), _f32(4), _f32(4)],
     dict(in_channels=3, kernel_shape=[3, 2], strides=[2, 1], pads=[1, 0, 2, 1]), None),
    ("conv schema defaults", "BinaryConv", _f32(2, 3, 6, 7), [pack_bits(CW.reshape(4, -1)), _f32(4)],
     dict(in_channels=3, kernel_shape=[3, 2]), dict(in_channels=3, kernel_shape=[3, 2], strides=[1, 1], pads=[0] * 4)),
]


@pytest.mark.parametrize("name,op,x,consts,attrs,kernel_attrs", ROWS, ids=[r[0] for r in ROWS])
def test_custom_op_runs_the_reference_kernel(name, op, x, consts, attrs, kernel_attrs):
    consts = list(consts) + [None] * (3 - len(consts) if op != "Butterfly" else 2 - len(consts))
    want = get_reference(op)(x, *consts, **(kernel_attrs or attrs))
    model = _model(op, ["batch", *x.shape[1:]], ["batch"] + [None] * (want.ndim - 1), consts, **attrs)
    onnx.checker.check_model(model, full_check=True)
    (got,) = run(model, [x])
    np.testing.assert_array_equal(got, want)
    (got1,) = run(make_session(model), [x[:1]])  # dynamic batch
    np.testing.assert_array_equal(got1, want[:1])


def test_session_copy_rewrites_only_the_copy():
    model = _model("BinaryConv", ["b", 3, 6, 7], ["b", 4, 4, 6], [pack_bits(CW.reshape(4, -1)), _f32(4), None],
                   in_channels=3, kernel_shape=[3, 2])
    before = model.SerializeToString()
    node = session_model(model).graph.node[0]
    assert model.SerializeToString() == before
    assert node.op_type == "BinaryConvNoBias" and len(node.input) == 3
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"in_channels": 3, "kernel_shape": b"[3, 2]", "strides": b"[1, 1]", "pads": b"[0, 0, 0, 0]"}


def test_compare_reports_errors_and_argmax():
    want = np.array([[1.0, 2.0], [3.0, -4.0]], np.float32)
    got = want + np.array([[0.0, 0.5], [0.0, 0.0]], np.float32)
    (a,) = compare([got], [want])
    assert a.max_abs == 0.5 and a.max_rel == 0.5 / 4 and a.argmax_agreement == 1.0 and not a.passed()
    (b,) = compare([np.array([[1.0, 2.0], [-4.0, 3.0]], np.float32)], [want])
    assert b.argmax_agreement == 0.5
    assert compare([want], [want])[0].passed()
