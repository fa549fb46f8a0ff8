"""Packed activations between binary ops (docs/ops.md, "Packed activations"): the reference kernels
against torch, the schemas and spec check, the ONNX Runtime path and the rewrite
(frugalrt.export.fold.pack_between_binary), bit for bit."""
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import frugalrt
from frugalrt.errors import ArtifactError, FrugalError
from frugalrt.export import spec_check
from frugalrt.export.fold import optimize_graph, pack_between_binary
from frugalrt.export.single_op import chain_model
from frugalrt.runtime import reference as ref
from frugalrt.runtime.ort import run

DOMAIN = "ai.frugalrt"
RNG = np.random.default_rng(7)
ACTIVATIONS = {"none": {}, "relu": {"activation": "relu"},
               "clip": {"activation": "clip", "activation_min": -0.3, "activation_max": 0.7}}


def _pack(negative: np.ndarray) -> np.ndarray:
    """Independent packing along the last axis: bit k % 8 of byte k // 8, set = negative."""
    n = negative.shape[-1]
    padded = np.zeros((*negative.shape[:-1], -(-n // 8) * 8), np.uint8)
    padded[..., :n] = negative
    return (padded.reshape(*negative.shape[:-1], -1, 8) << np.arange(8, dtype=np.uint8)).sum(-1).astype(np.uint8)


def _params(n: int, odd_k: bool = True):
    """scale with negative and zero entries, bias; channels 1, 2 hit Y == 0 exactly at some S
    (S odd for odd K): 0.5 * 1 - 0.5 and -0.25 * 3 + 0.75."""
    scale = RNG.standard_normal(n).astype(np.float32)
    bias = RNG.standard_normal(n).astype(np.float32)
    scale[0], scale[1], bias[1], scale[2], bias[2] = 0.0, 0.5, -0.5, -0.25, 0.75
    return scale, bias


def _torch_out(s: torch.Tensor, scale, bias, act: dict, packed: bool, channel_dim: int) -> np.ndarray:
    """torch's float result (S * scale + B, then the activation), packed along channels if asked."""
    shape = [1] * s.dim()
    shape[channel_dim] = -1
    y = s * torch.from_numpy(scale).reshape(shape) + torch.from_numpy(bias).reshape(shape)
    if act.get("activation") == "relu":
        y = torch.relu(y)
    elif act.get("activation") == "clip":
        y = torch.clamp(y, act["activation_min"], act["activation_max"])
    y = y.numpy()
    return _pack(np.moveaxis(y, channel_dim, -1) < 0) if packed else y


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("packed_in,packed_out", [(0, 1), (1, 0), (1, 1)])
def test_reference_binary_gemm_packed_matches_torch(packed_in, packed_out, act):
    k, n, batch = 77, 13, 4
    signs = np.where(RNG.random((batch, k)) < 0.5, -1.0, 1.0).astype(np.float32)
    w = RNG.standard_normal((n, k)).astype(np.float32)
    scale, bias = _params(n)
    x = _pack(signs < 0) if packed_in else signs * RNG.random((batch, k)).astype(np.float32)
    got = ref.binary_gemm(x, _pack(w < 0), scale, bias, in_features=k, input_packed=packed_in,
                          output_packed=packed_out, **ACTIVATIONS[act])
    s = F.linear(torch.from_numpy(signs), torch.from_numpy(np.sign(w)))
    want = _torch_out(s, scale, bias, ACTIVATIONS[act], packed_out, 1)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("packed_in,packed_out", [(0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("strides,pads", [([1, 1], [1, 1, 1, 1]), ([2, 1], [1, 0, 2, 1])])
@pytest.mark.parametrize("pad_value", [0, 1])
def test_reference_binary_conv_packed_matches_torch(packed_in, packed_out, act, strides, pads, pad_value):
    c, o, (h, wd), (kh, kw), batch = 11, 10, (7, 6), (3, 2), 2
    signs = np.where(RNG.random((batch, c, h, wd)) < 0.5, -1.0, 1.0).astype(np.float32)
    w = RNG.standard_normal((o, c, kh, kw)).astype(np.float32)
    scale, bias = _params(o)
    x = _pack(signs.transpose(0, 2, 3, 1) < 0) if packed_in else signs
    got = ref.binary_conv(x, _pack(w.reshape(o, -1) < 0), scale, bias, in_channels=c, kernel_shape=[kh, kw],
                          strides=strides, pads=pads, input_packed=packed_in, output_packed=packed_out,
                          pad_value=pad_value, **ACTIVATIONS[act])
    # zeros contribute 0, ones (pad_value = 1) read +1
    padded = F.pad(torch.from_numpy(signs), (pads[1], pads[3], pads[0], pads[2]), value=float(pad_value))
    s = F.conv2d(padded, torch.from_numpy(np.sign(w)), stride=strides)
    want = _torch_out(s, scale, bias, ACTIVATIONS[act], packed_out, 1)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_reference_ignores_pad_bits_of_a_packed_x():
    k, n = 13, 5
    x = _pack(RNG.random((3, k)) < 0.5)
    dirty = x.copy()
    dirty[:, -1] |= 0xE0  # bits 13..15, past K
    args = (_pack(RNG.random((n, k)) < 0.5), np.ones(n, np.float32))
    np.testing.assert_array_equal(ref.binary_gemm(dirty, *args, in_features=k, input_packed=1),
                                  ref.binary_gemm(x, *args, in_features=k, input_packed=1))


# --- schemas and spec check ------------------------------------------------------------------------

def _node_model(op_type: str, x_type: int, x_dims: list, consts: dict, attrs: dict):
    node = helper.make_node(op_type, ["X", *consts], ["Y"], domain=DOMAIN, name="n0", **attrs)
    y_type = TensorProto.UINT8 if attrs.get("output_packed") == 1 else TensorProto.FLOAT
    graph = helper.make_graph([node], "m", [helper.make_tensor_value_info("X", x_type, ["batch", *x_dims])],
                              [helper.make_tensor_value_info("Y", y_type, None)],
                              [numpy_helper.from_array(v, name) for name, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])


def _conv_consts(c, o, kh, kw):
    return {"W_packed": _pack(RNG.random((o, c * kh * kw)) < 0.5), "scale": RNG.standard_normal(o).astype(np.float32)}


def test_shape_inference_gives_the_packed_layouts():
    model = _node_model("BinaryConv", TensorProto.UINT8, [7, 6, 2], _conv_consts(11, 10, 3, 2),
                        dict(in_channels=11, kernel_shape=[3, 2], strides=[2, 1], pads=[1, 0, 2, 1],
                             input_packed=1, output_packed=1))
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    y = inferred.graph.output[0].type.tensor_type
    assert y.elem_type == TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in y.shape.dim] == ["batch", 4, 6, 2]
    gemm = _node_model("BinaryGemm", TensorProto.FLOAT, [77], {"W_packed": _pack(RNG.random((13, 77)) < 0.5),
                                                                "scale": np.ones(13, np.float32)},
                       dict(in_features=77, output_packed=1))
    y = onnx.shape_inference.infer_shapes(gemm, strict_mode=True).graph.output[0].type.tensor_type
    assert y.elem_type == TensorProto.UINT8 and [d.dim_param or d.dim_value for d in y.shape.dim] == ["batch", 2]


@pytest.mark.parametrize("x_type,x_dims,attrs,message", [
    (TensorProto.FLOAT, [77], dict(input_packed=1),
     "node n0 (BinaryGemm): input X has dtype float32, expected uint8 (packed signs, attribute input_packed = 1)"),
    (TensorProto.UINT8, [77], dict(input_packed=1),
     "node n0 (BinaryGemm): input X has width 77, expected 10 (ceil(K / 8) bytes of packed signs, "
     "in_features = 77, input_packed = 1)"),
    (TensorProto.UINT8, [10], {},
     "node n0 (BinaryGemm): input X has dtype uint8, expected float32 (input_packed absent or 0)"),
    (TensorProto.FLOAT, [77], dict(output_packed=2), "node n0 (BinaryGemm): attribute output_packed is 2, "
     "expected 0 or 1"),
])
def test_spec_check_names_node_input_expected_and_found(x_type, x_dims, attrs, message):
    consts = {"W_packed": _pack(RNG.random((13, 77)) < 0.5), "scale": np.ones(13, np.float32)}
    model = _node_model("BinaryGemm", x_type, x_dims, consts, dict(in_features=77, **attrs))
    with pytest.raises(ArtifactError) as e:
        spec_check.check_model(model)
    assert str(e.value) == message
    with pytest.raises(onnx.shape_inference.InferenceError) as e:  # the schema's shape inference: same rule
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    assert message.split(": ", 1)[1] in str(e.value)


def test_spec_check_packed_conv_layout():
    with pytest.raises(FrugalError, match=r"input X has shape \[\?, 7, 6, 11\], expected \[batch, H, W, 2\] "
                                          r"\(packed signs, in_channels = 11, input_packed = 1\)"):
        spec_check.check_node("BinaryConv", spec_check.attributes("BinaryConv", dict(
            in_channels=11, kernel_shape=[3, 2], input_packed=1)), {"X": [None, 7, 6, 11], **_conv_consts(11, 4, 3, 2)})


# --- ONNX Runtime ----------------------------------------------------------------------------------

@pytest.mark.parametrize("packed_in,packed_out", [(0, 1), (1, 0), (1, 1)])
@pytest.mark.parametrize("bias,pad_value", [(True, 0), (False, 0), (True, 1)])
def test_ort_runs_the_packed_variants_like_the_reference(packed_in, packed_out, bias, pad_value):
    c, o = 11, 10
    consts = {**_conv_consts(c, o, 3, 2), **({"B": RNG.standard_normal(o).astype(np.float32)} if bias else {})}
    attrs = dict(in_channels=c, kernel_shape=[3, 2], strides=[2, 1], pads=[1, 0, 2, 1], pad_value=pad_value,
                 input_packed=packed_in, output_packed=packed_out, **ACTIVATIONS["clip"])
    x = (_pack(RNG.random((3, 7, 6, c)) < 0.5) if packed_in
         else RNG.standard_normal((3, c, 7, 6)).astype(np.float32))
    model = _node_model("BinaryConv", TensorProto.UINT8 if packed_in else TensorProto.FLOAT,
                        list(x.shape[1:]), consts, attrs)
    (got,) = run(model, [x])
    want = ref.binary_conv(x, consts["W_packed"], consts["scale"], consts.get("B"), **attrs)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


# --- the rewrite -----------------------------------------------------------------------------------

def _gemm_layer(k, n, act):
    scale, bias = _params(n)
    return (dict(in_features=k, **ACTIVATIONS[act]),
            {"W_packed": _pack(RNG.random((n, k)) < 0.5), "scale": scale, "B": bias})


def _conv_layer(c, o, kernel, strides, pads, act):
    scale, bias = _params(o)
    return (dict(in_channels=c, kernel_shape=kernel, strides=strides, pads=pads, **ACTIVATIONS[act]),
            {"W_packed": _pack(RNG.random((o, c * kernel[0] * kernel[1])) < 0.5), "scale": scale, "B": bias})


def gemm_chain() -> onnx.ModelProto:
    return chain_model("BinaryGemm", [77], [_gemm_layer(77, 45, "clip"), _gemm_layer(45, 13, "none"),
                                       _gemm_layer(13, 9, "relu")])


def conv_chain() -> onnx.ModelProto:
    return chain_model("BinaryConv", [3, 9, 8], [_conv_layer(3, 11, [3, 3], [1, 1], [1, 1, 1, 1], "clip"),
                                            _conv_layer(11, 37, [3, 2], [2, 1], [1, 0, 2, 1], "none"),
                                            _conv_layer(37, 5, [2, 2], [1, 1], [0, 0, 0, 0], "relu")])


def _packed(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy, pack_between_binary(copy)


@pytest.mark.parametrize("make,x_shape", [(gemm_chain, (5, 77)), (conv_chain, (3, 3, 9, 8))])
def test_rewrite_packs_between_binary_ops_bit_for_bit(make, x_shape):
    model = make()
    packed, count = _packed(model)
    assert count == 2
    flags = [{a.name: a.i for a in n.attribute if a.name.endswith("_packed")} for n in packed.graph.node]
    assert flags == [{"output_packed": 1}, {"input_packed": 1, "output_packed": 1}, {"input_packed": 1}]
    types = {v.name: v.type.tensor_type.elem_type for v in packed.graph.value_info}
    assert types == {"y0": TensorProto.UINT8, "y1": TensorProto.UINT8}
    onnx.checker.check_model(packed, full_check=True)
    assert pack_between_binary(packed) == 0  # idempotent
    x = RNG.standard_normal(x_shape).astype(np.float32)
    x.flat[::7] = 0.0  # sign(0) = +1
    np.testing.assert_array_equal(run(packed, [x])[0], run(model, [x])[0])


def test_rewrite_leaves_values_read_otherwise():
    """y0 is also a graph output; y1 is also read by a Relu: neither is packed."""
    model = gemm_chain()
    graph = model.graph
    graph.output.append(helper.make_tensor_value_info("y0", TensorProto.FLOAT, None))
    graph.node.append(helper.make_node("Relu", ["y1"], ["r"]))
    graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    assert _packed(model)[1] == 0


def test_optimize_graph_packs_an_exported_binary_net_only_when_asked(tmp_path, binary_net):
    """Exported torch net: BinaryConv2d, BN, Hardtanh, BinaryConv2d, BN, Hardtanh, Flatten,
    BinaryLinear, BN, Hardtanh, BinaryLinear: after folding, conv -> conv and linear -> linear pack."""
    net = binary_net(3, 12, 9, 3 * 3, 21, seed=0)
    x = torch.randn(4, 3, 8, 8)
    model = frugalrt.export(net, (x,), tmp_path / "net.onnx", fold_bn=False)
    plain, packed = onnx.ModelProto(), onnx.ModelProto()
    plain.CopyFrom(model)
    packed.CopyFrom(model)
    assert optimize_graph(plain).packed == 0
    assert optimize_graph(packed, pack_bits=True).packed == 2
    onnx.checker.check_model(packed, full_check=True)
    np.testing.assert_array_equal(run(packed, [x.numpy()])[0], run(plain, [x.numpy()])[0])


def test_export_packs_between_binary_layers_and_portable_export_still_works(tmp_path, binary_net):
    """frugalrt.export detects the pattern (rewrites 2, 3 and 5 of docs/ops.md): conv -> conv and
    linear -> linear pass packed sign bits, bit-identical in ONNX Runtime to the float file; the
    portable export (standard ops) keeps float activations and still matches PyTorch."""
    net = binary_net(3, 12, 9, 3 * 3, 21, seed=1)
    x = torch.randn(4, 3, 8, 8)
    packed = frugalrt.export(net, (x,), tmp_path / "packed.onnx")
    plain = frugalrt.export(net, (x,), tmp_path / "float.onnx", pack_activations=False)
    flags = [(n.op_type, {a.name: a.i for a in n.attribute if a.name.endswith("_packed")})
             for n in packed.graph.node if n.domain == ref.DOMAIN]
    assert flags == [("BinaryConv", {"output_packed": 1}), ("BinaryConv", {"input_packed": 1}),
                     ("BinaryGemm", {"output_packed": 1}), ("BinaryGemm", {"input_packed": 1})]
    assert not any(a.name.endswith("_packed") for n in plain.graph.node for a in n.attribute)
    np.testing.assert_array_equal(run(tmp_path / "packed.onnx", [x.numpy()])[0],
                                  run(tmp_path / "float.onnx", [x.numpy()])[0])
    portable = frugalrt.export(net, (x,), tmp_path / "portable.onnx", portable=True)
    assert {n.domain for n in portable.graph.node} <= {"", "ai.onnx"}
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(run(tmp_path / "portable.onnx", [x.numpy()])[0], want, rtol=1e-5, atol=1e-5)
