"""ONNX Runtime with the ai.frugalrt Python custom ops, on hand-built models (no exporter involved)."""
import numpy as np
import onnx
import pytest
from onnx import helper

from frugalrt.export.schemas import SCHEMAS
from frugalrt.export.single_op import single_op_model
from frugalrt.runtime.ort import make_session, run, session_model
from frugalrt.runtime.reference import get_reference, pack_bits
from frugalrt.runtime.validate import ATOL, compare

rng = np.random.default_rng(0)


def _named(op, consts):
    """Constants given in schema order (None = omitted optional input), keyed by schema input name."""
    return {p.name: c for p, c in zip(SCHEMAS[op][0].inputs[1:], consts) if c is not None}


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
    model = single_op_model(op, list(x.shape[1:]), _named(op, consts), attrs)
    onnx.checker.check_model(model, full_check=True)
    (got,) = run(model, [x])
    np.testing.assert_array_equal(got, want)
    (got1,) = run(make_session(model), [x[:1]])  # dynamic batch
    np.testing.assert_array_equal(got1, want[:1])


def test_session_copy_rewrites_only_the_copy():
    model = single_op_model("BinaryConv", [3, 6, 7], {"W_packed": pack_bits(CW.reshape(4, -1)), "scale": _f32(4)},
                            dict(in_channels=3, kernel_shape=[3, 2]))
    before = model.SerializeToString()
    node = session_model(model).graph.node[0]
    assert model.SerializeToString() == before
    assert node.op_type == "BinaryConvNoBias" and len(node.input) == 3
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"in_channels": 3, "kernel_shape": b"[3, 2]", "strides": b"[1, 1]", "pads": b"[0, 0, 0, 0]"}


def test_export_check_reports_elementwise_errors_and_argmax():
    """The comparison `frugalrt export` prints (validate.compare, float mode, rtol 1e-5)."""
    want = np.array([[1.0, 2.0], [3.0, -4.0]], np.float32)
    got = want + np.array([[0.0, 0.5], [0.0, 0.0]], np.float32)
    a = compare("y", got, want, "float", rtol=1e-5, atol=ATOL)
    assert a.max_abs == 0.5 and a.max_rel == 0.5 / 2 and a.argmax_agreement == 1.0 and not a.passed
    b = compare("y", np.array([[1.0, 2.0], [-4.0, 3.0]], np.float32), want, "float", rtol=1e-5, atol=ATOL)
    assert b.argmax_agreement == 0.5 and not b.passed
    assert compare("y", want, want, "float", rtol=1e-5, atol=ATOL).passed
    assert not compare("y", want * (1 + 3e-5), want, "float", rtol=1e-5, atol=ATOL).passed
