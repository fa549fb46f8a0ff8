"""ONNX Runtime with the ai.frugalrt Python custom ops, on hand-built models (no exporter involved)."""
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper

from frugalrt.export.schemas import SCHEMAS
from frugalrt.export.single_op import single_op_model
from frugalrt.nn import BinaryConv2d, BinaryLinear, ButterflyLinear
from frugalrt.runtime.ort import make_session, run, session_model
from frugalrt.runtime.reference import pack_bits
from frugalrt.runtime.validate import ATOL, compare

rng = np.random.default_rng(0)


def _named(op, consts):
    """Constants given in schema order (None = omitted optional input), keyed by schema input name."""
    return {p.name: c for p, c in zip(SCHEMAS[op][0].inputs[1:], consts) if c is not None}


def _f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def _np(t):
    return None if t is None else t.detach().numpy()


def _butterfly(bias):
    layer = ButterflyLinear(20, 13, bias=bias)
    return [_np(layer.twiddles), _np(layer.bias)], layer


def _binary(layer):
    """The layer's ONNX constants: packed sign bits, XNOR-Net scale, bias (as the exporter writes them)."""
    return [pack_bits(_np(layer.weight).reshape(layer.weight.shape[0], -1)), _np(layer.weight_scale()),
            _np(layer.bias)], layer


def _asymmetric_conv(pad_value=0):
    """BinaryConv2d pads symmetrically: the oracle is its float twin, conv2d on signs padded (1, 0, 2, 1)
    with pad_value."""
    w, scale, b = _f32(4, 3, 3, 2), _f32(4), _f32(4)
    signs = lambda t: torch.where(t >= 0, 1.0, -1.0)  # noqa: E731
    oracle = lambda x: (F.conv2d(F.pad(signs(x), (0, 1, 1, 2), value=float(pad_value)),  # noqa: E731
                                 signs(torch.from_numpy(w)), stride=(2, 1))
                        * torch.from_numpy(scale).reshape(1, -1, 1, 1) + torch.from_numpy(b).reshape(1, -1, 1, 1))
    return [pack_bits(w.reshape(4, -1)), scale, b], oracle


CONV = dict(in_channels=3, kernel_shape=[3, 2])
X_GEMM = _f32(5, 13)
X_GEMM[0, :3] = 0.0  # sign(0) = +1
# (name, op, x, () -> (constants in schema order, PyTorch oracle), attributes, exact)
ROWS = [
    ("butterfly with bias", "Butterfly", _f32(5, 20), lambda: _butterfly(True), {"out_features": 13}, False),
    ("butterfly no bias", "Butterfly", _f32(5, 20), lambda: _butterfly(False), {"out_features": 13}, False),
    ("gemm with bias", "BinaryGemm", X_GEMM, lambda: _binary(BinaryLinear(13, 9)), {"in_features": 13}, True),
    ("gemm no bias", "BinaryGemm", _f32(5, 13), lambda: _binary(BinaryLinear(13, 9, bias=False)),
     {"in_features": 13}, True),
    ("conv asymmetric pads", "BinaryConv", _f32(2, 3, 6, 7), _asymmetric_conv,
     dict(CONV, strides=[2, 1], pads=[1, 0, 2, 1]), True),
    ("conv stride and pads", "BinaryConv", _f32(2, 3, 6, 7),
     lambda: _binary(BinaryConv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), bias=False)),
     dict(CONV, strides=[2, 1], pads=[1, 0, 1, 0]), True),
    ("conv schema defaults", "BinaryConv", _f32(2, 3, 6, 7), lambda: _binary(BinaryConv2d(3, 4, (3, 2))), CONV, True),
    ("conv one-padding asymmetric pads", "BinaryConv", _f32(2, 3, 6, 7), lambda: _asymmetric_conv(1),
     dict(CONV, strides=[2, 1], pads=[1, 0, 2, 1], pad_value=1), True),
    ("conv one-padding layer, no bias", "BinaryConv", _f32(2, 65, 6, 7),
     lambda: _binary(BinaryConv2d(65, 4, (3, 2), stride=2, padding=(1, 2), bias=False, pad_value=1)),
     dict(in_channels=65, kernel_shape=[3, 2], strides=[2, 2], pads=[1, 2, 1, 2], pad_value=1), True),
]


@pytest.mark.parametrize("name,op,x,make,attrs,exact", ROWS, ids=[r[0] for r in ROWS])
def test_custom_op_matches_the_pytorch_layer(name, op, x, make, attrs, exact):
    """Oracle: the PyTorch layer (or its float twin on signs); binary ops are bit-identical by spec."""
    consts, torch_fn = make()
    with torch.no_grad():
        want = torch_fn(torch.from_numpy(x)).numpy()
    model = single_op_model(op, list(x.shape[1:]), _named(op, consts), attrs)
    onnx.checker.check_model(model, full_check=True)
    (got,) = run(model, [x])
    (got1,) = run(make_session(model), [x[:1]])  # dynamic batch
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(got, want, **tol)
    np.testing.assert_allclose(got1, want[:1], **tol)


def test_session_copy_rewrites_only_the_copy():
    model = single_op_model("BinaryConv", [3, 6, 7], {"W_packed": pack_bits(_f32(4, 18)), "scale": _f32(4)},
                            dict(in_channels=3, kernel_shape=[3, 2]))
    before = model.SerializeToString()
    node = session_model(model).graph.node[0]
    assert model.SerializeToString() == before
    assert node.op_type == "BinaryConvNoBias" and len(node.input) == 3
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"in_channels": 3, "kernel_shape": b"[3, 2]", "strides": b"[1, 1]", "pads": b"[0, 0, 0, 0]",
                     "pad_value": 0, "activation": b'""', "activation_min": -np.inf,
                     "activation_max": np.inf}  # defaults filled in


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
